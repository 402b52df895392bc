"""Evaluation metrics: CIDEr-D, Frechet distance, text-to-image and captioning scores, perplexity."""
