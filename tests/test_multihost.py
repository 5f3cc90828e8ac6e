"""Real multi-process runs: two JAX processes on this machine's CPU, joined by `jax.distributed` (gloo collectives),
two devices each, against one process.

Both runs train BPD heads on a mesh of the four devices, decode with them and run the bench (tests/multihost.py). The
two processes share every folder, as hosts do on an NFS or gcsfuse mount. What must hold: the processes agree with
each other and with the one-process run (heads, losses, tokens), BPD decoding stays exact, and the shared folders
hold each file once and whole (one metrics line per record, one bench result, no temporary files).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import PINNED_JAXLIB
from tests.test_bpd import tiny_train_config
from training.trainer import STOP_CHECK_EVERY

SCRIPT = Path(__file__).with_name("multihost.py")
TRAIN_TINY = Path(__file__).with_name("train_tiny.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# The processes compile at LLVM's level 0 as the suite does, under the jaxlib that option was measured with only
# (tests/conftest.py: XLA ends the process at an option it does not know).
_FAST_COMPILE = " --xla_backend_optimization_level=0" if PINNED_JAXLIB else ""


def _start(args: list, devices: int, env_extra: dict, script: Path = SCRIPT) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(env_extra, PYTHONPATH=os.pathsep.join([str(SCRIPT.parents[1]), str(SCRIPT.parent)]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}{_FAST_COMPILE}")
  return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _processes(n: int) -> list[dict]:
  """The environment of each of `n` processes joined through a fresh local coordinator port."""
  port = _free_port()
  return [{"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
          for i in range(n)]


def _finish(proc: subprocess.Popen) -> str:
  try:
    out, _ = proc.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
  return out


def _result(proc: subprocess.Popen) -> dict:
  out = _finish(proc)
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, out[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # about 45 s each: three processes compile and train; run before resolving
@pytest.mark.parametrize("mesh", ["data=2,model=2", "data=1,model=4"])  # the second splits params across processes
def test_two_processes_match_one_and_share_folders_safely(tmp_path, mesh):
  multi, single = tmp_path / "multi", tmp_path / "single"
  for d in (multi, single):
    d.mkdir()
    tiny_train_config(d)  # writes the prompt file both runs read
  procs = [_start([multi, mesh], 2, env) for env in _processes(2)]
  ref_proc = _start([single, mesh], 4, {})
  results = [_result(p) for p in procs]
  ref = _result(ref_proc)

  assert [r["process"] for r in results] == [0, 1] and all(r["processes"] == 2 for r in results)
  assert ref["processes"] == 1 and all(r["devices"] == ref["devices"] == 4 for r in results)
  for r in results:
    assert r["greedy"] == ref["greedy"] and r["drafted"] == r["greedy"]  # exact, and the same tokens as one process
    assert r["tau"] == ref["tau"] > 1.2  # the heads learned, and the same in both runs
    assert r["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
    assert r["bench_mismatches"] == 0
    assert r["first"] == {"index": 0} and r["agree"] == [True, False]

  heads, ref_heads = (load_file(d / "heads" / "heads.safetensors") for d in (multi, single))
  assert heads.keys() == ref_heads.keys()
  for k in heads:
    # The target's weights are split over the processes as over the one process's devices, but a sum across two
    # processes adds its parts in another order than one across devices of one process: the saved (float16) heads
    # may differ by one rounding step (a relative 2^-10) on a few elements, nothing more.
    a, b = heads[k].astype(np.float32), ref_heads[k].astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=2 ** -9, atol=1e-5, err_msg=k)
    assert np.mean(np.abs(a - b) > 1e-5) < 0.02, k

  # Shared folders: one writer for appended files, whole files, no temporaries left.
  steps = lambda d: [json.loads(l)["step"] for l in (d / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  assert steps(multi) == steps(single) and len(steps(multi)) > 5
  assert (multi / "ckpt" / "curves.png").is_file()
  bench = json.loads((multi / "bench" / "results.json").read_text())
  assert bench["complete"] and not (multi / "bench" / "progress.jsonl").exists()
  assert bench["environment"]["process_count"] == 2
  assert [p.name for p in multi.rglob("*") if ".tmp" in p.name] == []


@pytest.mark.slow  # about 40 s; run before resolving
def test_draft_models_train_export_and_decode_with_the_target_split_over_two_processes(tmp_path):
  """The draft model and the feature-level draft share the target's embedding, which `model=4` splits over the two
  processes: training, the export (each process writes the whole files) and the loaders' embedding checks gather
  it. The exports equal the one-process run's and decoding with them stays exact."""
  from tests.test_draft import tiny_draft_config
  from tests.test_eagle import tiny_eagle_config

  multi, single = tmp_path / "multi", tmp_path / "single"
  for d in (multi, single):  # the prompt files, written before the processes share them
    d.mkdir()
    tiny_draft_config(d, "draft", 20), tiny_eagle_config(d / "eagle", 20)
  procs = [_start([multi, "data=1,model=4", "drafts"], 2, env) for env in _processes(2)]
  ref_proc = _start([single, "data=1,model=4", "drafts"], 4, {})
  results = [_result(p) for p in procs]
  ref = _result(ref_proc)
  for r in results:
    assert r["greedy"] == ref["greedy"] and r["spec"] == r["greedy"] and r["eagle"] == r["greedy"]
    assert r["tau"] == pytest.approx(ref["tau"]) and min(r["tau"]) > 1.0
    for got, want in zip(r["evals"], ref["evals"]):
      assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert r["weights"].keys() == ref["weights"].keys() and len(ref["weights"]) > 10
    for k, v in ref["weights"].items():
      assert r["weights"][k] == pytest.approx(v, rel=1e-4), k
  assert [p.name for p in multi.rglob("*") if ".tmp" in p.name] == []


@pytest.mark.slow  # about 20 s; run before resolving
def test_a_signal_to_one_process_stops_every_process_at_one_checkpoint(tmp_path):
  """A preemption notice (SIGTERM) may reach one host only, or each host between different steps, while a checkpoint
  is a collective save: the processes agree on stopping and save the same step; the run then resumes from it and
  ends with the parameters of an uninterrupted run."""
  ckpt, metrics = tmp_path / "ckpt", tmp_path / "ckpt" / "metrics.jsonl"
  envs = _processes(2)
  procs = [_start([ckpt, 60, 1000, 0.1, tmp_path / f"a{i}.npz"], 2, env, TRAIN_TINY) for i, env in enumerate(envs)]
  deadline = time.monotonic() + 300
  while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 12):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [_finish(p)[-2000:] for p in procs]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  outs = [_finish(p) for p in procs]
  assert procs[1].returncode == -signal.SIGTERM, outs[1][-3000:]
  assert procs[0].returncode == 130 and "another process got a signal" in outs[0], outs[0][-3000:]
  (saved,) = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()]  # one checkpoint, the same for both
  assert 12 <= saved < 60 and saved % STOP_CHECK_EVERY == 0, saved

  procs = [_start([ckpt, 60, 1000, 0, tmp_path / f"b{i}.npz"], 2, env, TRAIN_TINY)
           for i, env in enumerate(_processes(2))]
  ref = _start([tmp_path / "ref_ckpt", 60, 1000, 0, tmp_path / "ref.npz"], 2, {}, TRAIN_TINY)  # one process, unbroken
  for p in [*procs, ref]:
    out = _finish(p)
    assert p.returncode == 0, out[-3000:]
    assert f"first_step={saved + 1 if p is not ref else 1}" in out, out[-3000:]
  with np.load(tmp_path / "ref.npz") as want:
    for i in range(2):
      with np.load(tmp_path / f"b{i}.npz") as got:
        for k in want.files:
          np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
  assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == list(range(1, 61))

  # Nine more steps (60 -> 69): the agreement at step 60 comes before the signal, and none follows until the loop
  # ends; the signal is agreed on then, so both processes still take the same exit after the last save.
  procs = [_start([ckpt, 69, 1000, 0.2, tmp_path / f"c{i}.npz"], 2, env, TRAIN_TINY)
           for i, env in enumerate(_processes(2))]
  while len(metrics.read_text().splitlines()) < 62:
    assert time.monotonic() < deadline + 300 and all(p.poll() is None for p in procs), \
        [_finish(p)[-2000:] for p in procs]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [_finish(p) for p in procs]
  assert procs[1].returncode == -signal.SIGTERM and procs[0].returncode == 130, [o[-3000:] for o in outs]
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())[-1] == 69


BENCH = Path(__file__).with_name("bench_multihost.py")


def _bench_prompts(path: Path, n: int) -> Path:
  path.write_text("".join(json.dumps({"question_id": i, "category": "c" if i % 2 else "d",
                                      "turns": [f"alpha {i} bravo alpha {i}"]}) + "\n" for i in range(n)))
  return path


def _start_bench(cwd: Path, args: list, env_extra: dict) -> subprocess.Popen:
  cwd.mkdir(exist_ok=True)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(env_extra, PYTHONPATH=os.pathsep.join([str(SCRIPT.parents[1]), str(SCRIPT.parent)]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count=2{_FAST_COMPILE}")
  return subprocess.Popen([sys.executable, str(BENCH), *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # about 40 s; run before resolving
def test_a_method_one_host_cannot_build_is_unavailable_on_every_host(tmp_path):
  """Building a method can work on the target's arrays, which every process must do together when they are split
  over hosts (`model=4` on two hosts): `opt-tree:nodes=auto` measures costs, and heads over a vocabulary subset
  gather their output table from the target's. One host lacks the heads (a relative heads= path, found in process
  0's folder only): the other must not wait for it in that work's collectives; the method is unavailable on both
  and the rest of the bench runs."""
  from jaxspec.models.draft import save_draft
  from tests.conftest import make_tiny

  prompts, out = _bench_prompts(tmp_path / "prompts.jsonl", 4), tmp_path / "out"
  # A draft that every host sees, sharing the target's embedding: its check of that embedding gathers the rows the
  # other host holds.
  save_draft(tmp_path / "draft", *make_tiny(embed_scale=3.0), dtype="float32")
  methods = f"greedy,lookup,spec:draft={tmp_path / 'draft'},opt-tree:nodes=auto:heads=heads"
  procs = [_start_bench(tmp_path / f"host{i}", [prompts, out, methods],
                        {**env, "WRITE_HEADS": "1" if i == 0 else "", "MESH": "data=1,model=4"})
           for i, env in enumerate(_processes(2))]
  results = [_result(p) for p in procs]
  for r in results:
    assert r["complete"] and r["methods"]["lookup"]["mismatches"] == 0 and r["methods"]["lookup"]["n_prompts"] == 4
    spec = r["methods"][f"spec:draft={tmp_path / 'draft'}"]
    assert spec["mismatches"] == 0 and spec["tau"] > 2  # the draft is the target itself
    assert r["methods"]["opt-tree:nodes=auto:heads=heads"]["available"] is False
  first, second = (r["methods"]["opt-tree:nodes=auto:heads=heads"]["reason"] for r in results)
  assert "process 1 of this multi-host run cannot run it" in first, first
  assert "no BPD heads in heads" in second, second
  saved = json.loads((out / "results.json").read_text())["methods"]["opt-tree:nodes=auto:heads=heads"]
  assert saved["reason"] == first  # process 0 writes


@pytest.mark.slow  # about 60 s; run before resolving
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_one_bench_process_stops_both_after_the_same_run(tmp_path, signum):
  """Ctrl-C or a preemption notice reaches one host of a bench: both processes stop after the method run in flight
  (they agree between runs), the runs finished so far are kept, and the same command on both goes on from there."""
  prompts, out = _bench_prompts(tmp_path / "prompts.jsonl", 12), tmp_path / "out"
  args = [prompts, out, "greedy,lookup", 0.4]
  procs = [_start_bench(tmp_path / f"host{i}", args, env) for i, env in enumerate(_processes(2))]
  progress = out / "progress.jsonl"
  deadline = time.monotonic() + 300
  while not (progress.is_file() and len(progress.read_text().splitlines()) >= 4):  # a header line and 3 runs
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [_finish(p)[-2000:] for p in procs]
    time.sleep(0.05)
  procs[1].send_signal(signum)
  outs = [_finish(p) for p in procs]
  assert procs[1].returncode == -signum, outs[1][-3000:]
  assert procs[0].returncode != 0 and "another process got a signal: stopping after this method run" in outs[0], \
      outs[0][-3000:]
  kept = len(progress.read_text().splitlines()) - 1
  assert 3 <= kept < 12, kept  # 6 batches of 2 prompts x 2 methods; stopped before the end
  assert not (out / "report.md").exists()

  procs = [_start_bench(tmp_path / f"host{i}", args[:3], env) for i, env in enumerate(_processes(2))]
  results = [_result(p) for p in procs]
  for r in results:
    assert r["complete"] and r["resumed_runs"] == kept
    assert r["methods"]["lookup"]["mismatches"] == 0 and r["methods"]["lookup"]["n_prompts"] == 12
  assert (out / "report.md").is_file() and not progress.exists()
