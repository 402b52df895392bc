"""Data for tfx: built-in shapes + text datasets, tokenizer, examples, packing, the Grain pipeline.

All Grain and tfds code lives in this package. Entry points:
  tfx.data.pipeline.make_iterator(config, split=..., process_index=..., process_count=...)
  tfx.data.tokenizer.load(config)
  python -m tfx.data.prepare --input=PATH --output=DIR
"""
