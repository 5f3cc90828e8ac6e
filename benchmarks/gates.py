"""Choose draft gates (`bpd:gate=G`, `lookup:gate=G`) on prompts written for this script, apart from Spec-Bench.

A gated step verifies the draft only when the drafter expects it to pay; otherwise it runs a one-token forward,
which costs less than a forward over the whole block on hardware where t(k+1) > t(1). BPD's gate is the heads'
expected accepted length, sum_i prod_{j<=i} p_j over the heads' top probabilities; prompt lookup's is the length of
the n-gram its copy was matched on. The output is greedy decoding's either way; only speed changes.

    python benchmarks/gates.py [--methods greedy,bpd:k=4,bpd:k=4:gate=1.2] [--prompts open|context|all]

Methods run interleaved prompt by prompt after a warm-up per prompt, and speedup is greedy's time over the method's.
"""

from __future__ import annotations

import argparse
import collections
import sys

from script_args import method_list, positive_int
from script_args import run as run_script

# Prompts written for this script: none from Spec-Bench, none from training/data/prompts.jsonl.
OPEN = [
    "Explain how the gears of a bicycle make climbing hills easier.",
    "Write a short poem about a train crossing a snowy valley.",
    "What are three tips for keeping a small vegetable garden healthy?",
    "Write a Python function that returns the longest word in a sentence.",
    "Summarize the main causes of the French Revolution in a paragraph.",
    "If a recipe for 4 people needs 300 g of rice, how much rice do 10 people need? Explain.",
    "Describe a busy morning at a fish market from the point of view of a seagull.",
    "Translate into French: The library opens at nine and closes at six.",
]
# Prompts that carry a text to work from, where copying from the context pays (what prompt lookup is for).
CONTEXT = [
    "Summarize in two sentences: The town council met on Tuesday to discuss the new bus routes. Residents of the "
    "north side asked for a stop near the hospital, because the closest one is a twenty-minute walk away. The council "
    "agreed to study the request and to publish a revised map in the spring. Funding will come from the regional "
    "transport budget, which grew by eight percent this year.",
    "Fix the bug in this function and show the corrected code:\n\ndef average(values):\n    total = 0\n    for v in "
    "values:\n        total += v\n    return total / len(values) + 1\n",
    "From the text below, list every person's name and their job.\n\nMaria Lopez, a nurse at the city clinic, "
    "met with Tom Becker, the head librarian, to plan a health fair. They invited Priya Shah, a dentist, and Ahmed "
    "Karim, who teaches biology at the high school.",
    "Rewrite this paragraph in a formal tone: hey team, the printer on floor two is broken again so please use the "
    "one by the kitchen until friday. also don't forget the meeting moved to 3pm. thanks!",
    "Answer using only the notes. Notes: The museum opens at 10 am on weekdays and 9 am on weekends. Tickets cost "
    "12 dollars for adults and 6 dollars for children under 12. The cafe closes one hour before the museum, which "
    "closes at 6 pm. Question: When does the cafe close, and how much do two adults and one child pay?",
    "Convert this list to a JSON array of objects with keys name and price: apples 3.20, bread 2.50, milk 1.10, "
    "cheese 6.75, coffee 8.40.",
]
SETS = {"open": OPEN, "context": CONTEXT, "all": OPEN + CONTEXT}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--methods", type=method_list,
                  default="greedy,bpd:k=4,bpd:k=4:gate=0.8,bpd:k=4:gate=1.2,bpd:k=4:gate=1.6",
                  help="comma-separated methods as in `jaxspec bench --list-methods`; speedups are over the first")
  ap.add_argument("--new-tokens", type=positive_int, default=64)
  ap.add_argument("--prompts", choices=sorted(SETS), default="all",
                  help="open: 8 open-ended questions; context: 6 prompts with a text to work from; all: both")
  args = ap.parse_args(argv)

  from jaxspec.bench.methods import METHODS, BenchContext, parse_method
  from jaxspec.bench.runner import chat_prompt_ids
  from jaxspec.loading import load_model

  model, params, tok = load_model(None)
  ctx = BenchContext(model, params, tok)
  labels = args.methods
  runs = {}
  for label in labels:
    _, name, opts = parse_method(label)
    runs[label] = METHODS[name].build(ctx, opts)
  sets = ["open", "context"] if args.prompts == "all" else [args.prompts]
  prompts = [(name, ids) for name in sets for ids in chat_prompt_ids(tok, SETS[name])]
  secs, toks, calls, rows = (collections.Counter() for _ in range(4))
  for name, p in prompts:
    for run in runs.values():  # compile for this prompt's length bucket
      run([p], args.new_tokens, 0)
    for label, run in runs.items():
      r = run([p], args.new_tokens, 0)
      for key in ((label, name), (label, "all")):
        secs[key] += r.run_s
        toks[key] += sum(len(t) for t in r.tokens)
        calls[key] += r.target_calls
        rows[key] += 1
  base = labels[0]
  for name in sets + (["all"] if len(sets) > 1 else []):
    print(f"-- prompts: {name}")
    for label in labels:
      key = (label, name)
      tau = (toks[key] - rows[key]) / max(calls[key], 1)  # the first token of each row comes from prefill
      print(f"{label:28s} speedup over {base} {secs[base, name] / secs[key]:.2f}x  tau {tau:.2f}  "
            f"tok/s {toks[key] / secs[key]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(run_script(main, __file__))
