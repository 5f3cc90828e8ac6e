"""Checks the project's prompt sets: format, ids, counts per category, duplicates, and overlap with Spec-Bench.

  python training/data/check_prompts.py                       # the project's files against ../shared/data
  python training/data/check_prompts.py --spec-bench FILE     # Spec-Bench from elsewhere

Overlap means a shared run of `--ngram` words (lower-cased, words are `\\w+`): no prompt of ours may share one with
any turn of any Spec-Bench prompt, and no benchmark prompt of ours with a training prompt. The training files may
share phrases with each other (the rag prompts reuse a few layouts), but not whole prompts. Exits 1 and names each
failure.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAINING = {  # file -> prompts expected per category
    "training/data/prompts.jsonl": 40,
    "training/data/prompts_more.jsonl": 100,
}
BENCH = {"jaxspec/bench/data/quick.jsonl": 2}
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
              "translation", "summarization", "qa", "math_reasoning", "rag")


def words(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
  w = words(text)
  return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def normalised(text: str) -> str:
  return " ".join(words(text))


def read(path: Path) -> tuple[list[dict], list[str]]:
  rows, errors = [], []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      errors.append(f"{path}:{i}: not JSON ({e})")
      continue
    ok = (isinstance(row, dict) and set(row) == {"question_id", "category", "turns"}
          and isinstance(row["question_id"], int) and isinstance(row["category"], str)
          and isinstance(row["turns"], list) and len(row["turns"]) == 1 and isinstance(row["turns"][0], str))
    if not ok:
      errors.append(f"{path}:{i}: needs exactly question_id (int), category (str) and turns (one str)")
      continue
    rows.append(row)
  return rows, errors


def check(training: dict[str, int], bench: dict[str, int], spec_bench: Path | None, n: int) -> list[str]:
  files = {**training, **bench}
  errors: list[str] = []
  sets = {}
  for name, per_cat in files.items():
    rows, errs = read(ROOT / name)
    errors += errs
    ids = [r["question_id"] for r in rows]
    if ids != list(range(1, len(rows) + 1)):
      errors.append(f"{name}: ids must run 1..{len(rows)} in order")
    counts = collections.Counter(r["category"] for r in rows)
    for c in CATEGORIES:
      if counts.get(c, 0) != per_cat:
        errors.append(f"{name}: {counts.get(c, 0)} prompts in {c}, expected {per_cat}")
    for c in set(counts) - set(CATEGORIES):
      errors.append(f"{name}: unknown category {c!r}")
    sets[name] = [r["turns"][0] for r in rows]
  seen: dict[str, str] = {}
  for name, texts in sets.items():
    for t in texts:
      key = normalised(t)
      if key in seen:
        errors.append(f"{name}: duplicate prompt (also in {seen[key]}): {t[:60]!r}")
      seen[key] = name
  names = list(sets)
  grams = {name: [ngrams(t, n) for t in sets[name]] for name in names}
  for a in bench:  # our benchmark prompts against our training prompts
    for b in training:
      b_all = set().union(*grams[b])
      for t, g in zip(sets[a], grams[a]):
        if g & b_all:
          errors.append(f"{a}: shares {n} words with {b}: {' '.join(sorted(g & b_all)[0])!r} in {t[:50]!r}")
  if spec_bench is not None:
    sb = set()
    for line in spec_bench.read_text().splitlines():
      for turn in json.loads(line)["turns"]:
        sb |= ngrams(turn, n)
    for name in names:
      hits = sum(bool(g & sb) for g in grams[name])
      print(f"{name}: {len(sets[name])} prompts, {hits} share {n} words with Spec-Bench ({spec_bench.name})")
      for t, g in zip(sets[name], grams[name]):
        if g & sb:
          errors.append(f"{name}: shares {n} words with Spec-Bench: {' '.join(sorted(g & sb)[0])!r} in {t[:50]!r}")
  return errors


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--spec-bench", type=Path, default=ROOT.parent / "shared" / "data" / "spec_bench_dev.jsonl")
  ap.add_argument("--ngram", type=int, default=8)
  args = ap.parse_args()
  spec = args.spec_bench if args.spec_bench.exists() else None
  if spec is None:
    print(f"{args.spec_bench} not found: the Spec-Bench overlap check did not run", file=sys.stderr)
  errors = check(TRAINING, BENCH, spec, args.ngram)
  for e in errors:
    print("FAIL", e)
  print("all checks passed" if not errors else f"{len(errors)} failures")
  return 1 if errors or spec is None else 0


if __name__ == "__main__":
  sys.exit(main())
