"""The Hugging Face baselines, `hf-greedy` and `hf-lookup` (jaxspec/bench/baselines.py), on the default model.

torch and transformers are not jaxspec dependencies: the slow tests here need them and are skipped, with the reason,
where they are not installed (run them from a venv that has both: docs/testing.md). What a user without them is told
is checked in the default run, with neither imported.
"""

import json
import sys
import types

import numpy as np
import pytest

from jaxspec.bench import BenchConfig, run_bench
from jaxspec.bench.methods import METHODS, BenchContext, Unavailable, build
from jaxspec.bench.runner import chat_prompt_ids
from jaxspec.models.llama import LlamaLM, tiny_config
from tests.conftest import SHIPPED_QUESTIONS

NO_HF = "needs torch and transformers, which are not jaxspec dependencies and are not installed here"
# Greedy with 40 new tokens, one output runs to the token limit and two end with EOS (after 27 and 8 tokens): both
# ways a row stops, and a repetitive one where prompt lookup has something to copy.
QUESTIONS = (*SHIPPED_QUESTIONS, "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the "
             "mat.")
NEW = 40


@pytest.fixture(scope="session")
def torch():
  """torch, with transformers importable too; the test is skipped, with the reason, where either is missing (a
  session fixture, so that it is set up before the default model, also one)."""
  pytest.importorskip("transformers", reason=NO_HF)
  return pytest.importorskip("torch", reason=NO_HF)


@pytest.mark.parametrize("missing", ["torch", "transformers"])
@pytest.mark.parametrize("name", ["hf-greedy", "hf-lookup"])
def test_without_torch_or_transformers_the_baselines_say_what_to_install(monkeypatch, name, missing):
  """A user without them gets an Unavailable that names the missing module and what to install (the bench lists it
  as the method's reason); a None in sys.modules makes the import fail as it does where the package is absent."""
  for module in ("torch", "transformers"):
    monkeypatch.setitem(sys.modules, module, None if module == missing else types.ModuleType(module))
  ctx = BenchContext(LlamaLM(tiny_config()), None, None)
  with pytest.raises(Unavailable, match=rf"need torch and transformers, which jaxspec does not install.*"
                                        rf"\(ModuleNotFoundError: .*{missing}.*`pip install torch transformers`"):
    METHODS[name].build(ctx, {})


@pytest.fixture(scope="module")
def reference(torch, default_model):
  """(ctx, prompts, jaxspec's greedy result): the bench's own reference runner on the bench's prompt encoding."""
  model, params, tok = default_model
  ctx = BenchContext(model, params, tok)
  prompts = chat_prompt_ids(tok, QUESTIONS)
  ref = build(ctx, "greedy", {})(prompts, NEW, 0)
  lengths = [len(t) for t in ref.tokens]
  assert lengths == [27, NEW, 8] and ref.tokens[0][-1] in ctx.eos_ids and ref.tokens[2][-1] in ctx.eos_ids, lengths
  return ctx, prompts, ref


def _check_counts(res, ref):
  """The counts of a one-prompt-at-a-time run: per row, its verify calls after the prefill, the tokens they gave
  (every output token but the prefill's first) and the histogram of what each call committed, which must add up to
  both; the batch's forwards are the rows' sum, as each served one row."""
  assert res.step_tokens == ref.step_tokens == [len(t) - 1 for t in ref.tokens]
  hist = np.asarray(res.accept_hist)
  assert hist.shape[0] == len(ref.tokens) and (hist[:, 0] == 0).all()
  assert hist.sum(axis=1).tolist() == list(res.active_calls)
  assert (hist * np.arange(hist.shape[1])).sum(axis=1).tolist() == list(res.step_tokens)
  assert res.target_calls == sum(res.active_calls)
  assert res.drafter_calls == 0 and res.run_s > 0


@pytest.mark.slow
def test_hf_greedy_gives_jaxspec_greedy_tokens_and_counts(torch, reference):
  ctx, prompts, ref = reference
  res = build(ctx, "hf-greedy", {})(prompts, NEW, 0)
  assert res.tokens == ref.tokens
  _check_counts(res, ref)
  assert res.active_calls == ref.active_calls  # one token per call, the prefill's first not counted
  assert np.asarray(res.accept_hist)[:, 1].tolist() == ref.step_tokens and np.asarray(res.accept_hist).shape[1] == 2
  hf, _ = ctx.cache["hf", id(ctx.params)]
  assert hf.dtype == torch.float32  # the target's compute dtype


@pytest.mark.slow
def test_hf_lookup_is_exact_and_its_steps_add_up(reference):
  ctx, prompts, ref = reference
  for n in (None, 3):
    res = build(ctx, "hf-lookup", {} if n is None else {"n": str(n)})(prompts, NEW, 0)
    assert res.tokens == ref.tokens, n
    _check_counts(res, ref)
    hist = np.asarray(res.accept_hist)
    assert sum(res.active_calls) < sum(res.step_tokens), n  # copies were accepted: τ > 1
    assert hist[:, 2:].sum() > 0, n
    if n is not None:
      assert hist.shape[1] <= n + 2  # a step commits at most its n candidates and the target's own token


@pytest.mark.slow
def test_hf_baselines_in_the_bench_at_batch_two(torch, default_model, tmp_path):
  """Through run_bench, two prompts to a batch (transformers decodes them one by one): exact, counted as the bench
  counts greedy, and in the report."""
  model, params, tok = default_model
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [q]}) + "\n"
                          for i, (c, q) in enumerate(zip(("writing", "qa"), (QUESTIONS[0], QUESTIONS[2])))))
  out = tmp_path / "out"
  cfg = BenchConfig(prompts=str(path), methods=("greedy", "hf-greedy", "hf-lookup"), max_new_tokens=16, batch_size=2,
                    quick=True, out=str(out))
  res = run_bench(cfg, model, params, tok, progress=False)
  m = res["methods"]
  for name in ("hf-greedy", "hf-lookup"):
    assert m[name]["available"] and m[name]["mismatches"] == 0, m[name]
    assert m[name]["new_tokens"] == m["greedy"]["new_tokens"] and m[name]["step_tokens"] == m["greedy"]["step_tokens"]
  assert m["hf-greedy"]["target_calls"] == m["greedy"]["target_calls"] == m["greedy"]["step_tokens"]
  assert m["hf-lookup"]["target_calls"] < m["hf-lookup"]["step_tokens"] and m["hf-lookup"]["tau"] > 1
  outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
  by_method = {name: [o["tokens"] for o in outputs if o["method"] == name] for name in cfg.methods}
  assert by_method["hf-greedy"] == by_method["hf-lookup"] == by_method["greedy"]
  assert len(by_method["greedy"]) == 2 and all(by_method["greedy"])
  md = (out / "report.md").read_text()
  assert "| hf-lookup |" in md and "`hf-greedy`, `hf-lookup`: transformers' generate decodes one prompt at a time" in md


@pytest.mark.slow
def test_hf_runs_in_the_targets_compute_dtype(torch):
  """A bfloat16 target is compared with transformers in bfloat16, not float32 (it ran in float32 whatever --dtype)."""
  from jaxspec.loading import load_model

  model, params, tok = load_model(dtype="bfloat16")
  ctx = BenchContext(model, params, tok)
  build(ctx, "hf-greedy", {})
  hf, _ = ctx.cache["hf", id(params)]
  assert hf.dtype == torch.bfloat16
