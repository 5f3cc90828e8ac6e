"""Randomized differential tests (slow set): random lossless methods on random tiny targets must give plain greedy
decoding's tokens, and greedy decoding must give what recomputing every step without a cache gives
(tests/fuzz_greedy.py builds the targets, parts, labels and batches; each seed draws its own).

The fixed seeds below are a few minutes' worth, picked to cover sliding windows, query/key norms, short contexts,
cache buckets, a draft scoring a vocabulary subset and a rescorer that names its heads. For a longer hunt, run other
seeds:

  JAXSPEC_FUZZ_SEEDS=100-140 python -m pytest -q -n 2 --dist load -m slow tests/test_random_differential.py

(`A-B` is A to B inclusive; commas join seeds and ranges: `3,8,20-25`; `--dist load` spreads the seeds over the
workers, which the default `--dist loadfile` would keep on one). Both tests run the seeds given. A failure's message
holds the call that replays it: `from tests.fuzz_greedy import reproduce; reproduce(seed=..., label=..., ...)`.
"""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jaxspec.bench import methods
from jaxspec.decoding import generate as gen
from tests import fuzz_greedy

# Seeds whose targets read their context (a target with attention off would not see a stale cache entry), together
# covering sliding windows with and without cache buckets, query/key norms, short contexts, multi-query attention,
# ragged batches of 3 and 4 rows and each method kind, opt-tree drafter and tree shape (and a draft scoring a subset
# of the vocabulary, rescoring methods reading the heads their rescorer names). What a seed draws depends on every
# draw in tests/fuzz_greedy.py: a change there draws other targets and methods, so choose the seeds again.
DIFFERENTIAL_SEEDS = (3, 98, 129, 229, 285)
RECOMPUTE_SEEDS = (3, 22, 25, 26, 27, 28, 34, 37, 47, 54, 55, 112)
LABELS = 6  # random methods per seed (each compiles its programs: most of the time)
DRAWS = 3  # batches per batch shape (two shapes per seed; each batch costs a decode, not a compile)
SHOWN = 4  # problems described in full in a failure's message; the rest are counted by method


def report(problems: list[dict]) -> str:
  text = f"{len(problems)} problem(s):\n" + "\n\n".join(map(fuzz_greedy.describe, problems[:SHOWN]))
  rest = problems[SHOWN:]
  if rest:
    counts = Counter(f"{p['kind']} {p['label']}" for p in rest)
    text += "\n\nand " + ", ".join(f"{n} x {what}" for what, n in counts.items())
  return text


@pytest.mark.slow
@pytest.mark.parametrize("seed", fuzz_greedy.seeds(DIFFERENTIAL_SEEDS))
def test_random_methods_give_greedy_tokens(seed):
  """Every random lossless method gives greedy decoding's tokens on every batch, with counters that add up; no
  method crashes. Methods may refuse (an option this target cannot serve), but not more than half of them, or the
  test would check little."""
  smallest = gen.BUCKET_SMALLEST
  found = fuzz_greedy.run(seed, LABELS, DRAWS)
  assert gen.BUCKET_SMALLEST == smallest  # put back for the tests after this one
  problems = [p for p in found if p["kind"] != "refused"]
  assert not problems, report(problems)
  refused = [p for p in found if p["kind"] == "refused"]
  assert 2 * len(refused) <= LABELS, f"{len(refused)} of {LABELS} methods refused:\n" + report(refused)


@pytest.mark.slow
@pytest.mark.parametrize("seed", fuzz_greedy.seeds(RECOMPUTE_SEEDS))
def test_greedy_matches_recomputation(seed):
  """Cached greedy decoding (with and without attention buckets) gives the tokens of a full recomputation."""
  problems = fuzz_greedy.reference_check(seed)
  assert not problems, report(problems)


def test_random_labels_parse():
  """The labels the slow tests draw are ones `jaxspec bench` reads (checked in the default run, without a model, so
  that a renamed or retired option shows up here and not as refusals in the slow set)."""
  rng = np.random.default_rng(0)
  kinds = set()
  for tuned_heads in (False, True):
    parts = dict(root=Path("/nowhere"), kmax=4, has_ids=True, tuned_heads=tuned_heads, vocab=64)
    for _ in range(300):
      label = fuzz_greedy.random_method(rng, parts, n_layers=3)
      _, name, _ = methods.parse_method(label.replace(fuzz_greedy.PARTS, "/nowhere"))
      assert methods.METHODS[name].lossless, label
      kinds.add(name)
  assert kinds == {"bpd", "bpd-ngram", "bpd-neural", "bpd-oracle", "spec", "eagle", "lookup", "layerskip", "jacobi",
                   "opt-tree"}
