"""Generation, one job per module: images (IO), sampling (next token), prompts (host-side layout),
kernels (pure functions that run the model), engine (the Generator). `tfx.generate` re-exports
the public names."""
