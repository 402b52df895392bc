"""The SentencePiece tokenizer: specials, lossless round trips, pickling, foreign models, derived vocabulary."""
import io
import os
import pathlib
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from tfx.data import shapes, text_corpus, tokenizer
from data_testing import small_config


@pytest.fixture(scope="module")
def tok():
  return tokenizer.load(small_config())


def test_special_ids_are_distinct_and_in_vocab(tok):
  ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id]
  assert len(set(ids)) == 5
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.vocab_size == tokenizer.ids_needed(small_config()) == small_config().data.tokenizer_vocab_size
  assert tokenizer.model_vocab_size(small_config()) == 1024  # derived without building the model
  assert not set(ids) & set(tok.encode("a red circle to the left of a blue square"))


def test_round_trips_prose_and_captions(tok):
  doc = text_corpus.documents()[3][1]
  assert tok.decode(tok.encode(doc)) == doc
  for cap in ("an orange triangle", "three green circles", "a purple square below a yellow circle"):
    ids = tok.encode(cap)
    assert tok.decode(ids) == cap
    assert len(ids) <= 12      # the grammar's words are in the vocabulary
  assert tok.decode([tok.bos_id] + tok.encode("hello") + [tok.eos_id, tok.boi_id, tok.pad_id]) == "hello"


def test_pickles_for_grain_workers(tok):
  again = pickle.loads(pickle.dumps(tok))
  text = "Python objects are stored in memory"
  assert again.encode(text) == tok.encode(text)
  assert (again.boi_id, again.eoi_id, again.vocab_size) == (tok.boi_id, tok.eoi_id, tok.vocab_size)


def test_foreign_model_loads_by_path_with_extra_specials(tmp_path):
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(shapes.grammar_captions(np.random.default_rng(0), 500)),
                                 model_writer=out, vocab_size=36, pad_id=-1, minloglevel=2)
  path = tmp_path / "foreign.model"
  path.write_bytes(out.getvalue())
  c = small_config()
  c.data.tokenizer = os.fspath(path)
  t = tokenizer.load(c)
  # No PAD / BOI / EOI in the model: they get the ids just after its 36 pieces.
  assert {t.pad_id, t.boi_id, t.eoi_id} == {36, 37, 38} and t.vocab_size == 39
  assert t.decode(t.encode("two red squares")) == "two red squares"


def test_bad_tokenizer_paths_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="cannot read tokenizer"):
    tokenizer.from_file(os.fspath(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenizer.from_file(os.fspath(junk))


LLAMA_LAYOUT = pathlib.Path(__file__).parent / "fixtures" / "llama_layout.model"


def _config_with(path, vocab_size=0):
  c = small_config()
  c.data.tokenizer, c.model.vocab_size = os.fspath(path), vocab_size
  return c


def test_llama_layout_fixture_gets_pad_boi_eoi_after_its_pieces_and_a_padded_vocab():
  """unk/bos/eos = 0/1/2 and no PAD, as Llama 2's: 4,000 pieces + 3 appended ids -> 4,096 rows."""
  t = tokenizer.from_file(os.fspath(LLAMA_LAYOUT))
  assert (t.bos_id, t.eos_id, t.pad_id, t.boi_id, t.eoi_id, t.vocab_size) == (1, 2, 4000, 4001, 4002, 4003)
  text = "a purple square below a yellow circle. def f(x): return x ** 2  # 1234 Ünïcode ✓"
  ids = t.encode(text)
  assert t.decode(ids) == text and 0 not in ids and max(ids) < 4000  # byte fallback: no UNK
  assert tokenizer.model_vocab_size(_config_with(LLAMA_LAYOUT)) == 4096
  assert tokenizer.model_vocab_size(_config_with(LLAMA_LAYOUT, 4003)) == 4003  # explicit and enough: kept
  with pytest.raises(ValueError, match=r"model.vocab_size=4000 is smaller than the 4003 ids .* derive it \(4096\)"):
    tokenizer.model_vocab_size(_config_with(LLAMA_LAYOUT, 4000))


def test_fixture_is_what_its_committed_script_makes():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "make_fixture", pathlib.Path(__file__).parents[1] / "tools" / "make_llama_tokenizer_fixture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.train() == LLAMA_LAYOUT.read_bytes()


def test_specials_use_the_models_own_marker_pieces_never_twice(tmp_path):
  """Control pieces "<pad>"/"<s>" (pad and bos ids unset) and user-defined BOI/EOI pieces are used."""
  texts = shapes.grammar_captions(np.random.default_rng(0), 500)
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=40,
                                 unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, control_symbols=["<pad>", "<s>"],
                                 user_defined_symbols=["<boi>", "<eoi>"], minloglevel=2)
  t = tokenizer.Tokenizer(out.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
  assert (t.pad_id, t.bos_id, t.eos_id, t.boi_id, t.eoi_id) == tuple(
      sp.piece_to_id(p) for p in ("<pad>", "<s>", "</s>", "<boi>", "<eoi>")) and t.vocab_size == 40
  path = tmp_path / "no_bos.model"
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=36,
                                 unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, minloglevel=2)
  path.write_bytes(out.getvalue())
  t = tokenizer.from_file(os.fspath(path))
  # no "<s>", "<pad>", "<boi>", "<eoi>" pieces at all: four fresh ids after the 36 pieces
  assert (t.eos_id, t.pad_id, t.bos_id, t.boi_id, t.eoi_id, t.vocab_size) == (1, 36, 37, 38, 39, 40)
