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


def _figures(recs, ref_recs, mism, compared: str | None) -> dict:
  """A method's figures on some prompts. `compared`: what its outputs' differences from greedy's are, "mismatches"
  (a lossless method at temperature 0; 0 for greedy itself), "differ_from_greedy" (another method at temperature 0:
  agreement, not exactness) or None (nothing compared: sampling)."""
  seconds = sum(r.seconds for r in recs)
  ref_seconds = sum(r.seconds for r in ref_recs)
  new = sum(r.new_tokens for r in recs)
  figures = {
      "tau": _num(tau(recs)), "speedup": _num(ref_seconds / seconds if seconds else float("nan")),
      "tokens_per_s": _num(new / seconds if seconds else float("nan")),
      "mismatches": len(mism) if compared == "mismatches" else None,
      "n_prompts": len(recs), "new_tokens": new,
      # τ = step_tokens / target_calls: the new tokens but each output's first (prefill's) over the verify forwards
      # each prompt took part in (a batch's shared forward counted once per prompt it served)
      "step_tokens": sum(r.steps_tokens for r in recs), "target_calls": sum(r.active_calls for r in recs),
      "drafter_calls": sum(r.drafter_calls for r in recs), "run_s": seconds, "accept_hist": _hist(recs)}
  if compared == "differ_from_greedy":
    figures["differ_from_greedy"] = len(mism)
  return figures


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
    compared = None if cfg.temperature > 0 else "mismatches" if entry["lossless"] else "differ_from_greedy"
    untimed = getattr(spec, "analysis", False)  # its run holds untimed work: its times compare with nothing
    if untimed:
      entry["analysis"] = True
    figures = lambda *a: {**_figures(*a), **({"speedup": None, "tokens_per_s": None} if untimed else {})}
    entry.update(available=True, **figures(recs, refs, mism, compared), compile_s=compile_s[label],
                 program_bytes=program_bytes[label])
    entry["per_category"] = {}
    for c in cats:
      idx = [i for i, r in enumerate(recs) if r.category == c]
      if idx:
        entry["per_category"][c] = figures([recs[i] for i in idx], [refs[i] for i in idx],
                                           [m for m in mism if m["category"] == c], compared)
    entry["difference_list" if compared == "differ_from_greedy" else "mismatch_list"] = mism
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
  batch = min(cfg["batch_size"], max(res["prompts"]["n"], 1))  # as the run batched them: never more than it had
  lines = ["# jaxspec bench report", ""]
  if not res["complete"]:
    lines += ["**Incomplete run**: these figures cover the batches finished before it stopped.", ""]
  lines += [
      f"- prompts: `{res['prompts']['file']}`, {res['prompts']['n']} prompt{'s' * (res['prompts']['n'] != 1)} "
      f"({', '.join(f'{c} {n}' for c, n in res['prompts']['per_category'].items())})",
      f"- model: `{cfg['model'] or env.get('model_given') or 'embedded SmolLM2-135M-Instruct'}` "
      f"({cfg.get('dtype', 'float32')}"
      + (f", {cfg['param_dtype']} weights" if cfg.get("param_dtype") else "")
      + (", layers under lax.scan" if cfg.get("scan_layers") else "")
      + (f", matmul precision {cfg['matmul_precision']}" if cfg.get("matmul_precision", "highest") != "highest"
         else "") + f"); max new tokens {cfg['max_new_tokens']}; "
      f"batch size {batch}; " + ("greedy" if greedy else
                                             f"temperature {cfg['temperature']}, top-k {cfg['top_k']}, "
                                             f"top-p {cfg['top_p']}, seed {cfg.get('seed', 0)}")
      + (f"; params sharded over the mesh {cfg['mesh']} (the Hugging Face baselines run in torch, off it)"
         if cfg.get("mesh") else ""),
      f"- jaxspec {env.get('jaxspec') or '(version not recorded)'}"
      + (f" (commit {env['jaxspec_commit']})" if env.get("jaxspec_commit") else "") + ", "
      f"jax {env['jax']} on {env['backend']} ({', '.join(sorted(set(env['devices'])))} ×{env['device_count']}), "
      f"CPU {env['cpu']} ×{env['cpu_count']}, load average at start {_load(env['load_avg'])}",
      f"- wall time {env['wall_s']:.0f} s, peak RSS {env['peak_rss_bytes'] / 2**20:.0f} MiB"
      + (f", peak memory of the fullest device {env['device_peak_bytes'] / 2**20:.0f} MiB (JAX's arrays)"
         if env.get("device_peak_bytes") else "")
      + (f"; resumed: method runs (a method on a prompt batch) restored from earlier processes: "
         f"{env['resumed_runs']} (wall time, peak RSS and warm-up compile time are the last process's; each run's "
         "own compile time is that of the process that ran it)"
         + (f"; the restored runs ran jaxspec commit {', '.join(env['resumed_commits'])}, not only the one above"
            if env.get("resumed_commits") else "")
         + (f"; in {env['batches_timed_across_processes']} prompt batch(es) the methods were timed by different "
            "processes, so their speedups there compare times taken at different times"
            if env.get("batches_timed_across_processes") else "")
         if env.get("resumed_runs") else "")
      + (f"; persistent compilation cache {env['compilation_cache_dir']} (a compile time may be a load from it)"
         if env.get("compilation_cache_dir") else ""),
      "",
      "τ = new tokens from verify steps (every output token but the first, which prefill gives; bonus token "
      "included) / the verify forwards each prompt took part in after prefill (`step_tokens / target_calls` in "
      "results.json), pooled over the prompts (all their tokens over all their forwards, not a mean of per-prompt "
      "τ). Speedup = wall time of jaxspec's plain decoding loop, `greedy` (one token per target call"
      + ("" if greedy else "; at this run's temperature it samples") + ") / the method's, same prompts, same run, "
      "after compilation. Drafter calls = the drafter's own forwards (0 where it reads the target's), counted as the "
      "verify forwards are: a batch's forward once per prompt it served. Program memory = XLA's arguments + outputs "
      "+ temporaries of the compiled decode program (largest shape)."
      + (" With --quick no untimed warm-up runs: each timed run is its program's first, which is slower by an "
         "amount that differs by method and prompt length, so the speedups are indicative." if cfg.get("quick")
         else ""),
      "",
      "## Overall", "",
      "| method | τ | speedup | tokens/s | mismatches | drafter calls | compile s | program MiB |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for label, m in avail.items():
    mm = compared_mismatches(res, label)
    mib = _fmt(m["program_bytes"] / 2**20 or None, ".0f")
    speedup = "n/a" if m.get("analysis") else f"{_fmt(m['speedup'])}×"
    lines.append(f"| {label} | {_fmt(m['tau'])} | {speedup} | {_fmt(m['tokens_per_s'], '.1f', 'n/a')} | {mm} | "
                 f"{m['drafter_calls']:.0f} | {m['compile_s']:.1f} | {mib} |")
  analysis = [label for label, m in avail.items() if m.get("analysis")]
  if analysis:
    lines += ["", f"{', '.join(f'`{l}`' for l in analysis)}: an analysis of τ, whose run first decodes greedily "
              "(untimed) to know what to look for: no speedup or tokens/s."]
  one_by_one = [label for label in avail if label.split(":")[0] in ("hf-greedy", "hf-lookup")]
  if one_by_one and batch > 1:
    lines += ["", f"{', '.join(f'`{l}`' for l in one_by_one)}: transformers' generate decodes one prompt at a time; "
              f"its speedup is against jaxspec's greedy at batch {batch}, so it includes what batching gains."]
  for key, title in (("tau", "τ per category"), ("speedup", "Speedup per category")):
    lines += ["", f"## {title}", ""]
    if key == "speedup" and batch > 1:
      # One decode call runs a whole batch: its time cannot be told apart by row, so rows share it evenly.
      lines += [f"Prompts ran {batch} to a batch and a batch is timed as a whole, so each row gets an "
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
    others = [label for label in avail if label != "greedy"]
    if not others:
      lines.append("Only greedy decoding ran: there was nothing to compare with it.")
    for label in others:
      m = avail[label]
      if m["lossless"]:
        lines.append(f"- `{label}`: {m['mismatches']} of {m['n_prompts']} outputs differ from greedy")
        listed = m["mismatch_list"]
      else:
        if "differ_from_greedy" not in m:
          lines.append(f"- `{label}` (not lossless): not compared with greedy (results written by an older jaxspec)")
          continue
        lines.append(f"- `{label}` (not lossless, so agreement rather than exactness): {m['differ_from_greedy']} of "
                     f"{m['n_prompts']} outputs differ from greedy")
        listed = m["difference_list"]
      for mm in listed[:MAX_LISTED_MISMATCHES]:
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
            "![accepted lengths](accept_hist.png)", "",
            "The accepted lengths are what each step's acceptance rule committed, a measure of the drafter: a last "
            "block that EOS or the token limit cut short counts whole, so a histogram's mean can be above τ.", ""]
  return "\n".join(lines)


def _load(load) -> str:
  return "n/a" if not load else " / ".join(f"{x:.2f}" for x in load)


def plots(res: dict, out: Path) -> list[Path]:
  """τ per category per method, speedup bars, and accepted-length histograms, as PNG files."""
  import textwrap

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  avail = {k: v for k, v in res["methods"].items() if v["available"]}
  cats = list(res["prompts"]["per_category"])
  names = list(avail)
  paths = []
  tau_png, speedup_png, hist_png = PLOTS
  greedy = res["config"]["temperature"] == 0
  run = "greedy" if greedy else f"temperature {res['config']['temperature']}"
  # Long labels (a heads folder in the options) are wrapped rather than let run off the figure. A folder's bytes that
  # are not UTF-8 (lone surrogates in the label, which matplotlib refuses with a TypeError) are drawn as U+FFFD.
  def wrap(label: str, width: int = 38) -> str:
    label = label.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label

  # Missing figures (a category a method did not reach) are gaps, not bars of height 0.
  value = lambda x: float("nan") if x is None else x
  # The legend goes under the axes, in columns, with the figure grown to hold it (long labels crushed the bars).
  ncol = 1 if len(names) <= 2 else 2 if len(names) <= 8 else 3
  lines_below = sum(max(wrap(n).count("\n") + 1 for n in names[i:i + ncol]) for i in range(0, len(names), ncol))
  fig, ax = plt.subplots(figsize=(max(8.0, 1.0 * len(cats) + 2, 3.4 * ncol), 4.2 + 0.2 * lines_below),
                         layout="constrained")
  width = 0.8 / max(1, len(names))
  colors = plt.get_cmap("tab20").colors
  for i, label in enumerate(names):
    vals = [value(avail[label]["per_category"].get(c, {}).get("tau")) for c in cats]
    ax.bar(np.arange(len(cats)) + i * width, vals, width, label=wrap(label), color=colors[i % len(colors)])
  ax.set_xticks(np.arange(len(cats)) + width * (len(names) - 1) / 2, cats, rotation=30, ha="right")
  ax.set_ylabel("τ (new tokens per target call)")
  ax.set_xlabel("prompt category")
  ax.set_title(f"τ per category ({run})")
  fig.legend(fontsize="small", loc="outside lower center", ncol=ncol)
  paths.append(_save(fig, out / tau_png))

  fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(names) + 1.8), layout="constrained")
  speed = [value(avail[n]["speedup"]) for n in names]
  ax.barh([wrap(n) for n in names], speed, color=["#888" if n == "greedy" else "#2a7" for n in names])
  ax.axvline(1.0, color="k", lw=0.8)
  top = max([s for s in speed if math.isfinite(s)], default=1.0)
  ax.set_xlim(0, max(1.0, top) * 1.22)  # room for the labels right of the bars
  for y, s in enumerate(speed):
    ax.annotate("n/a" if not math.isfinite(s) else f"{s:.2f}×", (0 if not math.isfinite(s) else s, y),
                xytext=(4, 0), textcoords="offset points", va="center", fontsize="small")
  ax.set_xlabel(f"speedup over jaxspec's plain loop `greedy` ({'' if greedy else 'sampling, '}same run): wall time "
                "ratio", fontsize="small")
  ax.set_title(f"Wall-clock speedup ({run})")
  ax.invert_yaxis()
  paths.append(_save(fig, out / speedup_png))

  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows + 0.4), squeeze=False, layout="constrained")
  for ax, label in zip(axes.flat, names):
    h = np.asarray(avail[label]["accept_hist"], float)
    steps = h.sum()
    if steps > 0:
      h = h / steps
    ax.bar(np.arange(len(h)), h)
    mean = float(np.dot(np.arange(len(h)), h)) if steps > 0 else float("nan")
    ax.set_title(wrap(f"{label}: τ {_fmt(avail[label]['tau'])}, mean {_fmt(_num(mean))}", 44), fontsize="small")
    ax.set_xlabel("tokens committed per step", fontsize="small")
    ax.set_ylabel("fraction of steps", fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = int(np.flatnonzero(h)[-1]) if steps > 0 else 1
    ax.set_xlim(-0.6, max(last, 1) + 0.6)  # up to the longest step seen, not the drafter's whole width
    ax.tick_params(labelsize="x-small")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle("Accepted tokens per verify step (a last block cut by EOS or the token limit counts whole)",
               fontsize="small")
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
  reference itself. A method that is not lossless gets "N differ" (agreement, not a check)."""
  m = res["methods"][label]
  if res["config"]["temperature"] > 0 or label == "greedy":
    return "n/a"
  if not m["lossless"]:  # (results.json of older versions hold mismatches 0 for these, uncompared)
    return f"{m['differ_from_greedy']} differ" if m.get("differ_from_greedy") is not None else "n/a"
  return str(m["mismatches"]) if m.get("mismatches") is not None else "n/a"
