"""`jaxspec generate`: output on the default model, and one clear message with exit code 2 on bad input."""

import pytest

import jaxspec.loading
from jaxspec import cli


@pytest.fixture
def shared_model(monkeypatch, default_model):
  """Makes the CLI reuse the session's default model instead of loading it again."""
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda path=None, **kw: default_model)


def test_generate_prints_text_and_speed(shared_model, capsys):
  assert cli.main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12"]) == 0
  out, err = capsys.readouterr()
  assert "Paris" in out
  assert "tok/s" in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi", "--model", "/nonexistent/model.gguf"], "No model at"),
    (["generate", "--prompt", "   "], "prompt is empty"),
])
def test_bad_input_gives_one_clear_message(argv, message, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_corrupt_gguf(tmp_path, capsys):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF" + b"\xff" * 100)
  assert cli.main(["generate", "--prompt", "hi", "--model", str(bad)]) == 2
  assert "corrupt" in capsys.readouterr().err


def test_prompt_longer_than_the_cache(shared_model, capsys):
  assert cli.main(["generate", "--prompt", "word " * 200, "--max-len", "128"]) == 2
  assert "more than the cache length 128" in capsys.readouterr().err


def test_bad_number_is_an_argparse_error(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "0"])
  assert e.value.code == 2
