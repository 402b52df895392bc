"""Transfusion against its Chameleon baseline at four FLOP budgets (docs/experiments.md).

After the VQ tokenizer and its code cache (experiments/chameleon.py's first two commands):

  python -m tfx.sweep --config=experiments/shapes.py --sweep=experiments/sweeps/transfusion_vs_chameleon.py \
    --set=keep_checkpoints=0 --set=checkpoint_every_steps=1800 --eval_steps=1800,3600,5400,7200 \
    --parity=chameleon,transfusion --workdir=/tmp/t_vs_c

The chameleon variant is experiments/chameleon.py expressed as overrides of shapes.py; edit
the two paths if the tokenizer or the cache live elsewhere. Both were measured with guidance 3
at every step and one draw per prompt (docs/experiments.md says how to run the transfusion variant so).
"""

VARIANTS = {
    "transfusion": {},
    "chameleon": {"model.image_mode": "discrete", "autoencoder.kind": "vq",
                  "autoencoder.path": "/tmp/shapes_vq", "autoencoder.latent_channels": 8,
                  "autoencoder.downsample": 4, "autoencoder.codebook_size": 256,
                  "image.patch_size": 1, "data.image_text": "/tmp/shapes_codes",
                  "diffusion.cfg_scale": 3.0, "diffusion.cfg_interval": (0.0, 1.0),
                  "diffusion.best_of": 1},
}
