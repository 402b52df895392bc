"""Parameter count and training FLOPs per token for a config, from abstract shapes only."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx import patching, record
from tfx.model import presets
from tfx.model.transfusion import Transfusion, dims


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(config) -> Transfusion:
  """The model with ShapeDtypeStructs for arrays (jax.eval_shape; allocates nothing).

  Works inside `jax.set_mesh` too: the params' logical axis names are not mesh axes, so
  no sharding is attached to them here.
  """
  graphdefs = []

  def build():
    with nnx.use_eager_sharding(False):
      graphdef, state = nnx.split(Transfusion(config, rngs=nnx.Rngs(0)))
    graphdefs.append(graphdef)  # static: safe to take out of the trace
    return state

  state = jax.eval_shape(build)
  return nnx.merge(graphdefs[0], state)


def _modality_forward_flops_per_image(config, model) -> float:
  """Forward FLOPs of the modality layers (encode + decode) on one image, by XLA cost analysis
  of the lowered (or, where the backend needs it, compiled; never run) computation."""
  im, ae = config.image, config.autoencoder
  n = patching.num_patches(im.resolution // ae.downsample, im.patch_size)
  p = patching.patch_dim(im.patch_size, ae.latent_channels)
  graphdef, state = nnx.split(model.patches)

  def forward(state, patches_BLP, t_BL, x_BLD):
    layers = nnx.merge(graphdef, state)
    modality_BL = jnp.full(t_BL.shape, record.IMAGE, jnp.int32)
    encoded, ctx = layers.encode(patches_BLP, t_BL, modality_BL)
    return encoded, layers.decode(x_BLD, ctx)

  args = (state, jax.ShapeDtypeStruct((1, n, p), jnp.float32), jax.ShapeDtypeStruct((1, n), jnp.float32),
          jax.ShapeDtypeStruct((1, n, config.model.d_model), jnp.float32))
  lowered = jax.jit(forward).lower(*args)
  # Some backends (GPU) analyse only compiled code; compiling this small forward takes seconds.
  for analyse in (lowered.cost_analysis, lambda: lowered.compile().cost_analysis()):
    cost = analyse()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost and "flops" in cost:
      return float(cost["flops"]) / n
  raise RuntimeError(f"XLA gave no FLOP count for the modality layers on {jax.devices()[0].platform}")


def report(config) -> dict:
  """params (total and by part) and training FLOPs per token (forward + backward = 3x forward).

  `flops_per_token` counts the LM head at every position (the dry run's per-token figure);
  `model_flops` counts what a given batch needs, for MFU.

  flops_per_token = 6 * (block + LM-head matmul params) + 6 * layers * seq_len * heads * head_dim:
  attention over the causal half of the L x L pairs (the work the mask leaves; an image's
  bidirectional patches add n^2 / 2 pairs, under 1% at 4096 positions), MaxText's convention;
  so model.image_attention "causal" and "bidirectional" count the same FLOPs.
  Image tokens add `modality_flops_per_image_token` (the patch encoder/decoder or U-Net, measured);
  in model.image_mode "discrete" (Chameleon) an image's codes are ordinary LM positions: 0 there,
  and the head's vocabulary (in `head`) includes the codebook.
  """
  config = presets.resolve(config)
  m = config.model
  model = abstract_model(config)
  params = nnx.state(model, nnx.Param)
  total = _count(params)
  embedding = _count(nnx.state(model.embed, nnx.Param))
  blocks = _count(nnx.state(model.blocks, nnx.Param))
  modality = 0 if model.patches is None else _count(nnx.state(model.patches, nnx.Param))
  head = embedding if model.lm_head is None else _count(nnx.state(model.lm_head, nnx.Param))
  head_dim = dims(config)["head_dim"]
  dense_flops = 6.0 * (blocks + head)
  attention_flops = 6.0 * m.n_layers * config.seq_len * m.n_heads * head_dim
  # image_mode "discrete": code tokens are text positions (embedding + LM head), no modality layers
  modality_flops = 0.0 if model.patches is None else 3.0 * _modality_forward_flops_per_image(config, model)
  return dict(
      params=total,
      params_embedding=embedding,
      params_blocks=blocks,
      params_modality=modality,
      params_lm_head=0 if model.lm_head is None else head,
      flops_per_token=dense_flops + attention_flops,
      body_flops_per_token=6.0 * blocks + attention_flops,
      head_flops_per_token=6.0 * head,
      attention_flops_per_token=attention_flops,
      modality_flops_per_image_token=modality_flops,
      flops_per_image_token=dense_flops + attention_flops + modality_flops,
      seq_len=int(config.seq_len),
  )


def model_flops(report: dict, positions: float, text_targets: float, image_positions: float) -> float:
  """Training FLOPs a step needs: the blocks and attention at every position, the LM head where
  the loss reads it (text targets: the chunked loss runs it nowhere else) and the modality
  layers on image positions. `report` is `report(config)`; this is MFU's numerator."""
  return (positions * report["body_flops_per_token"] + text_targets * report["head_flops_per_token"]
          + image_positions * report["modality_flops_per_image_token"])


def step_flops(config, report: dict, metrics: dict) -> float:
  """A training step's FLOPs (`model_flops`) from its metrics: `text_tokens` and `images` of the
  global batch, as the loss counts them (the trainer's MFU and tfx.sweeps' FLOP axis)."""
  n = patching.num_patches(config.image.resolution // config.autoencoder.downsample, config.image.patch_size)
  return model_flops(report, config.global_batch_size * config.seq_len, metrics["text_tokens"],
                     metrics["images"] * n)
