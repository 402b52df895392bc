"""Training metrics: JSONL + TensorBoard writers, delayed fetch, MFU, NaN guard, progress line."""
import io
import json
import math
import sys
import time
from typing import Callable

import jax
import numpy as np

from tfx import fs

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per chip, by device_kind substring (first match wins).
PEAK_FLOPS_PER_DEVICE = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),   # v5e / "TPU v5 lite"
    ("TPU v4", 275e12),
)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


def peak_flops(device: jax.Device) -> float | None:
  """The device's peak FLOP/s from the table, or None when unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  return next((flops for name, flops in PEAK_FLOPS_PER_DEVICE if name in kind), None)


def check_finite(step: int, metrics: dict) -> None:
  """Raises NonFiniteLossError naming the step when the loss is NaN or Inf."""
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}; stopping (the last checkpoint before it is intact). "
        "Lower optim.lr, raise optim.warmup_steps or check the data.")


class DelayedFetch:
  """Holds step s's device metrics and hands back step s-1's as host floats.

  Fetching the previous step's values lets the device run step s while the host
  logs s-1, so the host never waits on the step it just dispatched.
  """

  def __init__(self):
    self._pending = None

  def push(self, step: int, metrics: dict) -> tuple[int, dict] | None:
    previous, self._pending = self._pending, (step, metrics)
    return None if previous is None else (previous[0], to_host(previous[1]))

  def flush(self) -> tuple[int, dict] | None:
    previous, self._pending = self._pending, None
    return None if previous is None else (previous[0], to_host(previous[1]))


def to_host(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


class Throughput:
  """Tokens/s and MFU over the interval since the last call.

  `step_flops(metrics)` gives a step's training FLOPs from its metrics (text targets and images
  differ from step to step); the logged step's count stands for the interval's steps.
  """

  def __init__(self, tokens_per_step: int, step_flops: Callable[[dict], float] | None, num_devices: int,
               device: jax.Device):
    self.tokens_per_step, self.step_flops = tokens_per_step, step_flops
    peak = peak_flops(device)
    self.peak_total = peak * num_devices if peak else None
    self._last = None

  def update(self, step: int, metrics: dict | None = None) -> dict:
    now, out = time.perf_counter(), {}
    if self._last is not None and step > self._last[0]:
      seconds = now - self._last[1]
      steps = step - self._last[0]
      out["steps_per_sec"] = steps / seconds
      out["tokens_per_sec"] = steps * self.tokens_per_step / seconds
      if self.step_flops and self.peak_total and metrics is not None:
        out["mfu"] = out["steps_per_sec"] * self.step_flops(metrics) / self.peak_total
    self._last = (step, now)
    return out


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and to TensorBoard."""

  def __init__(self, workdir, *, enabled: bool = True):
    self.enabled = enabled
    self.workdir = str(workdir)
    self.path = fs.join(workdir, METRICS_FILE)
    self._tb = fs.tensorboard_writer(fs.join(workdir, "tensorboard")) if enabled else None

  def drop_after(self, step: int) -> None:
    """Removes records past `step` (left by a run killed after its last checkpoint)."""
    if not self.enabled or not fs.exists(self.path):
      return
    lines = fs.read_text(self.path).splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
      fs.write_text(self.path, "".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    fs.append_text(self.path, json.dumps(record) + "\n")
    for key, value in metrics.items():
      tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
      self._tb.add_scalar(tag, float(value), int(step))

  def write_image(self, step: int, name: str, image_HW3: np.ndarray) -> None:
    """Saves WORKDIR/samples/<name>_<step>.png and logs it to TensorBoard under samples/<name>."""
    if not self.enabled:
      return
    from PIL import Image
    png = io.BytesIO()
    Image.fromarray(np.asarray(image_HW3, np.uint8)).save(png, format="PNG")
    fs.write_bytes(fs.join(self.workdir, "samples", f"{name}_{int(step):08d}.png"), png.getvalue())
    self._tb.add_image(f"samples/{name}", np.asarray(image_HW3, np.uint8), int(step), dataformats="HWC")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl in order."""
  path = fs.join(workdir, METRICS_FILE)
  if not fs.exists(path):
    return []
  return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


class Progress:
  """A one-line progress report: step, loss, steps/s and ETA."""

  def __init__(self, total_steps: int, *, enabled: bool = True, stream=None):
    self.total_steps, self.enabled, self.stream = total_steps, enabled, stream

  def report(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    rate = metrics.get("steps_per_sec")
    eta = _format_seconds((self.total_steps - step) / rate) if rate else "?"
    rate_text = f"{rate:.2f}" if rate else "?"
    print(f"step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  "
          f"{rate_text} steps/s  ETA {eta}", file=self.stream or sys.stderr, flush=True)


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
