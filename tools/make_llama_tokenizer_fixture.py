"""Builds tests/fixtures/llama_layout.model: a SentencePiece model laid out like Llama 2's.

Llama 2's tokenizer is a byte-fallback BPE model with unk=0, bos=1, eos=2 and no PAD,
BOI or EOI piece; tfx appends those three ids after the vocabulary. This one has the same
layout with 4,000 pieces (32,000 in Llama 2), so tfx derives 4,003 ids -> a 4,096-row
model vocabulary, exercising the padding, from a 62 KB file. Trained on text the repo
already has (Python's pydoc topics and the shapes captions), deterministically:

  python tools/make_llama_tokenizer_fixture.py [--out tests/fixtures/llama_layout.model]
"""
import argparse
import io
import pathlib

import numpy as np
import sentencepiece as spm

from tfx.data import shapes, text_corpus

PIECES = 4000


def train(pieces: int = PIECES) -> bytes:
  texts = [t for _, t in text_corpus.documents()]
  texts += shapes.grammar_captions(np.random.default_rng(0), 2000)
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=out, vocab_size=pieces, model_type="bpe",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,  # Llama 2's settings too
      allow_whitespace_only_pieces=True, character_coverage=0.99995, max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
  return out.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                           / "tests" / "fixtures" / "llama_layout.model"))
  args = parser.parse_args()
  proto = train()
  pathlib.Path(args.out).write_bytes(proto)
  sp = spm.SentencePieceProcessor(model_proto=proto)
  print(f"wrote {args.out}: {len(proto)} bytes, {sp.vocab_size()} pieces, "
        f"unk/bos/eos/pad = {sp.unk_id()}/{sp.bos_id()}/{sp.eos_id()}/{sp.pad_id()}")


if __name__ == "__main__":
  main()
