"""Benchmark prompts in Spec-Bench's JSONL format: one object per line with `question_id`, `category`, `turns`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

from jaxspec.errors import InputError

QUICK_PROMPTS = Path(__file__).parent / "data" / "quick.jsonl"
"""The project's own small prompt set (2 per Spec-Bench category, written for jaxspec): the default of `bench`."""

SPEC_BENCH_DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spec_bench_dev.jsonl"
"""Where the Spec-Bench dev prompts sit next to a development checkout (not shipped with the package)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  question_id: int | str
  category: str
  text: str  # the first turn: Spec-Bench's single-turn convention for speculative decoding


def load_prompts(path: str | os.PathLike, *, categories: Sequence[str] | None = None,
                 limit: int | None = None, given: str = "with --prompts") -> list[Prompt]:
  """Reads a Spec-Bench-format JSONL file, keeping file order.

  Args:
    path: the JSONL file.
    categories: keep only these categories (all when None).
    limit: keep at most this many prompts per category (the first ones in the file).
    given: how the user names the file, for the error messages (the bench's flag by default).

  Raises:
    InputError: a missing file, a line that is not JSON, a missing field, a question_id given twice, or a category
      filter that matches nothing.
  """
  path = Path(path)
  if path.is_dir():
    raise InputError(f"Prompt file {path} is a folder: pass a JSONL file in Spec-Bench format {given}.")
  if not path.exists():  # a pipe (<(...)) or /dev/stdin is not a regular file, and reads as one
    raise InputError(f"Prompt file {path} not found: pass a JSONL file in Spec-Bench format {given}.")
  prompts, per_cat, seen, first_line = [], {}, set(), {}
  try:
    # Split at newlines only: JSON strings may hold U+2028 and the other breaks `str.splitlines` splits at.
    # utf-8-sig: a byte-order mark (as some editors write) is not part of the first line.
    lines = path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").split("\n")
  except UnicodeDecodeError as e:
    raise InputError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8 JSONL.") from None
  except OSError as e:
    raise InputError(f"Cannot read the prompt file {path}: {e.strerror or e}.") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{n} is not valid JSON ({e.msg}): each line must be a JSON object with question_id, "
                       "category and turns (Spec-Bench's format). For one text prompt, use jaxspec generate "
                       "--prompt-file.") from None
    except RecursionError:
      raise InputError(f"{path}:{n} is not a prompt: its JSON is nested too deeply to read.") from None
    if not isinstance(row, dict):
      raise InputError(f"{path}:{n} is a JSON {type(row).__name__}, not an object with question_id, category and "
                       "turns.")
    missing = [k for k in ("question_id", "category", "turns") if k not in row]
    if missing:
      raise InputError(f"{path}:{n} lacks the field(s) {', '.join(missing)}; each line needs question_id, "
                       "category and turns (a list of strings).")
    turns = row["turns"]
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
      raise InputError(f"{path}:{n}: 'turns' must be a non-empty list whose first item is the prompt text.")
    # JSON's escapes can write a lone surrogate ("\udc80"): no tokenizer takes it, and reports cannot write it
    for field, text in (("the prompt", turns[0]), ("'category'", row["category"]),
                        ("'question_id'", row["question_id"])):
      try:
        text.encode("utf-8") if isinstance(text, str) else None
      except UnicodeEncodeError as e:
        raise InputError(f"{path}:{n}: {field} holds {text[e.start:e.end]!r} at character {e.start}, which is not a "
                         "Unicode character (an escaped lone surrogate): write the text as UTF-8.") from None
    if not isinstance(row["category"], str) or not row["category"].strip():
      raise InputError(f"{path}:{n}: 'category' must be a non-empty string, got {row['category']!r}.")
    qid = row["question_id"]
    if isinstance(qid, bool) or not (isinstance(qid, str) or (isinstance(qid, int)) or
                                     (isinstance(qid, float) and math.isfinite(qid))):
      raise InputError(f"{path}:{n}: 'question_id' must be a string or a finite number, got {qid!r}.")
    if qid in first_line:  # results and outputs are keyed by it: two prompts of one id could not be told apart
      raise InputError(f"{path}:{n}: question_id {qid!r} is already that of line {first_line[qid]}; give each prompt "
                       "its own.")
    first_line[qid] = n
    cat = row["category"]
    seen.add(cat)
    if categories and cat not in categories:
      continue
    if limit is not None and per_cat.get(cat, 0) >= limit:
      continue
    per_cat[cat] = per_cat.get(cat, 0) + 1
    prompts.append(Prompt(row["question_id"], cat, turns[0]))
  if not seen:
    raise InputError(f"{path} holds no prompts: each line is a JSON object with question_id, category and turns.")
  absent = sorted(set(categories or ()) - seen)
  if absent or not prompts:
    raise InputError(f"No prompts of the categories {', '.join(absent or ['(any)'])} in {path}; its categories are "
                     f"{', '.join(sorted(seen))}.")
  return prompts
