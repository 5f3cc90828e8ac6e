"""The analysis of Kim et al. 2024 for jaxspec's BPD heads: head entropy and top-1 confidence by head index, the
consecutive-repetition rate of raw vs rescored drafts, and the block efficiency of plain, n-gram rescored, neural
rescored and oracle drafts per category.

  python benchmarks/bpd_drafts.py --prompts ../shared/data/spec_bench_dev.jsonl --limit 2 \
      --out benchmarks/results/bpd_drafts

Writes `analysis.json`, `analysis.md`, `head_entropy.png` and `repetition.png` under `--out`. Every run is checked
against greedy decoding (a mismatch stops the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from script_args import positive_int, run


def _ratio(a: float, b: float) -> float:
  return a / b if b else float("nan")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--prompts", default=None, help="Spec-Bench-format JSONL (default: jaxspec's quick prompts)")
  ap.add_argument("--limit", type=positive_int, default=2, help="prompts per category")
  ap.add_argument("--max-new-tokens", type=positive_int, default=64)
  ap.add_argument("--batch-size", type=positive_int, default=16)
  ap.add_argument("--k", type=positive_int, default=8, help="heads analysed (entropy by head index uses all of them)")
  ap.add_argument("--top-t", type=positive_int, default=None, help="lattice width (default: the tuned one)")
  ap.add_argument("--out", default="benchmarks/results/bpd_drafts")
  args = ap.parse_args(argv)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxspec.bench.methods import DEFAULT_BPD_HEADS, DEFAULT_RESCORE, BenchContext, rescore_lm
  from jaxspec.bench.prompts import QUICK_PROMPTS, load_prompts
  from jaxspec.bench.runner import chat_prompt_ids
  from jaxspec.decoding.bpd import bpd_draft_params
  from jaxspec.decoding.generate import generate
  from jaxspec.decoding.lattice import LatticeDrafter, lattice_draft_params
  from jaxspec.decoding.speculative import DraftModelDrafter
  from jaxspec.loading import load_model
  from jaxspec.models.bpd import load_bpd
  from jaxspec.models.ngram import load_ngram

  # the prompts and the heads first: a wrong file or --k is said before the model loads
  prompts = load_prompts(args.prompts or QUICK_PROMPTS, limit=args.limit)
  bpd, bp = load_bpd(DEFAULT_BPD_HEADS, args.k)
  model, params, tok = load_model()
  ids = chat_prompt_ids(tok, [p.text for p in prompts])
  ngram, tables, cfg = load_ngram(DEFAULT_RESCORE)
  tuned = cfg["tuned"]
  top_t = args.top_t or tuned["top_t"]
  bdp = bpd_draft_params(model, params, bpd, bp)
  lm, lm_params = rescore_lm(BenchContext(model, params, tok), tuned)  # the LM the neural weight was tuned with
  eos = [tok.eos_id]
  pad = tok.pad_id or 0
  batches = [list(range(i, min(i + args.batch_size, len(ids)))) for i in range(0, len(ids), args.batch_size)]

  greedy = {}
  for b in batches:
    res = generate(model, params, [ids[i] for i in b], max_new_tokens=args.max_new_tokens, eos_ids=eos, pad_id=pad)
    greedy.update(zip(b, res.tokens))

  def reference(b):
    ref = np.full((len(b), args.max_new_tokens + bpd.num_heads + 1), -1, np.int32)
    for r, i in enumerate(b):
      ref[r, :len(greedy[i])] = greedy[i]
    return ref

  variants = {
      "plain": (LatticeDrafter(bpd, "none", top_t=top_t), lambda b: lattice_draft_params(bdp)),
      "ngram": (LatticeDrafter(bpd, "ngram", top_t=top_t, beams=1, ngram=ngram),
                lambda b: lattice_draft_params(bdp, weight=tuned["ngram_weight"], ngram=tables)),
      f"ngram x{tuned['beams']}": (LatticeDrafter(bpd, "ngram", top_t=top_t, beams=tuned["beams"], ngram=ngram),
                                   lambda b: lattice_draft_params(bdp, weight=tuned["ngram_weight"], ngram=tables)),
      "neural": (LatticeDrafter(bpd, "neural", top_t=top_t, lm=DraftModelDrafter(lm, bpd.num_heads)),
                 lambda b: lattice_draft_params(bdp, weight=tuned.get("neural_weight", 0.5), lm=lm_params)),
      "oracle": (LatticeDrafter(bpd, "oracle", top_t=top_t), lambda b: lattice_draft_params(bdp,
                                                                                           reference_BxR=reference(b))),
  }
  out = {"k": bpd.num_heads, "top_t": top_t, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
         "tuned": {k: v for k, v in tuned.items() if not k.endswith("tuning")}, "variants": {}}
  t0 = time.time()
  for name, (drafter, make_dp) in tqdm(variants.items(), desc="variants"):
    stats = None
    per_cat: dict[str, list[int]] = {}
    for b in batches:
      res = generate(model, params, [ids[i] for i in b], max_new_tokens=args.max_new_tokens, eos_ids=eos,
                     pad_id=pad, drafter=drafter, draft_params=make_dp(b))
      if res.tokens != [greedy[i] for i in b]:
        print(f"error: {name} differs from greedy decoding", file=sys.stderr)
        return 1
      st = {k: np.asarray(v, np.float64) for k, v in res.drafter_stats.items()}
      stats = st if stats is None else {k: stats[k] + st[k] for k in st}
      for r, i in enumerate(b):
        c = per_cat.setdefault(prompts[i].category, [0, 0])
        c[0] += res.step_tokens[r]
        c[1] += res.active_calls[r]
    n = stats["proposals"]
    out["variants"][name] = {
        # NaN where no verify step ran (every answer was one token long)
        "tau": _ratio(sum(c[0] for c in per_cat.values()), sum(c[1] for c in per_cat.values())),
        "tau_per_category": {c: _ratio(v[0], v[1]) for c, v in sorted(per_cat.items())},
        "head_entropy": (stats["head_entropy_K"] / n).tolist(), "head_top1": (stats["head_top1_K"] / n).tolist(),
        "raw_repeat_rate": float(stats["raw_repeats"] / (bpd.num_heads * n)),
        "draft_repeat_rate": float(stats["draft_repeats"] / (bpd.num_heads * n))}
  out["seconds"] = round(time.time() - t0, 1)

  dest = Path(args.out)
  dest.mkdir(parents=True, exist_ok=True)
  (dest / "analysis.json").write_text(json.dumps(out, indent=1))
  v = out["variants"]
  plain = v["plain"]
  heads = np.arange(1, bpd.num_heads + 1)
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
  ax[0].plot(heads, plain["head_entropy"], "o-")
  ax[0].set(xlabel="head index i (predicts token t+1+i)", ylabel="mean entropy (nats)", title="head entropy")
  ax[1].plot(heads, plain["head_top1"], "o-", color="tab:orange")
  ax[1].set(xlabel="head index i", ylabel="mean top-1 probability", title="head confidence", ylim=(0, 1))
  fig.tight_layout()
  fig.savefig(dest / "head_entropy.png", dpi=120)
  plt.close(fig)
  names = [n for n in v if n != "oracle"]
  fig, ax = plt.subplots(figsize=(6, 3.4))
  x = np.arange(len(names))
  ax.bar(x - 0.2, [v[n]["raw_repeat_rate"] for n in names], 0.4, label="raw draft (per-head argmax)")
  ax.bar(x + 0.2, [v[n]["draft_repeat_rate"] for n in names], 0.4, label="verified draft")
  ax.set_xticks(x, names)
  ax.set(ylabel="adjacent repeats per drafted token", title="consecutive repetition in drafts")
  ax.legend()
  fig.tight_layout()
  fig.savefig(dest / "repetition.png", dpi=120)
  plt.close(fig)

  cats = list(plain["tau_per_category"])
  lines = [f"# BPD draft analysis ({out['prompts']} prompts, {args.max_new_tokens} new tokens, k = {bpd.num_heads}, "
           f"top-t = {top_t})", "",
           "Block efficiency τ (tokens per target call); every output equals greedy decoding.", "",
           "| variant | τ | vs plain | raw repeats | draft repeats | " + " | ".join(cats) + " |",
           "|---|---|---|---|---|" + "---|" * len(cats)]
  for n, r in v.items():
    lines.append(f"| {n} | {r['tau']:.3f} | {r['tau'] / plain['tau'] - 1:+.1%} | {r['raw_repeat_rate']:.3f} | "
                 f"{r['draft_repeat_rate']:.3f} | "
                 + " | ".join(f"{r['tau_per_category'][c]:.2f}" for c in cats) + " |")
  lines += ["", "| head | " + " | ".join(str(i) for i in heads) + " |", "|---|" + "---|" * len(heads),
            "| entropy (nats) | " + " | ".join(f"{e:.2f}" for e in plain["head_entropy"]) + " |",
            "| top-1 probability | " + " | ".join(f"{e:.2f}" for e in plain["head_top1"]) + " |", "",
            "![head entropy](head_entropy.png) ![repetition](repetition.png)", ""]
  (dest / "analysis.md").write_text("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(run(main, __file__))
