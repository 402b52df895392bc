"""Basic NNX layers with logical axis names on every parameter: dense, embedding, RMSNorm, SwiGLU, RoPE."""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tfx import mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The jnp dtype for config.model.dtype, with a clear error for anything else."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None]) -> nnx.Param:
  """An fp32 parameter tagged with logical axis names (see tfx.mesh.LOGICAL_RULES)."""
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(names))


class Dense(nnx.Module):
  """y = x @ W (+ b) over the last `len(in_shape)` axes; W carries logical names."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence[str | None],
               *, rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = False, zero_init: bool = False):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    init = nnx.initializers.zeros if zero_init else nnx.initializers.normal(fan_in ** -0.5)
    self.kernel = param(rngs, init, in_shape + out_shape, names)
    self.bias = (param(rngs, nnx.initializers.zeros, out_shape, names[len(in_shape):])
                 if use_bias else None)
    self.n_in = len(in_shape)
    self.dtype = dtype

  def __call__(self, x):
    n = self.n_in
    lhs = tuple(range(x.ndim - n, x.ndim))
    y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                            ((lhs, tuple(range(n))), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied logits."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.table = param(rngs, nnx.initializers.normal(1.0), (vocab_size, d_model), ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, tokens_BL):
    return jnp.take(self.table[...], tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD):
    # the table is N(0, 1) for the input side; d^-1/2 keeps tied logits O(1) on normalized x
    table_VD = self.table[...].astype(self.dtype)
    return (x_BLD.astype(self.dtype) @ table_VD.T) * (table_VD.shape[1] ** -0.5)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale; statistics in fp32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, names=("norm",), rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), names)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  """Plain LayerNorm over the last axis (the U-Net's norm; no AdaLN)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
  """Llama feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.gate = Dense((d_model,), (mlp_dim,), ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.up = Dense((d_model,), (mlp_dim,), ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.down = Dense((mlp_dim,), (d_model,), ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x_BLD):
    h_BLF = jax.nn.silu(self.gate(x_BLD)) * self.up(x_BLD)
    h_BLF = mesh.constrain(h_BLF, ("act_batch", "act_len", "act_mlp"))
    return self.down(h_BLF)


def rope(x_BLHK, positions_BL, theta: float):
  """Rotary position embedding (half-split layout) from integer positions; math in fp32."""
  half = x_BLHK.shape[-1] // 2
  freq_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLK = positions_BL.astype(jnp.float32)[..., None] * freq_K
  sin, cos = jnp.sin(angle_BLK)[:, :, None, :], jnp.cos(angle_BLK)[:, :, None, :]
  x32 = x_BLHK.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)
