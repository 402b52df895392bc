"""SentencePiece tokenizer with the special ids Transfusion needs (PAD, BOS, EOS, BOI, EOI).

`train_model(texts, vocab_size)` makes a small model (PAD=0, UNK=1, BOS=2, EOS=3,
<boi>=4, <eoi>=5). Any other .model (e.g. Llama 2's) loads by path: missing
specials get fresh ids after its vocabulary.
"""
import io
from typing import Iterable

import sentencepiece as spm

BOI_PIECE = "<boi>"
EOI_PIECE = "<eoi>"
PAD_PIECE = "<pad>"


class Tokenizer:
  """Text <-> ids. Picklable (carries the serialized model), so Grain workers can use it."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    n = self._sp.vocab_size()
    extra = 0

    def special(piece: str, builtin: int) -> int:
      nonlocal extra
      if builtin >= 0:
        return builtin
      pid = self._sp.piece_to_id(piece)
      if pid != self._sp.unk_id() and self._sp.id_to_piece(pid) == piece:
        return pid
      extra += 1
      return n + extra - 1

    self.pad_id = special(PAD_PIECE, self._sp.pad_id())
    self.bos_id = special("<s>", self._sp.bos_id())
    self.eos_id = special("</s>", self._sp.eos_id())
    self.boi_id = special(BOI_PIECE, -1)
    self.eoi_id = special(EOI_PIECE, -1)
    self.vocab_size = n + extra
    self._sp_size = n

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS/EOS."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special and out-of-model ids are dropped."""
    specials = {self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in specials and 0 <= int(i) < self._sp_size])

  def serialized(self) -> bytes:
    return self._proto

  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])


def from_file(path: str) -> Tokenizer:
  """Loads any SentencePiece .model file."""
  try:
    with open(path, "rb") as f:
      return Tokenizer(f.read())
  except OSError as e:
    raise FileNotFoundError(f"cannot read tokenizer model {path}: {e.strerror}") from None
  except RuntimeError as e:
    raise ValueError(f"{path} is not a SentencePiece model ({e})") from None


def train_model(texts: Iterable[str], vocab_size: int) -> bytes:
  """Trains a unigram SentencePiece model on `texts`; returns the serialized model.

  Whitespace and newlines are kept as they are, so decode(encode(x)) == x for
  text whose characters the model has seen.
  """
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size, model_type="unigram",
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=[BOI_PIECE, EOI_PIECE],
      character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
      num_threads=2, minloglevel=2)
  return out.getvalue()


def load(config) -> Tokenizer:
  """The tokenizer a config names (config.data.tokenizer), building the default one if needed."""
  if config.data.tokenizer:
    return from_file(config.data.tokenizer)
  from tfx.data import builtin  # builtin imports this module; import late to keep it one-way
  return from_file(builtin.ensure_tokenizer(config))
