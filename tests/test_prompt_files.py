"""The shipped prompt files: format, counts, no duplicates, bench prompts apart from training prompts, and no
overlap with Spec-Bench (training/data/check_prompts.py)."""
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_prompts", ROOT / "training" / "data" / "check_prompts.py")
check_prompts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_prompts)
# Spec-Bench is not shipped: the development layout keeps its dev prompts beside the checkout; elsewhere point
# JAXSPEC_SPEC_BENCH at a copy.
SPEC_BENCH = Path(os.environ.get("JAXSPEC_SPEC_BENCH", ROOT.parent / "shared" / "data" / "spec_bench_dev.jsonl"))


def test_shipped_prompt_files_pass_their_checks():
  assert check_prompts.check(check_prompts.TRAINING, check_prompts.BENCH, None, 8) == []


@pytest.mark.skipif(not SPEC_BENCH.exists(),
                    reason=f"Spec-Bench dev prompts not at {SPEC_BENCH}: set JAXSPEC_SPEC_BENCH to the file")
def test_no_shipped_prompt_shares_eight_words_with_spec_bench():
  assert check_prompts.check(check_prompts.TRAINING, check_prompts.BENCH, SPEC_BENCH, 8) == []


def test_the_check_finds_a_copied_prompt(tmp_path, monkeypatch):
  """The check has power: a bench prompt copied into a training file, and a Spec-Bench sentence, both fail."""
  import json
  quick = (ROOT / "jaxspec" / "bench" / "data" / "quick.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in (ROOT / "training" / "data" / "prompts.jsonl").read_text().splitlines()]
  rows[0]["turns"] = [json.loads(quick[0])["turns"][0]]
  (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  spec = tmp_path / "spec.jsonl"
  spec.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": [rows[5]["turns"][0]]}) + "\n")
  monkeypatch.setattr(check_prompts, "ROOT", tmp_path)
  (tmp_path / "jaxspec" / "bench" / "data").mkdir(parents=True)
  (tmp_path / "jaxspec" / "bench" / "data" / "quick.jsonl").write_text("\n".join(quick) + "\n")
  errors = check_prompts.check({"t.jsonl": 40}, check_prompts.BENCH, spec, 8)
  assert any("duplicate prompt" in e for e in errors)
  assert any("shares 8 words with t.jsonl" in e for e in errors)
  assert any("shares 8 words with Spec-Bench" in e and "t.jsonl" in e for e in errors)
