"""The workdir itself, besides checkpoints: writable?, config.json (save, read, migrate, resume check).

config.json holds the run's current config and, under "_history", one entry per
resume that changed it: {"time", "changed": {key: [old, new]}}. A resume may
change the keys in SAFE_TO_CHANGE freely; any other change needs naming in
--allow_config_change (it would not continue the run exactly).
A workdir may be a URL (gs://...); its files go through tfx.fs.
"""
import datetime
import json
import os
import uuid

import ml_collections

from tfx import config as config_lib
from tfx import fs

CONFIG_FILE = "config.json"
# Keys whose change alters param shapes or structure; a resume must keep them.
_SHAPE_IGNORED_MODEL_KEYS = {"dtype", "remat", "attention", "loss_chunk"}
HISTORY_KEY = "_history"
# Keys (or groups, ending in '.') a resume may change without --allow_config_change: when to
# stop / log / save / evaluate, the schedule's tail, how the same math is laid out on devices,
# and inference-only settings. Every other change is refused unless named.
SAFE_TO_CHANGE = (
    "total_steps", "stop_after_step", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
    "eval_every_steps", "sample_every_steps", "sample_prompts", "profile_start_step", "profile_steps",
    "optim.end_lr", "mesh.", "model.remat", "model.attention", "model.loss_chunk", "data.prefetch",
    "data.data_dir", "data.shapes_eval_size", "diffusion.sampler", "diffusion.sample_steps",
    "diffusion.cfg_scale", "diffusion.cfg_interval", "diffusion.clip_x0", "autoencoder.train_steps",
    "autoencoder.train_batch_size", "autoencoder.train_lr", "autoencoder.eval_images", "init_from",
    "optim.nan_policy", "optim.max_skips_in_row")
# Keys that decide which examples fill which rows: when one changes (allowed), the data
# iterator cannot continue from its saved position and starts afresh.
DATA_ORDER_KEYS = ("seed", "global_batch_size", "seq_len", "data.", "image.max_images_per_seq")


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


def _read_raw(workdir) -> dict:
  path = fs.join(workdir, CONFIG_FILE)
  if not fs.exists(path):
    raise NotAWorkdirError(f"no {CONFIG_FILE} in {workdir}: not a tfx training workdir")
  return json.loads(fs.read_text(path))


def load_config(workdir) -> ml_collections.ConfigDict:
  """Reads WORKDIR/config.json (raises NotAWorkdirError if absent)."""
  raw = _read_raw(workdir)
  raw.pop(HISTORY_KEY, None)
  return config_from_dict(raw)


def read_history(workdir) -> list[dict]:
  """config.json's record of the resumes that changed the config, oldest first."""
  return _read_raw(workdir).get(HISTORY_KEY, [])


def save_config(workdir, config) -> None:
  """Writes WORKDIR/config.json: `config`, with the saved history plus an entry for what
  changed since the saved config (with the time), if anything did."""
  try:
    history, saved = read_history(workdir), load_config(workdir)
  except NotAWorkdirError:
    history, saved = [], None
  if saved is not None:
    changed = config_changes(saved, config)
    if changed:
      now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
      history = history + [{"time": now, "changed": {k: list(v) for k, v in changed.items()}}]
  raw = json.loads(config.to_json_best_effort())
  if history:
    raw[HISTORY_KEY] = history
  fs.write_text(fs.join(workdir, CONFIG_FILE), json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _flat(config) -> dict:
  """Dotted key -> JSON value, defaults filled as load_config fills them."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[prefix + key] = value
  walk(json.loads(config_from_dict(json.loads(config.to_json_best_effort())).to_json_best_effort()), "")
  return out


def config_changes(old, new) -> dict[str, tuple]:
  """Dotted key -> (old value, new value) for every key that differs."""
  a, b = _flat(old), _flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(key: str, patterns) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def check_config_change(workdir, config, allowed=()) -> dict[str, tuple]:
  """The changes from WORKDIR/config.json; IncompatibleWorkdirError naming the ones that are
  neither safe nor in `allowed` (dotted keys; a group as 'data.'). {} for a new workdir."""
  try:
    saved = load_config(workdir)
  except NotAWorkdirError:
    return {}
  flat = _flat(config)
  unknown = [k for k in allowed if not any(_matches(f, (k,)) for f in flat)]
  if unknown:
    raise IncompatibleWorkdirError(f"--allow_config_change names unknown config key(s): {', '.join(unknown)}")
  changed = config_changes(saved, config)
  refused = [k for k in changed if not _matches(k, SAFE_TO_CHANGE) and not _matches(k, allowed)]
  if refused:
    what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
    raise IncompatibleWorkdirError(
        f"{workdir} was trained with another config ({what}); resuming would not continue that run "
        f"exactly: pass --allow_config_change={','.join(refused)} to accept, or use a new --workdir")
  return changed


def data_order_changed(changes: dict) -> list[str]:
  """The changed keys after which the saved data-iterator position no longer applies."""
  return [k for k in changes if _matches(k, DATA_ORDER_KEYS) and not _matches(k, SAFE_TO_CHANGE)]


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
