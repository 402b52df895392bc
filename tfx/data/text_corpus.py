"""The embedded text corpus: the English prose of Python's `pydoc_data.topics`."""
import zlib

from pydoc_data import topics

_MAX_DOC_CHARS = 2000
_VALIDATION_EVERY = 20    # every 20th document goes to validation


def documents() -> list[tuple[str, str]]:
  """Distinct (key, text) documents: each help topic cut at paragraph breaks into ~2000 chars."""
  docs = []
  for name in sorted(topics.topics):
    chunk: list[str] = []
    for para in topics.topics[name].split("\n\n"):
      if chunk and sum(len(p) + 2 for p in chunk) + len(para) > _MAX_DOC_CHARS:
        docs.append("\n\n".join(chunk))
        chunk = []
      if para.strip():
        chunk.append(para)
    if chunk:
      docs.append("\n\n".join(chunk))
  docs = list(dict.fromkeys(docs))   # some topics share paragraphs; keep each text once
  return [(f"{i:05d}", d) for i, d in enumerate(docs)]


def split_of(key: str) -> str:
  """"train" or "validation", fixed per document."""
  return "validation" if zlib.crc32(key.encode()) % _VALIDATION_EVERY == 0 else "train"
