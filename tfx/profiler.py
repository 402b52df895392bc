"""A jax.profiler trace of a window of train steps, where TensorBoard's profile plugin finds it."""
import jax

from tfx import fs


def trace_dir(workdir) -> str:
  """The TensorBoard log dir: traces go to its plugins/profile/<run>/<host>.xplane.pb."""
  return fs.join(workdir, "tensorboard")


class StepProfiler:
  """Traces steps [start, start + count) (count 0 = off); call before() and after() around each step."""

  def __init__(self, workdir, start: int, count: int, *, enabled: bool = True):
    self.log_dir, self.start, self.end = trace_dir(workdir), start, start + count
    self.enabled = enabled and count > 0
    self.active = False

  def before(self, step: int) -> None:
    """Starts the trace if `step` (about to run) is in the window (a resumed run starts mid-window)."""
    if self.enabled and not self.active and self.start <= step < self.end:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, done: int, outputs) -> None:
    """Stops the trace once step `done - 1` ends, after its outputs are computed (dispatch is async)."""
    if self.active and done >= self.end:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    """Ends a running trace (also where the run stops inside the window)."""
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
