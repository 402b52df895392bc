"""SentencePiece tokenizer with the special ids Transfusion needs (PAD, BOS, EOS, BOI, EOI).

`train_model(texts, vocab_size)` makes a small model (PAD=0, UNK=1, BOS=2, EOS=3,
<boi>=4, <eoi>=5). Any other .model loads by path, whatever special pieces it has:
each special is the model's own (its pad/bos/eos id, else a control or user-defined
piece of that name), else a fresh id after its vocabulary. Llama 2's (unk=0, bos=1,
eos=2, no PAD) gets PAD/BOI/EOI = 32000-32002: 32,003 ids.

`model_vocab_size(config)` is the text vocabulary the model gets: model.vocab_size when
set, else the tokenizer's ids rounded up to VOCAB_MULTIPLE.
"""
import io
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from tfx import fs

BOI_PIECE = "<boi>"
EOI_PIECE = "<eoi>"
PAD_PIECE = "<pad>"
# A derived vocabulary is rounded up to this: it divides over any power-of-two tensor-parallel
# degree up to 128 and keeps the embedding and LM-head rows a multiple of the
# 128-wide TPU lanes and GPU MMA tiles.
VOCAB_MULTIPLE = 128


def _special_pieces(model_proto: bytes) -> dict[str, int]:
  """piece -> id of the model's control and user-defined pieces: the ones made to be markers
  (a normal piece that happens to read "<pad>" is text and stays text)."""
  pieces = sentencepiece_model_pb2.ModelProto.FromString(model_proto).pieces
  kinds = (pieces[0].CONTROL, pieces[0].USER_DEFINED) if pieces else ()
  return {p.piece: i for i, p in enumerate(pieces) if p.type in kinds}


class Tokenizer:
  """Text <-> ids. Picklable (carries the serialized model), so Grain workers can use it."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    n = self._sp.vocab_size()
    own = _special_pieces(model_proto)
    taken: list[int] = []

    def special(piece: str, builtin: int) -> int:
      """The model's own id for `piece` (its built-in id, else a control or user-defined piece of
      that name, never one taken by another special), else the next id after the vocabulary."""
      if builtin < 0:
        builtin = own.get(piece, -1)
      pid = builtin if builtin >= 0 and builtin not in taken else n + sum(t >= n for t in taken)
      taken.append(pid)
      return pid

    self.pad_id = special(PAD_PIECE, self._sp.pad_id())
    self.bos_id = special("<s>", self._sp.bos_id())
    self.eos_id = special("</s>", self._sp.eos_id())
    self.boi_id = special(BOI_PIECE, -1)
    self.eoi_id = special(EOI_PIECE, -1)
    self.vocab_size = max(n, max(taken) + 1)
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
  """Loads any SentencePiece .model file (local or a URL)."""
  try:
    return Tokenizer(fs.read_bytes(path))
  except OSError as e:
    raise FileNotFoundError(f"cannot read tokenizer model {path}: {e.strerror or e}") from None
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


def padded_vocab_size(ids: int) -> int:
  """`ids` rounded up to a multiple of VOCAB_MULTIPLE."""
  return -(-ids // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def ids_needed(config) -> int:
  """How many ids config.data.tokenizer uses (its pieces plus appended specials). The default
  tokenizer holds every special in its data.tokenizer_vocab_size pieces: no need to build it."""
  if config.data.tokenizer:
    return from_file(config.data.tokenizer).vocab_size
  return config.data.tokenizer_vocab_size


def model_vocab_size(config, tok: Tokenizer | None = None) -> int:
  """The model's text vocabulary: model.vocab_size, or when that is 0 the ids the config's
  tokenizer needs rounded up to VOCAB_MULTIPLE. Raises ValueError when it is smaller than
  the tokenizer (`tok`, else the config's) needs."""
  needed = ids_needed(config) if tok is None else tok.vocab_size
  vocab = config.model.vocab_size or padded_vocab_size(needed if tok is None else ids_needed(config))
  if needed > vocab:
    name = config.data.tokenizer or "the default tokenizer"
    raise ValueError(f"model.vocab_size={vocab} is smaller than the {needed} ids tokenizer {name} needs; "
                     f"set model.vocab_size >= {needed}, or 0 to derive it ({padded_vocab_size(needed)})")
  return vocab
