"""Inception-v3 pool features (the FID network) as pure JAX, loaded from a local weights file.

The layout and layer names follow the FID Inception of pytorch-fid (the weights of
`pt_inception-2015-12-05`), converted by the user to .safetensors or .npz (tfx never
unpickles): keys like `Mixed_5b.branch1x1.conv.weight` [O, I, kh, kw] and
`... .bn.{weight,bias,running_mean,running_var}`. Images are resized bilinearly
to 299 x 299 and mapped to [-1, 1]; features are the 2048-d average pool.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3
FEATURE_DIM = 2048
INPUT_SIDE = 299


def load_weights(path: str) -> dict[str, np.ndarray]:
  """Reads FID Inception weights from .safetensors or .npz and checks every layer is there."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    weights = load_file(path)
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      weights = dict(f)
  else:
    raise ValueError(f"inception weights {path!r}: supported formats are .safetensors and .npz "
                     "(convert pt_inception-*.pth once; tfx never unpickles)")
  required = required_keys()
  missing = [k for k in required if k not in weights]
  if missing:
    raise ValueError(f"inception weights {path!r} lack {len(missing)} tensors, e.g. {missing[0]!r}")
  wrong = [k for k, shape in required.items() if tuple(weights[k].shape) != shape]
  if wrong:
    raise ValueError(f"inception weights {path!r}: {wrong[0]!r} has shape {tuple(weights[wrong[0]].shape)}, "
                     f"expected {required[wrong[0]]}")
  return {k: np.asarray(weights[k], np.float32) for k in required_keys()}


def _conv_names(prefix: str, names: list[str]) -> list[str]:
  return [f"{prefix}.{n}" for n in names]


_BLOCKS = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
_MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
          ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
          ("Mixed_7c", "E")]


def conv_layers() -> list[str]:
  """Every BasicConv2d (conv + batch norm + ReLU) of the network, by name."""
  layers = list(_STEM)
  for name, kind in _MIXED:
    layers += _conv_names(name, _BLOCKS[kind])
  return layers


def _block_shapes(kind: str, cin: int, arg: int = 0) -> list[tuple[int, int, int, int]]:
  """[out, in, kh, kw] of each conv of a block, in _BLOCKS order."""
  if kind == "A":
    return [(64, cin, 1, 1), (48, cin, 1, 1), (64, 48, 5, 5), (64, cin, 1, 1), (96, 64, 3, 3),
            (96, 96, 3, 3), (arg, cin, 1, 1)]
  if kind == "B":
    return [(384, cin, 3, 3), (64, cin, 1, 1), (96, 64, 3, 3), (96, 96, 3, 3)]
  if kind == "C":
    c7 = arg
    return [(192, cin, 1, 1), (c7, cin, 1, 1), (c7, c7, 1, 7), (192, c7, 7, 1), (c7, cin, 1, 1),
            (c7, c7, 7, 1), (c7, c7, 1, 7), (c7, c7, 7, 1), (192, c7, 1, 7), (192, cin, 1, 1)]
  if kind == "D":
    return [(192, cin, 1, 1), (320, 192, 3, 3), (192, cin, 1, 1), (192, 192, 1, 7), (192, 192, 7, 1),
            (192, 192, 3, 3)]
  return [(320, cin, 1, 1), (384, cin, 1, 1), (384, 384, 1, 3), (384, 384, 3, 1), (448, cin, 1, 1),
          (384, 448, 3, 3), (384, 384, 1, 3), (384, 384, 3, 1), (192, cin, 1, 1)]


# (block, input channels, pool features / c7) of the mixed blocks, in order.
_MIXED_ARGS = [(192, 32), (256, 64), (288, 64), (288, 0), (768, 128), (768, 160), (768, 160), (768, 192),
               (768, 0), (1280, 0), (2048, 0)]


def conv_shapes() -> dict[str, tuple[int, int, int, int]]:
  """[out, in, kh, kw] of every conv weight, by layer name."""
  shapes = dict(zip(_STEM, [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (80, 64, 1, 1), (192, 80, 3, 3)]))
  for (name, kind), (cin, arg) in zip(_MIXED, _MIXED_ARGS):
    shapes.update(zip(_conv_names(name, _BLOCKS[kind]), _block_shapes(kind, cin, arg)))
  return shapes


def required_keys() -> dict[str, tuple[int, ...]]:
  """Every tensor the network reads, with its shape."""
  keys = {}
  for layer, shape in conv_shapes().items():
    keys[f"{layer}.conv.weight"] = shape
    keys.update({f"{layer}.bn.{p}": (shape[0],) for p in ("weight", "bias", "running_mean", "running_var")})
  return keys


def _conv(w, x, name, stride=1, padding=(0, 0)):
  """BasicConv2d: conv (no bias) -> batch norm (inference) -> ReLU, NHWC."""
  kernel = jnp.transpose(w[f"{name}.conv.weight"], (2, 3, 1, 0))
  y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding[0],) * 2, (padding[1],) * 2],
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  scale = w[f"{name}.bn.weight"] * jax.lax.rsqrt(w[f"{name}.bn.running_var"] + BN_EPS)
  return jax.nn.relu(y * scale + (w[f"{name}.bn.bias"] - w[f"{name}.bn.running_mean"] * scale))


def _max_pool(x, k=3, stride=2, pad=0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                               [(0, 0), (pad, pad), (pad, pad), (0, 0)])


def _avg_pool_same(x):
  """3x3 stride-1 average that excludes the zero padding (count_include_pad=False)."""
  pad = [(0, 0), (1, 1), (1, 1), (0, 0)]
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = jnp.ones(x.shape[1:3] + (1,), x.dtype)[None]
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


def _block_a(w, p, x):
  c = functools.partial(_conv, w)
  b1 = c(x, f"{p}.branch1x1")
  b5 = c(c(x, f"{p}.branch5x5_1"), f"{p}.branch5x5_2", padding=(2, 2))
  b3 = c(c(c(x, f"{p}.branch3x3dbl_1"), f"{p}.branch3x3dbl_2", padding=(1, 1)), f"{p}.branch3x3dbl_3", padding=(1, 1))
  bp = c(_avg_pool_same(x), f"{p}.branch_pool")
  return jnp.concatenate([b1, b5, b3, bp], -1)


def _block_b(w, p, x):
  c = functools.partial(_conv, w)
  b3 = c(x, f"{p}.branch3x3", stride=2)
  bd = c(c(c(x, f"{p}.branch3x3dbl_1"), f"{p}.branch3x3dbl_2", padding=(1, 1)), f"{p}.branch3x3dbl_3", stride=2)
  return jnp.concatenate([b3, bd, _max_pool(x)], -1)


def _block_c(w, p, x):
  c = functools.partial(_conv, w)
  row, col = (0, 3), (3, 0)
  b1 = c(x, f"{p}.branch1x1")
  b7 = c(c(c(x, f"{p}.branch7x7_1"), f"{p}.branch7x7_2", padding=row), f"{p}.branch7x7_3", padding=col)
  bd = c(x, f"{p}.branch7x7dbl_1")
  for i, pad in zip(range(2, 6), (col, row, col, row)):
    bd = c(bd, f"{p}.branch7x7dbl_{i}", padding=pad)
  bp = c(_avg_pool_same(x), f"{p}.branch_pool")
  return jnp.concatenate([b1, b7, bd, bp], -1)


def _block_d(w, p, x):
  c = functools.partial(_conv, w)
  b3 = c(c(x, f"{p}.branch3x3_1"), f"{p}.branch3x3_2", stride=2)
  b7 = c(c(c(x, f"{p}.branch7x7x3_1"), f"{p}.branch7x7x3_2", padding=(0, 3)), f"{p}.branch7x7x3_3", padding=(3, 0))
  b7 = c(b7, f"{p}.branch7x7x3_4", stride=2)
  return jnp.concatenate([b3, b7, _max_pool(x)], -1)


def _block_e(w, p, x, pool):
  c = functools.partial(_conv, w)
  b1 = c(x, f"{p}.branch1x1")
  b3 = c(x, f"{p}.branch3x3_1")
  b3 = jnp.concatenate([c(b3, f"{p}.branch3x3_2a", padding=(0, 1)), c(b3, f"{p}.branch3x3_2b", padding=(1, 0))], -1)
  bd = c(c(x, f"{p}.branch3x3dbl_1"), f"{p}.branch3x3dbl_2", padding=(1, 1))
  bd = jnp.concatenate([c(bd, f"{p}.branch3x3dbl_3a", padding=(0, 1)), c(bd, f"{p}.branch3x3dbl_3b", padding=(1, 0))], -1)
  bp = c(pool(x), f"{p}.branch_pool")
  return jnp.concatenate([b1, b3, bd, bp], -1)


def pool_features(weights: dict, images_BHWC_uint8: jax.Array, side: int = INPUT_SIDE) -> jax.Array:
  """uint8 images [B, H, W, 3] -> Inception pool features [B, 2048]."""
  x = images_BHWC_uint8.astype(jnp.float32) / 255.0
  x = jax.image.resize(x, (x.shape[0], side, side, 3), "bilinear", antialias=False) * 2.0 - 1.0
  c = functools.partial(_conv, weights)
  x = c(c(x, "Conv2d_1a_3x3", stride=2), "Conv2d_2a_3x3")
  x = _max_pool(c(x, "Conv2d_2b_3x3", padding=(1, 1)))
  x = _max_pool(c(c(x, "Conv2d_3b_1x1"), "Conv2d_4a_3x3"))
  blocks = {"A": _block_a, "B": _block_b, "C": _block_c, "D": _block_d,
            "E": functools.partial(_block_e, pool=_avg_pool_same)}
  for name, kind in _MIXED:
    if name == "Mixed_7c":  # the FID network max-pools in its last block
      x = _block_e(weights, name, x, pool=lambda y: _max_pool(y, 3, 1, 1))
    else:
      x = blocks[kind](weights, name, x)
  return x.mean(axis=(1, 2))


def features(weights: dict, images_NHWC_uint8: np.ndarray, batch_size: int = 32, side: int = INPUT_SIDE) -> np.ndarray:
  """Features [N, 2048] of uint8 images, in batches."""
  fn = jax.jit(pool_features, static_argnums=2)
  w = {k: jnp.asarray(v) for k, v in weights.items()}
  return np.concatenate([np.asarray(fn(w, jnp.asarray(images_NHWC_uint8[i:i + batch_size]), side))
                         for i in range(0, len(images_NHWC_uint8), batch_size)])
