"""The SentencePiece tokenizer: specials, lossless round trips, pickling, foreign models."""
import io
import os
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
  assert tok.vocab_size <= small_config().model.vocab_size
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
