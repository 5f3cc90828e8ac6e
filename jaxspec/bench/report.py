"""Figures from benchmark records: results.json, report.md and PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxspec import files

MAX_LISTED_MISMATCHES = 50
PLOTS = ("tau_per_category.png", "speedup.png", "accept_hist.png")  # what `plots` writes, in its order


def tau(records) -> float:
  """τ: new tokens from steps / target calls after prefill, the bonus token included (Spec-Bench's convention)."""
  calls = sum(r.active_calls for r in records)
  return sum(r.steps_tokens for r in records) / calls if calls else float("nan")


def _hist(records) -> list[int]:
  width = max((len(r.accept_hist) for r in records), default=0)
  total = np.zeros(width, np.int64)
  for r in records:
    total[:len(r.accept_hist)] += r.accept_hist
  return total.tolist()


def _num(x: float) -> float | None:
  return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _figures(recs, ref_recs, mism) -> dict:
  seconds = sum(r.seconds for r in recs)
  ref_seconds = sum(r.seconds for r in ref_recs)
  new = sum(r.new_tokens for r in recs)
  return {
      "tau": _num(tau(recs)), "speedup": _num(ref_seconds / seconds if seconds else float("nan")),
      "tokens_per_s": _num(new / seconds if seconds else float("nan")), "mismatches": len(mism),
      "n_prompts": len(recs), "new_tokens": new, "target_calls": sum(r.active_calls for r in recs),
      "drafter_calls": sum(r.drafter_calls for r in recs), "run_s": seconds, "accept_hist": _hist(recs)}


def results(cfg, env: dict, prompts, specs: dict, lossless: dict, records: dict, compile_s: dict,
            program_bytes: dict, mismatches: dict, unavailable: dict, *, complete: bool, wall_s: float,
            peak_rss_bytes: int, device_peak_bytes: int | None = None, notes: dict | None = None) -> dict:
  """The content of results.json: every figure per method, overall and per category, and the environment."""
  from jaxspec.bench.runner import REFERENCE

  cfg = cfg.resolved()  # the settings the run used, the defaults filled in
  cats = sorted({p.category for p in prompts})
  ref = records[REFERENCE]
  methods = {}
  for label, spec in specs.items():
    entry = {"description": spec.description, "lossless": lossless.get(label, spec.lossless),
             "baseline": spec.baseline}
    if notes and notes.get(label):
      entry["note"] = notes[label]  # what the method chose when it was built (e.g. a tree budget from cost)
    if label in unavailable:
      entry.update(available=False, reason=unavailable[label], tau=None, speedup=None, tokens_per_s=None,
                   mismatches=None, n_prompts=0, per_category={})
      methods[label] = entry
      continue
    recs = records[label]
    refs = ref[:len(recs)]
    mism = mismatches[label]
    entry.update(available=True, **_figures(recs, refs, mism), compile_s=compile_s[label],
                 program_bytes=program_bytes[label])
    entry["per_category"] = {}
    for c in cats:
      idx = [i for i, r in enumerate(recs) if r.category == c]
      if idx:
        entry["per_category"][c] = _figures([recs[i] for i in idx], [refs[i] for i in idx],
                                            [m for m in mism if m["category"] == c])
    entry["mismatch_list"] = mism
    entry["per_prompt"] = [{k: v for k, v in dataclasses.asdict(r).items() if k != "tokens"} for r in recs]
    methods[label] = entry
  return {
      "complete": complete,
      "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
      "environment": dict(env, wall_s=wall_s, peak_rss_bytes=peak_rss_bytes, device_peak_bytes=device_peak_bytes),
      "prompts": {"file": str(cfg.prompts or "quick (jaxspec/bench/data/quick.jsonl)"), "n": len(prompts),
                  "per_category": {c: sum(p.category == c for p in prompts) for c in cats}},
      "methods": methods,
  }


def _fmt(x, spec=".2f", none="—") -> str:
  return none if x is None else format(x, spec)


def markdown(res: dict) -> str:
  """report.md: the tables of a results dict."""
  cfg, env, methods = res["config"], res["environment"], res["methods"]
  avail = {k: v for k, v in methods.items() if v["available"]}
  cats = list(res["prompts"]["per_category"])
  greedy = cfg["temperature"] == 0
  lines = ["# jaxspec bench report", ""]
  if not res["complete"]:
    lines += ["**Incomplete run**: these figures cover the batches finished before it stopped.", ""]
  lines += [
      f"- prompts: `{res['prompts']['file']}`, {res['prompts']['n']} prompt{'s' * (res['prompts']['n'] != 1)} "
      f"({', '.join(f'{c} {n}' for c, n in res['prompts']['per_category'].items())})",
      f"- model: `{cfg['model'] or 'embedded SmolLM2-135M-Instruct'}` ({cfg.get('dtype', 'float32')}"
      + (f", {cfg['param_dtype']} weights" if cfg.get("param_dtype") else "")
      + (", layers under lax.scan" if cfg.get("scan_layers") else "")
      + (f", matmul precision {cfg['matmul_precision']}" if cfg.get("matmul_precision", "highest") != "highest"
         else "") + f"); max new tokens {cfg['max_new_tokens']}; "
      f"batch size {cfg['batch_size']}; " + ("greedy" if greedy else
                                             f"temperature {cfg['temperature']}, top-k {cfg['top_k']}, "
                                             f"top-p {cfg['top_p']}, seed {cfg.get('seed', 0)}")
      + (f"; params sharded over the mesh {cfg['mesh']} (the Hugging Face baselines run in torch, off it)"
         if cfg.get("mesh") else ""),
      f"- jax {env['jax']} on {env['backend']} ({', '.join(sorted(set(env['devices'])))} ×{env['device_count']}), "
      f"CPU {env['cpu']} ×{env['cpu_count']}, load average at start {_load(env['load_avg'])}",
      f"- wall time {env['wall_s']:.0f} s, peak RSS {env['peak_rss_bytes'] / 2**20:.0f} MiB"
      + (f", peak memory of the fullest device {env['device_peak_bytes'] / 2**20:.0f} MiB (JAX's arrays)"
         if env.get("device_peak_bytes") else "")
      + (f"; resumed after a kill: method runs (a method on a prompt batch) restored from earlier processes: "
         f"{env['resumed_runs']} (wall time, peak RSS and warm-up compile time are the last process's; each run's "
         "own compile time is that of the process that ran it)"
         if env.get("resumed_runs") else "")
      + (f"; persistent compilation cache {env['compilation_cache_dir']} (a compile time may be a load from it)"
         if env.get("compilation_cache_dir") else ""),
      "",
      "τ = new tokens / target calls after prefill (bonus token included). Speedup = wall time of jaxspec's greedy "
      "loop / the method's, same prompts, same run, after compilation. Program memory = XLA's arguments + outputs + "
      "temporaries of the compiled decode program (largest shape).",
      "",
      "## Overall", "",
      "| method | τ | speedup | tokens/s | mismatches | drafter calls | compile s | program MiB |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for label, m in avail.items():
    mm = compared_mismatches(res, label)
    mib = _fmt(m["program_bytes"] / 2**20 or None, ".0f")
    lines.append(f"| {label} | {_fmt(m['tau'])} | {_fmt(m['speedup'])}× | {_fmt(m['tokens_per_s'], '.1f')} | {mm} | "
                 f"{m['drafter_calls']:.0f} | {m['compile_s']:.1f} | {mib} |")
  for key, title in (("tau", "τ per category"), ("speedup", "Speedup per category")):
    lines += ["", f"## {title}", ""]
    if key == "speedup" and cfg["batch_size"] > 1:
      # One decode call runs a whole batch: its time cannot be told apart by row, so rows share it evenly.
      lines += [f"Prompts ran {cfg['batch_size']} to a batch and a batch is timed as a whole, so each row gets an "
                "even share of its batch's time: a category's figure is that of the batches its prompts were in, "
                "not its own. `--batch-size 1` times each prompt alone.", ""]
    lines += ["| method | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for label, m in avail.items():
      lines.append(f"| {label} | " + " | ".join(_fmt(m["per_category"].get(c, {}).get(key)) for c in cats) + " |")
  noted = {k: v["note"] for k, v in avail.items() if v.get("note")}
  if noted:
    lines += ["", "## Settings chosen by the methods", ""] + [f"- `{k}`: {v}" for k, v in noted.items()]
  off = {k: v for k, v in methods.items() if not v["available"]}
  if off:
    lines += ["", "## Unavailable", ""] + [f"- `{k}`: {v['reason']}" for k, v in off.items()]
  if greedy:
    lines += ["", "## Exactness", ""]
    if cfg.get("dtype", "float32") != "float32":
      lines += [f"The model ran in {cfg['dtype']}: a block verified in one forward and one-token steps round "
                "differently there, so outputs can leave greedy decoding at near-ties without a fault in a method "
                "(in float32 they stayed identical in every run measured; benchmarks/README.md, \"bfloat16\").", ""]
    for label, m in avail.items():
      if label == "greedy" or not m["lossless"]:
        continue
      lines.append(f"- `{label}`: {m['mismatches']} of {m['n_prompts']} outputs differ from greedy")
      for mm in m["mismatch_list"][:MAX_LISTED_MISMATCHES]:
        lines.append(f"  - question {mm['question_id']} ({mm['category']}): first difference at token "
                     f"{mm['first_diff']}; greedy `{mm['expected']!r}` vs `{mm['got']!r}`")
  else:
    lines += ["", "## Exactness", "",
              "Sampled outputs are random draws, so they are not compared with another method's token by token "
              "(mismatches: n/a). That each lossless method samples the target's own distribution is shown by "
              "jaxspec's χ² tests over thousands of generations per setting (`tests/test_speculative.py`, "
              "`test_opt_tree.py`, `test_eagle.py`, `test_bpd.py`, `test_lookup.py`), whose power is checked on "
              "broken acceptance rules that they reject. Run with `--temperature 0` to check token identity with "
              "greedy decoding here."]
  lines += ["", "## Plots", "", "![τ per category](tau_per_category.png)", "", "![speedup](speedup.png)", "",
            "![accepted lengths](accept_hist.png)", ""]
  return "\n".join(lines)


def _load(load) -> str:
  return "n/a" if not load else " / ".join(f"{x:.2f}" for x in load)


def plots(res: dict, out: Path) -> list[Path]:
  """τ per category per method, speedup bars, and accepted-length histograms, as PNG files."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  avail = {k: v for k, v in res["methods"].items() if v["available"]}
  cats = list(res["prompts"]["per_category"])
  names = list(avail)
  paths = []
  tau_png, speedup_png, hist_png = PLOTS

  fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(cats) + 2), 4))
  width = 0.8 / max(1, len(names))
  colors = plt.get_cmap("tab20").colors
  for i, label in enumerate(names):
    vals = [avail[label]["per_category"].get(c, {}).get("tau") or 0 for c in cats]
    ax.bar(np.arange(len(cats)) + i * width, vals, width, label=label, color=colors[i % len(colors)])
  ax.set_xticks(np.arange(len(cats)) + width * (len(names) - 1) / 2, cats, rotation=30, ha="right")
  ax.set_ylabel("τ (tokens per target call)")
  ax.set_title("τ per category")
  ax.legend(fontsize="small", ncol=2)
  fig.tight_layout()
  paths.append(_save(fig, out / tau_png))

  fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.5))
  speed = [avail[n]["speedup"] or 0 for n in names]
  ax.barh(names, speed, color=["#888" if n == "greedy" else "#2a7" for n in names])
  ax.axvline(1.0, color="k", lw=0.8)
  for y, s in enumerate(speed):
    ax.text(s, y, f" {s:.2f}×", va="center", fontsize="small")
  ax.set_xlabel("wall-clock speedup over jaxspec greedy (same run)")
  ax.invert_yaxis()
  fig.tight_layout()
  paths.append(_save(fig, out / speedup_png))

  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
  for ax, label in zip(axes.flat, names):
    h = np.asarray(avail[label]["accept_hist"], float)
    if h.sum() > 0:
      h = h / h.sum()
    ax.bar(np.arange(len(h)), h)
    ax.set_title(f"{label} (τ {_fmt(avail[label]['tau'])})", fontsize="small")
    ax.set_xlabel("tokens committed per step")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  paths.append(_save(fig, out / hist_png))
  return paths


def _save(fig, path: Path) -> Path:
  files.write_figure(path, fig)
  return path


def write_all(out: Path, res: dict) -> None:
  """results.json, report.md and the plots, each written whole or not at all."""
  files.write_files(out, {"results.json": files.json_writer(res), "report.md": files.text_writer(markdown(res))})
  plots(res, out)


def load(path: str | os.PathLike) -> dict:
  return json.loads(Path(path).read_text())


def summary_lines(res: dict) -> Sequence[str]:
  """A short table for the terminal."""
  w = max([22, *map(len, res["methods"])])  # the widest label (long option values, e.g. a heads folder)
  rows = [f"{'method':<{w}} {'tau':>6} {'speedup':>8} {'tok/s':>8} {'mismatch':>8}"]
  for label, m in res["methods"].items():
    if not m["available"]:
      rows.append(f"{label:<{w}} unavailable: {m['reason']}")
    else:
      rows.append(f"{label:<{w}} {_fmt(m['tau']):>6} {_fmt(m['speedup']):>7}× {_fmt(m['tokens_per_s'], '.1f'):>8} "
                  f"{compared_mismatches(res, label):>8}")
  return rows


def compared_mismatches(res: dict, label: str) -> str:
  """A method's count of outputs that differ from greedy's, or "n/a" where none were compared: sampling, the
  reference itself, methods that are not lossless."""
  m = res["methods"][label]
  greedy = res["config"]["temperature"] == 0
  return str(m["mismatches"]) if greedy and m["lossless"] and label != "greedy" else "n/a"
