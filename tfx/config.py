"""Every config key tfx reads, with its default. Experiment files override these."""
import ml_collections


def default() -> ml_collections.ConfigDict:
  """The full default config; `experiments/*.py` start here and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0                         # one seed for init, data order and diffusion noise
  c.total_steps = 1000               # optimizer steps to train
  c.global_batch_size = 8            # sequences per step, over all hosts
  c.seq_len = 256                    # tokens per packed sequence (text tokens + patches)
  c.checkpoint_every_steps = 500     # save the train state and data iterator this often
  c.keep_checkpoints = 3             # how many recent checkpoints to keep
  c.log_every_steps = 10             # write metrics.jsonl / TensorBoard this often
  c.eval_every_steps = 0             # 0 = no evaluation during training
  c.sample_every_steps = 0           # 0 = no sample grids during training
  c.sample_prompts = (               # captions drawn into WORKDIR/samples/ every sample_every_steps
      "a red circle", "two blue squares", "a green triangle to the left of a yellow square",
      "three purple circles")
  c.profile_start_step = 10          # first step of the jax.profiler trace (after the compile at step 0)
  c.profile_steps = 0                # steps traced (process 0) into WORKDIR/tensorboard/plugins/profile; 0 = off
  c.cpu_ynnpack_dots_only = False    # XLA:CPU: YNNPACK for matmuls only (tfx/compile_options.py: ~8% faster
                                     # shapes step; off by default, since it changes the numerics of every run)
  c.init_from = ""                   # fine-tuning: a run with no checkpoint starts from this workdir's latest params (EMA if saved)
  c.stop_after_step = 0              # end this run early at this step, after a checkpoint (0 = total_steps); the schedule still spans total_steps

  # -- model: a Llama-style decoder plus modality layers ---------------------
  c.model = m = ml_collections.ConfigDict()
  m.preset = ""                      # tfx.model.presets name the sizes below came from (set by presets.apply, before overrides)
  m.vocab_size = 0                   # text vocabulary; 0 = the tokenizer's ids (specials included) rounded up to 128
  m.d_model = 128                    # residual width
  m.n_layers = 2                     # transformer blocks
  m.n_heads = 4                      # query heads
  m.n_kv_heads = 4                   # key/value heads (grouped-query attention when < n_heads)
  m.head_dim = 0                     # 0 = d_model // n_heads
  m.mlp_dim = 0                      # SwiGLU hidden width; 0 = 8/3 * d_model rounded to 64
  m.qk_norm = False                  # RMSNorm on queries and keys
  m.rope_theta = 10000.0             # RoPE base
  m.norm_eps = 1e-5                  # RMSNorm epsilon
  m.tie_embeddings = False           # share text embedding and LM head
  m.encoder = "linear"               # modality layers: "linear" or "unet"
  m.image_pos_embed = "none"         # "sincos2d" adds a fixed (row, column) embedding to each patch vector
  m.unet_channels = (64, 128)        # U-Net down/up block widths (encoder="unet")
  m.unet_blocks_per_level = 1        # residual blocks per U-Net level
  m.unet_space_to_depth = 1          # U-Net input fold: f > 1 regroups f x f latent cells into channels
                                     # first (pixel-unshuffle) and drops the full-resolution level
  m.t_embed_dim = 256                # sinusoidal timestep features before the MLP
  m.dtype = "float32"                # compute dtype: "float32" or "bfloat16" (params stay fp32)
  m.attention = "auto"               # "dense" ([L, S] mask), "flash" (tfx/model/flash.py: Triton on GPU,
                                     # Mosaic on TPU, Pallas interpret mode on CPU), "auto" (dense until
                                     # the kernels are measured on hardware)
  m.image_attention = "bidirectional"  # patches of one image: "bidirectional" (see each other) or "causal"
                                     # (only earlier patches: the paper's causal-mask ablation)
  m.remat = "none"                   # per-block remat, by what it keeps: "none" (all), "full" (nothing),
                                     # "dots" (matmul outputs), "attention" (attention outputs),
                                     # "dots_offload" (matmul outputs in host memory)
  m.scan_layers = False              # stack blocks with nnx.scan (faster compile at depth)
  m.image_mode = "continuous"        # "continuous" (Transfusion: patches + diffusion) or "discrete" (Chameleon:
                                     # VQ codes as LM tokens after the text vocabulary, plain causal mask)
  m.loss_chunk = 512                 # LM loss: positions per row with logits held at once (0 = all [B, L, V])

  # -- images: what one image is in the sequence ----------------------------
  c.image = im = ml_collections.ConfigDict()
  im.resolution = 32                 # pixel side of images fed to the autoencoder
  im.patch_size = 4                  # k: k x k latent cells per patch
  im.max_images_per_seq = 4          # upper bound on images in one packed sequence

  # -- autoencoder: pixels <-> latents --------------------------------------
  c.autoencoder = ae = ml_collections.ConfigDict()
  ae.kind = "pixels"                 # "pixels" (identity), "vae" (tfx-trained), "diffusers", "vq" (tfx-trained
                                     # VQ tokenizer: images <-> int codes, for model.image_mode "discrete")
  ae.path = ""                       # checkpoint dir / diffusers folder for "vae"/"diffusers"
  ae.latent_channels = 3             # channels of the latent grid (3 for pixels)
  ae.downsample = 1                  # pixels per latent cell along each side (1 for pixels)
  ae.scaling_factor = 1.0            # latents are multiplied by this before diffusion
  ae.shift_factor = 0.0              # ... after subtracting this
  ae.vae_channels = (16, 32, 64)     # tfx VAE block widths; downsample = 2 ** (len - 1)
  ae.vae_layers_per_block = 1        # tfx VAE ResNet blocks per encoder level (decoder: +1)
  ae.vae_norm_groups = 8             # tfx VAE GroupNorm groups
  ae.vae_mid_attention = True        # tfx VAE self-attention in the mid blocks
  ae.kl_weight = 1e-6                # tfx VAE KL weight vs the per-pixel L1+L2 loss (SD's scale)
  ae.codebook_size = 256             # VQ codebook entries (kind "vq"): an image is h*w codes in [0, this)
  ae.vq_beta = 0.25                  # VQ commitment loss weight
  ae.vq_ema_decay = 0.99             # VQ codebook EMA decay; 0 = straight-through (the codebook learns by gradient)
  ae.vq_dead_threshold = 1.0         # VQ codes picked fewer times per batch (EMA) are restarted at encoder outputs
  ae.train_steps = 3000              # tfx.train_autoencoder optimizer steps
  ae.train_batch_size = 32           # tfx.train_autoencoder images per step (all hosts)
  ae.train_lr = 1e-3                 # tfx.train_autoencoder peak Adam learning rate (cosine decay)
  ae.eval_images = 1000              # test images for PSNR and the shapes scorer after training

  # -- diffusion ------------------------------------------------------------
  c.diffusion = d = ml_collections.ConfigDict()
  d.num_timesteps = 1000             # T, discrete training timesteps
  d.schedule = "cosine"              # noise schedule (Nichol & Dhariwal cosine)
  d.schedule_shift = 1.0             # s >= 1 divides the schedule's SNR by s^2 (more high-noise steps)
  d.prediction = "eps"               # model target: "eps", "v" or "x0"
  d.loss_weight = 5.0                # lambda in L = L_lm + lambda * L_diff
  d.noise_limit = 500                # max t for images that precede their caption
  d.sampler = "ddim"                 # "ddim" or "ddpm"
  d.sample_steps = 50                # denoising steps at inference
  d.cfg_scale = 3.0                  # classifier-free guidance scale at inference
  d.cfg_interval = (0.0, 1.0)        # guide only the steps with t / (T - 1) in [lo, hi]; elsewhere the
                                     # conditional prediction alone (Kynkaanniemi et al., 2024)
  d.clip_x0 = 0.0                    # > 0: sampling clips each step's predicted x0 to [-c, c] (pixels: 1,
                                     # their range); 0 = off
  d.best_of = 1                      # text-to-image draws this many images per caption and keeps the one
                                     # the model itself reads likeliest as the caption (log p(caption |
                                     # image)); costs best_of times the denoising. 1 = one draw, no ranking
  d.read_only_cache = True           # denoising steps only read the KV cache (False: each step writes its chunk, as before)
  d.loss_weighting = "none"          # x0-error weight: "none" (the target's own), "min_snr" (min(SNR, gamma)),
                                     # "clipped_v" (min(SNR, gamma) + 1: v's SNR + 1, clipped)
  d.min_snr_gamma = 5.0              # gamma of "min_snr" and "clipped_v"
  d.timestep_sampling = "uniform"    # training t per image: "uniform" (independent draws) or "stratified"
                                     # (a step's images one in each of as many equal strata of [0, 1))
  d.timestep_density = "uniform"     # training t's density over [0, T): "uniform" or "logit_normal"
                                     # (t / T = sigmoid(N(mean, std)): most draws mid-range; SD3)
  d.logit_normal = (0.0, 1.0)        # (mean, std) of "logit_normal"'s logit
  d.timestep_uniform_share = 0.0     # with "logit_normal": this share of the draws stays uniform (a mixture)

  # -- data -----------------------------------------------------------------
  c.data = dt = ml_collections.ConfigDict()
  dt.image_text = "shapes"           # image-caption source: "shapes", "shapes_wide" (built in) or a prepared dir
  dt.text = "pydoc_topics"           # text-only source: built-in name or prepared dir ("" = none)
  dt.data_dir = ""                   # where tfds datasets live ("" = ~/tensorflow_datasets)
  dt.tokenizer = ""                  # SentencePiece .model path ("" = built for the default data)
  dt.image_text_weight = 0.5         # share of positions (tokens + patches) from image-caption examples
  dt.text_weight = 0.5               # share of positions from text documents (paper: 1:1 with images)
  dt.caption_first_fraction = 0.8    # share of pairs as caption->image (rest image->caption)
  dt.caption_dropout = 0.1           # drop the caption of caption-first pairs (for CFG)
  dt.shuffle_buffer_seed = 0         # shuffle seed offset (added to c.seed)
  dt.streams = 0                     # packed streams per global batch (0 = one per host); a fixed multiple of
                                     # the host count gives the same batches on any number of hosts
  dt.worker_count = 0                # Grain worker processes (0 = in the main process); batches depend on it
  dt.prefetch = 2                    # batches prefetched ahead of the step
  dt.shapes_train_size = 50000       # shapes images in the built-in train split
  dt.shapes_eval_size = 1000         # shapes images in each of validation / test / heldout
  dt.shapes_kind_weights = (1.0, 1.0, 1.0)  # single / count / relation scenes in the built-in train split
                                     # (the other splits stay even); uneven weights name another dataset
  dt.tokenizer_vocab_size = 1024     # pieces of the default SentencePiece model, its specials included
  dt.max_caption_tokens = 64         # captions are cut to this many tokens

  # -- optimizer (AdamW, warmup + cosine; paper defaults) -------------------
  c.optim = o = ml_collections.ConfigDict()
  o.lr = 3e-4                        # peak learning rate
  o.warmup_steps = 4000              # linear warmup
  o.end_lr = 1.5e-5                  # the schedule decays to this
  o.schedule = "cosine"              # after warmup: "cosine" to end_lr, or "wsd" (lr held, then a cooldown)
  o.decay_fraction = 0.2             # "wsd": the last 20% of the steps cool down as 1 - sqrt(progress)
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1               # not applied to norms, biases and embeddings
  o.grad_clip = 1.0                  # global-norm clip
  o.ema_decay = 0.0                  # 0 = no EMA copy of the params
  o.grad_accum_steps = 1             # micro-batches per step (global_batch_size / this rows each); 1 = none
  o.nan_policy = "stop"              # a step with a non-finite loss, gradient or update: "stop" (raise, never save
                                     # it) or "skip" (keep the old state, count it in skipped_steps); both loops
  o.max_skips_in_row = 10            # "skip" stops after this many non-finite steps in a row

  # -- mesh: logical axes -> devices (-1 = fill with the remaining devices) --
  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.tensor = 1
  # multi-slice: each mesh axis is dcn_* (across slices, slow network) x the size above (per slice)
  ms.dcn_data = 1                    # data-parallel replicas across slices (MaxText's dcn_data_parallelism)
  ms.dcn_fsdp = 1                    # FSDP across slices (rarely worth the DCN traffic)
  ms.dcn_tensor = 1                  # tensor parallelism across slices (almost never wanted)
  return c
