"""The benchmark run: every method on the same prompts, interleaved prompt batch by prompt batch.

Timing: each method first runs the first batch once untimed (compilation and warm-up), then every batch is run by
every method in turn, in an order that rotates from batch to batch, so drift of this machine's speed touches all
methods alike. Compilation of a new prompt-length bucket is timed apart (ahead-of-time), never as run time.

Exactness: with greedy decoding, every lossless method's output is compared token for token with jaxspec's own
greedy loop on the same batch; every difference is counted and listed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxspec import sharding
from jaxspec.bench import progress as saved
from jaxspec.bench.methods import METHODS, BenchContext, Unavailable, parse_method
from jaxspec.bench.prompts import QUICK_PROMPTS, Prompt, load_prompts
from jaxspec.errors import InputError

REFERENCE = "greedy"
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchConfig:
  """What to run. `prompts=None` means the project's own quick prompt set."""

  prompts: str | None = None
  methods: tuple[str, ...] = ("greedy",)
  limit: int | None = None
  categories: tuple[str, ...] | None = None
  max_new_tokens: int = 128
  batch_size: int = 1
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  out: str = "bench_out"
  t5x_src: str | None = None
  model: str | None = None
  quick: bool = False
  mesh: str | None = None  # run every jaxspec method sharded on this mesh, e.g. "data=2,model=4" (jaxspec.sharding)
  fresh: bool = False  # start over even when OUT/progress.jsonl holds batches of a killed run of the same settings
  dtype: str = "float32"  # the target's dtype when it is loaded here (jaxspec.loading.DTYPES)
  scan_layers: bool = False  # load the target with its layers stacked under lax.scan
  param_dtype: str | None = None  # the target's weights' dtype when it differs from `dtype`

  def resolved(self) -> "BenchConfig":
    """`--quick`: at most one prompt per category, 32 new tokens, all prompts in one batch (one compiled program per
    method instead of one per prompt-length bucket) and no warm-up run (compilation is timed apart anyway), unless a
    limit or batch size is given."""
    if not self.quick:
      return self
    return dataclasses.replace(self, limit=self.limit or 1, max_new_tokens=min(self.max_new_tokens, 32),
                               batch_size=self.batch_size if self.batch_size > 1 else 16)


@dataclasses.dataclass
class Record:
  """One prompt decoded by one method."""

  question_id: Any
  category: str
  new_tokens: int
  steps_tokens: int  # tokens from steps after prefill (τ's numerator)
  active_calls: int  # target calls while the row was live (τ's denominator)
  seconds: float  # the row's share of its batch's run time
  drafter_calls: float  # the row's share of the batch's drafter calls
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
  return {
      "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      "flax": _version("flax"), "python": sys.version.split()[0], "platform": platform.platform(),
      "backend": jax.default_backend(), "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
      "device_count": len(devices), "process_count": jax.process_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
      "load_avg": load,
  }


def model_settings(model, cfg: BenchConfig) -> dict:
  """`dtype`, `param_dtype` (None when it equals `dtype`) and `scan_layers` of a model, as BenchConfig records them;
  `cfg`'s own values where the model does not say (models without a `cfg`). Names are normalised: "float32",
  jnp.float32 and np.dtype("float32") are all "float32"."""
  mcfg = getattr(model, "cfg", None)
  dtype = jnp.dtype(getattr(mcfg, "dtype", None) or cfg.dtype).name
  param_dtype = jnp.dtype(getattr(mcfg, "param_dtype", None) or cfg.param_dtype or dtype).name
  return {"dtype": dtype, "param_dtype": param_dtype if param_dtype != dtype else None,
          "scan_layers": bool(getattr(mcfg, "scan_layers", cfg.scan_layers))}


def _version(pkg: str) -> str | None:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def chat_prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Prompt texts as token ids in the model's chat template (plain encoding when it has none)."""
  if tokenizer.chat_template:
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
  return [tokenizer.encode(t, add_bos=None) for t in texts]


def _atomic_json(path: Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


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

  A run that is killed keeps every finished batch in `OUT/progress.jsonl`; the same call again decodes only the
  batches that are missing (`jaxspec.bench.progress`), unless `cfg.fresh`.

  Returns:
    The results (the content of results.json).
  """
  from jaxspec.bench import report

  cfg = cfg.resolved()
  if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
    raise InputError("batch_size and max_new_tokens must be >= 1.")
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None  # a bad mesh fails before the model loads
  prompts = load_prompts(cfg.prompts or QUICK_PROMPTS, categories=cfg.categories, limit=cfg.limit)
  labels = [parse_method(m)[0] for m in cfg.methods]
  if len(set(labels)) != len(labels):
    raise InputError(f"A method is listed twice in {', '.join(labels)}.")
  if REFERENCE not in labels:
    labels.insert(0, REFERENCE)  # speedups and exactness are measured against it, in the same run
  out = Path(cfg.out)
  try:  # before the model loads: a results folder that cannot be written fails now, not after the run
    out.mkdir(parents=True, exist_ok=True)
    (out / ".write_check").touch()
    (out / ".write_check").unlink()
  except OSError as e:
    raise InputError(f"Cannot write the results folder {out}: {e.strerror or e}. Pass another --out.") from None
  if model is None:
    from jaxspec.loading import load_model
    model, params, tokenizer = load_model(cfg.model, dtype=cfg.dtype, scan_layers=cfg.scan_layers,
                                          param_dtype=cfg.param_dtype)
  cfg = dataclasses.replace(cfg, **model_settings(model, cfg))  # what the model is, loaded here or passed in
  # Before any method is built (some measure this machine's costs first): every prompt must fit.
  ids = chat_prompt_ids(tokenizer, [p.text for p in prompts])
  context = getattr(getattr(model, "cfg", None), "max_seq_len", None)
  bound = ("the model's context length" if getattr(model, "context_is_limit", False)
           else "the model's max_seq_len, the decode loop's bound on prompt + output")
  for p, row in zip(prompts, ids):
    if context and len(row) + cfg.max_new_tokens > context:
      raise InputError(f"Prompt {p.question_id!r} ({p.category}) is {len(row)} tokens long: with {cfg.max_new_tokens} "
                       f"new tokens it needs more than {bound} ({context}). Lower --max-new-tokens, or leave the "
                       "prompt out of the file.")
  if mesh is not None:  # placed once here; generate() then finds the params already on the mesh
    params = sharding.partitioner(mesh, model).shard_params(params)
  ctx = BenchContext(model, params, tokenizer, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                     seed=cfg.seed, t5x_src=cfg.t5x_src, mesh=mesh)

  runners, unavailable, specs = {}, {}, {}
  for label in labels:
    _, name, opts = parse_method(label)
    specs[label] = METHODS[name]
    try:
      runners[label] = METHODS[name].build(ctx, opts)
    except Unavailable as e:
      unavailable[label] = str(e)
  lossless = {l: getattr(r, "lossless", specs[l].lossless) for l, r in runners.items()}
  notes = {l: getattr(r, "note", None) for l, r in runners.items()}
  if REFERENCE in unavailable:
    raise InputError(f"The reference method cannot run: {unavailable[REFERENCE]}")
  # Baselines (T5X, Hugging Face) depend on what is installed: those stay listed as unavailable.
  failed = {l: why for l, why in unavailable.items() if not specs[l].baseline}
  if require_all and failed:
    raise InputError("Cannot run " + "; ".join(f"{l}: {why.rstrip('.')}" for l, why in failed.items()) + ".")

  batches = [list(range(i, min(i + cfg.batch_size, len(prompts)))) for i in range(0, len(prompts), cfg.batch_size)]
  records: dict[str, list[Record]] = {l: [] for l in runners}
  compile_s = {l: 0.0 for l in runners}
  program_bytes = {l: 0 for l in runners}
  mismatches: dict[str, list[dict]] = {l: [] for l in runners}
  env = environment()
  started = time.time()

  def log(msg: str) -> None:
    logger.info(msg)
    if progress:
      tqdm.write(f"jaxspec bench: {msg}", file=sys.stderr)

  progress_path = out / saved.FILE
  head = saved.fingerprint(cfg, prompts, ids, list(runners))
  done, why_not = ([], None) if cfg.fresh else saved.restore(progress_path, head)
  if why_not:
    log(why_not)
  for entry in done:
    for label in runners:
      records[label] += [Record(**r) for r in entry["records"][label]]
      mismatches[label] += entry["mismatches"][label]
      compile_s[label] += entry["compile_s"][label]
      program_bytes[label] = max(program_bytes[label], entry["program_bytes"][label])
  if done:
    env["resumed_batches"] = len(done)  # decoded by an earlier process of the same settings
    log(f"resuming: {len(done)} of {len(batches)} batches restored from {progress_path} (--fresh starts over)")
  saved.start(progress_path, head, done)

  def snapshot(complete: bool) -> dict:
    return report.results(cfg, env, prompts, specs, lossless, records, compile_s, program_bytes, mismatches,
                          unavailable, complete=complete, wall_s=time.time() - started,
                          peak_rss_bytes=_peak_rss_bytes(), notes=notes)

  # Warm-up: compile and run each method once on the first batch, untimed (skipped by --quick: compilation is
  # ahead-of-time and timed apart, so only first-run effects go unexcluded).
  todo = list(range(len(done), len(batches)))
  warm = [ids[i] for i in batches[todo[0] if todo else 0]]
  for label, run in tqdm(list(runners.items()) if todo and not cfg.quick else [], desc="warm-up",
                         disable=not progress, leave=False):
    res = run(warm, cfg.max_new_tokens, cfg.seed)
    compile_s[label] += res.compile_s
    program_bytes[label] = max(program_bytes[label], res.program_bytes)

  order = list(runners)
  # One tick per method and batch: with --quick every prompt is in one batch, which takes minutes.
  bar = tqdm(desc="bench", unit="run", disable=not progress, initial=len(done) * len(order),
             total=len(batches) * len(order))
  taus = lambda: " ".join(f"{l}:{report.tau(records[l]):.2f}" for l in order if records[l])
  for bi in todo:
    batch = batches[bi]
    rows = [ids[i] for i in batch]
    seed = cfg.seed + bi
    outputs = {}
    new = {"batch": bi, "records": {}, "mismatches": {l: [] for l in order}, "compile_s": {}, "program_bytes": {}}
    rot = bi % len(order)
    for label in order[rot:] + order[:rot]:
      if progress:
        so_far = taus()
        bar.set_postfix_str(f"batch {bi + 1}/{len(batches)}: {label}" + (f"; tau so far {so_far}" if so_far else ""))
      res = runners[label](rows, cfg.max_new_tokens, seed)
      bar.update(1)
      outputs[label] = res
      new["compile_s"][label] = res.compile_s
      new["program_bytes"][label] = res.program_bytes
      n = len(batch)
      new["records"][label] = [Record(
          question_id=prompts[pi].question_id, category=prompts[pi].category, new_tokens=len(res.tokens[r]),
          steps_tokens=int(res.step_tokens[r]), active_calls=int(res.active_calls[r]), seconds=res.run_s / n,
          drafter_calls=res.drafter_calls / n, accept_hist=np.asarray(res.accept_hist[r]).tolist(),
          tokens=list(map(int, res.tokens[r]))) for r, pi in enumerate(batch)]
    if cfg.temperature == 0:
      ref = outputs[REFERENCE].tokens
      for label, res in outputs.items():
        if label == REFERENCE or not lossless[label]:
          continue
        for r, pi in enumerate(batch):
          if res.tokens[r] != ref[r]:
            new["mismatches"][label].append(_mismatch(tokenizer, prompts[pi], ref[r], res.tokens[r]))
    for label in order:
      records[label] += new["records"][label]
      mismatches[label] += new["mismatches"][label]
      compile_s[label] += new["compile_s"][label]
      program_bytes[label] = max(program_bytes[label], new["program_bytes"][label])
    new["records"] = {l: [dataclasses.asdict(r) for r in recs] for l, recs in new["records"].items()}
    saved.append(progress_path, new)
    _atomic_json(out / "results.json", snapshot(complete=False))
    if progress:
      bar.set_postfix_str(f"tau {taus()}")
  bar.close()
  results = snapshot(complete=True)
  report.write_all(out, results)
  with open(out / "outputs.jsonl", "w", encoding="utf-8") as f:
    for label, recs in records.items():
      for r in recs:
        f.write(json.dumps({"method": label, "question_id": r.question_id, "category": r.category,
                            "tokens": r.tokens, "text": tokenizer.decode(r.tokens)}) + "\n")
  progress_path.unlink()  # everything it held is in results.json and outputs.jsonl now
  return results


def _mismatch(tokenizer, prompt: Prompt, expected: list[int], got: list[int]) -> dict:
  i = next((j for j, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
  lo = max(0, i - 8)
  return {"question_id": prompt.question_id, "category": prompt.category, "first_diff": i,
          "expected_len": len(expected), "got_len": len(got),
          "expected": tokenizer.decode(expected[lo:i + 8]), "got": tokenizer.decode(got[lo:i + 8])}
