"""A decode that cannot fit the memory left is refused before it runs (`jaxspec.memory`), with the sizes and what to
make smaller; an XLA out-of-memory error while it runs becomes the same kind of error."""

import types

import jax
import numpy as np
import pytest

from jaxspec import cli, memory, sharding
from jaxspec.bench.methods import ASSETS
from jaxspec.decoding import generate as gen_mod
from jaxspec.decoding.generate import generate
from jaxspec.errors import InputError, OutOfMemory


@pytest.fixture(scope="module")
def t5():
  """The shipped T5 numbers model: 4 heads, no limit on its encoder input (relative positions)."""
  from jaxspec.loading import load_model
  return load_model(str(ASSETS / "t5_numbers"))


def test_an_encoder_input_too_long_for_the_host_is_refused_before_it_runs(t5, monkeypatch):
  model, params, _ = t5
  seen = []
  real = memory.check_fits
  monkeypatch.setattr(memory, "check_fits", lambda need, *args: seen.append(need) or real(need, *args))
  generate(model, params, [[5] * 100], max_new_tokens=2)
  short = seen[-1]
  # 2100 tokens pad to 4096: one layer's attention scores alone are 4 heads x 4096^2 float32 = 256 MiB.
  monkeypatch.setattr(memory, "host_available_bytes", lambda: 200 << 20)
  with pytest.raises(OutOfMemory, match=r"needs about \d+\.\d GiB more memory per device to decode, and the host has "
                                        r"0\.2 GiB free: decode shorter prompts \(an encoder-decoder's encoder input"):
    generate(model, params, [[5] * 2100], max_new_tokens=2)
  assert seen[-1] >= model.cfg.n_heads * 4096 ** 2 * 4 > 200 << 20 > short  # XLA's count holds the scores
  monkeypatch.setattr(memory, "host_available_bytes", lambda: seen[-1] + (1 << 20))  # room for it: it runs
  assert len(generate(model, params, [[5] * 2100], max_new_tokens=2).tokens[0]) == 2


def test_the_cli_names_its_own_flags(t5, monkeypatch, capsys):
  monkeypatch.setattr(memory, "host_available_bytes", lambda: 100 << 20)
  argv = ["--model", str(ASSETS / "t5_numbers"), "--max-new-tokens", "2"]
  assert cli.main(["generate", "--prompt", " ".join(["twelve"] * 2100)] + argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxspec: error: This request needs about") and err.count("\n") == 1, err
  assert "lower --max-new-tokens" in err and "--dtype bfloat16" in err and "(--mesh)" in err, err
  assert "max_new_tokens" not in err  # the library's parameter names are for Python callers


def test_free_memory_of_accelerators_and_of_the_host(tmp_path, monkeypatch):
  def device(platform, stats, process=0):
    return types.SimpleNamespace(platform=platform, process_index=process, memory_stats=lambda: stats)

  gpus = [device("gpu", {"bytes_limit": 10 << 30, "bytes_in_use": 4 << 30}),
          device("gpu", {"bytes_limit": 10 << 30, "bytes_in_use": 7 << 30}),
          device("gpu", {"bytes_limit": 1 << 30}, process=1)]  # another host's: not this process's to count
  assert memory.free_bytes(gpus) == 3 << 30  # the fullest device decides
  assert memory.free_bytes(gpus + [device("gpu", None)]) is None  # a device that does not say: no check
  assert memory.free_bytes(gpus[2:]) is None
  # CPU devices share the host's memory, and a cgroup's limit is the host's for this process.
  monkeypatch.setattr(memory, "_CGROUP", tmp_path)
  (tmp_path / "memory.max").write_text("max\n")
  free = memory.host_available_bytes()
  assert 0 < free <= __import__("psutil").virtual_memory().total
  (tmp_path / "memory.max").write_text(f"{3 << 20}\n")
  (tmp_path / "memory.current").write_text(f"{1 << 20}\n")
  assert memory.host_available_bytes() == 2 << 20
  # The page cache charged to the cgroup (a model's files as read) is reclaimed before anything is killed: room.
  (tmp_path / "memory.current").write_text(f"{3 << 20}\n")
  (tmp_path / "memory.stat").write_text(f"anon {1 << 20}\nfile {2 << 20}\nactive_file {1 << 20}\n"
                                        f"inactive_file {1 << 20}\n")
  assert memory.host_available_bytes() == 2 << 20
  (tmp_path / "memory.stat").unlink()
  (tmp_path / "memory.current").write_text(f"{1 << 20}\n")
  cpus = [device("cpu", None), device("cpu", None)]
  assert memory.free_bytes(cpus) == 1 << 20


def test_every_process_of_a_multi_host_run_refuses_with_the_shortest_one(monkeypatch):
  """One process refusing alone would leave the others waiting in the collective program."""
  program = types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
      argument_size_in_bytes=5 << 30, output_size_in_bytes=1 << 30, temp_size_in_bytes=3 << 30,
      alias_size_in_bytes=2 << 30))
  assert memory.program_bytes(program) == (7 << 30, 2 << 30)  # the arguments are held already: 2 GiB more
  need = memory.program_bytes(program)[1]
  gpu = types.SimpleNamespace(platform="gpu", process_index=0,
                              memory_stats=lambda: {"bytes_limit": 8 << 30, "bytes_in_use": 0})
  memory.check_fits(need, [gpu], "advice")  # 2 GiB of 8 GiB: fits here
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  # A program on this process's devices alone runs alone (maybe on this process only): no collective.
  monkeypatch.setattr(sharding, "each_process", lambda value: pytest.fail("a collective for a local program"))
  memory.check_fits(need, [gpu], "advice")
  # A program over both processes' devices: they decide together.
  both = [gpu, types.SimpleNamespace(platform="gpu", process_index=1, memory_stats=lambda: None)]
  for case, room in {"roomy": 8 << 10, "short": 1 << 10}.items():  # MiB free on the other process
    def each_process(value, room=room):
      assert value.tolist() == [2 << 10, 8 << 10]  # this process's need and room, in MiB
      return np.array([value, [2 << 10, room]])
    monkeypatch.setattr(sharding, "each_process", each_process)
    if case == "short":
      with pytest.raises(OutOfMemory, match="needs about 2.0 GiB .* a device has 1.0 GiB free: advice"):
        memory.check_fits(need, both, "advice")
    else:
      memory.check_fits(need, both, "advice")
  monkeypatch.setattr(sharding, "each_process", lambda value: np.array([[2 << 10, -1], [2 << 10, -1]]))
  memory.check_fits(need, both, "advice")  # no process can say: no check


def test_xla_running_out_of_memory_while_decoding_says_what_to_do(tiny, monkeypatch):
  model, params = tiny

  def program_raising(error):
    def program(*args):
      raise error
    return lambda args, static: (program, 0.0, 0, 0)

  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
  monkeypatch.setattr(gen_mod, "compiled_program", program_raising(oom))
  with pytest.raises(OutOfMemory, match=r"ran out of memory while decoding \(RESOURCE_EXHAUSTED: Out of memory while "
                                        r"trying to allocate 123 bytes\.\): decode shorter prompts") as e:
    generate(model, params, [[1, 2, 3]], max_new_tokens=2)
  assert isinstance(e.value, InputError) and e.value.__cause__ is oom
  other = jax.errors.JaxRuntimeError("INTERNAL: something else")
  monkeypatch.setattr(gen_mod, "compiled_program", program_raising(other))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # a bug stays a bug, with its traceback
    generate(model, params, [[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("command,flags", [("generate", ["--prompt", "x"]), ("bench", []), ("train", ["c.yaml"])])
def test_each_command_words_the_advice_with_its_own_settings(monkeypatch, capsys, command, flags):
  def run(args):
    raise OutOfMemory("This request needs about 9.0 GiB more memory per device to decode, and the host has 1.0 GiB "
                      "free", gen_mod.MEMORY_ADVICE)

  monkeypatch.setattr(cli, f"_cmd_{command}", run)
  assert cli.main([command, *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxspec: error: This request needs about 9.0 GiB") and err.count("\n") == 1
  advice = err.split("free: ", 1)[1]
  assert advice.strip() == cli._MEMORY_ADVICE[command] and "max_new_tokens," not in advice
  settings = {"generate": "--max-new-tokens", "bench": "--batch-size", "train": "data.gen_batch_size"}
  assert settings[command] in advice


def test_a_limit_on_any_cgroup_above_this_process_binds(tmp_path, monkeypatch):
  """This process's cgroup v2 folder and each one above it up to the root are read (a systemd slice's or a SLURM
  job's limit sits above the process's own folder), and the least room decides; a folder beside the path, or one
  without a limit (a host's root cgroup has no memory.max), does not count. A folder over its limit has no room."""
  proc = tmp_path / "proc_self_cgroup"
  proc.write_text("4:memory:/elsewhere\n0::/job/step\n")  # a v1 line before the v2 one
  real_path = memory.Path
  monkeypatch.setattr(memory, "Path", lambda p: proc if p == "/proc/self/cgroup" else real_path(p))
  root = tmp_path / "cgroup"
  step, job, other = root / "job" / "step", root / "job", root / "other"
  for folder in (step, other):
    folder.mkdir(parents=True)

  def limit(folder, most, used):
    (folder / "memory.max").write_text(f"{most}\n")
    (folder / "memory.current").write_text(f"{used}\n")

  limit(job, 4 << 20, 1 << 20)
  limit(step, 8 << 20, 1 << 20)
  limit(other, 1 << 20, 1 << 20)
  monkeypatch.setattr(memory, "_CGROUP", root)
  memory._cgroup_dirs.cache_clear()
  try:
    assert memory._cgroup_dirs(root) == (step, job, root)
    assert memory.host_available_bytes() == 3 << 20  # the job's limit, above the step's own
    (job / "memory.max").write_text("max\n")
    assert memory.host_available_bytes() == 7 << 20
    (step / "memory.stat").write_text("a garbled line\n")  # read as nothing to take off
    assert memory.host_available_bytes() == 7 << 20
    (step / "memory.stat").write_text(f"active_file {2 << 20}\n")  # read at another moment than memory.current
    assert memory.host_available_bytes() == 8 << 20
    (step / "memory.stat").unlink()
    (step / "memory.current").write_text(f"{9 << 20}\n")  # over its limit (the kernel is reclaiming): no room
    assert memory.host_available_bytes() == 0
  finally:
    memory._cgroup_dirs.cache_clear()


def test_a_cgroup_v1_memory_limit_binds(tmp_path, monkeypatch):
  """On a cgroup v1 host (this project's VMs mount v1 controllers beside an empty v2 hierarchy), the memory
  controller's folders are read: memory.limit_in_bytes, whose "no limit" is the largest page-aligned 64-bit count,
  less memory.usage_in_bytes, with the subtree's page cache (total_*_file) taken off."""
  proc = tmp_path / "proc_self_cgroup"
  proc.write_text("5:cpu,cpuacct:/x\n4:memory:/job/step\n0::/\n")
  real_path = memory.Path
  monkeypatch.setattr(memory, "Path", lambda p: proc if p == "/proc/self/cgroup" else real_path(p))
  root = tmp_path / "cgroup"
  v1 = root / "memory"
  step, job = v1 / "job" / "step", v1 / "job"
  step.mkdir(parents=True)
  (root / "unified").mkdir()
  unlimited = 9223372036854771712

  def limit(folder, most, used):
    (folder / "memory.limit_in_bytes").write_text(f"{most}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{used}\n")

  limit(v1, unlimited, 50 << 20)
  limit(job, 6 << 20, 2 << 20)
  limit(step, unlimited, 2 << 20)
  monkeypatch.setattr(memory, "_CGROUP", root)
  memory._cgroup_dirs.cache_clear()
  try:
    assert memory._cgroup_dirs(root) == (step, job, v1)
    assert memory.host_available_bytes() == 4 << 20  # the job's limit binds; the unlimited folders do not
    (job / "memory.stat").write_text(f"inactive_file 0\ntotal_inactive_file {1 << 20}\ntotal_active_file {1 << 20}\n")
    assert memory.host_available_bytes() == 6 << 20
    limit(job, unlimited, 2 << 20)
    assert memory.host_available_bytes() > 1 << 30  # no limit anywhere: the host's available memory
    (v1 / "memory.limit_in_bytes").unlink()  # no v1 memory controller: the v2 hierarchy is read
    memory._cgroup_dirs.cache_clear()
    assert memory._cgroup_dirs(root) == (root,)
  finally:
    memory._cgroup_dirs.cache_clear()


def test_free_memory_of_devices_that_say_only_part(monkeypatch):
  """A device that reports no limit cannot be checked (None); one that reports no use has its whole limit free."""
  def gpu(stats, process=0):
    return types.SimpleNamespace(platform="gpu", process_index=process, memory_stats=lambda: stats)

  assert memory.free_bytes([gpu({"bytes_in_use": 1 << 30})]) is None
  assert memory.free_bytes([gpu({"bytes_limit": 5 << 30})]) == 5 << 30
  assert memory.free_bytes([types.SimpleNamespace(platform="gpu", process_index=0)]) is None  # no memory_stats


def test_check_fits_at_the_edges(monkeypatch):
  """A program that takes exactly the room left fits; a full device refuses any program; a device that does not
  say runs it unchecked. Across processes the one with the least room to spare decides, whatever each needs."""
  def gpu(free, process=0):
    return types.SimpleNamespace(platform="gpu", process_index=process,
                                 memory_stats=lambda: None if free is None else {"bytes_limit": free})

  memory.check_fits(8 << 30, [gpu(8 << 30)], "advice")  # exactly the room left: fits
  with pytest.raises(OutOfMemory, match="needs about 8.0 GiB .* a device has 8.0 GiB free"):
    memory.check_fits((8 << 30) + (1 << 20), [gpu(8 << 30)], "advice")
  with pytest.raises(OutOfMemory, match="needs about 0.0 GiB .* a device has 0.0 GiB free"):
    memory.check_fits(1 << 20, [gpu(0)], "advice")  # full: known, not unknown
  memory.check_fits(1 << 40, [gpu(None)], "advice")  # does not say: no check
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  both = [gpu(8 << 30), gpu(None, process=1)]
  for other, error in (([9 << 10, 8 << 10], "needs about 9.0 GiB .* a device has 8.0 GiB free"),
                       ([1 << 10, 0], "needs about 1.0 GiB .* a device has 0.0 GiB free")):
    monkeypatch.setattr(sharding, "each_process", lambda value, other=other: np.array([value, other]))
    with pytest.raises(OutOfMemory, match=error):
      memory.check_fits(2 << 30, both, "advice")


def test_program_bytes_and_out_of_memory_errors_where_backends_say_less():
  analysis = lambda **sizes: types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(**sizes))
  assert memory.program_bytes(object()) == (0, 0)  # no memory_analysis: nothing known, no check
  assert memory.program_bytes(types.SimpleNamespace(memory_analysis=lambda: None)) == (0, 0)
  # More bytes aliased to the arguments than its outputs and temporaries hold: running it adds nothing, not less.
  assert memory.program_bytes(analysis(argument_size_in_bytes=4 << 20, output_size_in_bytes=2 << 20,
                                       temp_size_in_bytes=0, alias_size_in_bytes=3 << 20))[1] == 0
  assert memory.is_out_of_memory(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
  assert not memory.is_out_of_memory(ValueError("RESOURCE_EXHAUSTED named in a message of another kind"))
