"""Shared fixtures: the real default model is loaded once per test session (once per worker under `pytest -n 2`).

The session runs on 8 CPU devices (`--xla_force_host_platform_device_count=8`) so that tests/test_sharding.py can
shard over a real mesh in the default run; everything else still runs on device 0, as it does without the flag.
"""

import os

FORCED_DEVICES = 8
# XLA reads the flag when the CPU backend starts (the first use of a device), so it is set before anything runs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={FORCED_DEVICES}"

# Two options make compiling faster under the pinned jaxlib, which they were measured with. XLA ends the process at
# an option it does not know, and releases drop options (the legacy CPU emitters are being retired), so another
# jaxlib (a GPU machine's own, say) runs the suite with XLA's defaults.
from importlib import metadata  # noqa: E402

try:
  PINNED_JAXLIB = metadata.version("jaxlib").startswith("0.10.")
except metadata.PackageNotFoundError:
  PINNED_JAXLIB = False
# Compile time is most of this suite's time: programs are compiled with LLVM's optimisation level 0 (about 15-20 %
# faster here; what a program computes does not depend on it). An XLA_FLAGS that sets the level itself wins, e.g.
# XLA_FLAGS=--xla_backend_optimization_level=2 to test at XLA's default level.
if PINNED_JAXLIB and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  os.environ["JAXSPEC_TESTS_LEVEL_0"] = "1"  # read again where tests import this file as `tests.conftest`
# The χ² tests run each of their programs over 10^5 generations, and there XLA's default level saves more run time
# than it adds compile time (a third off the tree tests' time here): their helpers compile with these options.
SAMPLING_COMPILE_OPTIONS = {"xla_backend_optimization_level": 2} if os.environ.get("JAXSPEC_TESTS_LEVEL_0") else None
# XLA:CPU's older loop emitters compile the tiny models' decode loops in about half the time of its MLIR fusion
# emitters (the default), the default model's in about three quarters; the whole suite passes with either.
# XLA_FLAGS=--xla_cpu_use_fusion_emitters=true tests the default emitters.
if PINNED_JAXLIB and "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

# The `jaxspec` command adds XLA options per CPU (jaxspec/xla_defaults.py); tests call it in this process after JAX
# has started, where it adds nothing, and in subprocesses, which then run as this process does.
os.environ.setdefault("JAXSPEC_XLA_DEFAULTS", "0")

# A shell starts a background job (`pytest ... &`, `nohup`) with SIGINT ignored, and every process it starts inherits
# that, so Ctrl-C tests would see their signal dropped, as jaxspec does on purpose for such jobs (`jaxspec.signals`).
# The tests are about a terminal's Ctrl-C: each pytest process gets Python's usual handler, and subprocesses it
# starts the default disposition (a handler becomes SIG_DFL at exec), whatever the job that ran pytest.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from jaxspec.models.llama import LlamaLM, tiny_config  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same programs (the same tiny model and method in another test, or in the other xdist worker),
# and XLA compiles are most of this suite's time: JAX's persistent compilation cache, in a folder made for this run
# and shared by its workers, compiles each program once (a third off tests/test_speculative.py's time here). The
# controller process makes the folder before the workers start (they inherit the variable) and removes it at the
# end; a run in which JAX_COMPILATION_CACHE_DIR or jax_compilation_cache_dir is set uses that folder instead, and
# JAXSPEC_TEST_COMPILATION_CACHE=off compiles every program in every test.
_CACHE_VAR = "JAXSPEC_TEST_COMPILATION_CACHE"
_OWN_CACHE = None
if (os.environ.get(_CACHE_VAR) != "off" and not os.environ.get("JAX_COMPILATION_CACHE_DIR")
    and not jax.config.jax_compilation_cache_dir):
  if not os.environ.get(_CACHE_VAR):
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxspec-test-xla-cache-")
    os.environ[_CACHE_VAR] = _OWN_CACHE
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    import shutil

    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def make_tiny(seed: int = 0, embed_scale: float = 40.0, attend: bool = True, **overrides):
  """A tiny random LLaMA with peaked next-token distributions, so greedy choices are not near-ties. A mild
  `embed_scale` (3) gives one whose next token depends on the context: at 40 its output mostly repeats one token.
  `attend=False` zeroes the attention outputs, so the next token is a fixed function of the current one: with
  `embed_scale=1.5` a varied map that BPD heads can learn in a few hundred steps (the other two are not learnable
  that fast: a random function of the whole context, or one repeated token that fresh heads already predict)."""
  model = LlamaLM(tiny_config(**overrides))
  params = model.init_params(jax.random.key(seed))
  params = dict(params)
  params["embed"] = {"embedding": params["embed"]["embedding"] * embed_scale}
  if not attend:
    for name in [k for k in params if k.startswith("layers_")]:
      attn = {**params[name]["attn"], "o": {"kernel": jnp.zeros_like(params[name]["attn"]["o"]["kernel"])}}
      params[name] = {**params[name], "attn": attn}
  return model, params


@pytest.fixture(scope="session")
def tiny():
  """The tiny target most tests decode with: its next token depends on the context, so its greedy output varies
  (a method that kept a stale cache entry or committed one token too many would change it)."""
  return make_tiny(embed_scale=3.0)


@pytest.fixture(scope="session")
def tiny_repeating():
  """A tiny target whose greedy output soon repeats one token: for checks that need drafts to be accepted (copies of
  a repeating output, a Jacobi window at its fixed point), never for equality with greedy decoding alone."""
  return make_tiny()


@pytest.fixture(scope="session")
def learnable():
  """A tiny target a drafter can learn in a few dozen steps: the next token is a varied function of the current one
  (attention off), so an untrained drafter agrees with little of it and training has something to find."""
  return make_tiny(embed_scale=1.5, attend=False)


@pytest.fixture(scope="session")
def default_model():
  """(model, params, tokenizer) of the embedded SmolLM2-135M-Instruct."""
  from jaxspec.loading import load_model

  return load_model()


def assert_gates_mix(calls: dict) -> float:
  """`calls`: target calls by gate, from 0 (verify every step) through gates in between to one no step reaches. The
  ends must differ, and some gate in between must give a count strictly between them: its run verified some steps
  and took one-token steps in others. Returns that gate. (Counts need not be monotone in the gate: skipping a
  verify changes where later blocks start.)"""
  gates = sorted(calls)
  ungated, never = calls[gates[0]], calls[gates[-1]]
  assert gates[0] == 0.0 and ungated < never, calls
  mixed = [g for g in gates[1:-1] if ungated < calls[g] < never]
  assert mixed, f"no gate in between verified some steps and skipped others: {calls}"
  return mixed[0]


SHIPPED_QUESTIONS = ("List the planets of the solar system in order.", "Write a haiku about rain.")


@pytest.fixture(scope="session")
def default_greedy(default_model):
  """`(prompts, result)`: greedy decoding of two chat prompts (40 new tokens) on the default model, the reference the
  shipped drafters' tests compare against (computed once per session)."""
  from jaxspec.decoding.generate import generate

  model, params, tok = default_model
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in SHIPPED_QUESTIONS]
  return prompts, generate(model, params, prompts, max_new_tokens=40, eos_ids=[tok.eos_id])


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops every compiled program after each test module. XLA:CPU maps each executable's code into memory; kept for
  the whole session (jaxspec's program cache and jax's own), hundreds of them exhausted the process's memory-map
  budget (vm.max_map_count) and the next compilation crashed late in the run."""
  yield
  from jaxspec.decoding import generate as gen

  gen.clear_programs()
  jax.clear_caches()


@pytest.fixture(scope="module", autouse=True)
def _restore_signal_handlers():
  """Puts back each test file's SIGINT and SIGTERM handlers when it ends: `jaxspec.cli.main`, called in-process by
  the CLI tests, installs its own for the life of the process, and a file that runs after them in the same worker
  must find what it would find alone (which files share a worker depends on timing)."""
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for s, handler in saved.items():
    if handler is not None:
      signal.signal(s, handler)
