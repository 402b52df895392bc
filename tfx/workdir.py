"""The workdir itself, besides checkpoints: writable?, config.json (save, read, migrate, resume check).

A workdir may be a URL (gs://...); its files go through tfx.fs.
"""
import json
import os
import uuid

import ml_collections

from tfx import config as config_lib
from tfx import fs

CONFIG_FILE = "config.json"
# Keys whose change alters param shapes or structure; a resume must keep them.
_SHAPE_IGNORED_MODEL_KEYS = {"dtype", "remat", "attention", "loss_chunk"}


class NotAWorkdirError(FileNotFoundError):
  """The workdir holds no config.json."""


class IncompatibleWorkdirError(ValueError):
  """A workdir's saved config differs from the requested one in model shape."""


def _coerce_like(value, reference):
  """JSON turns tuples into lists; put them back where the default is a tuple."""
  if isinstance(reference, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def config_from_dict(raw: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from a JSON dict, with tuple-typed defaults restored and keys added
  since the run was saved filled from tfx.config.default() (whose defaults keep the
  behaviour of the code before the key existed)."""
  defaults = config_lib.default()

  def convert(node, ref):
    out = dict(ref) if isinstance(ref, dict) else {}
    for key, value in node.items():
      sub = ref.get(key) if isinstance(ref, dict) else None
      out[key] = convert(value, sub if sub is not None else {}) if isinstance(value, dict) \
          else _coerce_like(value, sub)
    return out

  return ml_collections.ConfigDict(convert(raw, defaults.to_dict()))


def check_writable(workdir) -> None:
  """Makes WORKDIR and writes/removes a probe file; OSError when it cannot."""
  fs.makedirs(workdir)
  probe = fs.join(workdir, f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}")
  fs.write_text(probe, "")
  fs.remove(probe)


def load_config(workdir) -> ml_collections.ConfigDict:
  """Reads WORKDIR/config.json (raises NotAWorkdirError if absent)."""
  path = fs.join(workdir, CONFIG_FILE)
  if not fs.exists(path):
    raise NotAWorkdirError(f"no {CONFIG_FILE} in {workdir}: not a tfx training workdir")
  return config_from_dict(json.loads(fs.read_text(path)))


def save_config(workdir, config) -> None:
  """Writes WORKDIR/config.json (the resolved config of the run), replacing it whole."""
  fs.write_text(fs.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _shape_keys(config) -> dict:
  c = config_from_dict(json.loads(config.to_json_best_effort()))
  keys = {f"model.{k}": v for k, v in c.model.items() if k not in _SHAPE_IGNORED_MODEL_KEYS}
  keys["image.patch_size"] = c.image.patch_size
  keys["image.resolution"] = c.image.resolution
  keys["autoencoder.latent_channels"] = c.autoencoder.latent_channels
  keys["autoencoder.downsample"] = c.autoencoder.downsample
  keys["optim.ema_decay>0"] = c.optim.ema_decay > 0
  return keys


def check_resumable(workdir, config) -> None:
  """Raises IncompatibleWorkdirError if WORKDIR/config.json has another model shape."""
  try:
    saved = load_config(workdir)
  except NotAWorkdirError:
    return
  old, new = _shape_keys(saved), _shape_keys(config)
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diff:
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    raise IncompatibleWorkdirError(
        f"{workdir} holds a run with another model shape ({changes}); use a new --workdir")
