"""model.image_mode "discrete", the Chameleon baseline: an image is `BOI, h*w code tokens, EOI` in the text stream.

Code c of the VQ tokenizer (autoencoder.kind "vq") is token id `code_offset + c`, past
the text vocabulary (model.vocab_size; BOI/EOI are the tokenizer's own specials), so
the model's vocabulary is text + codebook. Code positions are ordinary text positions
of tfx/record.py (modality TEXT, no patches): the mask is plain causal over them
(model.image_attention does not apply) and the LM loss learns them.
"""
MODES = ("continuous", "discrete")


def check(config) -> str:
  """model.image_mode, checked against the autoencoder (discrete needs a VQ tokenizer)."""
  mode = config.model.image_mode
  if mode not in MODES:
    raise ValueError(f"model.image_mode must be one of {MODES}, got {mode!r}")
  if mode == "discrete" and config.autoencoder.kind != "vq":
    raise ValueError(f"model.image_mode='discrete' needs a VQ tokenizer (autoencoder.kind='vq' and "
                     f"autoencoder.path), not autoencoder.kind={config.autoencoder.kind!r}")
  return mode


def is_discrete(config) -> bool:
  return check(config) == "discrete"


def code_offset(config, tok=None) -> int:
  """Token id of code 0: the model's text vocabulary (model.vocab_size, or derived from the tokenizer)."""
  from tfx.data import tokenizer
  return tokenizer.model_vocab_size(config, tok)


def model_vocab(config) -> int:
  """Rows of the embedding and LM head: model.vocab_size (resolved), plus the codebook when discrete."""
  return config.model.vocab_size + (config.autoencoder.codebook_size if is_discrete(config) else 0)


def codes_per_image(config) -> int:
  """h * w: the code tokens of one image."""
  side = config.image.resolution // config.autoencoder.downsample
  return side * side
