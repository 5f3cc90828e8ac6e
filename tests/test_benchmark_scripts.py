"""What the scripts in benchmarks/ say when their input is wrong: one line, before a model loads where it can, never a
traceback (a nonsense count, an unknown method, a missing prompt file or data folder, a model path that is none).

Cheap: every case stops before decoding; the model loader is replaced by one that fails the test, or by the tiny
LLaMA where a case needs a model's shape.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxspec.loading
from jaxspec.bench.methods import ASSETS
from jaxspec.errors import InputError, ModelLoadError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str, monkeypatch):
  """benchmarks/NAME.py as a module, imported as `python benchmarks/NAME.py` runs it (its folder on sys.path)."""
  monkeypatch.syspath_prepend(str(BENCH))
  monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py")])  # argparse's program name
  spec = importlib.util.spec_from_file_location(f"benchmark_script_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def no_model(monkeypatch):
  """Fails the test if a script loads a model."""
  def refuse(*args, **kwargs):
    raise AssertionError("the script loaded a model before checking its arguments")
  monkeypatch.setattr(jaxspec.loading, "load_model", refuse)


def run_script(name: str, argv: list[str], monkeypatch) -> int:
  module = script(name, monkeypatch)
  import script_args  # benchmarks/script_args.py, now on sys.path
  return script_args.run(module.main, module.__file__, argv)


def one_error_line(capsys, prog: str) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
  assert "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
  return lines[0]


@pytest.mark.parametrize("name, argv, said", [
    ("gates", ["--new-tokens", "0"], "--new-tokens: must be >= 1, got 0"),
    ("gates", ["--methods", "greedy,nosuch"], "Unknown method 'nosuch'"),
    ("buckets", ["--new-tokens", "abc"], "--new-tokens: must be a whole number, got 'abc'"),
    ("buckets", ["--methods", "greedy,bpd:k=x"], "--methods"),
    ("t5_sources", ["--lengths", "4,0"], "--lengths: must be >= 1, got 0 (in '4,0')"),
    ("cllm_quality", ["--model", "m", "--limit", "0"], "--limit: must be >= 1, got 0"),
    ("cllm_quality", ["--model", "m", "--window", "0"], "--window: must be >= 1, got 0"),
    ("bpd_drafts", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("bpd_drafts", ["--top-t", "0"], "--top-t: must be >= 1, got 0"),
    ("head_inputs", ["--eval-every", "0"], "--eval-every: must be >= 1, got 0"),
    ("head_inputs", ["--layers", "abc"], "--layers: must be a whole number, got 'abc'"),
    ("speed", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    ("speed", ["--ks", "1,x"], "--ks: must be a whole number, got 'x'"),
    ("dots", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
])
def test_wrong_arguments_are_refused_as_they_are_read(name, argv, said, monkeypatch, capsys, no_model):
  module = script(name, monkeypatch)
  with pytest.raises(SystemExit) as e:
    module.main(argv)
  assert e.value.code == 2
  assert said in one_error_line(capsys, Path(module.__file__).name)


@pytest.mark.parametrize("name, argv, said", [
    ("cllm_quality", ["--model", "m", "--prompts", "/nonexistent/p.jsonl"],
     "Prompt file /nonexistent/p.jsonl not found"),
    ("bpd_drafts", ["--prompts", "/nonexistent/p.jsonl"], "Prompt file /nonexistent/p.jsonl not found"),
    ("bpd_drafts", ["--k", "9"], "Asked for 9 heads"),
    ("head_inputs", ["--data", "/nonexistent/data"], "No dataset shards"),
])
def test_missing_files_are_said_in_one_line_before_the_model_loads(name, argv, said, monkeypatch, capsys, no_model):
  assert run_script(name, argv, monkeypatch) == 2
  assert said in one_error_line(capsys, f"{name}.py")


def test_t5_sources_finds_the_shipped_model_from_any_folder(monkeypatch, tmp_path, capsys):
  """Its default model was the relative path jaxspec/assets/t5_numbers: from another folder, no model there."""
  asked = []

  def load(path=None, **kwargs):
    asked.append(path)
    raise ModelLoadError(f"No model at {path!r}")
  monkeypatch.setattr(jaxspec.loading, "load_model", load)
  monkeypatch.chdir(tmp_path)
  assert run_script("t5_sources", ["--lengths", "4", "--new-tokens", "1"], monkeypatch) == 2
  assert Path(asked[0]) == ASSETS / "t5_numbers"
  assert "No model at" in one_error_line(capsys, "t5_sources.py")


def test_head_inputs_names_layers_the_model_lacks_and_a_seq_len_inside_the_prompts(monkeypatch, capsys, tiny):
  from training import datasets

  model, params = tiny  # 2 layers
  rng = np.random.default_rng(0)
  seqs = datasets.Sequences([rng.integers(1, 200, 30) for _ in range(40)], np.full(40, 10))
  monkeypatch.setattr(datasets, "load_sequences", lambda folder: seqs)
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda path=None, **kw: (model, params, None))
  assert run_script("head_inputs", ["--layers", "1,2", "--steps", "101"], monkeypatch) == 2
  assert "--layers 1,2: the model's decoder layers are 0 to 1" in one_error_line(capsys, "head_inputs.py")
  assert run_script("head_inputs", ["--layers", "1", "--seq-len", "11", "--steps", "101"], monkeypatch) == 2
  assert "ends inside its prompt at --seq-len 11" in one_error_line(capsys, "head_inputs.py")


def test_speed_says_why_its_generate_job_failed(monkeypatch):
  """The job's own message, not a CalledProcessError that hides it (e.g. --model naming no model)."""
  speed = script("speed", monkeypatch)
  said = "jaxspec: error: No model at '/nonexistent': pass a .gguf file or a Hugging Face model folder."
  monkeypatch.setattr(speed.subprocess, "run",
                      lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", f"some warning\n{said}\n"))
  with pytest.raises(InputError, match="failed with exit code 2: " + said.replace(".", r"\.")):
    speed.cli_job_peak_rss_mb("/nonexistent", 4, [])


def test_xla_flags_help_prints_help_and_runs_nothing(monkeypatch, capsys, no_model):
  module = script("xla_flags", monkeypatch)
  with pytest.raises(SystemExit) as e:
    module.main(["--help"])
  assert e.value.code == 0
  assert "usage:" in capsys.readouterr().out


def test_hf_greedy_without_torch_says_what_it_needs(monkeypatch, capsys):
  module = script("hf_greedy", monkeypatch)
  if module.torch is not None:
    pytest.skip("torch is installed here")
  with pytest.raises(SystemExit) as e:
    module.main(["--new-tokens", "1"])
  assert e.value.code == 2
  assert "needs torch and transformers" in one_error_line(capsys, "hf_greedy.py")


def test_layer_subsets_reads_ranges_and_refuses_nonsense(monkeypatch):
  parse = script("layer_subsets", monkeypatch).parse_subset
  assert parse("0-3,26-29", 30) == [0, 1, 2, 3, 26, 27, 28, 29]
  assert parse("every4", 30) == [0, 4, 8, 12, 16, 20, 24, 28] and parse("even", 6) == [0, 2, 4]
  assert parse(" 5, 1-2 ", 30) == [1, 2, 5]
  for bad in ("0-3,2", "0-30", "a-b", "", "every1", "0-5"):
    with pytest.raises(InputError, match="subset"):
      parse(bad, 6 if bad == "0-5" else 30)
