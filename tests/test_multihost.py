"""A real multi-process run: two JAX processes on this machine's CPU, joined by `jax.distributed` (gloo collectives),
two devices each, against one process holding all four devices.

Both runs train BPD heads on a `data=2,model=2` mesh, decode with them and run the bench (tests/multihost.py). The
two processes share every folder, as hosts do on an NFS or gcsfuse mount. What must hold: the processes agree with
each other and with the one-process run (heads, losses, tokens), BPD decoding stays exact, and the shared folders
hold each file once and whole (one metrics line per record, one bench result, no temporary files).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.test_bpd import tiny_train_config

SCRIPT = Path(__file__).with_name("multihost.py")
MESH = "data=2,model=2"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir: Path, devices: int, env_extra: dict) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(env_extra, PYTHONPATH=os.pathsep.join([str(SCRIPT.parents[1]), str(SCRIPT.parent)]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
  return subprocess.Popen([sys.executable, str(SCRIPT), str(workdir), MESH], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen) -> dict:
  try:
    out, _ = proc.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, out[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # about a minute: three processes compile and train; run before resolving
def test_two_processes_match_one_and_share_folders_safely(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  for d in (multi, single):
    d.mkdir()
    tiny_train_config(d)  # writes the prompt file both runs read
  port = _free_port()
  procs = [_start(multi, 2, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                             "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  ref_proc = _start(single, 4, {})
  results = [_result(p) for p in procs]
  ref = _result(ref_proc)

  assert [r["process"] for r in results] == [0, 1] and all(r["processes"] == 2 for r in results)
  assert ref["processes"] == 1 and all(r["devices"] == ref["devices"] == 4 for r in results)
  for r in results:
    assert r["greedy"] == ref["greedy"] and r["drafted"] == r["greedy"]  # exact, and the same tokens as one process
    assert r["tau"] == ref["tau"] > 1.2  # the heads learned, and the same in both runs
    assert r["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
    assert r["bench_mismatches"] == 0

  heads, ref_heads = (load_file(d / "heads" / "heads.safetensors") for d in (multi, single))
  assert heads.keys() == ref_heads.keys()
  for k in heads:
    np.testing.assert_allclose(heads[k], ref_heads[k], atol=1e-5, err_msg=k)

  # Shared folders: one writer for appended files, whole files, no temporaries left.
  steps = lambda d: [json.loads(l)["step"] for l in (d / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  assert steps(multi) == steps(single) and len(steps(multi)) > 5
  assert (multi / "ckpt" / "curves.png").is_file()
  bench = json.loads((multi / "bench" / "results.json").read_text())
  assert bench["complete"] and not (multi / "bench" / "progress.jsonl").exists()
  assert bench["environment"]["process_count"] == 2
  assert [p.name for p in multi.rglob("*") if ".tmp" in p.name] == []
