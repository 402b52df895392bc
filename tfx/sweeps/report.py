"""A sweep's results: eval JSON -> points on a training-FLOPs axis -> Markdown table, plots, parity ratios.

Training FLOPs at step s are s times the mean FLOPs of the logged steps up to s, each counted
as the trainer counts MFU (tfx.model.flops.step_flops: the model's FLOPs for that step's text
targets and images), read from the run's metrics.jsonl.
"""
import dataclasses
import fnmatch
import io
import json
import math

from tfx import fs, metrics as metrics_lib, workdir as workdir_lib
from tfx.eval import results

# Table columns by default (those present); every numeric metric is plotted.
HEADLINE = ("t2i_pass", "t2i_pass_single", "caption_exact_match", "caption_cider_d", "ppl_text",
            "ppl_caption", "fd_shapesnet", "fd_inception")
_NOT_PLOTTED = ("_seconds", "_num")


@dataclasses.dataclass
class Point:
  variant: str
  step: int
  flops: float            # training FLOPs up to `step`
  metrics: dict


def lower_is_better(metric: str) -> bool:
  """Perplexities, distances and losses fall as models improve; rates and scores rise."""
  base = metric.split("@")[0]
  return base.startswith(("ppl_", "fd_")) or base.endswith("loss")


def training_flops(workdir: str, steps: list[int]) -> dict[int, float]:
  """{step: training FLOPs up to it} from WORKDIR's config.json and metrics.jsonl."""
  from tfx.model import flops
  config = workdir_lib.load_config(workdir)
  report = flops.report(config)
  records = [r for r in metrics_lib.read_metrics(workdir) if "text_tokens" in r and "images" in r]
  out = {}
  for step in steps:
    upto = [flops.step_flops(config, report, r) for r in records if r["step"] <= step]
    if not upto:
      raise ValueError(f"{workdir}: no logged training step up to {step} in metrics.jsonl")
    out[step] = step * sum(upto) / len(upto)
  return out


def eval_records(workdir: str) -> dict[int, dict]:
  """{step: metrics} of WORKDIR/eval/<step>.json (the first evaluation of each step)."""
  directory = fs.join(workdir, results.EVAL_SUBDIR)
  if not fs.isdir(directory):
    return {}
  out = {}
  for name in fs.listdir(directory):
    stem = name[:-len(".json")] if name.endswith(".json") else ""
    if stem.isdigit():
      out[int(stem)] = json.loads(fs.read_text(fs.join(directory, name)))["metrics"]
  return dict(sorted(out.items()))


def collect(root: str, names: list[str]) -> list[Point]:
  """Every evaluated step of every variant under ROOT, on the FLOPs axis."""
  points = []
  for name in names:
    workdir = fs.join(root, name)
    evals = eval_records(workdir)
    if not evals:
      continue
    flops_at = training_flops(workdir, list(evals))
    points += [Point(name, step, flops_at[step], m) for step, m in evals.items()]
  return points


def plotted_metrics(points: list[Point]) -> list[str]:
  keys = {k for p in points for k, v in p.metrics.items() if isinstance(v, (int, float))}
  return sorted(k for k in keys if not k.endswith(_NOT_PLOTTED))


# ---- parity ----------------------------------------------------------------------------------------


def _better(a: float, b: float, lower: bool) -> bool:
  """a at least as good as b."""
  return a <= b if lower else a >= b


def flops_to_reach(points: list[tuple[float, float]], target: float, lower: bool) -> tuple[float, str]:
  """(FLOPs, how) at which the best-so-far curve of (flops, value) points first reaches `target`.

  Between two points the curve is linear in log FLOPs. how: "interpolated"; "at most" when the
  first point already reaches it (nothing earlier to interpolate from); "never" when no point does
  (FLOPs is then the largest seen).
  """
  pts = sorted(points)
  best_flops, best = None, None
  for flops, value in pts:
    if _better(value, target, lower):
      if best is None:
        return flops, "at most"
      if best == value:
        return flops, "interpolated"
      frac = (target - best) / (value - best)
      return math.exp(math.log(best_flops) + frac * (math.log(flops) - math.log(best_flops))), "interpolated"
    if best is None or _better(value, best, lower):
      best = value
    best_flops = flops
  return pts[-1][0], "never"


def parity(points: list[Point], family_a: str, family_b: str, metric: str) -> dict | None:
  """Paper Table 3: the FLOPs family B needs to match family A's best `metric`, over A's FLOPs
  for it. A family is a variant name or a glob over names (several sizes: their points pooled).
  None when either family has no value of `metric`."""
  lower = lower_is_better(metric)
  pick = lambda fam: [(p.flops, float(p.metrics[metric])) for p in points
                      if fnmatch.fnmatchcase(p.variant, fam) and metric in p.metrics]
  a, b = pick(family_a), pick(family_b)
  if not a or not b:
    return None
  target = (min if lower else max)(v for _, v in a)
  flops_a = min(f for f, v in a if v == target)
  flops_b, how = flops_to_reach(b, target, lower)
  return dict(metric=metric, a=family_a, b=family_b, target=target, flops_a=flops_a, flops_b=flops_b,
              ratio=flops_b / flops_a, how=how)


# ---- output --------------------------------------------------------------------------------------


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4g}"


def markdown(points: list[Point], columns: list[str], parities: list[dict], plots: list[str]) -> str:
  lines = ["# Sweep results", "",
           "Training FLOPs: the model's FLOPs per step (tfx.model.flops.step_flops) x steps.", "",
           "| variant | step | training FLOPs | " + " | ".join(columns) + " |",
           "|---|---:|---:|" + "---:|" * len(columns)]
  for p in sorted(points, key=lambda p: (p.variant, p.step)):
    lines.append(f"| {p.variant} | {p.step} | {p.flops:.3e} | "
                 + " | ".join(_fmt(p.metrics.get(c)) for c in columns) + " |")
  if parities:
    lines += ["", "## Parity FLOP ratio", "",
              "FLOPs B needs to reach A's best value, over the FLOPs A used for it (B's best-so-far "
              "curve, linear in log FLOPs between evaluations); < 1: B is cheaper.", "",
              "| metric | A | B | A's best | A FLOPs | B FLOPs | ratio | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in parities:
      note = {"interpolated": "", "at most": "B's first point already matches: ratio is an upper bound",
              "never": "B never matches: ratio is a lower bound"}[r["how"]]
      lines.append(f"| {r['metric']} | {r['a']} | {r['b']} | {_fmt(r['target'])} | {r['flops_a']:.3e} | "
                   f"{r['flops_b']:.3e} | {r['ratio']:.3g} | {note} |")
  if plots:
    lines += ["", "## Plots", ""] + [f"![{name}]({name}.png)" for name in plots]
  return "\n".join(lines) + "\n"


def plot(points: list[Point], metric: str, path: str) -> None:
  """`metric` against training FLOPs (log axis), one line per variant (the paper's Figure 2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
  for variant in sorted({p.variant for p in points}):
    series = sorted((p.flops, p.metrics[metric]) for p in points if p.variant == variant and metric in p.metrics)
    if series:
      ax.plot([f for f, _ in series], [v for _, v in series], marker="o", label=variant)
  ax.set_xscale("log")
  short = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.1e}")
  ax.xaxis.set_major_formatter(short)
  ax.xaxis.set_minor_formatter(short)  # within one decade only minor ticks are labelled
  ax.tick_params(axis="x", which="both", labelsize=6, labelrotation=45)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else ""))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  fs.write_bytes(path, png.getvalue())


def write(root: str, names: list[str], *, columns: list[str] | None = None, plots: list[str] | None = None,
          parity_pairs: list[tuple[str, str]] = (), parity_metrics: list[str] | None = None) -> str:
  """ROOT/report/: README.md (table, parity ratios, plots), <metric>.png (`plots`, default every
  metric), points.json; returns the .md path."""
  points = collect(root, names)
  if not points:
    raise ValueError(f"no evaluations under {root} for {', '.join(names)}")
  present = plotted_metrics(points)
  columns = [c for c in (columns or HEADLINE) if c in present]
  present = [m for m in present if plots is None or m in plots]
  parities = [r for a, b in parity_pairs for m in (parity_metrics or columns)
              if (r := parity(points, a, b, m)) is not None]
  out = fs.join(root, "report")
  fs.makedirs(out)
  for metric in present:
    plot(points, metric, fs.join(out, f"{metric}.png"))
  fs.write_text(fs.join(out, "points.json"),
                json.dumps({"points": [dataclasses.asdict(p) for p in points], "parity": parities}, indent=1))
  path = fs.join(out, "README.md")
  fs.write_text(path, markdown(points, columns, parities, present))
  return path
