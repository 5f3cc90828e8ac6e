"""How close drafts made of some of the target's layers start to the target, before any training.

A layer-skip draft (`layerskip`, and the shipped 4-layer draft's starting point) keeps the target's first layers;
self-speculation papers also skip layers in the middle. This script measures, for several subsets of the default
model's layers, how often the subset's argmax equals the full model's on the full model's own greedy answers to
training prompts (teacher-forced, one forward per subset). Agreement near 0 means such a draft would almost never be
accepted untrained, whatever its cost.

    python benchmarks/layer_subsets.py [--prompts 12] [--new-tokens 96] [--subsets "0-3;0-7;0-3,26-29"]

A subset is a comma-separated list of layer indices and ranges (`0-3,26-29`); subsets are separated by `;`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from script_args import positive_int
from script_args import run as run_script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SUBSETS = "0-3;0-7;0-11;0-3,26-29;0-1,28-29;0-2,27-29;0-1,24-29;0-5,24-29;every4;even"


def parse_subset(text: str, n_layers: int) -> list[int]:
  """`0-3,26-29` -> [0, 1, 2, 3, 26, 27, 28, 29]; `every4`, `even`: every 4th / 2nd layer from 0."""
  from jaxspec.errors import InputError

  text = text.strip()
  if text.startswith("every") or text == "even":
    step = 2 if text == "even" else int(text.removeprefix("every") or 0)
    if step < 2:
      raise InputError(f"subset {text!r}: everyN needs N >= 2")
    return list(range(0, n_layers, step))
  layers = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    lo, _, hi = part.partition("-")
    try:
      layers += range(int(lo), int(hi or lo) + 1)
    except ValueError:
      raise InputError(f"subset {text!r}: {part!r} is not a layer index or a range like 0-3") from None
  if not layers or len(set(layers)) != len(layers) or not all(0 <= i < n_layers for i in layers):
    raise InputError(f"subset {text!r}: give distinct layers in 0..{n_layers - 1}")
  if len(layers) == n_layers:
    raise InputError(f"subset {text!r} keeps every layer: nothing is skipped")
  return sorted(layers)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prompts", type=positive_int, default=12,
                      help="training prompts to answer (every 40th of training/data/prompts.jsonl, then the next)")
  parser.add_argument("--new-tokens", type=positive_int, default=96)
  parser.add_argument("--subsets", default=DEFAULT_SUBSETS, help="';'-separated subsets (see the docstring)")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxspec
  from jaxspec.models.llama import LlamaLM

  model, params, tok = jaxspec.load_model()
  subsets = {s.strip(): parse_subset(s, model.cfg.n_layers) for s in args.subsets.split(";") if s.strip()}
  with open(REPO / "training" / "data" / "prompts.jsonl", encoding="utf-8") as f:
    questions = [json.loads(line)["turns"][0] for line in f if line.strip()]
  order = list(range(0, len(questions), 40)) + [i for i in range(len(questions)) if i % 40]
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": questions[i]}]))
             for i in order[:args.prompts]]
  answers = jaxspec.generate(model, params, prompts, max_new_tokens=args.new_tokens, eos_ids=list(tok.eos_ids))
  seqs = [list(p) + list(a) for p, a in zip(prompts, answers.tokens)]
  t = max(map(len, seqs))
  tokens = np.zeros((len(seqs), t), np.int32)
  scored = np.zeros((len(seqs), t), bool)  # positions whose next token is a generated one
  for b, (p, s) in enumerate(zip(prompts, seqs)):
    tokens[b, :len(s)] = s
    scored[b, len(p) - 1:len(s) - 1] = True

  @jax.jit
  def argmaxes(m_params, tokens_BxT, cache):
    m = LlamaLM(dataclasses.replace(model.cfg, n_layers=len(cache.k)))
    positions = jnp.broadcast_to(jnp.arange(t), tokens_BxT.shape)
    logits, _, _ = m.forward(m_params, tokens_BxT, positions, cache, jnp.tril(jnp.ones((t, t), bool)))
    return jnp.argmax(logits, -1)

  def run(layers):
    sub = {k: v for k, v in params.items() if not k.startswith("layers_")}
    sub.update({f"layers_{j}": params[f"layers_{i}"] for j, i in enumerate(layers)})
    m = LlamaLM(dataclasses.replace(model.cfg, n_layers=len(layers)))
    return np.asarray(argmaxes(sub, jnp.asarray(tokens), m.init_cache(len(seqs), t)))

  full = run(range(model.cfg.n_layers))
  following = np.roll(tokens, -1, axis=1)
  assert (full == following)[scored].all(), "the full model's argmax should be its own greedy answer"
  print(f"{int(scored.sum())} positions ({len(seqs)} answers of up to {args.new_tokens} tokens)")
  print(f"{'subset':14s} layers  agreement with the full model's argmax")
  for name, layers in subsets.items():
    agree = (run(layers) == full)[scored].mean()
    print(f"{name:14s} {len(layers):6d}  {agree:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(run_script(main, __file__))
