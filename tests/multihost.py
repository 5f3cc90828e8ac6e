"""One process of a multi-process run on this machine's CPU, for tests/test_multihost.py.

`python tests/multihost.py WORKDIR MESH` with `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
set (the way `--distributed` is used outside a cluster JAX detects) and `XLA_FLAGS` giving each process its CPU
devices. Without those variables it runs as the one process of a run on the same total of devices, the reference.

Every process trains BPD heads on the tiny target with `mesh=MESH` into the same WORKDIR (data, checkpoints and
export in shared folders, as on an NFS or gcsfuse mount), decodes with them on the mesh, and runs the bench there.
It prints one JSON line `RESULT {...}`: its process index and what it decoded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec import sharding  # noqa: E402

if os.environ.get("JAX_NUM_PROCESSES"):
  sharding.initialize_distributed()  # before any device is touched

import jax  # noqa: E402

from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params  # noqa: E402
from jaxspec.decoding.generate import generate  # noqa: E402
from jaxspec.models.bpd import load_bpd  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402
from tests.test_bpd import ByteTokenizer, tiny_train_config  # noqa: E402
from training.bpd import train_bpd  # noqa: E402

STEPS = 60


def main(workdir: Path, mesh_spec: str) -> None:
  model, params = make_tiny(embed_scale=1.5, attend=False)
  cfg = tiny_train_config(workdir, steps=STEPS, write_prompts=False)
  cfg = dataclasses.replace(cfg, mesh=mesh_spec, optim=dataclasses.replace(cfg.optim, warmup_steps=2),
                            data=dataclasses.replace(cfg.data, limit=12, max_new_tokens=24),
                            train=dataclasses.replace(cfg.train, batch_size=32, checkpoint_every=5, eval_every=6,
                                                      log_every=3))
  # On the mesh from the start, as `jaxspec train` loads a target whose config names a mesh (load_model(mesh=)): the
  # data, the cached features and the training all run on the split weights.
  params = sharding.partitioner(sharding.make_mesh(mesh_spec), model).shard_params(params)
  summary = train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  bpd, heads = load_bpd(workdir / "heads")

  mesh = sharding.make_mesh(mesh_spec)
  tok = ByteTokenizer()
  prompts = [tok.encode("kilo 99 olik"), tok.encode("alpha 3 ahpla"), tok.encode("echo 7"), tok.encode("golf")]
  greedy = generate(model, params, prompts, max_new_tokens=24, mesh=mesh)
  drafted = generate(model, params, prompts, max_new_tokens=24, mesh=mesh, drafter=BPDDrafter(bpd),
                     draft_params=bpd_draft_params(model, params, bpd, heads))

  from jaxspec.bench.runner import BenchConfig, run_bench
  bench = run_bench(BenchConfig(prompts=str(workdir / "prompts.jsonl"), limit=4, methods=("greedy", "lookup"),
                                max_new_tokens=12, batch_size=2, out=str(workdir / "bench"), mesh=mesh_spec),
                    model, params, tok, progress=False)
  print("RESULT " + json.dumps({
      "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
      "final_loss": summary["final_eval"]["eval/loss"], "greedy": greedy.tokens, "drafted": drafted.tokens,
      "tau": float(drafted.tau), "bench_mismatches": bench["methods"]["lookup"]["mismatches"],
      # the agreements the bench relies on: process 0's value everywhere, and whether all processes hold one value
      "first": sharding.from_first_process({"index": jax.process_index()}),
      "agree": [sharding.same_everywhere("same"), sharding.same_everywhere(jax.process_index())]}), flush=True)


def drafts(workdir: Path, mesh_spec: str) -> None:
  """`python tests/multihost.py WORKDIR MESH drafts`: trains a one-layer draft model and a feature-level (EAGLE)
  draft of the tiny target on the mesh, exports both to WORKDIR, and decodes with them there."""
  from safetensors.numpy import load_file

  from jaxspec.decoding.eagle import EagleDrafter
  from jaxspec.decoding.speculative import DraftModelDrafter
  from jaxspec.models.draft import load_draft
  from jaxspec.models.eagle import load_eagle
  from tests.test_draft import tiny_draft_config
  from tests.test_eagle import tiny_eagle_config
  from training.draft import train_draft
  from training.eagle import train_eagle

  model, params = make_tiny(embed_scale=1.5, attend=False)
  tok = ByteTokenizer()
  mesh = sharding.make_mesh(mesh_spec)
  prompts = [tok.encode("kilo 99 olik"), tok.encode("alpha 3 ahpla"), tok.encode("echo 7"), tok.encode("golf")]
  draft_cfg = tiny_draft_config(workdir, "draft", 20)
  draft_cfg = dataclasses.replace(draft_cfg, mesh=mesh_spec, optim=dataclasses.replace(draft_cfg.optim, total_steps=20))
  eagle_cfg = dataclasses.replace(tiny_eagle_config(workdir / "eagle", 20), mesh=mesh_spec)
  # The target split over the mesh from the start, as `jaxspec train` loads it for a config with a mesh.
  params = sharding.partitioner(mesh, model).shard_params(params)
  losses = [train_draft(draft_cfg, model=model, params=params, tokenizer=tok, progress=False)["final_eval"],
            train_eagle(eagle_cfg, model=model, params=params, tokenizer=tok, progress=False)["final_eval"]]
  greedy = generate(model, params, prompts, max_new_tokens=24, mesh=mesh)
  draft, draft_params = load_draft(draft_cfg.out, params)
  spec = generate(model, params, prompts, max_new_tokens=24, mesh=mesh, drafter=DraftModelDrafter(draft, 3),
                  draft_params=draft_params)
  eagle, eagle_params = load_eagle(eagle_cfg.out, model, params)
  feature = generate(model, params, prompts, max_new_tokens=24, mesh=mesh, drafter=EagleDrafter(eagle, 3),
                     draft_params=eagle_params)
  weights = {f"{what}/{k}": float(abs(v.astype("float64")).sum())
             for what, folder in (("draft", draft_cfg.out), ("eagle", eagle_cfg.out))
             for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
  print("RESULT " + json.dumps({
      "process": jax.process_index(), "evals": losses, "greedy": greedy.tokens, "spec": spec.tokens,
      "eagle": feature.tokens, "tau": [float(spec.tau), float(feature.tau)], "weights": weights}), flush=True)


if __name__ == "__main__":
  (drafts if sys.argv[3:] == ["drafts"] else main)(Path(sys.argv[1]), sys.argv[2])
