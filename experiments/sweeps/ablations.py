"""The paper's ablations on experiments/shapes.py, one variant per switch (docs/experiments.md).

  python -m tfx.sweep --config=experiments/shapes.py --sweep=experiments/sweeps/ablations.py \
    --set=total_steps=1800 --set=checkpoint_every_steps=900 --set=sample_every_steps=0 \
    --eval_steps=900,1800 --workdir=/tmp/ablations

Each variant changes one key of the default recipe (U-Net patch layers, 8x8 patches, the
noise limit at 150, lambda, bidirectional image attention); the base is drawn with three
seeds to show how far two runs of one config differ. 1800 steps per variant: the ten take
53 minutes on 2 CPU cores (measured, partly shared with tests). The measured sweep's base
had lambda 5; shapes.py's is 20 since 2026-12-05, so add --set=diffusion.loss_weight=5 (and
docs/experiments.md's other flags for the earlier recipe, guidance 3 at every step among
them) to run it as measured: without it, lambda_20 repeats the base.
"""

VARIANTS = {
    "base": {},
    "causal": {"model.image_attention": "causal"},
    "noise_limit_off": {"diffusion.noise_limit": 999},
    "lambda_1": {"diffusion.loss_weight": 1.0},
    "lambda_20": {"diffusion.loss_weight": 20.0},
    "linear_p8": {"model.encoder": "linear"},
    "unet_p4": {"image.patch_size": 4},
    "linear_p4": {"model.encoder": "linear", "image.patch_size": 4},
    "base_seed1": {"seed": 1},
    "base_seed2": {"seed": 2},
}
