"""The public face of generation (tfx/generation/): `Generator` and the helpers callers use."""
from tfx.generation.engine import Generator, PromptTooLongError
from tfx.generation.images import ImageReadError, image_grid, load_image, to_uint8
from tfx.generation.prompts import concat_pieces, left_pad
from tfx.generation.sampling import check_sampling, sample_tokens

__all__ = ["Generator", "ImageReadError", "PromptTooLongError", "check_sampling", "concat_pieces", "image_grid",
           "left_pad", "load_image", "sample_tokens", "to_uint8"]
