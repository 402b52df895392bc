"""The paper's pretraining setups (Zhou et al. 2024, Table 2), at pod scale.

  python -m tfx.train --workdir=gs://BUCKET/run \
    --config=experiments/transfusion.py:size=7B,encoder=linear,patch=2,image_text=DIR,text=DIR,tokenizer=FILE,vae=DIR

Arguments (comma-separated key=value):
  size       0.16B | 0.37B | 0.76B | 1.4B | 7B (required)
  encoder    linear (default) | unet: the modality layers (U-Net ~0.27B params at every size)
  patch      latent cells per patch side: 2 (default; 256 patches per image), 4 or 8 (Table 6)
  image_text a prepared image-caption dataset holding VAE latents (python -m tfx.data.prepare, then
             the autoencoder's latent cache); text: a prepared text dataset; tokenizer: a SentencePiece
             .model (the paper's: Llama 2's; model.vocab_size follows it); vae: the autoencoder folder
             (a tfx.train_autoencoder workdir or a diffusers AutoencoderKL folder: its kind,
             latent channels, downsampling and latent scaling are read from it)
  data_dir   where tfds datasets live (optional)

Everything else is the paper's: 4096-token sequences, 2M-token batches (512 x 4096),
250k steps (0.5T tokens), AdamW (0.9, 0.95, eps 1e-8, wd 0.1, clip 1.0), lr 3e-4
with 4000 warmup steps and cosine decay to 1.5e-5, lambda 5, eps-prediction on a
cosine schedule (T=1000) with noise limiting, caption first 80% of the time, text
and image tokens mixed 1:1, 256 px images as 32x32x8 VAE latents, 250 DDPM steps
at inference. The 7B headline run used 4M-token batches for 500k steps: add
--config.global_batch_size=1024 --config.total_steps=500000. Any --config.X flag
wins over the preset (e.g. --config.model.n_layers=2 for a smoke test).
Sharding: pure FSDP over every device, bf16 compute, scanned layers with full
remat; `python -m tfx.train --dry_run` reports the memory this needs per device.
"""
import math

from tfx import autoencoder
from tfx import config as tfx_config
from tfx import patching
from tfx.data import tokenizer
from tfx.model import presets

SIZES = ("0.16B", "0.37B", "0.76B", "1.4B", "7B")
ENCODERS = ("linear", "unet")
PATCHES = (2, 4, 8)
DATA_KEYS = ("image_text", "text", "tokenizer", "vae", "data_dir")
SEQ_LEN = 4096
TOKENS_PER_BATCH = 2 * 1024 * 1024
LLAMA2_PIECES = 32000                 # the paper's tokenizer (Llama 2's SentencePiece model)
# U-Net widths per patch size (one stride-2 level per halving) that give the
# paper's ~0.27B-parameter U-Net (down + up blocks): 275M, 262M, 268M. Every width
# is a multiple of 64 so the conv weights shard over FSDP on up to 64 devices.
UNET_CHANNELS = {2: (832, 1664), 4: (384, 768, 1536), 8: (384, 640, 1024, 1024)}
UNET_BLOCKS_PER_LEVEL = 2
# Mean caption length in tokens (short alt-text style captions, as in the
# paper's licensed image-caption data); used only to balance text vs image tokens.
CAPTION_TOKENS = 32
# Images a record may hold, over the mean the mix gives. The U-Net runs on that many
# slots per record, used or not. The real packer (tfx/data/packing.py) on the patch=2
# mix with synthetic captions (8-56 tokens) and text documents (exponential lengths,
# mean 300/1500/6000 tokens) held 7.9 images per record on average and up to 14 with
# no cap; capped at 10 it kept the image share of positions (0.497) and no padding
# (patch=4: 31.3 on average, up to 43; capped at 40 the share stayed 0.490). Dry run of
# size=0.16B,encoder=unet at batch 8 on one device: 30.2 GiB at cap 10, 39.6 GiB at 15.
IMAGE_CAP_MARGIN = 1.25


def parse(arg: str) -> dict[str, str]:
  """'size=7B,encoder=unet' -> {'size': '7B', 'encoder': 'unet'}, rejecting unknown keys."""
  known = ("size", "encoder", "patch") + DATA_KEYS
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in known:
      raise ValueError(f"experiments/transfusion.py: bad argument {part!r}; expected key=value with key in {known}")
    out[key] = value
  return out


def mix_weights(n_patches: int, caption_tokens: int = CAPTION_TOKENS) -> tuple[float, float]:
  """(image_text_weight, text_weight): the paper's 1:1 text tokens to image tokens.

  The weights are shares of positions, and a pair is n patches plus BOI/EOI and its
  caption, all three text. Patches are half of all positions when the pairs' share is
  (n + 2 + caption) / 2n: 0.566 at 2x2 patches (n = 256), 0.766 at 4x4 (n = 64). At 8x8
  (n = 16) a pair holds more text than patches, so even pairs alone are under half
  patches and that share would leave no text documents at all. There the 1:1 is kept
  between image patches and the text corpus, captions riding along with their images:
  w_pair * n / (n + 2 + caption) = w_text, i.e. 0.758 / 0.242, patches 24% of positions.
  """
  pair = n_patches + 2 + caption_tokens
  image_text = pair / (2 * n_patches)
  if image_text >= 1.0:
    image_text = pair / (pair + n_patches)
  return round(image_text, 4), round(1.0 - image_text, 4)


def image_cap(n_patches: int, image_text_weight: float, text_weight: float) -> int:
  """image.max_images_per_seq: the mix's mean images per record times IMAGE_CAP_MARGIN.

  The packer fills a record that reached the cap with text and catches the image stream up
  in later records, so the mix still holds; with no text stream a binding cap would leave
  padding instead, so there the cap is only what fits (one BOI/EOI per image).
  """
  fits = SEQ_LEN // (n_patches + 2)
  if text_weight <= 0:
    return fits
  mean = SEQ_LEN * image_text_weight / (n_patches + 2 + CAPTION_TOKENS)
  return min(fits, math.ceil(mean * IMAGE_CAP_MARGIN))


def get_config(arg: str = ""):
  """The paper's configuration for `arg` (see the module docstring)."""
  args = parse(arg)
  size, encoder = args.get("size", ""), args.get("encoder", "linear")
  if size not in SIZES:
    raise ValueError(f"experiments/transfusion.py: unknown size {size!r}; choose one of {SIZES}")
  if encoder not in ENCODERS:
    raise ValueError(f"experiments/transfusion.py: unknown encoder {encoder!r}; choose one of {ENCODERS}")
  patch = args.get("patch", "2")
  if not patch.isdigit() or int(patch) not in PATCHES:
    raise ValueError(f"experiments/transfusion.py: unknown patch {patch!r}; choose one of {PATCHES}")
  patch = int(patch)

  c = tfx_config.default()
  c.total_steps = 250_000
  c.seq_len = SEQ_LEN
  c.global_batch_size = TOKENS_PER_BATCH // SEQ_LEN
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.log_every_steps = 50

  m = presets.apply(c, size).model    # Table 2 sizes (tfx/model/presets.py); --config.model.* flags win
  # The vocabulary is the tokenizer's (0: derived, tfx/data/tokenizer.py). Named none, the
  # paper's: Llama 2's 32,000 pieces + PAD/BOI/EOI, rounded up to 128, as derived from it.
  m.vocab_size = 0 if args.get("tokenizer") else tokenizer.padded_vocab_size(LLAMA2_PIECES + 3)
  m.encoder = encoder
  m.unet_channels = UNET_CHANNELS[patch]
  m.unet_blocks_per_level = UNET_BLOCKS_PER_LEVEL
  m.dtype = "bfloat16"
  m.remat = "full"
  m.scan_layers = True

  ae = c.autoencoder
  ae.kind = "vae"
  ae.path = args.get("vae", "")
  ae.latent_channels = 8
  ae.downsample = 8
  # The VAE you bring says what it is: kind, latent channels, downsampling and latent
  # scaling come from its folder (autoencoder.json or a diffusers config.json) when it is here.
  found = autoencoder.describe(ae.path) if ae.path else None
  if found:
    ae.update(found)

  c.image.resolution = 256
  c.image.patch_size = patch
  n_patches = patching.num_patches(c.image.resolution // ae.downsample, patch)

  d = c.diffusion
  d.num_timesteps, d.schedule, d.prediction = 1000, "cosine", "eps"
  d.loss_weight = 5.0
  d.noise_limit = 500
  d.sampler, d.sample_steps = "ddpm", 250

  dt = c.data
  dt.image_text = args.get("image_text", "")
  dt.text = args.get("text", "")
  dt.tokenizer = args.get("tokenizer", "")
  dt.data_dir = args.get("data_dir", "")
  dt.image_text_weight, dt.text_weight = mix_weights(n_patches)
  c.image.max_images_per_seq = image_cap(n_patches, dt.image_text_weight, dt.text_weight)
  dt.caption_first_fraction = 0.8

  o = c.optim
  o.lr, o.warmup_steps, o.end_lr = 3e-4, 4000, 1.5e-5
  o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip = 0.9, 0.95, 1e-8, 0.1, 1.0

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c
