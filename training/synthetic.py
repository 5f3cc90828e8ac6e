"""A transduction task that needs no download, for the encoder-decoder setting: numbers <-> English words.

Two directions, told apart by the source's first word:

  spell: 4821, 17, 300   ->  four thousand eight hundred twenty-one, seventeen, three hundred
  digits: seventeen, three hundred  ->  17, 300

Each example holds 1-3 numbers below one million, drawn log-uniformly so that short and long numbers are both
common. The spelled side is long and highly predictable once its first words are known (the setting where blockwise
heads and draft models accept many tokens); the digit side is short. Examples come from a seeded generator, so the
training set, the evaluation set and the benchmark prompts (`jaxspec/bench/data/numbers_dev.jsonl`, seed 1234) are
reproducible. Seeds alone do not make them disjoint (short sources recur), so evaluation drops sources seen in training
and the benchmark prompts are drawn with `exclude=` (training/data/README.md).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxspec import files

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))
TASKS = ("spell", "digits")


def _below_thousand(n: int) -> list[str]:
  words = []
  if n >= 100:
    words += [_ONES[n // 100], "hundred"]
    n %= 100
  if n >= 20:
    words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
  elif n or not words:
    words.append(_ONES[n])
  return words


def number_words(n: int) -> str:
  """English words of 0 <= n < 10^12, e.g. 4821 -> "four thousand eight hundred twenty-one"."""
  if not 0 <= n < 10 ** 12:
    raise ValueError(f"number_words takes 0 <= n < 10^12, got {n}")
  if n == 0:
    return "zero"
  words = []
  for value, name in _SCALES:
    if n >= value:
      words += _below_thousand(n // value) + [name]
      n %= value
  if n:
    words += _below_thousand(n)
  return " ".join(words)


def random_numbers(rng: np.random.Generator, max_count: int = 3, max_digits: int = 6) -> list[int]:
  count = int(rng.integers(1, max_count + 1))
  digits = rng.integers(1, max_digits + 1, size=count)  # uniform digit counts: log-uniform magnitudes
  return [int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10 ** d)) for d in digits]


def example(task: str, numbers: list[int]) -> tuple[str, str]:
  """(source, target) texts of one example."""
  spelled = ", ".join(number_words(n) for n in numbers)
  digits = ", ".join(str(n) for n in numbers)
  if task == "spell":
    return f"spell: {digits}", spelled
  if task == "digits":
    return f"digits: {spelled}", digits
  raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def _draws(seed: int, tasks: tuple[str, ...] = TASKS) -> Iterator[tuple[str, str, str]]:
  """Endless `(task, source, target)` triples from one seeded generator, the tasks in turn."""
  rng = np.random.default_rng(seed)
  for i in itertools.count():
    task = tasks[i % len(tasks)]
    yield (task, *example(task, random_numbers(rng)))


def examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> list[tuple[str, str, str]]:
  """n `(task, source, target)` triples, the tasks in turn."""
  return list(itertools.islice(_draws(seed, tasks), n))


def write_prompt_file(path: str | Path, n_per_task: int, seed: int, exclude: Iterable[str] = ()) -> None:
  """A Spec-Bench-format JSONL file of task sources (category = task), e.g. the encoder-decoder bench prompts.

  Sources in `exclude` are skipped and drawn again, so that benchmark prompts can be kept apart from every source a
  model trained on (short ones such as `spell: 7` recur across seeds). With nothing excluded the file holds the first
  `n_per_task` draws of each task of `examples(n_per_task * len(TASKS), seed)`, the tasks in turn."""
  exclude = set(exclude)
  kept: dict[str, list[str]] = {task: [] for task in TASKS}
  for i, (task, src, _) in enumerate(_draws(seed)):
    if all(len(v) >= n_per_task for v in kept.values()):
      break
    if i > 1000 * n_per_task * len(TASKS):
      raise ValueError(f"could not draw {n_per_task} sources per task outside the {len(exclude)} excluded ones")
    if len(kept[task]) < n_per_task and src not in exclude:
      kept[task].append(src)
  rows = enumerate((t, kept[t][j]) for j in range(n_per_task) for t in TASKS)
  files.write_text(path, "".join(json.dumps({"question_id": i, "category": task, "turns": [src]}) + "\n"
                                 for i, (task, src) in rows))


def training_sources(train_examples: int, seed: int, eval_examples: int = 0) -> set[str]:
  """The sources `jaxspec train` draws for a numbers model with `data.seed = seed` (its evaluation set uses
  seed + 1)."""
  rows = examples(train_examples, seed) + examples(eval_examples, seed + 1)
  return {src for _, src, _ in rows}


def train_tokenizer(texts: list[str], vocab_size: int):
  """A byte-level BPE tokenizer (`tokenizers`) trained on the task's texts, digits split one per token, with T5's
  special ids: 0 `<pad>` (also the decoder start), 1 `</s>` (EOS), 2 `<unk>`. Returns a `jaxspec` Tokenizer."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from jaxspec.loading.tokenizer import Tokenizer

  backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                show_progress=False)  # only the bytes the task uses: others read as <unk>
  backend.train_from_iterator(texts, trainer)
  return Tokenizer(backend, eos_id=1, pad_id=0, unk_id=2, name="numbers-bpe")
