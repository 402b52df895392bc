"""Loads a pretrained diffusers AutoencoderKL (SD 1.x/2.x/XL, FLUX-style) from a folder (local or a URL).

Reads `config.json` + `diffusion_pytorch_model.safetensors` (float32, float16 or
bfloat16) with the safetensors package: no PyTorch, no unpickling, no download.
Weights are used in float32.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import flax as safetensors_flax  # the numpy loader cannot read bfloat16 (FLUX) tensors

from tfx import fs
from tfx.autoencoder import nets
from tfx.autoencoder.base import AutoencoderError, NetAutoencoder

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SUPPORTED = f"a diffusers folder with config.json + {WEIGHTS_NAME} (or a .safetensors file beside config.json)"
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
# Names used by checkpoints saved before diffusers renamed the attention layers.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _is_file(path: str) -> bool:
  return fs.exists(path) and not fs.isdir(path)


def _locate(path: str) -> tuple[str, str]:
  """(config.json, weights) for a folder, a pipeline folder with vae/, or a .safetensors file."""
  p = os.path.expanduser(path).rstrip("/")
  suffix = os.path.splitext(p)[1]
  if suffix.lower() in _PICKLE_SUFFIXES:
    raise AutoencoderError(f"{p}: {suffix} checkpoints are pickles and are never loaded; "
                           f"supported: {SUPPORTED}")
  if _is_file(p):
    if suffix != ".safetensors":
      raise AutoencoderError(f"{p}: unsupported weights file; supported: {SUPPORTED}")
    folder, weights = os.path.dirname(p), p
  else:
    if not fs.isdir(p):
      raise AutoencoderError(f"{p}: no such file or folder; expected {SUPPORTED}")
    folder = fs.join(p, "vae") if _is_file(fs.join(p, "vae", "config.json")) else p
    weights = fs.join(folder, WEIGHTS_NAME)
    if not _is_file(weights):
      found = [n for n in fs.listdir(folder) if os.path.splitext(n)[1].lower() in _PICKLE_SUFFIXES]
      hint = f" (found {', '.join(found)}: pickles are never loaded)" if found else ""
      raise AutoencoderError(f"{folder}: missing {WEIGHTS_NAME}{hint}; supported: {SUPPORTED}")
  config = fs.join(folder, "config.json")
  if not _is_file(config):
    raise AutoencoderError(f"{folder}: missing config.json next to the weights; supported: {SUPPORTED}")
  return config, weights


def net_config(raw: dict) -> nets.NetConfig:
  """NetConfig from a diffusers AutoencoderKL config.json dict; rejects unsupported variants."""
  if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise AutoencoderError(f"config.json describes {raw['_class_name']}, only AutoencoderKL is supported")
  for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    bad = [b for b in raw.get(key, ()) if b != allowed]
    if bad:
      raise AutoencoderError(f"config.json {key} contains {bad[0]!r}; only {allowed!r} is supported")
  if raw.get("act_fn", "silu") != "silu":
    raise AutoencoderError(f"config.json act_fn={raw['act_fn']!r}; only 'silu' is supported")
  chans = tuple(raw.get("block_out_channels", (64,)))
  if len(raw.get("down_block_types", chans)) != len(chans):
    raise AutoencoderError("config.json: down_block_types and block_out_channels differ in length")
  return nets.NetConfig(
      in_channels=raw.get("in_channels", 3), out_channels=raw.get("out_channels", 3),
      block_out_channels=chans, layers_per_block=raw.get("layers_per_block", 1),
      latent_channels=raw.get("latent_channels", 4), norm_num_groups=raw.get("norm_num_groups", 32),
      use_quant_conv=raw.get("use_quant_conv", True) is not False,
      use_post_quant_conv=raw.get("use_post_quant_conv", True) is not False,
      mid_block_add_attention=raw.get("mid_block_add_attention", True) is not False)


def torch_name(path: tuple) -> str:
  """diffusers state-dict key of an nnx param path, e.g. (..., 'resample', 'conv', 'kernel')."""
  parts, in_down = [], "down_blocks" in path
  for part in path:
    part = str(part)
    if part == "resample":
      part = "downsamplers.0" if in_down else "upsamplers.0"
    elif part == "attention":
      part = "attentions.0"
    elif part == "to_out":
      part = "to_out.0"
    elif part in ("kernel", "scale"):
      part = "weight"
    parts.append(part)
  return ".".join(parts)


def _lookup(tensors: dict, key: str):
  if key in tensors:
    return key
  for new, old in _LEGACY_ATTENTION.items():
    legacy = key.replace(f".{new}.", f".{old}.")
    if legacy != key and legacy in tensors:
      return legacy
  return None


def _to_jax_layout(array: np.ndarray, target_shape: tuple) -> np.ndarray:
  """torch conv [O,I,kh,kw] -> [kh,kw,I,O]; linear [O,I] (or 1x1 conv) -> [I,O]."""
  if len(target_shape) == 4 and array.ndim == 4:
    array = array.transpose(2, 3, 1, 0)
  elif len(target_shape) == 2:
    array = array.reshape(array.shape[0], -1).T if array.ndim == 4 and array.shape[2:] == (1, 1) else array.T
  return np.ascontiguousarray(array, dtype=np.float32)


def load_params(net_state, tensors: dict, source: str):
  """Fills an (abstract) nnx param state from a diffusers state dict; errors on any mismatch."""
  used, problems = set(), []
  flat = nnx.to_flat_state(net_state)
  for path, var in flat:
    key = torch_name(path)
    found = _lookup(tensors, key)
    if found is None:
      problems.append(f"missing {key}")
      continue
    used.add(found)
    value = _to_jax_layout(tensors[found], var.shape)
    if value.shape != tuple(var.shape):
      problems.append(f"{found} has shape {tensors[found].shape}, config.json implies "
                      f"{tuple(var.shape)} (in tfx layout)")
      continue
    var.set_value(jnp.asarray(value))
  unexpected = sorted(k for k in tensors if k not in used and not k.endswith("num_batches_tracked"))
  problems += [f"unexpected {k}" for k in unexpected]
  if problems:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    raise AutoencoderError(f"{source}: weights do not match config.json: {'; '.join(problems[:3])}{more}")
  return nnx.from_flat_state(flat)


def read_config(path: str) -> tuple[nets.NetConfig, float, float]:
  """(architecture, scaling_factor, shift_factor) of a diffusers folder, from its config.json only."""
  config_path, _ = _locate(path)
  try:
    raw = json.loads(fs.read_text(config_path))
  except json.JSONDecodeError as e:
    raise AutoencoderError(f"{config_path}: not valid JSON ({e})") from None
  return net_config(raw), raw.get("scaling_factor") or 1.0, raw.get("shift_factor") or 0.0


def load(path: str) -> NetAutoencoder:
  """The Autoencoder stored in a diffusers folder (scaling/shift factors from config.json)."""
  cfg, scaling_factor, shift_factor = read_config(path)
  _, weights_path = _locate(path)
  graphdef, state = nets.abstract_autoencoder(cfg)
  raw = (safetensors_flax.load_file(weights_path) if fs.is_local(weights_path)  # memory-mapped
         else safetensors_flax.load(fs.read_bytes(weights_path)))
  tensors = {k: np.asarray(v, np.float32) for k, v in raw.items()}
  params = load_params(state, tensors, weights_path)
  net = nnx.merge(graphdef, params)
  return NetAutoencoder(net, scaling_factor=scaling_factor, shift_factor=shift_factor)
