"""What a sweep runs: named variants (config overrides) from --grid flags or a sweep file.

A sweep file is Python or JSON naming each variant's overrides (dotted keys of tfx/config.py):

    # sweeps/mask.py                          # or sweeps/mask.json: {"bidir": {...}, ...}
    VARIANTS = {
        "bidirectional": {"model.image_attention": "bidirectional"},
        "causal": {"model.image_attention": "causal"},
    }

--grid=KEY=v1,v2 flags take the cartesian product instead; each variant is named by its
values (`image_attention=causal+noise_limit=999`). --set=KEY=VALUE applies to every variant.
"""
import ast
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex

import ml_collections

_NAME = re.compile(r"^[A-Za-z0-9_.=+-]+$")  # no ',': --parity=A,B splits names on it


class SweepError(ValueError):
  """A grid, sweep file or override that names no config key or no valid value."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: dict          # dotted config key -> value (typed as the key's default)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`FILE.py[:ARG]` -> FILE's get_config(ARG), as --config of tfx.train reads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"tfx_sweep_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if ":" in spec else module.get_config()


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f"unknown config key {key!r}")
    node = node[part]
  return node


def parse_value(config, key: str, text: str):
  """A command-line value for `key`, typed as the key's current value."""
  current = _get(config, key)
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, tuple):
      value = ast.literal_eval(text)
      return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return text
  except (ValueError, SyntaxError):
    raise SweepError(f"{key}={text!r}: not a {type(current).__name__}") from None


def apply(config, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides`; a model.preset among them goes under the other model.* keys."""
  from tfx.model import presets
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    _get(config, key)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except TypeError as e:
      raise SweepError(f"{key}={value!r}: {e}") from None
  try:
    return presets.apply_overrides(config, overrides)
  except ValueError as e:
    raise SweepError(str(e)) from None


def parse_assignments(config, items, *, many: bool) -> list[tuple[str, list]]:
  """["KEY=v1,v2", ...] -> [(KEY, [typed values])]; one value each unless `many`."""
  out = []
  for item in items:
    key, eq, values = item.partition("=")
    if not eq or not values:
      raise SweepError(f"{item!r} is not KEY=VALUE{',VALUE...' if many else ''}")
    texts = _split_values(values) if many else [values]
    out.append((key, [parse_value(config, key, t) for t in texts]))
  return out


def _split_values(text: str) -> list[str]:
  """v1,v2 split on commas outside brackets, so tuples like (8,16),(16,32) stay whole."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def _text(value) -> str:
  """A value as a --config.KEY=VALUE flag takes it."""
  return str(value).replace(" ", "") if isinstance(value, tuple) else str(value)


def _label(value) -> str:
  """A value in a variant name: tuples as 8-16-32."""
  return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


def grid_variants(grid: list[tuple[str, list]]) -> list[Variant]:
  """The cartesian product of (key, values); names from the keys' last parts (full keys if those clash)."""
  leaves = [k.rsplit(".", 1)[-1] for k, _ in grid]
  labels = leaves if len(set(leaves)) == len(leaves) else [k for k, _ in grid]
  variants = []
  for values in itertools.product(*(vs for _, vs in grid)):
    name = "+".join(f"{label}={_label(v)}" for label, v in zip(labels, values))
    variants.append(Variant(name, dict(zip((k for k, _ in grid), values))))
  return check_names(variants)


def load_sweep_file(path: str) -> list[Variant]:
  """VARIANTS = {name: {dotted key: value}} from a .py file, or that dict as a .json file."""
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path} does not exist")
  if path.endswith(".json"):
    with open(path) as f:
      raw = json.load(f)
  else:
    module_spec = importlib.util.spec_from_file_location("tfx_sweep_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    raw = getattr(module, "VARIANTS", None)
  if not isinstance(raw, dict) or not raw or not all(isinstance(v, dict) for v in raw.values()):
    raise SweepError(f"{path}: expected VARIANTS = {{name: {{config key: value}}}} with at least one variant")
  return check_names([Variant(name, dict(overrides)) for name, overrides in raw.items()])


def check_names(variants: list[Variant]) -> list[Variant]:
  names = [v.name for v in variants]
  for name in names:
    if not _NAME.match(name) or name in (".", ".."):
      raise SweepError(f"variant name {name!r} is not a directory name (letters, digits, _ . = + -)")
  if len(set(names)) != len(names):
    raise SweepError(f"variant names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
  return variants


def train_command(config_spec: str, workdir: str, overrides: dict, launcher: str = "") -> str:
  """The shell command that trains one variant: tfx.train, or a launch/ script (its EXTRA flags after --)."""
  flags = [f"--config.{k}={_text(v)}" for k, v in overrides.items()]
  if launcher:
    words = [launcher, f"--config={config_spec}", f"--workdir={workdir}", "--", *flags]
    return " ".join([launcher] + [shlex.quote(w) for w in words[1:]])
  words = ["python", "-m", "tfx.train", f"--config={config_spec}", f"--workdir={workdir}", *flags]
  return " ".join(shlex.quote(w) for w in words)
