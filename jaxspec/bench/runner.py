"""The benchmark run: every method on the same prompts, interleaved prompt batch by prompt batch.

Timing: each method first runs the first batch once untimed (compilation and warm-up), then every batch is run by
every method in turn, in an order that rotates from batch to batch, so drift of this machine's speed touches all
methods alike. Compilation of a new prompt-length bucket is timed apart (ahead-of-time), never as run time, and the
batch that compiled it runs again for its timing (a program's first run is slower). `--quick` skips both warm-ups.

Exactness: with greedy decoding, every lossless method's output is compared token for token with jaxspec's own
greedy loop on the same batch; every difference is counted and listed. A method that is not lossless (approximate
acceptance, a distilled model) is compared too, as agreement with greedy decoding (`differ_from_greedy`).

Progress: each method's run on a batch is saved as soon as it ends (`jaxspec.bench.progress`), so a killed run loses
at most the run in flight and the same call goes on from there, in the same rotation. The figures cover whole batches
only (every method's run done), so each method is always compared with greedy on the same prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import resource
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxspec import files, sharding
from jaxspec.bench import progress as saved
from jaxspec.bench.methods import METHODS, BenchContext, Unavailable, build, parse_method, same_method_key
from jaxspec.bench.prompts import QUICK_PROMPTS, Prompt, load_prompts
from jaxspec.decoding.protocol import decoder_prompt_len
from jaxspec.errors import InputError
from jaxspec.signals import SignalGuard

REFERENCE = "greedy"
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchConfig:
  """What to run. `prompts=None` means the project's own quick prompt set."""

  prompts: str | None = None
  methods: tuple[str, ...] = ("greedy",)
  limit: int | None = None
  categories: tuple[str, ...] | None = None
  max_new_tokens: int | None = None  # None: 128, or 32 with `quick`
  batch_size: int | None = None  # None: 1, or batches of 16 with `quick`
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  out: str = "bench_out"
  t5x_src: str | None = None
  model: str | None = None
  quick: bool = False
  mesh: str | None = None  # run every jaxspec method sharded on this mesh, e.g. "data=2,model=4" (jaxspec.sharding)
  fresh: bool = False  # start over, discarding the runs a killed run kept in OUT/progress.jsonl (of any settings)
  dtype: str = "float32"  # the target's dtype when it is loaded here (jaxspec.loading.DTYPES)
  scan_layers: bool = False  # load the target with its layers stacked under lax.scan
  param_dtype: str | None = None  # the target's weights' dtype when it differs from `dtype`
  matmul_precision: str = "highest"  # the target's float32 products on GPU and TPU (jaxspec.models.llama)
  context: int | None = None  # the target's context when it is loaded here (None: its file's; jaxspec.loading)

  def resolved(self) -> "BenchConfig":
    """The settings left unset, filled in: 128 new tokens at batch size 1; with `--quick`, at most one prompt per
    category, 32 new tokens, batches of 16 prompts (one batch for the quick set's 13 categories: one compiled
    program per method instead of one per prompt-length bucket) and no warm-up run (compilation is timed apart
    anyway). A limit, a number of new tokens or a batch size that is given stays as given, with `--quick` too."""
    unset = lambda value, default: default if value is None else value  # 0 stays 0, and is refused by the run
    if not self.quick:
      return dataclasses.replace(self, max_new_tokens=unset(self.max_new_tokens, 128),
                                 batch_size=unset(self.batch_size, 1))
    return dataclasses.replace(self, limit=unset(self.limit, 1), max_new_tokens=unset(self.max_new_tokens, 32),
                               batch_size=unset(self.batch_size, 16))


@dataclasses.dataclass
class Record:
  """One prompt decoded by one method."""

  question_id: Any
  category: str
  new_tokens: int
  steps_tokens: int  # tokens from steps after prefill (τ's numerator)
  active_calls: int  # target calls while the row was live (τ's denominator)
  seconds: float  # the row's share of its batch's run time
  # the batch's drafter calls shared by the rows' verify steps (`active_calls` / the batch's target calls), so that
  # summed over rows they count as `active_calls` do, a batch's forward once per row it served
  drafter_calls: float
  accept_hist: list[int]
  tokens: list[int]


def environment() -> dict:
  """What the figures were measured on."""
  devices = jax.devices()
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  from jaxspec import __version__
  return {
      "jaxspec": __version__, "jaxspec_commit": source_commit(),
      "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      "flax": _version("flax"), "python": sys.version.split()[0], "platform": platform.platform(),
      "backend": jax.default_backend(), "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
      "device_count": len(devices), "process_count": jax.process_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
      "load_avg": load, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      # JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR): compile times read from it are load times
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir or None,
  }


def source_commit() -> str | None:
  """The git commit of the jaxspec source that runs, with "+changes:<hash>" where its tracked files differ from it
  (a hash of the difference, so that two edited versions of one commit are told apart); None where jaxspec is not
  run from a git checkout (an installed wheel) or git is missing."""
  import subprocess

  root = Path(__file__).resolve().parents[2]
  try:
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10)
    head = git("rev-parse", "--show-toplevel", "HEAD")
    if head.returncode != 0:
      return None
    top, commit = head.stdout.splitlines()  # (a path may hold spaces)
    if Path(top).resolve() != root:  # jaxspec installed inside another project's checkout
      return None
    changed = git("diff", "HEAD", "--", "jaxspec", "training")
    if changed.returncode != 0:
      return commit + "+changes"
    if not changed.stdout.strip():
      return commit
    return commit + "+changes:" + hashlib.sha256(changed.stdout.encode("utf-8", "surrogateescape")).hexdigest()[:12]
  except (OSError, ValueError, subprocess.SubprocessError):
    return None


def model_settings(model, cfg: BenchConfig) -> dict:
  """`dtype`, `param_dtype` (None when it equals `dtype`), `scan_layers` and `matmul_precision` of a model, as
  BenchConfig records them;
  `cfg`'s own values where the model does not say (models without a `cfg`). Names are normalised: "float32",
  jnp.float32 and np.dtype("float32") are all "float32"."""
  mcfg = getattr(model, "cfg", None)
  dtype = jnp.dtype(getattr(mcfg, "dtype", None) or cfg.dtype).name
  param_dtype = jnp.dtype(getattr(mcfg, "param_dtype", None) or cfg.param_dtype or dtype).name
  return {"dtype": dtype, "param_dtype": param_dtype if param_dtype != dtype else None,
          "scan_layers": bool(getattr(mcfg, "scan_layers", cfg.scan_layers)),
          "matmul_precision": str(getattr(mcfg, "matmul_precision", cfg.matmul_precision))}


def _version(pkg: str) -> str | None:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
  """The largest peak of memory in use on this process's devices, where they report it (GPU, TPU); None on CPU,
  whose arrays live in the process's memory (its peak RSS)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [int(p) for p in peaks if p is not None]
  return max(peaks) if peaks else None


def chat_prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Prompt texts as token ids in the model's chat template (plain encoding when it has none)."""
  if tokenizer.chat_template:
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
  return [tokenizer.encode(t, add_bos=None) for t in texts]


def run_bench(cfg: BenchConfig, model=None, params=None, tokenizer=None, *, progress: bool = True,
              require_all: bool = False) -> dict:
  """Runs the benchmark and writes `results.json`, `report.md` and plots under `cfg.out`.

  Args:
    cfg: what to run.
    model, params, tokenizer: the target; loaded from `cfg.model` (default: the embedded model) when None.
    progress: show a progress bar over prompt batches.
    require_all: fail before decoding anything when one of jaxspec's methods cannot run here (methods a user
      named), instead of reporting it as unavailable. Baselines whose code is not installed (T5X, Hugging Face)
      are reported as unavailable either way.

  A run that is killed keeps each method's run on each prompt batch in `OUT/progress.jsonl` as soon as it ends; the
  same call again runs only the ones that are missing (`jaxspec.bench.progress`), unless `cfg.fresh`. Runs kept for
  other work (other prompts, methods or settings) are never discarded unasked: InputError, before anything is decoded.
  A run that starts over first removes the previous run's results, report, outputs and plots from `cfg.out`.

  In a multi-host run a first Ctrl-C or SIGTERM, on any host, stops every process after the method run in flight
  (`jaxspec.signals`: they agree between runs), with the same runs kept; a second one stops that process at once.

  Returns:
    The results (the content of results.json).
  """
  made = _new_folders(Path(cfg.out)) if files.primary() else []
  try:
    return _run_bench(cfg, model, params, tokenizer, progress, require_all)
  except BaseException:
    for folder in made:  # a run that failed or was stopped before writing anything leaves no empty --out behind
      try:
        folder.rmdir()
      except OSError:
        break  # not empty (runs were kept), or not ours to remove
    raise


def _new_folders(out: Path) -> list[Path]:
  """The folders creating `out` makes, deepest first."""
  made = []
  while not out.exists() and out != out.parent:
    made.append(out)
    out = out.parent
  return made


def _run_bench(cfg: BenchConfig, model, params, tokenizer, progress: bool, require_all: bool) -> dict:
  if jax.process_count() == 1:
    return _run(cfg, model, params, tokenizer, progress, require_all, lambda: None)
  guard = SignalGuard(pending="stopping every process after the method run in flight (again: this one at once)",
                      stopping="another process got a signal: stopping after this method run")

  def stop_point() -> None:
    if guard.agree():
      raise _Stopped

  with guard:
    try:
      results = _run(cfg, model, params, tokenizer, progress, require_all, stop_point)
    except _Stopped:
      pass
    else:
      if guard.signum is not None:  # after the last agreement: the run is done and written
        logger.warning("got %s after the bench's last run; its results are written",
                       signal.Signals(guard.signum).name)
      return results
  guard.redeliver()
  raise KeyboardInterrupt  # a handler of the signal returned: stop as after Ctrl-C


class _Stopped(Exception):
  """The processes of a multi-host bench agreed to stop (a signal reached one of them)."""


def _run(cfg: BenchConfig, model, params, tokenizer, progress: bool, require_all: bool, stop_point) -> dict:
  """`run_bench`; `stop_point()` is called where every process is at the same point between method runs, and
  raises `_Stopped` when the processes agree to stop."""
  from jaxspec.bench import report

  cfg = cfg.resolved()
  if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
    raise InputError("batch_size and max_new_tokens must be >= 1.")
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None  # a bad mesh fails before the model loads
  if mesh is not None:  # the mesh by its sizes (-1 filled in): "2,4" and "data=2,model=4" are the same work
    cfg = dataclasses.replace(cfg, mesh=",".join(f"{a}={n}" for a, n in sharding.mesh_info(mesh).items()))
  prompts = load_prompts(cfg.prompts or QUICK_PROMPTS, categories=cfg.categories, limit=cfg.limit)
  labels, seen, twice = [], {}, None
  for method in cfg.methods:
    label, name, opts = parse_method(method)
    key = same_method_key(name, opts)
    if key in seen and twice is None:
      same = "is listed twice" if seen[key] == label else f"and {seen[key]!r} are the same method"
      twice = f"{label!r} {same} in --methods: give it once."
    seen[key] = label
    labels.append(label)
  # Paths are compared where they lead from here, and the defaults are this install's: process 0 decides for every
  # process of a multi-host run (one refusing alone would leave the others waiting for it).
  twice = sharding.from_first_process(twice)
  if twice:
    raise InputError(twice)
  named = list(labels)  # the methods asked for
  if REFERENCE not in labels:
    labels.insert(0, REFERENCE)  # speedups and exactness are measured against it, in the same run
  out = Path(cfg.out)
  # One process writes the results folder: process 0 of a multi-host run (the others decode their part of each batch).
  writer = files.primary()
  unwritable = None
  try:  # before the model loads: a results folder that cannot be written fails now, not after the run
    if writer:
      out.mkdir(parents=True, exist_ok=True)
      (out / ".write_check").touch()
      (out / ".write_check").unlink()
  except OSError as e:
    # (a device or pipe, such as /dev/null, was said as "File exists")
    why = "it is a file" if out.is_file() else "it is not a folder" if out.exists() and not out.is_dir() else \
        e.strerror or e
    unwritable = f"Cannot write the results folder {out}: {why}. Pass another --out."
  if writer and not unwritable:
    taken = [name for name in _result_files() if (out / name).is_dir()]
    if taken:
      unwritable = (f"{out / taken[0]} is a folder where the bench writes a file: move it away, or pass another "
                    "--out.")
  unwritable = sharding.from_first_process(unwritable)  # every process fails with process 0
  if unwritable:
    raise InputError(unwritable)
  given = None if model is None or cfg.model else f"a {type(model).__name__} passed to run_bench"  # for the report
  if model is None:
    from jaxspec.loading import load_model
    model, params, tokenizer = load_model(cfg.model, dtype=cfg.dtype, scan_layers=cfg.scan_layers,
                                          param_dtype=cfg.param_dtype, matmul_precision=cfg.matmul_precision,
                                          mesh=mesh, context=cfg.context)  # read on the host, placed on the mesh
  elif cfg.context is not None and (has := getattr(getattr(model, "cfg", None), "max_seq_len", None)) != cfg.context:
    raise InputError(f"context={cfg.context} is for a target the bench loads; the model passed to run_bench has "
                     f"{f'a context of {has}' if has else 'no context length'}: load it with "
                     f"load_model(..., context={cfg.context}), or leave context unset.")
  cfg = dataclasses.replace(cfg, **model_settings(model, cfg))  # what the model is, loaded here or passed in
  vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
  if cfg.temperature > 0 and vocab and cfg.top_k > vocab:  # before any method is built, not at the first warm-up
    raise InputError(f"--top-k {cfg.top_k} is more than the model's vocabulary ({vocab} tokens): use 0 (no filter) "
                     "or fewer.")
  # Before any method is built (some measure this machine's costs first): every prompt must fit.
  ids = chat_prompt_ids(tokenizer, [p.text for p in prompts])
  context = getattr(getattr(model, "cfg", None), "max_seq_len", None)
  bound = ("the model's context length" if getattr(model, "context_is_limit", False)
           else "the model's max_seq_len, the decode loop's bound on prompt + output")
  dec = decoder_prompt_len(model)  # an encoder-decoder's cache holds its decoder's tokens only
  if context and dec and dec + cfg.max_new_tokens > context:
    raise InputError(f"--max-new-tokens {cfg.max_new_tokens} after the decoder's start token is more than {bound} "
                     f"({context}): lower it.")
  for p, row in zip(prompts, ids):
    if context and not dec and len(row) + cfg.max_new_tokens > context:
      fixes = [f"lower --max-new-tokens (to {context - len(row)} or fewer)"] if len(row) < context else []
      if cfg.context is not None:
        fixes.append(f"load the target with a longer --context than {cfg.context} where its file allows one")
      fixes.append("leave the prompt out of the file" if cfg.prompts else
                   "pass prompts of your own with --prompts (or --categories without this one's)")
      raise InputError(f"Prompt {p.question_id!r} ({p.category}) is {len(row)} tokens long: with {cfg.max_new_tokens} "
                       f"new tokens it needs more than {bound} ({context}). "
                       + "; or ".join(f[0].upper() + f[1:] if i == 0 else f for i, f in enumerate(fixes)) + ".")
  asked = saved.fingerprint(cfg, prompts, ids, labels)  # the work as named, before any method is built
  if not sharding.same_everywhere(asked["prompts_sha256"]):
    raise InputError(f"The processes of this run read different prompts ({cfg.prompts or 'the quick set'} on process "
                     f"{jax.process_index()}): give every host the same prompt file.")
  progress_path = out / saved.FILE
  saved_head, restored, why_not, refused = None, {}, None, None
  if writer and not cfg.fresh:
    try:
      saved_head, restored, why_not = saved.read(progress_path)
      if saved_head is not None:  # a method written another way (`spec`, then `spec:gamma=4`) goes on under this name
        saved_head, restored = saved.relabel(saved_head, restored, labels)
      if not restored:
        refused = _report_of_another_program(out) or _finished_other_work(out, asked, cfg)
    except InputError as e:
      refused = str(e)
  # Every process resumes the runs process 0 found, so all of them decode the same batches (or all refuse).
  saved_head, kept, why_not, refused = sharding.from_first_process([saved_head, list(restored.values()), why_not,
                                                                    refused])
  if refused:
    raise InputError(refused)
  restored = {(int(e["batch"]), str(e["method"])): e for e in kept}
  log = _logger(progress)
  if why_not:
    log(why_not)
  # Before any method is built: saved runs of other work are refused now, not after minutes of building.
  # Process 0's fingerprint (its paths) everywhere: it is the one compared with the file process 0 reads.
  _refuse_other_work(progress_path, saved_head, restored, sharding.from_first_process(asked), skip=("methods",))
  if mesh is not None:  # placed once (a no-op for params loaded here); generate() then finds them on the mesh
    params = sharding.partitioner(mesh, model).shard_params(params)
  ctx = BenchContext(model, params, tokenizer, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                     seed=cfg.seed, t5x_src=cfg.t5x_src, mesh=mesh, batch_size=min(cfg.batch_size, len(prompts)),
                     say=log)

  # What the resumed run's methods measured (opt-tree's nodes=auto, gate=auto): taken again, so that every run of a
  # method in these results used the same setting (measured anew they may differ, on a busier machine say).
  earlier = (saved_head or {}).get("measured") if restored else None
  earlier = earlier if isinstance(earlier, dict) else {}
  runners, unavailable, specs = {}, {}, {}
  for label in labels:
    _, name, opts = parse_method(label)
    specs[label] = METHODS[name]
    ctx.measured = earlier[label] if isinstance(earlier.get(label), dict) else {}
    try:
      runners[label] = build(ctx, name, opts)  # by every process of a multi-host run, or by none
    except Unavailable as e:
      unavailable[label] = str(e)
  # Before anything below can fail on one process only: a multi-host run's processes must have built the same methods.
  if not sharding.same_everywhere([list(runners), sorted(unavailable)]):
    raise InputError(f"The processes of this run can run different methods (process {jax.process_index()}: "
                     f"{', '.join(runners)}): every host needs the same model, heads and draft files and the same "
                     "packages.")
  lossless = {l: getattr(r, "lossless", specs[l].lossless) for l, r in runners.items()}
  notes = {l: getattr(r, "note", None) for l, r in runners.items()}
  if REFERENCE in unavailable:
    raise InputError(f"The reference method cannot run: {unavailable[REFERENCE]}")
  # Baselines (T5X, Hugging Face) depend on what is installed: those stay listed as unavailable, unless no method
  # asked for can run (the run would time greedy decoding alone).
  failed = {l: why for l, why in unavailable.items() if not specs[l].baseline}
  nothing = bool(named) and all(l in unavailable for l in named)
  if require_all and (failed or nothing):
    raise InputError(_cannot_run({l: unavailable[l] for l in named} if nothing else failed, nothing))

  stop_point()  # a signal while the methods were built: nothing decoded yet
  head = saved.fingerprint(cfg, prompts, ids, list(runners))
  measured = {l: m for l, r in runners.items() if (m := getattr(r, "measured", None))}
  for label in measured.keys() - earlier.keys():
    if any(method == label for _, method in restored):  # kept by a jaxspec that did not record what it measured
      again = ("measured again: the run this one resumes did not record its choice, so its kept runs may have used "
               "another")
      notes[label] = f"{notes[label]}; {again}" if notes.get(label) else again
      log(f"{label}: {again}; --fresh runs every batch with one choice")
  if measured:  # kept with the runs, for a resumed run to take (not compared: it takes them)
    head["measured"] = measured
  head = sharding.from_first_process(head)
  _refuse_other_work(progress_path, saved_head, restored, head)
  batches = [list(range(i, min(i + cfg.batch_size, len(prompts)))) for i in range(0, len(prompts), cfg.batch_size)]
  order = list(runners)
  # A kept run whose records are not its batch's prompts, one each in order (a hand-edited or otherwise damaged
  # line; the fingerprint fixes the prompts and the batch size), goes again rather than counting other prompts.
  mismatched = [key for key, e in restored.items()
                if key[0] >= len(batches) or [str(r["question_id"]) for r in e["records"]]
                != [str(prompts[pi].question_id) for pi in batches[key[0]]]]
  if mismatched:
    restored = {k: e for k, e in restored.items() if k not in mismatched}
    log(f"{progress_path}: {len(mismatched)} kept run(s) do not hold their batch's prompts; they go again")
  # The unit of progress: one method's run on one batch, (records, compile s, program bytes), saved as it ends.
  runs: dict[tuple[int, str], tuple[list[Record], float, int]] = {
      key: ([Record(**r) for r in e["records"]], e["compile_s"], e["program_bytes"]) for key, e in restored.items()}
  warm_compile = {l: 0.0 for l in runners}
  warm_bytes = {l: 0 for l in runners}
  env = environment()
  if given:
    env["model_given"] = given  # not the default model, which `config.model` null would say
  started = time.time()
  # Which process timed each run: a batch's speedups compare its methods' times with its greedy run's, and a batch
  # a killed process left unfinished is finished by another, perhaps on a busier machine (the report says so).
  process_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # (one per run: two runs of one process are two timings)
  timed_by = {key: e.get("process", "not recorded") for key, e in restored.items()}
  if runs:
    env["resumed_runs"] = len(runs)  # decoded by an earlier process of the same settings
    # Each saved run names the source it ran (progress files from before 2026-12-06 do not: "not recorded").
    commits = {e.get("commit", "not recorded") for e in restored.values()}
    if commits != {env["jaxspec_commit"]}:
      env["resumed_commits"] = sorted(map(str, commits))
    log(f"resuming: {len(runs)} of {len(batches) * len(order)} method runs restored from {progress_path} (--fresh "
        "starts over)")
  if writer:
    saved.start(progress_path, head, restored.values())
  # A finished run's results, which this one starts over from, stay until this one has kept a run of its own: a run
  # stopped before that leaves them as they were. Anything else goes now: a resumed run's own partial results
  # (results.json is written again from its runs), or an unfinished run's that --fresh discards (whose progress is
  # gone, so its partial results.json would later pass for finished work).
  replace_previous = writer and not runs and _finished_results(out)
  if writer and not replace_previous:
    _remove_previous_results(out, log=None if runs else log)

  def kept_a_run() -> None:
    nonlocal replace_previous
    if replace_previous:
      replace_previous = False
      _remove_previous_results(out, log=log)

  def whole(bi: int) -> bool:
    return all((bi, l) in runs for l in order)

  def snapshot(complete: bool) -> dict:
    """The figures of the whole batches: every method measured on the same prompts."""
    records = {l: [] for l in runners}
    compile_s, program_bytes = dict(warm_compile), dict(warm_bytes)
    mismatches: dict[str, list[dict]] = {l: [] for l in runners}
    split = 0  # whole batches whose methods more than one process timed
    for bi in filter(whole, range(len(batches))):
      split += len({timed_by[bi, label] for label in order}) > 1
      ref = runs[bi, REFERENCE][0]
      for label in order:
        recs, comp, size = runs[bi, label]
        records[label] += recs
        compile_s[label] += comp
        program_bytes[label] = max(program_bytes[label], size)
        if cfg.temperature == 0 and label != REFERENCE:  # a lossless method's mismatches, another's differences
          mismatches[label] += [_mismatch(tokenizer, prompts[pi], a.tokens, b.tokens)
                                for pi, a, b in zip(batches[bi], ref, recs) if a.tokens != b.tokens]
    res = report.results(cfg, env, prompts, specs, lossless, records, compile_s, program_bytes, mismatches,
                         unavailable, complete=complete, wall_s=time.time() - started,
                         peak_rss_bytes=_peak_rss_bytes(), device_peak_bytes=device_peak_bytes(), notes=notes)
    res["fingerprint"] = head  # what a later run into the same --out compares with before replacing these results
    if split:
      res["environment"]["batches_timed_across_processes"] = split
    return res

  # Every batch is run by every method in turn, in an order that rotates from batch to batch; runs restored from a
  # killed process are skipped.
  todo = [(bi, label) for bi in range(len(batches)) for label in order[bi % len(order):] + order[:bi % len(order)]
          if (bi, label) not in runs]
  first = {}  # each method's warm-up batch: the first it has left
  for bi, label in todo:
    first.setdefault(label, bi)
  # One tick per method and batch: with --quick every prompt is in one batch, which takes minutes.
  bar = tqdm(desc="bench", unit="run", disable=not progress, initial=len(runs), total=len(batches) * len(order))
  try:
    if writer and any(map(whole, range(len(batches)))):
      files.write_json(out / "results.json", snapshot(complete=False))
    # Warm-up: compile and run each method once, untimed (skipped by --quick: compilation is ahead-of-time and timed
    # apart, so only first-run effects go unexcluded).
    warm = list(first.items()) if not cfg.quick else []  # --quick: no warm-up, and no bar that says there is one
    for label, bi in tqdm(warm, desc="warm-up", disable=not progress or not warm, leave=False):
      res = runners[label]([ids[i] for i in batches[bi]], cfg.max_new_tokens, cfg.seed)
      warm_compile[label] += res.compile_s
      warm_bytes[label] = max(warm_bytes[label], res.program_bytes)
      stop_point()
    for bi, label in todo:
      batch = batches[bi]
      if progress:
        # (no τ yet for a method whose outputs so far took no call after the prefill: one token each)
        taus = {l: report.tau(recs) for l in order if (recs := _done(runs, l))}
        so_far = " ".join(f"{l}:{t:.2f}" for l, t in taus.items() if math.isfinite(t))
        bar.set_postfix_str(f"batch {bi + 1}/{len(batches)}: {label}" + (f"; tau so far {so_far}" if so_far else ""))
      res = runners[label]([ids[i] for i in batch], cfg.max_new_tokens, cfg.seed + bi)
      # A program compiled for this batch (a new prompt-length bucket) runs slower the first time (a review measured
      # 30-70 ms against 5-30 ms on a tiny model): that run counts as warm-up, and the same run again is timed, with
      # its compile time kept. Multi-host: every process reruns where any compiled, as they run collectives together.
      if not cfg.quick and sharding.each_process(res.compile_s > 0).any():
        res = dataclasses.replace(runners[label]([ids[i] for i in batch], cfg.max_new_tokens, cfg.seed + bi),
                                  compile_s=res.compile_s)
      n = len(batch)
      recs = [Record(
          question_id=prompts[pi].question_id, category=prompts[pi].category, new_tokens=len(res.tokens[r]),
          steps_tokens=int(res.step_tokens[r]), active_calls=int(res.active_calls[r]), seconds=res.run_s / n,
          drafter_calls=(res.drafter_calls * res.active_calls[r] / res.target_calls if res.target_calls
                         else res.drafter_calls / n), accept_hist=np.asarray(res.accept_hist[r]).tolist(),
          tokens=list(map(int, res.tokens[r]))) for r, pi in enumerate(batch)]
      if writer:
        saved.append(progress_path, {"batch": bi, "method": label, "records": [dataclasses.asdict(r) for r in recs],
                                     "compile_s": res.compile_s, "program_bytes": res.program_bytes,
                                     "commit": env["jaxspec_commit"], "process": process_id})
      runs[bi, label] = (recs, res.compile_s, res.program_bytes)  # kept: from here a stop keeps progress.jsonl
      timed_by[bi, label] = process_id
      if writer:
        kept_a_run()
      bar.update(1)
      if writer and whole(bi):
        files.write_json(out / "results.json", snapshot(complete=False))
      stop_point()  # after the run is saved: the processes keep the same runs
  except (KeyboardInterrupt, _Stopped, Exception) as e:
    bar.close()
    signal_ = isinstance(e, (KeyboardInterrupt, _Stopped))
    if runs:
      log(f"{'interrupted' if signal_ else f'stopped by an error ({e!r})'}: {len(runs)} of "
          f"{len(batches) * len(order)} method runs (a method on a prompt batch) are kept in {progress_path}; "
          + ("the same command goes on from there" if signal_ else
             "once the error is dealt with, the same command goes on from there"))
    elif writer and signal_:  # only the fingerprint: nothing to go on from, so no file that says there is
      progress_path.unlink(missing_ok=True)
      old = " (the previous run's results there are as they were)" if (out / "results.json").exists() else ""
      log(f"interrupted before any method finished a prompt batch: nothing was kept{old}")
    raise
  bar.close()
  results = snapshot(complete=True)
  if not writer:
    return results
  records = {l: [r for bi in range(len(batches)) for r in runs[bi, l][0]] for l in order}
  try:
    report.write_all(out, results)
    files.write_text(out / "outputs.jsonl", "".join(
        json.dumps({"method": label, "question_id": r.question_id, "category": r.category, "tokens": r.tokens,
                    "text": tokenizer.decode(r.tokens)}) + "\n" for label, recs in records.items() for r in recs))
  except KeyboardInterrupt:
    log(f"interrupted while writing the report: all {len(runs)} method runs are kept in {progress_path}; the same "
        "command writes the report without running them again")
    raise
  progress_path.unlink()  # everything it held is in results.json and outputs.jsonl now
  return results


def _cannot_run(reasons: dict[str, str], nothing: bool) -> str:
  """Why methods cannot run, each reason once with the methods it stops (the shipped heads missing for this model
  stop bpd, bpd-oracle and opt-tree alike: one reason, not three copies of it); `nothing`: no method asked for can."""
  by_reason: dict[str, list[str]] = {}
  for label, why in reasons.items():
    by_reason.setdefault(why.strip().rstrip("."), []).append(label)
  lines = [f"Cannot run {', '.join(labels)}: {why}." for why, labels in by_reason.items()]
  if nothing:
    lines.append("None of the methods asked for can run, so there is nothing to compare with greedy decoding.")
  return "\n".join(lines)


def _done(runs: dict, label: str) -> list[Record]:
  """A method's records so far, for the progress bar."""
  return [r for (_, m), (recs, _, _) in runs.items() if m == label for r in recs]


def _logger(progress: bool):
  """Logs a line of the run, and shows it above the progress bar when there is one."""

  def log(msg: str) -> None:
    logger.info(msg)
    if progress:
      tqdm.write(f"jaxspec bench: {msg}", file=sys.stderr)

  return log


def _refuse_other_work(path: Path, head: dict | None, restored: dict, want: dict, skip=()) -> None:
  """Saved runs of other work are never thrown away unasked: a careful user may want them (a kill, then a rerun
  with a typo), and a file holding none costs nothing to replace."""
  diff = saved.differences(head, want, skip) if head is not None else []
  if restored and diff:
    raise InputError(f"{path} holds {len(restored)} finished method run(s) of a killed run that differs from this "
                     f"one ({'; '.join(diff)}). Pass another --out to keep them, or --fresh to discard them and "
                     "start over.")


def _finished_other_work(out: Path, asked: dict, cfg) -> str | None:
  """Why `out`'s finished results (results.json) may not be replaced by this run, or None: results of other work are
  not thrown away unasked either (the same command again replaces them; so does --fresh), nor is a JSON object no
  bench wrote."""
  try:
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    if isinstance(res, dict) and "config" not in res:  # a JSON object of someone else's
      return _not_a_bench_file(out, "results.json")
    conf = dict(res["config"])
    have = res.get("fingerprint")
    # where the labels' paths led there (none recorded: read from here, as before they were recorded)
    paths = have.get("method_paths") if isinstance(have, dict) else None
    paths = paths if isinstance(paths, dict) else None
    if isinstance(have, dict):
      have, _ = saved.relabel(have, {}, asked["methods"])  # a method written another way is the same method
      diff = saved.differences(have, asked, skip=("methods",))
    else:  # written before results recorded their fingerprint: the settings are what can be compared
      diff = saved.differences({"config": saved.resolve_paths(conf)}, {"config": asked["config"]})
    methods = conf.get("methods")
    if methods is not None and list(map(str, methods)) != list(cfg.methods) and (
        [saved.method_key(m, None if paths is None else paths.get(str(m), {})) for m in methods]
        != [saved.method_key(m) for m in cfg.methods]):  # the same methods, one written another way, are the same
      diff.append(f"methods: {','.join(map(str, methods))} there, {','.join(cfg.methods)} here")
  except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
    return None  # none, or nothing readable to keep
  if not diff:
    return None
  which = "finished" if res.get("complete") is True else "unfinished"
  return (f"{out} holds the {which} results of another bench ({'; '.join(diff)}). Pass another --out to keep them, "
          "or --fresh to replace them.")


def _not_a_bench_file(out: Path, name: str) -> str:
  return (f"{out} holds {name}, which no jaxspec bench wrote and a run would replace. Pass another --out, or --fresh "
          "to replace it.")


def _report_of_another_program(out: Path) -> str | None:
  """Why `out` may not be written, or None: a `report.md` that no bench wrote, which a run would replace (found by a
  review: a folder of one's own notes lost them; `_finished_other_work` does the same for results.json)."""
  try:
    with open(out / "report.md", encoding="utf-8", errors="replace") as f:
      if f.readline().rstrip("\n") != "# jaxspec bench report":
        return _not_a_bench_file(out, "report.md")
  except OSError:
    pass
  return None


def _result_files() -> tuple[str, ...]:
  """Every file a run writes into its results folder."""
  from jaxspec.bench.report import PLOTS
  return (saved.FILE, "results.json", "report.md", "outputs.jsonl", *PLOTS)


def _finished_results(out: Path) -> bool:
  """Whether `out` holds a finished run's results.json."""
  try:
    return json.loads((out / "results.json").read_text(encoding="utf-8")).get("complete") is True
  except (OSError, ValueError, AttributeError, RecursionError):
    return False


def _remove_previous_results(out: Path, log: Callable[[str], None] | None = None) -> list[str]:
  """Removes an earlier run's files from `out` and returns their names. Its report, outputs and plots beside this
  run's progress would make the folder look complete and wrong, so they go once this run has runs of its own (a
  resumed run's before anything is decoded: results.json is written again from the runs it resumes from). `log`:
  where to say what went, if anything did."""
  gone = []
  for name in _result_files()[1:]:
    try:
      (out / name).unlink()
      gone.append(name)
    except FileNotFoundError:
      pass
  if gone and log is not None:
    log(f"starting over: removed the previous run's {', '.join(gone)} from {out}")
  return gone


def _mismatch(tokenizer, prompt: Prompt, expected: list[int], got: list[int]) -> dict:
  i = next((j for j, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
  lo = max(0, i - 8)
  return {"question_id": prompt.question_id, "category": prompt.category, "first_diff": i,
          "expected_len": len(expected), "got_len": len(got),
          "expected": tokenizer.decode(expected[lo:i + 8]), "got": tokenizer.decode(got[lo:i + 8])}
