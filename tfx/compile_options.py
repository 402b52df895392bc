"""XLA compiler options that tfx's train step compiles with, by config and backend."""
import functools

import jax

# XLA:CPU (jax 0.10) hands dots, convolutions, elementwise ops and reductions to YNNPACK
# fusions. On the shapes default's train step (2 cores) the elementwise and reduction
# fusions ran slower than XLA's own loops (each attention-softmax gradient row sum took
# 1.5-2 ms as a YNN fusion); with YNNPACK for dots only, the step's minimum over 60 steps
# was 86-88 ms against 93-101 ms (3 alternating runs each, 2026-12-06; docs/evaluation.md).
CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def for_backend(backend: str) -> dict:
  """The options for `backend`; none where this jax's XLA does not know them."""
  if backend != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU).lower(1.0).compile()
  except jax.errors.JaxRuntimeError:
    return {}
  return dict(CPU)


def train_step(config) -> dict:
  """The options for `config`'s train step on the default backend: config.cpu_ynnpack_dots_only
  turns on the CPU's (off by default: a run's floats, so its scores, change with them)."""
  if not config.get("cpu_ynnpack_dots_only", False):
    return {}
  return for_backend(jax.default_backend())
