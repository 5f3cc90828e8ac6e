"""Training curves: `curves.png` beside a run's `metrics.jsonl`, one panel per metric over the steps.

The trainer redraws it after evaluations (at most once every `MIN_INTERVAL_S` seconds) and when it stops, so a run
that is killed still leaves the curves up to its last evaluation. A training metric and its held-out counterpart
(`loss` and `eval/loss`) share a panel, and numbered families (`acc_h1`, `acc_h2`, ... or `kl_0`, `kl_1`, ...) share
one with a line per member. `python -m training.curves RUN_DIR` draws it for any run folder by hand.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from jaxspec import files

CURVES_FILE = "curves.png"
MIN_INTERVAL_S = 30.0
SKIP = ("steps_per_sec",)  # the machine's speed, not the model's progress
# The y axis of a panel, by its metric's name (a family's stem): what the number is and in what unit.
UNITS = {"loss": "objective (nats; the sum of its weighted terms)", "loss_*": "loss of each part (nats per token)",
         "ce": "cross-entropy (nats per token)",
         "kl": "KL divergence (nats per token)", "acc": "top-1 accuracy (fraction)", "token_acc": "accuracy (fraction)",
         "agree": "agreement with the target (fraction)", "tau_proxy": "τ estimate (tokens per step)",
         "grad_norm": "gradient norm (global L2)", "other_mass": "target mass outside its stored top K (fraction)",
         "consistency": "consistency loss (nats per token)", "ar": "AR loss (nats per token)",
         "rep": "n-grams seen earlier in the output (fraction)", "out_len": "output length (tokens)",
         "agree_base": "common prefix with the base's output (fraction)",
         "jacobi_tau": "Jacobi τ (tokens per iteration)"}
_MEMBER = re.compile(r"^(.*?)(?:_h|_)(\d+)$")  # acc_h3 -> ("acc", 3), kl_0 -> ("kl", 0)


def read_metrics(path: str | Path) -> list[dict]:
  """The records of a metrics.jsonl (lines a kill cut short are skipped)."""
  records, _ = files.read_jsonl(path)  # lines cut short or damaged are skipped
  return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]


def panels(records: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
  """`{panel: {line label: [(step, value), ...]}}`: `loss` first, the others in the order they first appear."""
  out: dict[str, dict[str, list[tuple[float, float]]]] = {}
  for rec in records:
    for key, value in rec.items():
      if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        continue
      held_out = key.startswith("eval/")
      name = key[5:] if held_out else key
      if name in SKIP:
        continue
      m = _MEMBER.match(name)
      panel = f"{m.group(1)}_*" if m else name
      label = (name if m else "train") if not held_out else (f"eval {name}" if m else "eval")
      out.setdefault(panel, {}).setdefault(label, []).append((rec["step"], float(value)))
  return dict(sorted(out.items(), key=lambda kv: kv[0] != "loss"))  # the objective first, then as they appear


def plot_metrics(metrics_path: str | Path, out: str | Path | None = None, title: str | None = None) -> Path | None:
  """Draws the curves of a metrics.jsonl into `out` (default: curves.png beside it); None when it holds no values."""
  from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures are left alone

  metrics_path = Path(metrics_path)
  groups = panels(read_metrics(metrics_path))
  if not groups:
    return None
  cols = min(3, len(groups))
  rows = math.ceil(len(groups) / cols)
  fig = Figure(figsize=(4.6 * cols, 3.0 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (panel, lines) in zip(axes.flat, groups.items()):
    members = list(dict.fromkeys(label.removeprefix("eval").strip() for label in lines))
    family = not set(members) <= {"", "train"}
    for label, points in lines.items():
      steps, values = zip(*points)
      held_out = label.startswith("eval")
      # a family member keeps its colour on both sides (dashed with markers: held out); a lone metric is
      # train in the first colour, eval in the second
      colour = f"C{members.index(label.removeprefix('eval').strip()) % 10}" if family else ("C1" if held_out else "C0")
      # (a training line of one point, before its second log, would be invisible without a marker)
      ax.plot(steps, values, marker="o" if held_out else "." if len(steps) == 1 else None, markersize=3,
              linewidth=1.2 if held_out else 0.9, linestyle="--" if held_out and family else "-", color=colour,
              label=label)
    only_eval = all(label.startswith("eval") for label in lines)
    ax.set_title(panel + (" (held out)" if only_eval else ""), fontsize="small")
    ax.set_xlabel("step", fontsize="small")
    stem = panel.removesuffix("_*")
    # (by the panel's name, its stem, or the stem without its number: eval/rep4 is CLLM's rep<n>)
    unit = next((UNITS[k] for k in (panel, stem, stem.split("_")[0], stem.rstrip("0123456789")) if k in UNITS), stem)
    ax.set_ylabel(unit, fontsize="x-small")
    ax.tick_params(labelsize="x-small")
    if len(lines) > 1:
      ax.legend(fontsize="xx-small", ncol=2 if len(lines) > 4 else 1, framealpha=0.6)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  fig.suptitle(title or f"Training curves of {metrics_path.parent} (held-out evaluations marked with dots)",
               fontsize="small")
  fig.tight_layout()
  out = Path(out) if out is not None else metrics_path.with_name(CURVES_FILE)
  files.write_figure(out, fig)
  return out


def main(argv: list[str] | None = None) -> int:
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 1:
    print("usage: python -m training.curves RUN_DIR (a checkpoint folder holding metrics.jsonl)", file=sys.stderr)
    return 2
  path = Path(args[0])
  if not path.exists():
    print(f"{path} does not exist: pass a run's checkpoint folder (train.checkpoint_dir)", file=sys.stderr)
    return 2
  path = path / "metrics.jsonl" if path.is_dir() else path
  if not path.is_file():
    print(f"no metrics.jsonl at {path}: pass a run's checkpoint folder (train.checkpoint_dir)", file=sys.stderr)
    return 2
  out = plot_metrics(path)
  print(out if out is not None else f"{path} holds no metrics yet")
  return 0


if __name__ == "__main__":
  sys.exit(main())
