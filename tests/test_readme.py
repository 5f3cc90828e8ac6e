"""README.md's Library example runs as written and says what it shows: the BPD call gives the greedy call's tokens in
fewer target calls."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_library_example_runs_as_written(default_model, monkeypatch):
  import jaxspec.loading

  block = re.search(r"^## Library\n\n```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
  assert block, "README.md has no Library section with a python block"
  greedy_part, bpd_part = block.group(1).split("# The same tokens")
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda *a, **k: default_model)  # the session's loaded model
  scope: dict = {}
  exec(compile(greedy_part, "README.md (Library)", "exec"), scope)
  greedy = scope["res"]
  exec(compile("# The same tokens" + bpd_part, "README.md (Library, BPD)", "exec"), scope)
  assert scope["res"].tokens == greedy.tokens and len(greedy.tokens[0]) > 8
  assert scope["res"].target_calls < greedy.target_calls
