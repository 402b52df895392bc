"""ShapesNet: a small CNN that tfx trains on shapes images, the feature network of `fd_shapesnet`.

It learns, for every (colour, shape) pair, how many such objects an image holds
(0..3), so its penultimate features encode what the shapes scorer cares about.
Weights are saved as a plain .npz (no pickle).
"""
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tfx import fs

FEATURE_DIM = 128


@dataclasses.dataclass(frozen=True)
class ShapesNetSpec:
  """What the saved file must agree on."""
  resolution: int
  num_heads: int
  num_classes: int


class ShapesNet(nnx.Module):
  """3 convs (2 strided) -> flatten -> features [B, FEATURE_DIM] -> heads x classes logits."""

  def __init__(self, spec: ShapesNetSpec, rngs: nnx.Rngs):
    self.spec = spec
    self.conv1 = nnx.Conv(3, 32, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.conv3 = nnx.Conv(64, 32, (3, 3), strides=1, rngs=rngs)
    side = spec.resolution // 4
    self.features = nnx.Linear(side * side * 32, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, spec.num_heads * spec.num_classes, rngs=rngs)

  def embed(self, images_BHWC: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> features [B, FEATURE_DIM]."""
    x = jax.nn.gelu(self.conv1(images_BHWC))
    x = jax.nn.gelu(self.conv2(x))
    x = jax.nn.gelu(self.conv3(x))
    return jax.nn.gelu(self.features(x.reshape(x.shape[0], -1)))

  def __call__(self, images_BHWC: jax.Array) -> jax.Array:
    logits = self.head(self.embed(images_BHWC))
    return logits.reshape(-1, self.spec.num_heads, self.spec.num_classes)


def to_unit_range(images_uint8: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 [N, H, W, 3] (any square size that is a multiple of resolution) -> float32 [-1, 1] at resolution."""
  x = np.asarray(images_uint8, np.float32)
  if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
    raise ValueError(f"shapesnet expects square RGB images [N, H, W, 3], got {x.shape}")
  side = x.shape[1]
  if side != resolution:
    if side % resolution:
      raise ValueError(f"image side {side} is not a multiple of the shapesnet resolution {resolution}")
    f = side // resolution
    x = x.reshape(x.shape[0], resolution, f, resolution, f, 3).mean(axis=(2, 4))
  return x / 127.5 - 1.0


def train(images_uint8: np.ndarray, labels_NK: np.ndarray, *, resolution: int, num_classes: int,
          steps: int = 400, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> tuple[ShapesNet, float]:
  """Trains a ShapesNet on labelled images; returns (model, accuracy on the training images)."""
  x_all = to_unit_range(images_uint8, resolution)
  y_all = np.asarray(labels_NK, np.int32)
  spec = ShapesNetSpec(resolution, y_all.shape[1], num_classes)
  model = ShapesNet(spec, nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x_all), batch_size)
    params, opt_state, _ = step(params, opt_state, x_all[idx], y_all[idx])
  model = nnx.merge(graphdef, params)
  return model, accuracy(model, images_uint8, labels_NK)


def _batched(fn, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(fn(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def accuracy(model: ShapesNet, images_uint8: np.ndarray, labels_NK: np.ndarray) -> float:
  """Share of images whose every head is right."""
  graphdef, params = nnx.split(model)
  predict = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
  x = to_unit_range(images_uint8, model.spec.resolution)
  logits = _batched(lambda b: predict(params, b), x)
  return float((logits.argmax(-1) == np.asarray(labels_NK)).all(-1).mean())


def features(model: ShapesNet, images_uint8: np.ndarray) -> np.ndarray:
  """Feature vectors [N, FEATURE_DIM] of uint8 images."""
  graphdef, params = nnx.split(model)
  embed = jax.jit(lambda p, b: nnx.merge(graphdef, p).embed(b))
  x = to_unit_range(images_uint8, model.spec.resolution)
  return _batched(lambda b: embed(params, b), x)


def save(model: ShapesNet, path: str) -> None:
  """Writes weights + spec to an .npz file (atomically)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  arrays = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}
  arrays["spec"] = np.array([model.spec.resolution, model.spec.num_heads, model.spec.num_classes])
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  fs.write_bytes(path, buffer.getvalue())


def load(path: str) -> ShapesNet:
  """Reads a ShapesNet written by `save`."""
  if not path.endswith(".npz"):
    raise ValueError(f"shapesnet weights must be an .npz file written by tfx, got {path!r}")
  with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as f:
    arrays = dict(f)
  spec = ShapesNetSpec(*(int(v) for v in arrays.pop("spec")))
  # abstract: an eager init compiles one random initialiser per weight shape (~7 s on a loaded CPU)
  model = nnx.eval_shape(lambda: ShapesNet(spec, nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for k, v in flat:
    key = "/".join(map(str, k))
    if key not in arrays or arrays[key].shape != v.get_value().shape:
      raise ValueError(f"{path}: weight {key!r} is missing or has the wrong shape")
    v.set_value(jnp.asarray(arrays[key]))
  return model
