"""The benchmark harness on fake models: τ counting, the exactness check, the files it writes, prompt files."""

import dataclasses
import json
import os
import sys
import re

import numpy as np
import pytest

from jaxspec.bench import METHODS, BenchConfig, MethodSpec, load_prompts, run_bench
from jaxspec.bench.methods import BenchContext, Unavailable, loop_runner, parse_method
from jaxspec.cli import main
from jaxspec.errors import InputError
from tests.fakes import BigramLM, OracleChain

VOCAB = 23


class ByteTokenizer:
  """Characters to ids modulo a small vocabulary (id 0 never used, so T5X-style padding stays unambiguous)."""

  chat_template = None
  eos_id = None
  pad_id = 0

  def encode(self, text, add_bos=None):
    return [1 + ord(c) % (VOCAB - 1) for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return " ".join(map(str, ids))


def write_prompts(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


@pytest.fixture
def prompt_file(tmp_path):
  rows = [{"question_id": i, "category": c, "turns": [f"prompt {i} about {c}", "second turn"]}
          for i, c in enumerate(["qa", "qa", "math", "math", "math", "rag"])]
  return write_prompts(tmp_path / "p.jsonl", rows)


@pytest.fixture
def methods(monkeypatch):
  """Two test methods: an oracle chain of k=3 (drafts the model's own greedy continuation) and a planted liar."""
  lm = BigramLM.random(VOCAB, seed=3)
  specs = dict(METHODS)

  def oracle(ctx, opts):
    return loop_runner(ctx, drafter=OracleChain(lm, 3))

  def liar(ctx, opts):
    inner = loop_runner(ctx)

    def run(prompts, max_new_tokens, seed):
      res = inner(prompts, max_new_tokens, seed)
      tokens = [list(t) for t in res.tokens]
      for t, p in zip(tokens, prompts):
        if p == prompts_to_corrupt[0]:
          t[5] = (t[5] + 1) % VOCAB  # one wrong token in one output
      return dataclasses.replace(res, tokens=tokens)

    return run

  prompts_to_corrupt = [ByteTokenizer().encode("prompt 2 about math")]
  specs["oracle"] = MethodSpec("oracle", "test oracle", True, oracle)
  specs["liar"] = MethodSpec("liar", "test liar", True, liar)
  specs["missing"] = MethodSpec("missing", "test", True, lambda ctx, o: (_ for _ in ()).throw(Unavailable("no parts")))
  monkeypatch.setattr("jaxspec.bench.methods.METHODS", specs)
  monkeypatch.setattr("jaxspec.bench.runner.METHODS", specs)
  return lm


def test_tau_counts_exactness_and_files(tmp_path, prompt_file, methods):
  out = tmp_path / "out"
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle", "liar", "missing"), max_new_tokens=13, batch_size=2,
                    out=str(out))
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  m = res["methods"]
  assert list(m) == ["greedy", "oracle", "liar", "missing"]  # the reference is added first
  # Greedy: the first token comes from prefill, then 12 steps of one token each.
  assert m["greedy"]["tau"] == 1.0 and m["greedy"]["target_calls"] == 6 * 12
  # Oracle chain, k = 3: 12 tokens after the first in steps of 4 -> 3 calls per prompt, τ = 4 exactly.
  assert m["oracle"]["tau"] == 4.0 and m["oracle"]["target_calls"] == 6 * 3
  assert m["oracle"]["accept_hist"][4] == 18 and sum(m["oracle"]["accept_hist"]) == 18
  assert m["oracle"]["mismatches"] == 0
  # The liar differs from greedy in exactly one output, and the report names it.
  assert m["liar"]["mismatches"] == 1
  (mm,) = m["liar"]["mismatch_list"]
  assert mm["question_id"] == 2 and mm["category"] == "math" and mm["first_diff"] == 5
  assert m["liar"]["per_category"]["math"]["mismatches"] == 1 and m["liar"]["per_category"]["qa"]["mismatches"] == 0
  assert m["missing"] == {**m["missing"], "available": False, "reason": "no parts"}

  saved = json.loads((out / "results.json").read_text())
  assert saved["complete"] is True
  for name in ("greedy", "oracle", "liar"):
    entry = saved["methods"][name]
    for key, typ in (("tau", float), ("speedup", float), ("tokens_per_s", float), ("mismatches", int),
                     ("n_prompts", int), ("per_category", dict)):
      assert isinstance(entry[key], typ), (name, key)
    assert set(entry["per_category"]) == {"qa", "math", "rag"}
    assert entry["n_prompts"] == 6
  assert saved["methods"]["greedy"]["speedup"] == 1.0
  assert {"jax", "devices", "cpu"} <= set(saved["environment"])
  report = (out / "report.md").read_text()
  assert "| oracle | 4.00 |" in report and "`liar`: 1 of 6 outputs differ" in report and "no parts" in report
  # Batches of 2 are timed whole: the per-category speedups say they are shares of batch times.
  assert "Prompts ran 2 to a batch" in report.split("## Speedup per category")[1].split("|")[0]
  # A --batch-size above the prompt count names the batch the run had (--quick with one prompt said 16).
  from jaxspec.bench.report import markdown
  one = markdown(dict(saved, config=dict(saved["config"], batch_size=16), prompts=dict(saved["prompts"], n=1)))
  assert "batch size 1;" in one and "Prompts ran" not in one
  for png in ("tau_per_category.png", "speedup.png", "accept_hist.png"):
    assert (out / png).stat().st_size > 1000
  lines = (out / "outputs.jsonl").read_text().splitlines()
  assert len(lines) == 3 * 6


def test_only_process_0_writes_the_results_folder(tmp_path, prompt_file, methods, monkeypatch):
  """The other processes of a multi-host run decode their part of every batch and write nothing: the folder may be
  shared (tests/test_multihost.py runs two real processes)."""
  monkeypatch.setattr("jaxspec.files.primary", lambda: False)
  out = tmp_path / "out"
  res = run_bench(BenchConfig(prompts=prompt_file, methods=("oracle",), max_new_tokens=5, batch_size=2, out=str(out)),
                  methods, None, ByteTokenizer(), progress=False)
  assert res["complete"] and res["methods"]["oracle"]["mismatches"] == 0 and res["methods"]["oracle"]["tau"] > 1
  assert not out.exists()

def test_a_context_for_a_model_passed_in_is_refused_unless_it_is_the_models(tmp_path, prompt_file, methods):
  """`context` is a setting of loading: with a model passed to run_bench it would be recorded in results.json without
  having applied, so a value other than the model's is refused before anything runs."""
  from tests.conftest import make_tiny

  cfg = BenchConfig(prompts=prompt_file, methods=("oracle",), max_new_tokens=5, batch_size=2, out=str(tmp_path / "o"),
                    context=64)
  with pytest.raises(InputError, match=r"^context=64 is for a target the bench loads; the model passed to run_bench "
                                       r"has no context length: load it with load_model\(\.\.\., context=64\)"):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  llama, llama_params = make_tiny()
  with pytest.raises(InputError, match=f"has a context of {llama.cfg.max_seq_len}: load it"):
    run_bench(cfg, llama, llama_params, ByteTokenizer(), progress=False)
  assert not (tmp_path / "o" / "results.json").exists()


def test_per_category_limit_and_filter(prompt_file):
  assert [p.question_id for p in load_prompts(prompt_file, limit=1)] == [0, 2, 5]
  ps = load_prompts(prompt_file, categories=["math"], limit=2)
  assert [p.question_id for p in ps] == [2, 3] and ps[0].text == "prompt 2 about math"  # the first turn


@pytest.mark.parametrize("line,msg", [
    ("not json", r"not valid JSON \(Expecting value\): each line must be a JSON object with question_id, category and "
     r"turns \(Spec-Bench.s format\)\. For one text prompt, use jaxspec generate --prompt-file"),
    ('{"question_id": 1, "turns": ["x"]}', r"lacks the field\(s\) category"),
    ('{"question_id": 1, "category": "qa", "turns": []}', "non-empty list"),
    ("123", "is a JSON int, not an object"),
    ("\n", "holds no prompts"),
    ('{"question_id": 1, "category": null, "turns": ["x"]}', "'category' must be a non-empty string, got None"),
    ('{"question_id": NaN, "category": "qa", "turns": ["x"]}', "'question_id' must be a string or a finite number"),
    ("[" * 100000, "its JSON is nested too deeply to read"),
    ('{"question_id": 3, "category": "qa", "turns": ["x"]}\n{"question_id": 3.0, "category": "rag", "turns": ["y"]}',
     ":2: question_id 3.0 is already that of line 1; give each prompt its own"),
    # an escaped lone surrogate (\udc80): no Unicode character; said with its line, not later by the tokenizer or
    # when the report is written
    ('{"question_id": 1, "category": "qa", "turns": ["a\\udc80b"]}',
     r"bad.jsonl:1: the prompt holds '\\udc80' at character 1, which is not a Unicode character"),
    ('{"question_id": 1, "category": "q\\udc80", "turns": ["x"]}',  # (the report's tables failed with a traceback)
     r"bad.jsonl:1: 'category' holds '\\udc80' at character 1, which is not a Unicode character"),
    ('{"question_id": "7\\udc80", "category": "qa", "turns": ["x"]}',
     r"bad.jsonl:1: 'question_id' holds '\\udc80' at character 1, which is not a Unicode character"),
])
def test_bad_prompt_files_are_clear_errors(tmp_path, line, msg):
  path = tmp_path / "bad.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(InputError, match=msg):
    load_prompts(path)


def test_prompt_files_that_are_not_utf8_text_or_not_files(tmp_path):
  path = tmp_path / "utf16.jsonl"
  path.write_text('{"question_id": 1, "category": "qa", "turns": ["x"]}\n', encoding="utf-16")
  with pytest.raises(InputError, match="not UTF-8"):
    load_prompts(path)
  with pytest.raises(InputError, match="is a folder"):
    load_prompts(tmp_path)
  # A line break that JSON strings may hold unescaped (U+2028) does not split a line.
  path.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["a\u2028b"]}, ensure_ascii=False) + "\n",
                  encoding="utf-8")
  assert [p.text for p in load_prompts(path)] == ["a\u2028b"]
  # A byte-order mark and Windows line ends, as some editors save them, read as the plain file does.
  rows = [{"question_id": i, "category": "qa", "turns": [f"prompt {i}"]} for i in range(2)]
  plain = "".join(json.dumps(r) + "\n" for r in rows)
  path.write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode())
  assert load_prompts(path) == load_prompts(write_prompts(tmp_path / "plain.jsonl", rows))


def test_a_prompt_file_may_be_a_pipe(tmp_path):
  """`--prompts <(...)` names a pipe, not a regular file: it read as 'not found'."""
  import os
  import threading

  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  row = json.dumps({"question_id": 7, "category": "qa", "turns": ["x"]}) + "\n"
  writer = threading.Thread(target=lambda: fifo.write_text(row))
  writer.start()
  assert [p.question_id for p in load_prompts(fifo)] == [7]
  writer.join()


def test_bad_method_option_values_are_clear_errors():
  for text, msg in [("bpd:k=abc", "k='abc' of 'bpd' must be a whole number in 1..16"),
                    # (a BPD model has at most 16 heads: k=99 advised training 99, which training refuses)
                    ("bpd-oracle:k=17", "k='17' of 'bpd-oracle' must be a whole number in 1..16"),
                    ("bpd:lookup=4", "lookup='4' of 'bpd' must be a whole number in 1..3"),
                    ("spec:lookup=4", "lookup='4' of 'spec' must be a whole number in 1..3"),
                    ("opt-tree:width=0", "width='0' of 'opt-tree' must be a whole number in 1..1024"),
                    ("bpd-ngram:width=65537", "width='65537' of 'bpd-ngram' must be a whole number in 1..65536"),
                    ("spec:gamma=100000", "gamma='100000' of 'spec' must be a whole number in 1..1024"),
                    ("jacobi:n=5000", "n='5000' of 'jacobi' must be a whole number in 1..1024"),
                    ("spec:stop=nan", "stop='nan' of 'spec' must be a number >= 0 and below 1"),
                    ("layerskip:stop=1", "stop='1' of 'layerskip' must be a number >= 0 and below 1"),
                    ("bpd:heads=", "option 'heads' in 'bpd:heads=' has no value: write heads=VALUE"),
                    ("opt-tree:gate=x", "must be a finite number >= 0 or auto"),
                    ("bpd:gate=inf", "gate='inf' of 'bpd' must be a finite number >= 0"),
                    ("bpd-ngram:weight=inf", "weight='inf' of 'bpd-ngram' must be a number in 0..1"),
                    ("opt-tree:weight=1.5", "weight='1.5' of 'opt-tree' must be a number in 0..1"),
                    ("lookup:gate=0.5", "gate='0.5' of 'lookup' must be a whole number in 0..1024"),
                    ("opt-tree:drafter=lm", "drafter='lm' of 'opt-tree' must be one of heads, eagle, draft, layerskip"),
                    ("opt-tree:shape=tree", "shape='tree' of 'opt-tree' must be one of dynamic, static, chain"),
                    ("spec:vocab=all", "vocab='all' of 'spec' must be one of auto, subset, full")]:
    with pytest.raises(InputError, match=msg):
      parse_method(text)
  with pytest.raises(InputError, match="option 'k' appears twice in 'bpd:k=4:k=2'"):
    parse_method("bpd:k=4:k=2")
  assert parse_method("opt-tree:nodes=auto:gate=auto")[2] == {"nodes": "auto", "gate": "auto"}
  with pytest.raises(InputError, match="a chain takes its length as nodes=N"):
    METHODS["opt-tree"].build(None, parse_method("opt-tree:shape=chain:nodes=auto")[2])  # before any model work
  assert parse_method("spec:gate=1.5:stop=0.6")[2] == {"gate": "1.5", "stop": "0.6"}
  # Options the drafter never reads were dropped without a word (opt-tree ran from the heads with draft=/nonexistent).
  for text, msg in [("opt-tree:draft=/nonexistent", r"draft= in .* is for drafter=eagle or drafter=draft; "
                                                     r"drafter=heads \(the default\) reads heads=: drop draft="),
                    ("opt-tree:drafter=eagle:heads=h", "heads= in .* is for drafter=heads; drafter=eagle reads draft="),
                    ("opt-tree:drafter=draft:layers=3", "layers= .* is for drafter=layerskip; drafter=draft reads "
                                                        "draft= and vocab="),
                    ("opt-tree:drafter=layerskip:vocab=full", "vocab= .* is for drafter=draft"),
                    ("bpd-neural:layers=3:draft=x", "names two rescoring LMs")]:
    with pytest.raises(InputError, match=msg):
      parse_method(text)
  for text in ("opt-tree:drafter=eagle:draft=d", "opt-tree:drafter=draft:draft=d:vocab=full", "opt-tree:heads=h",
               "opt-tree:drafter=layerskip:layers=2", "bpd-neural:layers=2"):
    parse_method(text)


def test_named_methods_must_all_run_and_the_results_folder_must_be_writable(tmp_path, prompt_file, methods):
  cfg = BenchConfig(prompts=prompt_file, methods=("greedy", "missing"), max_new_tokens=4, limit=1,
                    out=str(tmp_path / "out"))
  assert run_bench(cfg, methods, None, ByteTokenizer(), progress=False)["methods"]["missing"]["available"] is False
  with pytest.raises(InputError, match="Cannot run missing: no parts"):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False, require_all=True)
  # A baseline whose code is not installed stays a row of its own.
  base = dataclasses.replace(cfg, methods=("greedy", "t5x-greedy"), t5x_src=str(tmp_path), out=str(tmp_path / "o2"))
  res = run_bench(base, methods, None, ByteTokenizer(), progress=False, require_all=True)
  assert res["methods"]["t5x-greedy"]["available"] is False
  (tmp_path / "file").write_text("x")
  with pytest.raises(InputError, match="Cannot write the results folder"):
    run_bench(dataclasses.replace(cfg, out=str(tmp_path / "file")), methods, None, ByteTokenizer(), progress=False)
  for name in ("progress.jsonl", "report.md"):  # found before the model loads (model=None would load it)
    (tmp_path / name / "x").mkdir(parents=True)
    with pytest.raises(InputError, match=f"{name} is a folder where the bench writes a file"):
      run_bench(dataclasses.replace(cfg, out=str(tmp_path)), None, None, ByteTokenizer(), progress=False)
    (tmp_path / name / "x").rmdir()
    (tmp_path / name).rmdir()


def test_methods_that_cannot_run_say_each_reason_once(tmp_path, prompt_file, methods, monkeypatch, capsys):
  """Methods stopped by one missing part (the shipped heads for bpd, bpd-oracle and opt-tree on another model) gave
  that reason once per method, in one long line; each reason is said once now, naming its methods. Baselines whose
  code is missing stay rows of the report, unless no method asked for can run: that run timed greedy decoding alone
  and ended with exit 0, each baseline's reason in the table."""
  import jaxspec.bench.runner as runner_mod

  def unavailable(why):
    return lambda ctx, opts: (_ for _ in ()).throw(Unavailable(why))

  for name, why, baseline in (("missing2", "no parts", False), ("other", "no other parts.", False),
                              ("base1", "not installed", True), ("base2", "not installed", True)):
    monkeypatch.setitem(runner_mod.METHODS, name, MethodSpec(name, "test", True, unavailable(why), baseline=baseline))
  cfg = BenchConfig(prompts=prompt_file, max_new_tokens=3, limit=1, out=str(tmp_path / "o"))
  for names, message in ((("missing", "oracle", "missing2", "base1"), "Cannot run missing, missing2: no parts."),
                         (("missing", "other", "missing2"), "Cannot run missing, missing2: no parts.\n"
                          "Cannot run other: no other parts.\nNone of the methods asked for can run, so there is "
                          "nothing to compare with greedy decoding."),
                         (("base1", "base2"), "Cannot run base1, base2: not installed.\nNone of the methods asked "
                          "for can run, so there is nothing to compare with greedy decoding.")):
    with pytest.raises(InputError) as e:
      run_bench(dataclasses.replace(cfg, methods=names), methods, None, ByteTokenizer(), progress=False,
                require_all=True)
    assert str(e.value) == message
  assert not (tmp_path / "o").exists()
  # Named with greedy, or not required to run, the baselines are rows of the report (as before).
  for i, (names, require_all) in enumerate(((("greedy", "base1", "base2"), True), (("base1", "base2"), False))):
    res = run_bench(dataclasses.replace(cfg, methods=names, out=str(tmp_path / f"o{i}")), methods, None,
                    ByteTokenizer(), progress=False, require_all=require_all)
    assert res["methods"]["base2"] == dict(res["methods"]["base2"], available=False, reason="not installed")
  # The command line: one message, exit status 2.
  monkeypatch.setattr("jaxspec.loading.load_model", lambda *a, **k: (methods, None, ByteTokenizer()))
  assert main(["bench", "--prompts", prompt_file, "--limit", "1", "--methods", "base1,base2", "--out",
               str(tmp_path / "cli")]) == 2
  err = capsys.readouterr().err
  assert err.count("not installed") == 1 and "None of the methods asked for can run" in err


def test_a_prompt_longer_than_the_context_is_named_before_the_run(tmp_path, tiny, monkeypatch):
  model, params = tiny  # context: 512 tokens
  path = write_prompts(tmp_path / "p.jsonl", [{"question_id": "short", "category": "qa", "turns": ["hi"]},
                                              {"question_id": "long-7", "category": "qa", "turns": ["x" * 600]}])
  import jaxspec.bench.runner as runner_mod

  def costly(ctx, opts):
    raise AssertionError("a method was built (some measure costs for minutes) before the prompts were checked")

  monkeypatch.setitem(runner_mod.METHODS, "costly", MethodSpec("costly", "test", True, costly))
  cfg = BenchConfig(prompts=path, methods=("greedy", "costly"), max_new_tokens=4, out=str(tmp_path / "out"))
  with pytest.raises(InputError, match="Prompt 'long-7' .* 60[0-9] tokens long: .* the model's context length"):
    run_bench(cfg, model, params, ByteTokenizer(), progress=False)
  # So is a --top-k wider than the vocabulary (it failed at the first warm-up, after every build).
  wide = dataclasses.replace(cfg, temperature=1.0, top_k=model.vocab_size + 1)
  with pytest.raises(InputError, match=f"--top-k {model.vocab_size + 1} is more than the model's vocabulary"):
    run_bench(wide, model, params, ByteTokenizer(), progress=False)


def test_unknown_category_and_missing_file(tmp_path, prompt_file):
  with pytest.raises(InputError, match="categories are math, qa, rag"):
    load_prompts(prompt_file, categories=["poetry"])
  with pytest.raises(InputError, match="not found"):
    load_prompts(tmp_path / "nope.jsonl")


def test_method_names_and_options():
  assert parse_method("greedy") == ("greedy", "greedy", {})
  assert parse_method("bpd:k=4") == ("bpd:k=4", "bpd", {"k": "4"})
  with pytest.raises(InputError, match="Unknown method 'beam'"):
    parse_method("beam")
  with pytest.raises(InputError, match="no option 'x'"):
    parse_method("bpd:x=1")
  for name in ("greedy", "bpd", "bpd-ngram", "bpd-neural", "spec", "lookup", "layerskip", "jacobi", "cllm",
               "opt-tree"):
    assert name in METHODS


def test_list_methods_cli(capsys):
  assert main(["bench", "--list-methods"]) == 0
  lines = capsys.readouterr().out.splitlines()[1:]
  names = [l.split()[0] for l in lines if not l.startswith(" ")]
  assert names[:3] == ["greedy", "bpd", "bpd-ngram"] and "opt-tree" in names and "t5x-greedy" in names
  # every option of every method is listed with what it does (the audit found options no help named)
  for name in names:
    block = lines[lines.index(next(l for l in lines if l.split()[0] == name)) + 1:]
    listed = [l.split("=")[0].strip() for l in block[:len(METHODS[name].options)]]
    assert listed == list(METHODS[name].options), name
    assert all(len(l.split("=  ", 1)[1]) > 10 for l in block[:len(listed)]), name


def test_a_method_path_that_is_not_utf8_is_written_into_the_report(tmp_path, prompt_file, methods, monkeypatch):
  """A folder named with bytes that are not UTF-8 (h\xe9ads, Latin-1) reaches Python as a lone surrogate: the whole
  bench ran, then writing report.md ended in a UnicodeEncodeError traceback (and the plots in a TypeError). The report
  names the folder as it is on disk; the plots draw the byte as U+FFFD."""
  from jaxspec.bench import methods as methods_mod

  specs = dict(methods_mod.METHODS)
  specs["oracle"] = dataclasses.replace(specs["oracle"], options=("heads",))
  monkeypatch.setattr(methods_mod, "METHODS", specs)
  monkeypatch.setattr("jaxspec.bench.runner.METHODS", specs)
  label = "oracle:heads=" + os.fsdecode(b"h\xe9ads")
  cfg = BenchConfig(prompts=prompt_file, methods=(label,), max_new_tokens=4, batch_size=8, out=str(tmp_path / "o"))
  assert run_bench(cfg, methods, None, ByteTokenizer(), progress=False)["complete"]
  assert b"oracle:heads=h\xe9ads" in (tmp_path / "o" / "report.md").read_bytes()
  assert all((tmp_path / "o" / png).exists() for png in ("tau_per_category.png", "speedup.png", "accept_hist.png"))


def test_missing_t5x_checkout_is_reported_unavailable(tmp_path, prompt_file, methods):
  cfg = BenchConfig(prompts=prompt_file, methods=("t5x-greedy",), max_new_tokens=4, limit=1, out=str(tmp_path),
                    t5x_src=str(tmp_path))
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert res["methods"]["t5x-greedy"]["available"] is False
  assert "not a T5X checkout" in res["methods"]["t5x-greedy"]["reason"]


def test_baselines_that_cannot_take_the_settings_or_the_model_say_why(tmp_path):
  """T5X's sampler takes top-k or top-p, not both (it raised inside T5X, ending the bench), and the Hugging Face
  baseline writes LLaMA folders (a T5 target failed half-way with a KeyError)."""
  from jaxspec.bench.baselines import hf_runner, t5x_runner
  from jaxspec.models.t5 import T5LM, tiny_t5_config

  ctx = BenchContext(None, None, ByteTokenizer(), temperature=1.0, top_k=5, top_p=0.9, t5x_src=str(tmp_path))
  with pytest.raises(Unavailable, match=r"top-k or top-p, not both \(--top-k 5 --top-p 0.9\)"):
    t5x_runner(ctx)
  t5 = T5LM(tiny_t5_config(vocab_size=64))
  for lookup in (False, True):
    with pytest.raises(Unavailable, match="runs decoder-only LLaMA-family models; this target is T5LM"):
      hf_runner(BenchContext(t5, None, ByteTokenizer()), lookup=lookup)


def test_a_t5x_checkout_that_fails_to_import_is_reported_unavailable(tmp_path):
  from jaxspec.bench.baselines import load_t5x_decoding

  pkg = tmp_path / "t5x"
  pkg.mkdir()
  (pkg / "binary_search.py").write_text("")
  (pkg / "decoding.py").write_text("import a_module_no_one_has\n")
  with pytest.raises(Unavailable, match="decoding.py cannot be imported \\(ModuleNotFoundError: .*check it out again"):
    load_t5x_decoding(tmp_path)
  assert "t5x" not in sys.modules and not any(k.startswith("_jaxspec_t5x") for k in sys.modules)  # nothing half-loaded
  (pkg / "decoding.py").write_text("def temperature_sample():\n  pass\n")  # fixed: the same process tries again
  try:
    assert callable(load_t5x_decoding(tmp_path).temperature_sample)
  finally:  # later tests of this process load a real checkout under the same private name
    for key in [k for k in sys.modules if k.startswith("_jaxspec_t5x")]:
      del sys.modules[key]
    if getattr(sys.modules.get("t5x"), "__name__", None) == "_jaxspec_t5x":
      del sys.modules["t5x"]


T5X_SRC = os.environ.get("JAXSPEC_T5X_SRC")


@pytest.mark.skipif(not T5X_SRC, reason="T5X is not on PyPI: set JAXSPEC_T5X_SRC to a T5X source checkout to run "
                    "the T5X baseline check")
def test_t5x_greedy_equals_jaxspec_greedy(tiny, tmp_path):
  model, params = tiny
  rows = [{"question_id": i, "category": "c", "turns": [t]} for i, t in enumerate(["abc", "hello there", "x" * 40])]
  cfg = BenchConfig(prompts=write_prompts(tmp_path / "p.jsonl", rows), methods=("t5x-greedy",), max_new_tokens=24,
                    batch_size=2, out=str(tmp_path / "out"), t5x_src=T5X_SRC)
  res = run_bench(cfg, model, params, TinyTokenizer(), progress=False)
  m = res["methods"]["t5x-greedy"]
  assert m["available"], m.get("reason")
  assert m["mismatches"] == 0 and m["n_prompts"] == 3 and m["tau"] == 1.0
  assert m["target_calls"] == res["methods"]["greedy"]["target_calls"]  # the same count of calls after prefill


class TinyTokenizer(ByteTokenizer):
  eos_id = 7

  def encode(self, text, add_bos=None):
    return [1 + ord(c) % 250 for c in text]



class Killed(BaseException):
  """What a kill -9 leaves: the run stops where it is and no handler of the process runs (KeyboardInterrupt's do)."""


@pytest.fixture
def bomb(monkeypatch, methods):
  """A method `bomb` (an oracle chain) that raises `error` (KeyboardInterrupt, as Ctrl-C stops a run) in its call
  number `at` (3: the warm-up, batch 0, then batch 1) while `armed`; `calls` lists the seed of each call."""
  state = {"armed": True, "calls": [], "at": 3, "error": KeyboardInterrupt}

  def build(ctx, opts):
    inner = loop_runner(ctx, drafter=OracleChain(methods, 3))

    def run(prompts, max_new_tokens, seed):
      state["calls"].append(seed)
      if state["armed"] and len(state["calls"]) == state["at"]:
        raise state["error"]
      return inner(prompts, max_new_tokens, seed)

    return run

  import jaxspec.bench.runner as runner_mod
  monkeypatch.setitem(runner_mod.METHODS, "bomb", MethodSpec("bomb", "test: killed in its third call", True, build))
  return state


def count_calls(monkeypatch, names):
  """The seed of every call of these methods, by name (their runs, warm-ups included)."""
  import jaxspec.bench.runner as runner_mod
  calls = {n: [] for n in names}

  def counted(name, build):
    def make(ctx, opts):
      inner = build(ctx, opts)
      return lambda prompts, new, seed: (calls[name].append(seed), inner(prompts, new, seed))[1]
    return make

  for n in names:
    monkeypatch.setitem(runner_mod.METHODS, n, dataclasses.replace(runner_mod.METHODS[n],
                                                                  build=counted(n, runner_mod.METHODS[n].build)))
  return calls


def assert_same_figures(tmp_path, res, whole, labels):
  """A resumed run's figures and outputs are an unbroken run's (times apart), overall and per category."""
  same = ("tau", "target_calls", "accept_hist", "mismatches", "n_prompts")
  for label in labels:
    a, b = res["methods"][label], whole["methods"][label]
    assert a["mismatch_list"] == b["mismatch_list"] and a["per_category"].keys() == b["per_category"].keys()
    for x, y in [(a, b), *zip(a["per_category"].values(), b["per_category"].values())]:
      assert {k: x[k] for k in same} == {k: y[k] for k in same}, label
  outputs = lambda d: sorted((tmp_path / d / "outputs.jsonl").read_text().splitlines())
  assert outputs("out") == outputs("whole")


def test_a_killed_run_goes_on_where_it_stopped(tmp_path, prompt_file, methods, bomb):
  """Runs finished before a kill are kept; the same call decodes only the rest and ends as an unbroken run."""
  cfg = BenchConfig(prompts=prompt_file, methods=("liar", "bomb"), max_new_tokens=13, batch_size=2, seed=5,
                    out=str(tmp_path / "out"))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  prog = tmp_path / "out" / "progress.jsonl"
  # The fingerprint, batch 0's three runs, and batch 1's run of liar (its order rotated: liar, bomb, greedy).
  lines = prog.read_text().splitlines()
  assert [(e["batch"], e["method"]) for e in map(json.loads, lines[1:])] == [
      (0, "greedy"), (0, "liar"), (0, "bomb"), (1, "liar")]
  assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["liar"]["n_prompts"] == 2
  # Each saved run names the source that ran it; here one is made to come from another commit, as after a pull.
  from jaxspec.bench.runner import source_commit
  entries = [json.loads(line) for line in lines[1:]]
  assert {e["commit"] for e in entries} == {source_commit()}
  entries[1]["commit"] = "0123abc"
  prog.write_text("\n".join([lines[0], *map(json.dumps, entries)]) + "\n")
  with open(prog, "a") as f:
    f.write('{"batch": 1, "method": "bomb", "records": [{"gre')  # a line cut short by the kill is dropped
  bomb["armed"] = False
  bomb["calls"].clear()
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert bomb["calls"] == [5, 5 + 1, 5 + 2]  # the warm-up (seed 5), then batches 1 and 2 only
  assert res["complete"] and res["environment"]["resumed_runs"] == 4 and not prog.exists()
  report_md = (tmp_path / "out" / "report.md").read_text()
  assert "method runs (a method on a prompt batch) restored from earlier processes: 4" in report_md
  assert res["environment"]["resumed_commits"] == sorted(["0123abc", str(source_commit())])
  assert f"the restored runs ran jaxspec commit {', '.join(res['environment']['resumed_commits'])}" in report_md
  # Batch 1 was begun by the killed process and finished by this one: its speedups compare two processes' times.
  assert res["environment"]["batches_timed_across_processes"] == 1
  assert "in 1 prompt batch(es) the methods were timed by different processes" in report_md

  whole = run_bench(dataclasses.replace(cfg, out=str(tmp_path / "whole")), methods, None, ByteTokenizer(),
                    progress=False)
  assert "resumed_runs" not in whole["environment"] and "batches_timed_across_processes" not in whole["environment"]
  assert_same_figures(tmp_path, res, whole, ("greedy", "liar", "bomb"))
  assert res["methods"]["liar"]["mismatches"] == 1  # found in batch 1, decoded after the resume


def test_a_run_in_one_batch_keeps_each_method_that_finished(tmp_path, prompt_file, methods, bomb, monkeypatch):
  """--quick puts every prompt in one batch: killed (kill -9) in its fourth method, the three finished ones are
  kept, and the same call runs only the fourth, with the figures of an unbroken run (the liar's mismatch is found
  from the kept greedy tokens)."""
  calls = count_calls(monkeypatch, ("greedy", "oracle", "liar"))
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle", "liar", "bomb"), quick=True, seed=3,
                    out=str(tmp_path / "out"))
  bomb.update(at=1, error=Killed)
  with pytest.raises(Killed):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  prog = tmp_path / "out" / "progress.jsonl"
  assert [json.loads(l)["method"] for l in prog.read_text().splitlines()[1:]] == ["greedy", "oracle", "liar"]
  bomb["armed"] = False
  bomb["calls"].clear()
  for seeds in calls.values():
    seeds.clear()
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert bomb["calls"] == [3] and calls == {"greedy": [], "oracle": [], "liar": []}
  assert res["complete"] and res["environment"]["resumed_runs"] == 3 and not prog.exists()
  assert "resumed_commits" not in res["environment"]  # every run restored came from this source

  whole = run_bench(dataclasses.replace(cfg, out=str(tmp_path / "whole")), methods, None, ByteTokenizer(),
                    progress=False)
  assert_same_figures(tmp_path, res, whole, ("greedy", "oracle", "liar", "bomb"))
  assert res["methods"]["liar"]["mismatches"] == 1


def test_ctrl_c_says_how_much_was_kept(tmp_path, prompt_file, methods, bomb, monkeypatch, capsys):
  """Ctrl-C in a one-batch run says how many method runs are kept; stopped before any ended, it promises nothing
  (and leaves no progress file that would)."""
  monkeypatch.setattr("jaxspec.loading.load_model", lambda *a, **k: (methods, None, ByteTokenizer()))
  out = tmp_path / "out"
  argv = ["bench", "--quick", "--prompts", prompt_file, "--out", str(out)]
  bomb["at"] = 1
  assert main(argv + ["--methods", "oracle,liar,bomb"]) == 130
  err = capsys.readouterr().err
  assert f"interrupted: 3 of 4 method runs (a method on a prompt batch) are kept in {out}/progress.jsonl; " in err
  (out / "progress.jsonl").unlink()
  bomb["calls"].clear()
  assert main(argv + ["--methods", "bomb,greedy"]) == 130  # the bomb runs first
  err = capsys.readouterr().err
  assert "nothing was kept" in err and "kept in" not in err and "goes on from there" not in err
  assert not (out / "progress.jsonl").exists()


def test_a_method_that_fails_says_what_is_kept(tmp_path, prompt_file, methods, bomb, caplog):
  """A method's error ended the bench with its traceback alone; the runs kept are said as after Ctrl-C (found by a
  review)."""
  cfg = BenchConfig(prompts=prompt_file, methods=("liar", "bomb"), max_new_tokens=13, batch_size=2, seed=5,
                    out=str(tmp_path / "out"))
  bomb.update(error=RuntimeError("a method's own fault"))
  with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="a method's own fault"):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert ("stopped by an error (RuntimeError(\"a method's own fault\")): 4 of 9 method runs (a method on a prompt "
          "batch) are kept in") in caplog.text
  assert "once the error is dealt with, the same command goes on from there" in caplog.text


def test_quick_keeps_the_settings_given(tmp_path, prompt_file, methods, monkeypatch):
  """--quick fills in only what is not given: an explicit --batch-size 1 (each prompt timed alone) and more than 32
  new tokens stay as given, and a run without them gets the quick settings."""
  monkeypatch.setattr("jaxspec.loading.load_model", lambda *a, **k: (methods, None, ByteTokenizer()))
  base = ["bench", "--quick", "--prompts", prompt_file, "--methods", "oracle"]
  assert main(base + ["--out", str(tmp_path / "a"), "--batch-size", "1", "--max-new-tokens", "40"]) == 0
  assert main(base + ["--out", str(tmp_path / "b")]) == 0
  ran = [json.loads((tmp_path / d / "results.json").read_text())["config"] for d in "ab"]
  assert [(c["batch_size"], c["max_new_tokens"], c["limit"]) for c in ran] == [(1, 40, 1), (16, 32, 1)]
  assert "max new tokens 40; batch size 1" in (tmp_path / "a" / "report.md").read_text()
  plain = BenchConfig(prompts=prompt_file).resolved()
  assert (plain.batch_size, plain.max_new_tokens, plain.limit) == (1, 128, None)
  for quick in (False, True):  # a 0 given is not taken for "unset": the run refuses it
    with pytest.raises(InputError):
      run_bench(BenchConfig(prompts=prompt_file, methods=("oracle",), quick=quick, batch_size=0, out=str(tmp_path)),
                methods, None, ByteTokenizer(), progress=False)


def test_ctrl_c_while_the_report_is_written_keeps_every_run(tmp_path, prompt_file, methods, monkeypatch, capsys):
  """Every method has run and the report is being written when Ctrl-C comes: all runs are kept, and the same
  command writes the report without decoding again."""
  monkeypatch.setattr("jaxspec.loading.load_model", lambda *a, **k: (methods, None, ByteTokenizer()))
  calls = count_calls(monkeypatch, ("greedy", "oracle"))
  out = tmp_path / "out"
  argv = ["bench", "--quick", "--prompts", prompt_file, "--out", str(out), "--methods", "oracle"]

  def interrupted(*args):
    raise KeyboardInterrupt

  with monkeypatch.context() as m:
    m.setattr("jaxspec.bench.report.write_all", interrupted)
    assert main(argv) == 130
  err = capsys.readouterr().err
  assert f"interrupted while writing the report: all 2 method runs are kept in {out}/progress.jsonl" in err
  for seeds in calls.values():
    seeds.clear()
  assert main(argv) == 0
  assert calls == {"greedy": [], "oracle": []}
  assert (out / "report.md").exists() and not (out / "progress.jsonl").exists()


def test_a_run_that_starts_over_removes_the_previous_runs_files(tmp_path, prompt_file, methods, bomb, monkeypatch):
  """A finished run's report, outputs and plots go when another run in its folder has kept a run of its own, so a
  kill leaves no complete-looking folder of old figures; the killed run's progress stays for the run that resumes
  it. A run stopped before it kept anything leaves the old results as they were (they were deleted at its start)."""
  out = tmp_path / "out"
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle",), quick=True, out=str(out))
  run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  old = ["results.json", "report.md", "outputs.jsonl", "tau_per_category.png", "speedup.png", "accept_hist.png"]
  assert all((out / name).exists() for name in old)
  bomb.update(at=1, error=Killed)
  again = dataclasses.replace(cfg, methods=("oracle", "bomb"), max_new_tokens=5)
  before = {name: (out / name).read_bytes() for name in old}
  # Finished results of other work are not replaced unasked either: refused before anything is decoded.
  with pytest.raises(InputError, match=r"holds the finished results of another bench \(max_new_tokens: 32 there, 5 "
                                       r"here; methods: oracle there, oracle,bomb here\)\. Pass another --out to keep "
                                       "them, or --fresh to replace them"):
    run_bench(again, methods, None, ByteTokenizer(), progress=False)
  assert {name: (out / name).read_bytes() for name in old} == before and bomb["calls"] == []
  import jaxspec.bench.runner as runner_mod

  def stopped(ctx, opts):
    def run(*args):
      raise KeyboardInterrupt
    return run
  with monkeypatch.context() as m:  # the same command again, stopped (Ctrl-C) in its first run
    m.setitem(runner_mod.METHODS, "greedy", MethodSpec("greedy", "test: stopped at once", True, stopped))
    with pytest.raises(KeyboardInterrupt):
      run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert {name: (out / name).read_bytes() for name in old} == before and not (out / "progress.jsonl").exists()
  with pytest.raises(Killed):
    run_bench(dataclasses.replace(again, fresh=True), methods, None, ByteTokenizer(), progress=False)
  assert sorted(p.name for p in out.iterdir()) == ["progress.jsonl"]
  bomb["armed"] = False
  res = run_bench(again, methods, None, ByteTokenizer(), progress=False)
  assert res["environment"]["resumed_runs"] == 2 and all((out / name).exists() for name in old)
  assert json.loads((out / "results.json").read_text())["config"]["max_new_tokens"] == 5
  # The same command again replaces its own results; a results.json it cannot read is nothing to keep.
  assert run_bench(again, methods, None, ByteTokenizer(), progress=False)["complete"]
  for odd in ({"config": {}, "fingerprint": {"config": None}}, {"config": {"methods": 5}}, [1]):
    (out / "results.json").write_text(json.dumps(odd))
    assert run_bench(again, methods, None, ByteTokenizer(), progress=False)["complete"]


def test_a_folder_with_a_report_or_results_no_bench_wrote_is_not_written_over(tmp_path, prompt_file, methods):
  """--out into a folder of one's own with a report.md or results.json replaced them silently (found by a review):
  refused before anything runs, as other work's results are; --fresh replaces them, and a bench's own go again."""
  out = tmp_path / "out"
  out.mkdir()
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle",), quick=True, out=str(out))
  for name, text in (("report.md", "my notes\n"), ("results.json", '{"mine": 1}')):
    (out / name).write_text(text)
    with pytest.raises(InputError, match=f"holds {name}, which no jaxspec bench wrote"):
      run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
    assert (out / name).read_text() == text
    (out / name).unlink()
  (out / "report.md").write_text("my notes\n")
  assert run_bench(dataclasses.replace(cfg, fresh=True), methods, None, ByteTokenizer(), progress=False)["complete"]
  assert run_bench(cfg, methods, None, ByteTokenizer(), progress=False)["complete"]


def test_fresh_over_an_unfinished_run_discards_its_partial_results(tmp_path, prompt_file, methods, bomb, monkeypatch):
  """--fresh over a killed run, stopped before it kept a run of its own, left the killed run's partial results.json
  without its progress, and the next run refused it as 'finished results of another bench' (found by a review)."""
  import jaxspec.bench.runner as runner_mod

  out = tmp_path / "o"
  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(out))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert json.loads((out / "results.json").read_text())["complete"] is False

  def stopped(ctx, opts):
    def run(*args):
      raise KeyboardInterrupt
    return run
  other = dataclasses.replace(cfg, max_new_tokens=7)
  with monkeypatch.context() as m:
    m.setitem(runner_mod.METHODS, "greedy", MethodSpec("greedy", "test: stopped at once", True, stopped))
    with pytest.raises(KeyboardInterrupt):
      run_bench(dataclasses.replace(other, fresh=True), methods, None, ByteTokenizer(), progress=False)
  assert list(out.iterdir()) == []
  bomb["armed"] = False
  assert run_bench(other, methods, None, ByteTokenizer(), progress=False)["complete"]


def test_the_same_prompts_named_another_way_resume(tmp_path, prompt_file, methods, bomb):
  """The fingerprint holds the prompts, not how they were named: another path to the same file, or a --limit that
  keeps them all, goes on from the kept runs."""
  from jaxspec.bench import QUICK_PROMPTS
  from jaxspec.bench import progress as saved

  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path / "o"))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  bomb["calls"].clear()
  copy = tmp_path / "copy.jsonl"
  copy.write_text(open(prompt_file).read())
  res = run_bench(dataclasses.replace(cfg, prompts=str(copy), limit=3), methods, None, ByteTokenizer(),
                  progress=False)
  assert res["environment"]["resumed_runs"] == 2 and bomb["calls"] == [0, 1, 2]  # warm-up, batches 1 and 2
  # The default prompt set and the same file named explicitly are one piece of work.
  quick = load_prompts(QUICK_PROMPTS, limit=1)
  ids = [ByteTokenizer().encode(p.text) for p in quick]
  prints = [saved.fingerprint(BenchConfig(prompts=p, quick=True, limit=limit), quick, ids, ["greedy"])
            for p, limit in ((None, 1), (str(QUICK_PROMPTS), 1), ("jaxspec/bench/data/quick.jsonl", None))]
  assert prints[0] == prints[1] == prints[2]


def test_kept_runs_of_other_work_are_refused_not_wiped(tmp_path, prompt_file, methods, bomb):
  """Runs kept for other settings or methods stop the run before anything is built, naming what differs, and the
  file stays as it was; --fresh discards them. A file that keeps no run is simply replaced."""
  from jaxspec.bench import progress as saved

  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  prog = tmp_path / "progress.jsonl"
  kept = prog.read_text()
  for changed, what in ((dataclasses.replace(cfg, max_new_tokens=7), "max_new_tokens: 6 there, 7 here"),
                        (dataclasses.replace(cfg, seed=1, temperature=0.5), "seed: 0 there, 1 here; temperature"),
                        (dataclasses.replace(cfg, methods=("bomb", "oracle")),
                         "methods that can run: greedy, bomb there, greedy, bomb, oracle here"),
                        (dataclasses.replace(cfg, limit=1), "the prompts (their ids, categories or text)")):
    bomb["calls"].clear()
    with pytest.raises(InputError, match=rf"progress.jsonl holds 2 finished method run\(s\) of a killed run that "
                                         rf"differs from this one \({re.escape(what)}.*Pass another --out to keep "
                                         "them, or --fresh to discard them"):
      run_bench(changed, methods, None, ByteTokenizer(), progress=False)
    assert prog.read_text() == kept and bomb["calls"] == []
  bomb["calls"].clear()
  res = run_bench(dataclasses.replace(cfg, max_new_tokens=7, fresh=True), methods, None, ByteTokenizer(),
                  progress=False)
  assert "resumed_runs" not in res["environment"] and len(bomb["calls"]) == 1 + 3
  head = kept.splitlines()[0]
  prog.write_text(head + "\n")  # a kill before any run ended: nothing to keep, so no refusal
  bomb["calls"].clear()
  res = run_bench(dataclasses.replace(cfg, max_new_tokens=7), methods, None, ByteTokenizer(), progress=False)
  assert "resumed_runs" not in res["environment"] and len(bomb["calls"]) == 1 + 3
  prog.write_text("not json\n")
  assert saved.read(prog) == (None, {}, f"{prog} holds no run that can be read; starting over")


def test_a_method_written_another_way_resumes_its_kept_runs(tmp_path, prompt_file, methods, bomb, monkeypatch):
  """A run killed under `lookup` goes on under `lookup:ngram=3:n=08`: the options at their stated defaults, in another
  order, name the same method (`same_method_key`, which --methods already refuses twice), so its kept runs are its
  own (they were refused as other work). Other settings stay refused, and so do paths that lead elsewhere; finished
  results are replaced by the same methods written another way, not kept as another bench's."""
  from jaxspec.bench import progress as saved

  calls = count_calls(monkeypatch, ("lookup",))
  cfg = BenchConfig(prompts=prompt_file, methods=("lookup", "bomb"), max_new_tokens=6, batch_size=2,
                    out=str(tmp_path / "out"))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  prog = tmp_path / "out" / "progress.jsonl"
  kept = prog.read_text()
  bomb["armed"] = False
  with pytest.raises(InputError, match=r"methods that can run: greedy, lookup, bomb there, greedy, lookup:n=4, bomb "
                                       r"here\)\. Pass another --out"):
    run_bench(dataclasses.replace(cfg, methods=("lookup:n=4", "bomb")), methods, None, ByteTokenizer(), progress=False)
  assert prog.read_text() == kept
  calls["lookup"].clear()
  spelled = ("lookup:ngram=3:n=08", "bomb")
  res = run_bench(dataclasses.replace(cfg, methods=spelled), methods, None, ByteTokenizer(), progress=False)
  assert res["environment"]["resumed_runs"] == 4 and calls["lookup"] == [0, 2]  # a warm-up, then batch 2 only
  assert list(res["methods"]) == ["greedy", "lookup:ngram=3:n=08", "bomb"] and not prog.exists()
  whole = run_bench(dataclasses.replace(cfg, methods=spelled, out=str(tmp_path / "whole")), methods, None,
                    ByteTokenizer(), progress=False)
  assert_same_figures(tmp_path, res, whole, ("greedy", "lookup:ngram=3:n=08", "bomb"))
  # Finished results: the first spelling again replaces them (the same command would); other settings do not.
  with pytest.raises(InputError, match=r"holds the finished results of another bench \(methods: "
                                       "lookup:ngram=3:n=08,bomb there, lookup:n=4,bomb here"):
    run_bench(dataclasses.replace(cfg, methods=("lookup:n=4", "bomb")), methods, None, ByteTokenizer(), progress=False)
  assert run_bench(cfg, methods, None, ByteTokenizer(), progress=False)["complete"]

  # What the file kept under a label (the runs, the paths, what a build measured) follows it to this run's spelling;
  # a relative path is compared where it led when the run was kept.
  (tmp_path / "a").mkdir()
  monkeypatch.chdir(tmp_path)
  head = saved.fingerprint(BenchConfig(), [], [], ["greedy", "spec:draft=a/d", "opt-tree:nodes=auto"])
  head["measured"] = {"opt-tree:nodes=auto": {"nodes": 8}}
  runs = {(0, "spec:draft=a/d"): {"method": "spec:draft=a/d"}, (0, "greedy"): {"method": "greedy"}}
  labels = ["greedy", "spec:gamma=4:draft=./a/d/", "opt-tree:nodes=auto:drafter=heads"]
  new_head, new_runs = saved.relabel(head, runs, labels)
  assert new_head["methods"] == labels and new_head["measured"] == {labels[2]: {"nodes": 8}}
  assert new_runs == {(0, labels[1]): {"method": labels[1]}, (0, "greedy"): {"method": "greedy"}}
  assert saved.differences(new_head, saved.fingerprint(BenchConfig(), [], [], labels)) == []
  monkeypatch.chdir(tmp_path / "a")  # from here a/d is another folder, and ./d is the one the runs were kept with
  assert saved.relabel(head, runs, ["greedy", "spec:draft=a/d/", "opt-tree:nodes=auto"])[1] == runs
  assert saved.relabel(head, runs, ["greedy", "spec:draft=d", "opt-tree:nodes=auto"])[1] == {
      (0, "spec:draft=d"): {"method": "spec:draft=d"}, (0, "greedy"): {"method": "greedy"}}
  damaged = dict(head, method_paths={"spec:draft=a/d": {"gamma": "x"}})  # not a number, nor a path option
  assert saved.relabel(damaged, runs, ["greedy", "spec:draft=d", "opt-tree:nodes=auto"])[1] == runs


def test_damaged_progress_lines_lose_only_their_own_runs(tmp_path, prompt_file, methods, bomb):
  """A garbled line, or bytes that are not UTF-8, in the middle of the progress file lose only that line's run (all
  later runs used to be dropped, or, for a bad byte, every run); a damaged first line, the settings the runs belong
  to, with runs after it is refused instead of starting over, and --fresh discards them."""
  from jaxspec.bench import progress as saved

  cfg = BenchConfig(prompts=prompt_file, methods=("oracle", "bomb"), max_new_tokens=6, batch_size=1,
                    out=str(tmp_path))
  bomb.update(at=4, error=Killed)  # the warm-up, batches 0 and 1, then killed on batch 2
  with pytest.raises(Killed):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  prog = tmp_path / "progress.jsonl"
  lines = prog.read_bytes().split(b"\n")[:-1]
  head, runs, note = saved.read(prog)
  assert len(lines) - 1 == len(runs) >= 4 and note is None
  no_tokens = json.loads(lines[1])
  del no_tokens["records"][0]["tokens"]  # valid JSON, but not a run that can be read back
  damaged = [lines[0], lines[1], b'{"batch": 0, "method": "gre', b"\xff\xfe garbled", json.dumps(no_tokens).encode(),
             *lines[2:], lines[3][:20]]
  prog.write_bytes(b"\n".join(damaged) + b"\n")
  head2, runs2, note = saved.read(prog)
  assert head2 == head and runs2 == runs  # lines[3] is there whole, then cut short at the end (as by a kill)
  assert note == f"{prog}: line(s) 3, 4, 5 could not be read; their runs go again"
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert res["environment"]["resumed_runs"] == len(runs)
  # The first line damaged: the runs cannot be matched to any settings, so they are refused, not thrown away.
  bomb.update(at=4, error=Killed, armed=True)
  bomb["calls"].clear()
  with pytest.raises(Killed):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  kept = prog.read_bytes().split(b"\n")
  prog.write_bytes(b"\n".join([b'{"fingerprint": {"config": {"max_new_tok', *kept[1:]]))
  before = prog.read_bytes()
  with pytest.raises(InputError, match=r"progress.jsonl holds \d+ finished method run\(s\), but its first line \(the "
                                       r"settings they were run with\) is damaged.*Pass --fresh to discard them"):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert prog.read_bytes() == before
  res = run_bench(dataclasses.replace(cfg, fresh=True), methods, None, ByteTokenizer(), progress=False)
  assert res["complete"] and "resumed_runs" not in res["environment"]


def test_kept_runs_that_do_not_hold_their_batch_go_again(tmp_path, prompt_file, methods, bomb, caplog):
  """A kept line whose records are not its batch's prompts (one dropped, or another batch's) is run again instead of
  counting other prompts or too few; the run's results are those of an uninterrupted run."""
  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path / "out"))
  bomb["armed"] = False
  whole = run_bench(dataclasses.replace(cfg, out=str(tmp_path / "whole")), methods, None, ByteTokenizer(),
                    progress=False)
  bomb.update(armed=True, calls=[])
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  prog = tmp_path / "out" / "progress.jsonl"
  head, *lines = prog.read_text().splitlines()
  kept = [json.loads(line) for line in lines]
  assert sorted((e["batch"], len(e["records"])) for e in kept) == [(0, 2), (0, 2)]  # greedy and bomb on batch 0
  kept[0]["records"] = kept[0]["records"][:1]  # one prompt short
  kept[1]["batch"] = 1  # batch 0's records named as batch 1's
  prog.write_text("\n".join([head, *map(json.dumps, kept)]) + "\n")
  with caplog.at_level("INFO", logger="jaxspec.bench.runner"):
    res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert "resumed_runs" not in res["environment"] and res["complete"]
  assert "2 kept run(s) do not hold their batch's prompts; they go again" in caplog.text
  assert_same_figures(tmp_path, res, whole, ["greedy", "bomb"])


def test_progress_files_of_whole_batches_still_resume(tmp_path):
  """Files written when a batch was kept whole (every method's records in one line) and the fingerprint held the
  prompt file's name: their runs are read one by one, and the name does not count."""
  from jaxspec.bench import progress as saved

  want = saved.fingerprint(BenchConfig(prompts="a.jsonl", methods=("greedy", "x")), [], [], ["greedy", "x"])
  old = dict(want, config=dict(want["config"], prompts="b.jsonl", limit=2, methods=["x"]))
  rec = {"question_id": 0, "category": "qa", "new_tokens": 1, "steps_tokens": 0, "active_calls": 0, "seconds": 0.1,
         "drafter_calls": 0.0, "accept_hist": [], "tokens": [1]}
  batch = {"batch": 0, "records": {"greedy": [rec], "x": [rec]}, "mismatches": {"greedy": [], "x": []},
           "compile_s": {"greedy": 1.0, "x": 2.0}, "program_bytes": {"greedy": 3, "x": 4}}
  path = tmp_path / "progress.jsonl"
  path.write_text(json.dumps({"fingerprint": old}) + "\n" + json.dumps(batch) + "\n")
  head, runs, why = saved.read(path)
  assert why is None and saved.differences(head, want) == []
  assert runs[0, "x"] == {"batch": 0, "method": "x", "records": [rec], "compile_s": 2.0, "program_bytes": 4}
  assert sorted(runs) == [(0, "greedy"), (0, "x")]


def test_progress_lines_that_cannot_be_read_back_are_damaged(tmp_path):
  """A run read back is one the resumed run can restore: a line missing a key, a record of other fields, a time or
  size that is no number, or JSON nested past what the parser takes, is damaged (its run goes again) instead of
  failing the resumed run later. A first line without a fingerprint object is damaged too; a file that cannot be
  read is a clear error."""
  from jaxspec.bench import progress as saved

  rec = {"question_id": 0, "category": "qa", "new_tokens": 1, "steps_tokens": 0, "active_calls": 0, "seconds": 0.1,
         "drafter_calls": 0.0, "accept_hist": [], "tokens": [1]}
  good = {"batch": 0, "method": "greedy", "records": [rec], "compile_s": 1.0, "program_bytes": 3, "commit": "abc"}
  path, head = tmp_path / "progress.jsonl", {"config": {}}
  saved.start(path, head, [good])
  assert saved.read(path) == (head, {(0, "greedy"): good}, None)  # (re)started with the runs it keeps
  bad = [{k: v for k, v in good.items() if k != "method"}, dict(good, records=[dict(rec, extra=1)]),
         dict(good, compile_s="fast"), dict(good, program_bytes=None), dict(good, records="")]
  with open(path, "a") as f:
    f.write("".join(json.dumps(entry) + "\n" for entry in bad) + "[" * 100_000 + "\n")  # lines 3 to 8
  saved.append(path, dict(good, batch=1))
  assert saved.read(path) == (head, {(0, "greedy"): good, (1, "greedy"): dict(good, batch=1)},
                              f"{path}: line(s) 3, 4, 5, 6, 7, 8 could not be read; their runs go again")
  runs = path.read_bytes().split(b"\n", 1)[1]
  for first in (b'{"fingerprint": [1]}', b'{"fingerprint": {"config": {}}', b"[" * 100_000):
    path.write_bytes(first + b"\n" + runs)
    with pytest.raises(InputError, match=r"holds 2 finished method run\(s\), but its first line .* is damaged"):
      saved.read(path)
  path.write_bytes(b'{"fingerprint": 5}\n')
  assert saved.read(path) == (None, {}, f"{path} holds no run that can be read; starting over")
  path.unlink()
  path.mkdir()
  with pytest.raises(InputError, match="progress.jsonl cannot be read"):
    saved.read(path)


def test_a_run_resumed_twice_keeps_its_restored_runs_and_names_where_they_came_from(tmp_path, prompt_file, methods,
                                                                                     bomb):
  """A resumed run killed in turn keeps the runs it restored (it rewrites the progress file with them), and the run
  that completes names every source its restored runs came from: those saved before runs named their commit are
  "not recorded"."""
  from jaxspec.bench import progress as saved
  from jaxspec.bench.runner import source_commit

  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path / "o"))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)  # stopped in batch 1: batch 0's two runs kept
  prog = tmp_path / "o" / "progress.jsonl"
  lines = prog.read_text().splitlines()
  old = [{k: v for k, v in json.loads(line).items() if k != "commit"} for line in lines[1:]]  # before 2026-12-06
  prog.write_text("\n".join([lines[0], *map(json.dumps, old)]) + "\n")
  bomb["calls"].clear()  # stopped again in its third call: the warm-up, batch 1, then batch 2
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  runs = saved.read(prog)[1]
  assert sorted(runs) == [(0, "bomb"), (0, "greedy"), (1, "bomb"), (1, "greedy"), (2, "greedy")]
  assert "commit" not in runs[0, "bomb"] and runs[1, "bomb"]["commit"] == source_commit()
  bomb["armed"] = False
  bomb["calls"].clear()
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert bomb["calls"] == [0, 2] and res["complete"] and res["environment"]["resumed_runs"] == 5
  assert res["environment"]["resumed_commits"] == sorted(["not recorded", str(source_commit())])


def test_model_settings_count_in_the_fingerprint_only_when_set():
  """A progress file written before --dtype / --param-dtype / --scan-layers / --matmul-precision existed still
  resumes a default run; a run in other settings does not take its batches."""
  from jaxspec.bench.progress import fingerprint

  conf = lambda **kw: fingerprint(BenchConfig(**kw), [], [], ["greedy"])["config"]
  assert not {"dtype", "param_dtype", "scan_layers", "matmul_precision"} & set(conf())
  assert conf(dtype="bfloat16")["dtype"] == "bfloat16" and conf(scan_layers=True)["scan_layers"] is True
  assert conf(param_dtype="bfloat16")["param_dtype"] == "bfloat16"
  assert conf(matmul_precision="default")["matmul_precision"] == "default"


def _record(qid, category, seconds, new_tokens, steps_tokens, active_calls):
  from jaxspec.bench.runner import Record
  return Record(question_id=qid, category=category, new_tokens=new_tokens, steps_tokens=steps_tokens,
                active_calls=active_calls, seconds=seconds, drafter_calls=0.0, accept_hist=[0, active_calls],
                tokens=[1] * new_tokens)


def test_the_report_says_what_its_speedups_leave_out():
  """From a review: an analysis method (its run decodes greedily first, untimed) shows no speedup or tokens/s;
  transformers' baselines, one prompt at a time, are said to be against greedy at the run's batch; a --quick run's
  timings are first runs; τ is pooled over the prompts."""
  from jaxspec.bench import report
  from jaxspec.bench.prompts import Prompt
  from jaxspec.bench.runner import environment

  prompts = [Prompt(0, "qa", "a"), Prompt(1, "math", "b")]
  rec = lambda seconds: [_record(p.question_id, p.category, seconds, 10, 9, 9) for p in prompts]
  specs = {"greedy": MethodSpec("greedy", "greedy", True, None),
           "bpd-oracle": MethodSpec("bpd-oracle", "analysis", True, None, analysis=True),
           "hf-greedy": MethodSpec("hf-greedy", "transformers", True, None, baseline=True)}
  records = {"greedy": rec(1.0), "bpd-oracle": rec(0.5), "hf-greedy": rec(4.0)}
  for quick, batch in ((True, 2), (False, 1)):
    cfg = BenchConfig(prompts="p.jsonl", methods=tuple(specs), quick=quick, batch_size=batch)
    res = report.results(cfg, environment(), prompts, specs, {}, records, {k: 0.0 for k in specs},
                         {k: 0 for k in specs}, {k: [] for k in specs}, {}, complete=True, wall_s=1.0,
                         peak_rss_bytes=0)
    oracle = res["methods"]["bpd-oracle"]
    assert oracle["speedup"] is None and oracle["tokens_per_s"] is None and oracle["tau"] == 1.0
    assert all(c["speedup"] is None for c in oracle["per_category"].values())
    md = report.markdown(res)
    assert "| bpd-oracle | 1.00 | n/a | n/a |" in md and "`bpd-oracle`: an analysis of τ" in md
    assert "| hf-greedy | 1.00 | 0.25× |" in md
    assert ("`hf-greedy`: transformers' generate decodes one prompt at a time; its speedup is against jaxspec's "
            "greedy at batch 2" in md) == (batch == 2)
    assert ("each timed run is its program's first" in md) == quick
    assert "pooled over the prompts (all their tokens over all their forwards, not a mean of per-prompt τ)" in md


def test_report_speedup_tokens_per_second_and_tau_per_category():
  """The report's arithmetic on records of known times and counts: speedup = greedy seconds / method seconds on the
  same prompts, tokens/s = new tokens / seconds, τ = step tokens / target calls, each overall and per category."""
  from jaxspec.bench import report
  from jaxspec.bench.prompts import Prompt
  from jaxspec.bench.runner import environment

  prompts = [Prompt(0, "qa", "a"), Prompt(1, "qa", "b"), Prompt(2, "math", "c")]
  # Greedy: 2 s, 2 s and 3 s, 10 new tokens each (9 after the prefill's, one per call).
  greedy = [_record(p.question_id, p.category, s, 10, 9, 9) for p, s in zip(prompts, [2.0, 2.0, 3.0])]
  # "fast": 0.5 s on each qa prompt with τ 3 there (9 tokens in 3 calls); 1.5 s on the math prompt with τ 1.
  fast = [_record(0, "qa", 0.5, 10, 9, 3), _record(1, "qa", 0.5, 10, 9, 3), _record(2, "math", 1.5, 10, 9, 9)]
  # "slow": twice greedy's time everywhere, 8 new tokens per prompt.
  slow = [_record(p.question_id, p.category, 2 * r.seconds, 8, 7, 7) for p, r in zip(prompts, greedy)]
  specs = {name: MethodSpec(name, name, True, None) for name in ("greedy", "fast", "slow")}
  records = {"greedy": greedy, "fast": fast, "slow": slow}
  res = report.results(BenchConfig(prompts="p.jsonl", methods=("greedy", "fast", "slow")), environment(), prompts,
                       specs, {}, records, {k: 0.0 for k in specs}, {k: 0 for k in specs}, {k: [] for k in specs}, {},
                       complete=True, wall_s=1.0, peak_rss_bytes=0)
  m = res["methods"]
  approx = lambda x: pytest.approx(x, rel=1e-9)
  assert m["greedy"]["speedup"] == 1.0 and m["greedy"]["tau"] == 1.0
  assert m["greedy"]["tokens_per_s"] == approx(30 / 7.0)
  assert m["fast"]["speedup"] == approx(7.0 / 2.5)  # greedy's 7 s over the method's 2.5 s: not 2.5 / 7
  assert m["fast"]["tokens_per_s"] == approx(30 / 2.5)
  assert m["fast"]["tau"] == approx(27 / 15)  # all step tokens over all calls, not a mean of per-prompt τ
  assert m["slow"]["speedup"] == approx(0.5) and m["slow"]["tokens_per_s"] == approx(24 / 14.0)
  qa, math = m["fast"]["per_category"]["qa"], m["fast"]["per_category"]["math"]
  assert qa["tau"] == approx(3.0) and math["tau"] == approx(1.0)
  assert qa["speedup"] == approx(4.0 / 1.0) and math["speedup"] == approx(3.0 / 1.5)
  assert qa["tokens_per_s"] == approx(20 / 1.0) and math["tokens_per_s"] == approx(10 / 1.5)
  assert qa["n_prompts"] == 2 and math["n_prompts"] == 1 and qa["target_calls"] == 6 and math["target_calls"] == 9
  assert m["slow"]["per_category"]["qa"]["speedup"] == approx(0.5)
  assert m["greedy"]["per_category"]["math"]["speedup"] == 1.0
  # The tables show the same figures.
  md = report.markdown(res)
  assert "| fast | 1.80 | 2.80× | 12.0 |" in md and "| slow | 1.00 | 0.50× | 1.7 |" in md
  tau_table = md.split("## τ per category")[1].split("##")[0]
  speed_table = md.split("## Speedup per category")[1].split("##")[0]
  assert "| math | qa |" in tau_table and "| fast | 1.00 | 3.00 |" in tau_table
  assert "| fast | 2.00 | 4.00 |" in speed_table and "| slow | 0.50 | 0.50 |" in speed_table
  assert any(l.split()[:3] == ["fast", "1.80", "2.80×"] for l in report.summary_lines(res))
  # Compile times read from JAX's persistent cache are load times: the report says a cache was on.
  import jax

  assert environment()["compilation_cache_dir"] == (jax.config.jax_compilation_cache_dir or None)
  # ... and the folder a user names in JAX_COMPILATION_CACHE_DIR is the one recorded (checked in a fresh process).
  import subprocess
  code = "from jaxspec.bench.runner import environment; print(environment()['compilation_cache_dir'])"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="/tmp/users-xla-cache")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert out.stdout.strip().splitlines()[-1:] == ["/tmp/users-xla-cache"], out.stderr[-2000:]
  res["environment"]["compilation_cache_dir"] = None  # as without JAX_COMPILATION_CACHE_DIR
  assert "compilation cache" not in report.markdown(res)
  res["environment"]["compilation_cache_dir"] = "/tmp/xla-cache"
  assert "persistent compilation cache /tmp/xla-cache" in report.markdown(res)
  # Sampled runs compare no tokens; the report says how exactness is shown instead of leaving "n/a" unexplained.
  assert "differ from greedy" in md and "random draws" not in md
  sampled = report.markdown({**res, "config": {**res["config"], "temperature": 1.0}})
  assert "## Exactness" in sampled and "Sampled outputs are random draws" in sampled
  assert "differ from greedy" not in sampled
  # The header names what the figures depend on: a sampled run's seed, a mesh (the audit found neither there).
  assert "top-p 1.0, seed 0" in sampled and "seed" not in md.split("##")[0] and "mesh" not in md
  meshed = report.markdown({**res, "config": {**res["config"], "mesh": "data=2,model=4"}})
  assert "params sharded over the mesh data=2,model=4" in meshed.split("##")[0]
  # A label longer than the column (a heads folder in the options) widens it: every row's τ ends at one offset.
  long = "bpd:heads=jaxspec/assets/bpd_t5_numbers:k=4"
  res["methods"][long] = res["methods"]["fast"]
  lines = report.summary_lines(res)
  ends = {line.index("speedup") + len("speedup") for line in lines[:1]} | {line.index("×") + 1 for line in lines[1:]}
  assert len(ends) == 1 and len(lines) == 5, lines
  assert "3 prompts (" in md
  res["prompts"]["n"] = 1
  assert "1 prompt (" in report.markdown(res)
  # Outputs are compared only under greedy decoding: the terminal says n/a where report.md does (it said 0).
  assert [l.split()[-1] for l in lines[1:3]] == ["n/a", "0"]  # greedy itself, then fast
  res["config"]["temperature"] = 1.0
  assert {l.split()[-1] for l in report.summary_lines(res)[1:]} == {"n/a"}


def test_bench_times_each_row_by_its_share_of_the_batch(tmp_path, prompt_file, methods, monkeypatch):
  """Through the whole harness with the run times fixed: greedy takes 0.3 s per prompt and the oracle 0.1 s, in
  batches of up to 2 (each row is timed at its share of its batch), so the oracle's speedup is 3 and its tokens/s 13
  tokens / 0.1 s, overall and per category."""
  import jaxspec.bench.runner as runner_mod

  def timed(build, per_row):
    def make(ctx, opts):
      inner = build(ctx, opts)
      return lambda prompts, new, seed: dataclasses.replace(inner(prompts, new, seed), run_s=per_row * len(prompts))
    return make

  specs = runner_mod.METHODS
  monkeypatch.setitem(specs, "greedy", dataclasses.replace(specs["greedy"], build=timed(specs["greedy"].build, 0.3)))
  monkeypatch.setitem(specs, "oracle", dataclasses.replace(specs["oracle"], build=timed(specs["oracle"].build, 0.1)))
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle",), max_new_tokens=13, batch_size=2,
                    out=str(tmp_path / "out"))
  m = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)["methods"]
  assert m["oracle"]["speedup"] == pytest.approx(3.0) and m["greedy"]["speedup"] == 1.0
  assert m["oracle"]["tokens_per_s"] == pytest.approx(130.0) and m["greedy"]["tokens_per_s"] == pytest.approx(130 / 3)
  assert m["oracle"]["run_s"] == pytest.approx(0.6) and m["greedy"]["run_s"] == pytest.approx(1.8)
  for c, n in (("qa", 2), ("math", 3), ("rag", 1)):
    cat = m["oracle"]["per_category"][c]
    assert cat["speedup"] == pytest.approx(3.0) and cat["tokens_per_s"] == pytest.approx(130.0), c
    assert cat["run_s"] == pytest.approx(0.1 * n) and cat["tau"] == 4.0


def test_device_memory_is_reported_where_the_devices_report_it(monkeypatch, tmp_path, prompt_file, methods):
  """On GPU and TPU the arrays are not in the process's memory: the bench records the devices' peak, and on CPU,
  whose devices report none, only the peak RSS."""
  import types

  import jaxspec.bench.runner as runner_mod

  assert runner_mod.device_peak_bytes() is None  # this CPU
  fake = [types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 3 << 20, "bytes_in_use": 1}),
          types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 5 << 20}),
          types.SimpleNamespace(memory_stats=lambda: None)]
  monkeypatch.setattr(runner_mod.jax, "local_devices", lambda: fake)
  assert runner_mod.device_peak_bytes() == 5 << 20
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle",), quick=True, out=str(tmp_path / "out"))
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert res["environment"]["device_peak_bytes"] == 5 << 20
  assert "peak memory of the fullest device 5 MiB (JAX's arrays)" in (tmp_path / "out" / "report.md").read_text()


def test_process_zero_decides_whether_two_labels_are_one_method(monkeypatch, prompt_file, tmp_path):
  """Labels are compared by where their paths lead from each process's folder and by its install's default paths:
  in a multi-host run process 0's answer is everyone's, or one process would refuse alone while the others wait."""
  import jaxspec.bench.runner as runner_mod

  answers = []

  def from_first_process(obj):  # process 0 found a duplicate this process did not
    answers.append(obj)
    return "'spec' and 'spec:draft=d' are the same method in --methods: give it once." if len(answers) == 1 else obj

  monkeypatch.setattr(runner_mod.sharding, "from_first_process", from_first_process)
  cfg = BenchConfig(prompts=prompt_file, methods=("greedy", "lookup"), max_new_tokens=4, out=str(tmp_path / "o"))
  with pytest.raises(InputError, match="'spec' and 'spec:draft=d' are the same method"):
    run_bench(cfg, None, None, ByteTokenizer(), progress=False)  # refused before the model would load
  assert answers[0] is None  # this process's own answer: no duplicate


def test_one_method_written_two_ways_is_refused_and_a_failed_run_leaves_no_empty_folder(tmp_path, prompt_file, tiny):
  from jaxspec.bench.methods import DEFAULT_EAGLE

  out = tmp_path / "new" / "out"
  eagle = os.path.relpath(DEFAULT_EAGLE)  # the shipped draft, from wherever the tests run
  for methods, msg in [(("greedy", "lookup:n=8:gate=2", "lookup:gate=02:n=8"),
                        "'lookup:gate=02:n=8' and 'lookup:n=8:gate=2' are the same method"),
                       (("bpd:gate=0.80", "bpd:gate=0.8"), "'bpd:gate=0.8' and 'bpd:gate=0.80' are the same"),
                       (("spec:draft=out/d/", "spec:draft=./out/d"), "'spec:draft=./out/d' and 'spec:draft=out/d/'"),
                       (("greedy", "greedy"), "'greedy' is listed twice"),
                       # an option given at its stated default is the method without it (they ran twice)
                       (("spec", "spec:gamma=4"), "'spec:gamma=4' and 'spec' are the same"),
                       (("opt-tree:shape=chain", "opt-tree:shape=chain:nodes=16:drafter=heads"), "are the same"),
                       (("opt-tree:lookup=2:graft=1", "opt-tree:lookup=2"),
                        "'opt-tree:lookup=2' and 'opt-tree:lookup=2:graft=1'"),
                       ((f"eagle:draft={eagle}", "eagle"), "'eagle' and 'eagle:draft=")]:
    cfg = BenchConfig(prompts=prompt_file, methods=methods, max_new_tokens=4, out=str(out))
    with pytest.raises(InputError, match=msg):
      run_bench(cfg, None, None, ByteTokenizer(), progress=False)  # model=None: refused before it would load
  assert parse_method("lookup:n=08")[0] == "lookup:n=08"  # labels stay as written
  # A run that fails after the results folder was made removes the folders it made, and only those.
  (tmp_path / "new").mkdir()
  model, params = tiny  # context: 512 tokens
  cfg = BenchConfig(prompts=prompt_file, methods=("greedy",), max_new_tokens=600, out=str(out))
  with pytest.raises(InputError, match="with 600 new tokens it needs more than"):
    run_bench(cfg, model, params, ByteTokenizer(), progress=False)
  # The advice fits the case: no number of new tokens fits a prompt longer than the context, and --context (given
  # here) is named where it was set.
  long_file = write_prompts(tmp_path / "long.jsonl", [{"question_id": 7, "category": "qa", "turns": ["w" * 600]}])
  cfg = BenchConfig(prompts=long_file, methods=("greedy",), max_new_tokens=4, out=str(out), context=512)
  with pytest.raises(InputError) as e:
    run_bench(cfg, model, params, ByteTokenizer(), progress=False)
  assert str(e.value).endswith("needs more than the model's context length (512). Load the target with a longer "
                               "--context than 512 where its file allows one; or leave the prompt out of the file.")
  assert (tmp_path / "new").is_dir() and not out.exists()
  (tmp_path / "file").write_text("x")
  with pytest.raises(InputError, match="Cannot write the results folder .*file: it is a file. Pass another --out"):
    run_bench(dataclasses.replace(cfg, out=str(tmp_path / "file")), None, None, ByteTokenizer(), progress=False)
  with pytest.raises(InputError, match="Cannot write the results folder /dev/null: it is not a folder. Pass another"):
    run_bench(dataclasses.replace(cfg, out="/dev/null"), None, None, ByteTokenizer(), progress=False)


def test_a_results_folder_that_cannot_be_written_says_why(tmp_path, prompt_file, monkeypatch):
  """A folder that is there but cannot be written (no permission) is said as such, not as "it is not a folder"."""
  from pathlib import Path

  def refuse(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied")

  (tmp_path / "out").mkdir()
  monkeypatch.setattr(Path, "touch", refuse)
  cfg = BenchConfig(prompts=prompt_file, methods=("greedy",), max_new_tokens=4, out=str(tmp_path / "out"))
  with pytest.raises(InputError) as e:
    run_bench(cfg, None, None, ByteTokenizer(), progress=False)
  assert str(e.value) == f"Cannot write the results folder {tmp_path / 'out'}: Permission denied. Pass another --out."


def test_a_resumed_bench_takes_what_its_methods_measured(tmp_path, prompt_file, methods, monkeypatch):
  """A choice a method measures when it is built (opt-tree's nodes=auto budget, gate=auto) is kept with the runs, and
  a resumed run's build is given it back: measured anew (on a busier machine, say) it could differ, and the results
  would merge runs of two settings under the last one's name."""
  import jaxspec.bench.runner as runner_mod

  given, budgets, kill = [], iter([16, 32, 48, 64]), {"armed": True, "calls": 0}

  def build(ctx, opts):
    given.append(dict(ctx.measured))
    nodes = ctx.measured.get("nodes") or next(budgets)
    inner = loop_runner(ctx)
    kill["calls"] = 0

    def run(prompts, max_new_tokens, seed):
      kill["calls"] += 1
      if kill["armed"] and kill["calls"] == 3:  # the process is killed in batch 1 (after a warm-up and batch 0)
        kill["armed"] = False
        raise KeyboardInterrupt
      return inner(prompts, max_new_tokens, seed)

    run.measured, run.note = {"nodes": nodes}, f"nodes={nodes}"
    return run

  monkeypatch.setitem(runner_mod.METHODS, "auto", MethodSpec("auto", "test: measures when built", True, build))
  cfg = BenchConfig(prompts=prompt_file, methods=("auto",), max_new_tokens=6, batch_size=2, out=str(tmp_path / "o"))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert given == [{}, {"nodes": 16}] and res["environment"]["resumed_runs"] == 2
  assert res["methods"]["auto"]["note"] == "nodes=16"
  # The same command over the finished results starts over, and measures again.
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert given[-1] == {} and res["methods"]["auto"]["note"] == "nodes=32"
  # Runs kept by a version that did not record the choice: measured again, and the note and the log say so.
  kill["armed"] = True
  with pytest.raises(KeyboardInterrupt):
    run_bench(dataclasses.replace(cfg, fresh=True), methods, None, ByteTokenizer(), progress=False)
  prog = tmp_path / "o" / "progress.jsonl"
  lines = prog.read_text().splitlines()
  head = json.loads(lines[0])
  assert head["fingerprint"].pop("measured") == {"auto": {"nodes": 48}}
  prog.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert given[-1] == {} and res["environment"]["resumed_runs"] == 2
  assert res["methods"]["auto"]["note"] == ("nodes=64; measured again: the run this one resumes did not record its "
                                            "choice, so its kept runs may have used another")


def test_a_mesh_written_another_way_resumes(tmp_path, prompt_file, methods, bomb):
  """The saved work names the mesh by its sizes: "2,4", "data=2,model=-1" and "data=2,model=4" are one mesh (on the
  8 test devices), so a run killed under one spelling goes on under another."""
  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path / "o"),
                    mesh="data=2,model=4")
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  res = run_bench(dataclasses.replace(cfg, mesh="2, -1"), methods, None, ByteTokenizer(), progress=False)
  assert res["environment"]["resumed_runs"] == 2 and res["config"]["mesh"] == "data=2,model=4"


def test_a_method_that_is_not_lossless_is_compared_as_agreement_and_sampling_compares_nothing(
    tmp_path, prompt_file, methods, monkeypatch):
  """results.json said `mismatches: 0` for an approximate method whose every output differed from greedy (it was not
  compared), and the report's exactness section was an empty heading (found by an audit). A model passed to
  run_bench was reported as the embedded default, and τ was not the ratio of two results.json fields."""
  import jaxspec.bench.methods as methods_mod
  from jaxspec.bench import report

  specs = dict(methods_mod.METHODS)  # the fixture's, with its liar (one output differs from greedy)
  specs["approx"] = dataclasses.replace(specs["liar"], name="approx", lossless=False)
  monkeypatch.setattr("jaxspec.bench.methods.METHODS", specs)
  monkeypatch.setattr("jaxspec.bench.runner.METHODS", specs)
  out = tmp_path / "out"
  res = run_bench(BenchConfig(prompts=prompt_file, methods=("approx", "oracle"), max_new_tokens=9, batch_size=2,
                              out=str(out)), methods, None, ByteTokenizer(), progress=False)
  m = res["methods"]
  assert m["approx"]["mismatches"] is None and m["approx"]["differ_from_greedy"] == 1
  assert m["approx"]["per_category"]["math"]["differ_from_greedy"] == 1 and len(m["approx"]["difference_list"]) == 1
  assert m["oracle"]["mismatches"] == 0 and "differ_from_greedy" not in m["oracle"]
  for entry in m.values():
    assert entry["tau"] == entry["step_tokens"] / entry["target_calls"]
  md = (out / "report.md").read_text()
  assert "- `approx` (not lossless, so agreement rather than exactness): 1 of 6 outputs differ from greedy" in md
  assert "model: `a BigramLM passed to run_bench`" in md
  assert [l.split()[-1] for l in report.summary_lines(res)[1:]] == ["n/a", "differ", "0"]
  # results.json of older versions held mismatches 0 for a method that is not lossless, uncompared: not shown as 0
  old = {**res, "methods": {**m, "approx": {k: v for k, v in m["approx"].items()
                                           if k not in ("differ_from_greedy", "difference_list")} | {"mismatches": 0}}}
  assert report.summary_lines(old)[2].split()[-1] == "n/a"
  assert "`approx` (not lossless): not compared with greedy (results written by an older jaxspec)" in \
      report.markdown(old)
  sampled = run_bench(BenchConfig(prompts=prompt_file, methods=("approx",), max_new_tokens=9, batch_size=2,
                                  temperature=1.0, out=str(tmp_path / "s")), methods, None, ByteTokenizer(),
                      progress=False)["methods"]
  assert sampled["approx"]["mismatches"] is None and "differ_from_greedy" not in sampled["approx"]
  only = run_bench(BenchConfig(prompts=prompt_file, methods=("greedy",), max_new_tokens=5, out=str(tmp_path / "g")),
                   methods, None, ByteTokenizer(), progress=False)
  assert "Only greedy decoding ran" in (tmp_path / "g" / "report.md").read_text() and only["complete"]


def test_the_t5x_baseline_is_unavailable_for_a_model_with_several_eos_ids():
  """T5X's temperature_sample stops at one EOS id: with several it decoded past the others and every such output
  counted as a mismatch of a lossless baseline (found by an audit)."""
  from jaxspec.bench.baselines import t5x_runner

  class TwoEos(ByteTokenizer):
    eos_ids = [3, 4]

  with pytest.raises(Unavailable, match=r"takes one EOS id, and this model has 2 \(3, 4\)"):
    t5x_runner(BenchContext(None, None, TwoEos()))


def test_cllm_on_an_encoder_decoder_says_it_needs_a_decoder_only_model():
  """The advice to train an adapter led a T5 user to `task: cllm`, which refuses a T5 (found by an audit)."""
  from jaxspec.models.t5 import T5LM, tiny_t5_config

  with pytest.raises(Unavailable, match="fine-tunes a decoder-only model; on this T5LM use plain Jacobi decoding"):
    METHODS["cllm"].build(BenchContext(T5LM(tiny_t5_config()), None, ByteTokenizer()), {})


# ---- Scripted runs: every counter of a run known in advance ------------------------------------------------------

def _scripted_greedy(prompt, new):
  """A scripted greedy output: its length depends on the prompt (rows that reach EOS at different steps)."""
  return [1 + (prompt[0] + 3 * i) % (VOCAB - 1) for i in range(min(new, 10 + len(prompt) % 7))]


_CUT = ByteTokenizer().encode("prompt 3 about math")  # `twos` stops early here: its output is a prefix of greedy's
_WRONG = ByteTokenizer().encode("prompt 4 about math")  # and here its 11th token differs


def _scripted_twos(prompt, new):
  tokens = _scripted_greedy(prompt, new)
  if prompt == _CUT:
    return tokens[:11]
  if prompt == _WRONG:
    return tokens[:10] + [1 + tokens[10] % (VOCAB - 1)] + tokens[11:]
  return tokens


def _scripted_result(tokens, active, hist, *, drafter_calls, compile_s, run_s, program_bytes):
  from jaxspec.decoding.generate import GenerationResult
  return GenerationResult(tokens=tokens, target_calls=max(active), drafter_calls=drafter_calls, active_calls=active,
                          step_tokens=[len(t) - 1 for t in tokens], accept_hist=np.asarray(hist), compile_s=compile_s,
                          run_s=run_s, program_bytes=program_bytes)


@pytest.fixture
def scripted(monkeypatch, methods):
  """`greedy` and two methods whose results are scripted: every figure of a run follows from the script by hand.

  greedy: one token per call, 0.2 s and 2 MiB of program per row, 0.5 s to compile per call. `twos`: greedy's
  tokens (but for two prompts) in steps of 2 tokens, so a row takes ceil(steps / 2) calls while a batch's
  `target_calls` is its longest row's; 7 drafter calls per batch, 0.1 s and 3 MiB per row, 0.25 s to compile per
  call. `approx2`: `twos` whose runner says it is not lossless (its method's spec says it is)."""
  import jaxspec.bench.runner as runner_mod

  def greedy(ctx, opts):
    def run(prompts, new, seed):
      tokens = [_scripted_greedy(p, new) for p in prompts]
      steps = [len(t) - 1 for t in tokens]
      return _scripted_result(tokens, steps, [[0, s, 0] for s in steps], drafter_calls=0, compile_s=0.5,
                              run_s=0.2 * len(prompts), program_bytes=2 * len(prompts) << 20)
    return run

  def twos(lossless):
    def build(ctx, opts):
      def run(prompts, new, seed):
        tokens = [_scripted_twos(p, new) for p in prompts]
        steps = [len(t) - 1 for t in tokens]
        return _scripted_result(tokens, [(s + 1) // 2 for s in steps], [[0, s % 2, s // 2] for s in steps],
                                drafter_calls=7, compile_s=0.25, run_s=0.1 * len(prompts),
                                program_bytes=3 * len(prompts) << 20)
      if not lossless:
        run.lossless = False
      return run
    return build

  specs = runner_mod.METHODS
  monkeypatch.setitem(specs, "greedy", dataclasses.replace(specs["greedy"], build=greedy))
  monkeypatch.setitem(specs, "twos", MethodSpec("twos", "test: scripted", True, twos(True)))
  monkeypatch.setitem(specs, "approx2", MethodSpec("approx2", "test: scripted, not lossless", True, twos(False)))
  return methods


def test_scripted_run_figures_follow_from_each_rows_counts(tmp_path, prompt_file, scripted):
  """results.json's figures, by hand from the script: τ over each row's own calls (not its batch's longest row's),
  the drafter calls and compile time of every run (the warm-up's compile included, once), the largest program, the
  accepted lengths of every row, speedup from run time only (compile excluded), and an output that stops early as a
  mismatch at the token where it stopped (rows of other lengths than greedy's are not equal to greedy's)."""
  out = tmp_path / "out"
  new = 20
  cfg = BenchConfig(prompts=prompt_file, methods=("twos", "approx2"), max_new_tokens=new, batch_size=4, out=str(out))
  res = run_bench(cfg, scripted, None, ByteTokenizer(), progress=False)
  m = res["methods"]
  prompts = load_prompts(prompt_file)
  ids = [ByteTokenizer().encode(p.text) for p in prompts]
  g = [_scripted_greedy(i, new) for i in ids]
  t = [_scripted_twos(i, new) for i in ids]
  assert len({len(x) for x in g}) > 1  # rows end at different steps
  n_batches = 2  # 6 prompts in batches of 4: prompts 0-3, then 4-5
  for label in ("twos", "approx2"):
    e = m[label]
    steps = [len(x) - 1 for x in t]
    calls = [(s + 1) // 2 for s in steps]
    assert e["new_tokens"] == sum(map(len, t)) and e["step_tokens"] == sum(steps)
    assert e["target_calls"] == sum(calls) and e["tau"] == pytest.approx(sum(steps) / sum(calls))
    # 7 drafter forwards per batch, counted as its verify forwards are: once per row they served (each row's share
    # follows its own calls; the batch ran as many as its longest row)
    assert e["drafter_calls"] == pytest.approx(sum(7 * sum(calls[i] for i in b) / max(calls[i] for i in b)
                                                   for b in (range(0, 4), range(4, 6))))
    assert e["compile_s"] == pytest.approx(0.25 * (1 + n_batches))  # the warm-up's and every batch's
    assert e["program_bytes"] == 3 * 4 << 20  # the largest: a batch of 4
    assert e["accept_hist"] == [0, sum(s % 2 for s in steps), sum(s // 2 for s in steps)]
    assert e["run_s"] == pytest.approx(0.1 * 6) and e["speedup"] == pytest.approx(2.0)
    assert e["tokens_per_s"] == pytest.approx(sum(map(len, t)) / 0.6)
    assert [(r["question_id"], r["new_tokens"], r["steps_tokens"], r["active_calls"]) for r in e["per_prompt"]] == [
        (p.question_id, len(x), len(x) - 1, c) for p, x, c in zip(prompts, t, calls)]
    assert all("tokens" not in r for r in e["per_prompt"])  # the outputs are in outputs.jsonl
    for c in ("qa", "math", "rag"):
      rows = [i for i, p in enumerate(prompts) if p.category == c]
      cat = e["per_category"][c]
      assert cat["tau"] == pytest.approx(sum(steps[i] for i in rows) / sum(calls[i] for i in rows)), c
      assert cat["target_calls"] == sum(calls[i] for i in rows) and cat["speedup"] == pytest.approx(2.0), c
  assert m["greedy"]["compile_s"] == pytest.approx(0.5 * (1 + n_batches)) and m["greedy"]["program_bytes"] == 8 << 20
  assert m["greedy"]["tau"] == 1.0 and m["greedy"]["target_calls"] == sum(len(x) - 1 for x in g)
  assert res["prompts"] == {"file": prompt_file, "n": 6, "per_category": {"math": 3, "qa": 2, "rag": 1}}

  # Two outputs differ: one stops early (a prefix of greedy's), one has a wrong token.
  decode = ByteTokenizer().decode
  expected = [{"question_id": 3, "category": "math", "first_diff": 11, "expected_len": len(g[3]), "got_len": 11,
               "expected": decode(g[3][3:19]), "got": decode(t[3][3:19])},
              {"question_id": 4, "category": "math", "first_diff": 10, "expected_len": len(g[4]),
               "got_len": len(g[4]), "expected": decode(g[4][2:18]), "got": decode(t[4][2:18])}]
  assert m["twos"]["mismatches"] == 2 and m["twos"]["mismatch_list"] == expected
  assert m["twos"]["per_category"]["math"]["mismatches"] == 2 and m["twos"]["per_category"]["qa"]["mismatches"] == 0
  # The runner's own word on losslessness wins over its method's (bpd:approx=K): agreement, not mismatches.
  assert m["approx2"]["lossless"] is False and m["approx2"]["mismatches"] is None
  assert m["approx2"]["differ_from_greedy"] == 2 and m["approx2"]["difference_list"] == expected
  outputs = [json.loads(l) for l in (out / "outputs.jsonl").read_text().splitlines()]
  assert [o["tokens"] for o in outputs if o["method"] == "twos"] == t

  md = (out / "report.md").read_text()
  assert "- `twos`: 2 of 6 outputs differ from greedy" in md
  assert f"  - question 3 (math): first difference at token 11; greedy `{expected[0]['expected']!r}` vs " \
         f"`{expected[0]['got']!r}`" in md
  assert "- `approx2` (not lossless, so agreement rather than exactness): 2 of 6 outputs differ from greedy" in md
  # The tables show results.json's figures.
  shown = {"greedy": "n/a", "twos": "2", "approx2": "2 differ"}
  for label, e in m.items():
    row = (f"| {label} | {e['tau']:.2f} | {e['speedup']:.2f}× | {e['tokens_per_s']:.1f} | {shown[label]} | "
           f"{e['drafter_calls']:.0f} | {e['compile_s']:.1f} | {e['program_bytes'] / 2**20:.0f} |")
    assert row in md.split("## Overall")[1].split("##")[0], row
    for key, title in (("tau", "τ per category"), ("speedup", "Speedup per category")):
      table = md.split(f"## {title}")[1].split("##")[0]
      cats = list(res["prompts"]["per_category"])
      assert f"| method | {' | '.join(cats)} |" in table
      assert f"| {label} | " + " | ".join(f"{e['per_category'][c][key]:.2f}" for c in cats) + " |" in table, key

  # Sampled, nothing is compared: no mismatches listed either.
  sampled = run_bench(dataclasses.replace(cfg, temperature=1.0, out=str(tmp_path / "s")), scripted, None,
                      ByteTokenizer(), progress=False)["methods"]
  for label in ("twos", "approx2"):
    assert sampled[label]["mismatches"] is None and sampled[label]["mismatch_list"] == []
    assert "differ_from_greedy" not in sampled[label]


def test_plots_show_the_figures_of_results_json(tmp_path, prompt_file, scripted, monkeypatch):
  """The bars of tau_per_category.png are each method's τ per category, speedup.png's each method's speedup, and
  accept_hist.png's each method's accepted lengths as fractions of its steps."""
  from jaxspec.bench import report

  cfg = BenchConfig(prompts=prompt_file, methods=("twos",), max_new_tokens=20, batch_size=4, out=str(tmp_path / "o"))
  res = run_bench(cfg, scripted, None, ByteTokenizer(), progress=False)
  figures = {}
  monkeypatch.setattr(report, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
  report.plots(res, tmp_path)
  m, cats, names = res["methods"], list(res["prompts"]["per_category"]), ["greedy", "twos"]
  tau_bars = figures["tau_per_category.png"].axes[0].containers
  assert [b.get_height() for bars in tau_bars for b in bars] == pytest.approx(
      [m[n]["per_category"][c]["tau"] for n in names for c in cats])
  assert [len(bars) for bars in tau_bars] == [len(cats)] * len(names)
  (speed_bars,) = figures["speedup.png"].axes[0].containers
  assert [b.get_width() for b in speed_bars] == pytest.approx([m[n]["speedup"] for n in names])
  for ax, n in zip(figures["accept_hist.png"].axes, names):
    hist = np.asarray(m[n]["accept_hist"], float)
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx(list(hist / hist.sum()))
    assert ax.get_title().startswith(f"{n}: τ {m[n]['tau']:.2f}")


def test_a_figure_without_a_value_is_null_in_results_json(tmp_path, prompt_file, methods):
  """One new token per prompt: prefill gives it, no verify step runs, so τ is 0 / 0. results.json says null, not
  NaN (which is not JSON), and the tables say —."""
  out = tmp_path / "out"
  res = run_bench(BenchConfig(prompts=prompt_file, methods=("oracle",), max_new_tokens=1, batch_size=2, out=str(out)),
                  methods, None, ByteTokenizer(), progress=False)
  assert res["methods"]["oracle"]["target_calls"] == 0 and res["methods"]["oracle"]["tau"] is None

  def no_nan(name):
    raise AssertionError(f"results.json holds {name}")

  saved = json.loads((out / "results.json").read_text(), parse_constant=no_nan)
  assert saved["methods"]["oracle"]["tau"] is None and saved["methods"]["oracle"]["per_category"]["qa"]["tau"] is None
  assert "| oracle | — |" in (out / "report.md").read_text()


def test_the_report_says_when_a_run_is_incomplete_and_lists_at_most_50_differences(tmp_path, prompt_file, methods):
  from jaxspec.bench import report

  res = run_bench(BenchConfig(prompts=prompt_file, methods=("liar",), max_new_tokens=9, batch_size=2,
                              out=str(tmp_path / "o")), methods, None, ByteTokenizer(), progress=False)
  assert "Incomplete run" not in report.markdown(res)
  assert "**Incomplete run**" in report.markdown({**res, "complete": False})
  one = res["methods"]["liar"]["mismatch_list"][0]
  many = [dict(one, question_id=f"q{i}") for i in range(report.MAX_LISTED_MISMATCHES + 7)]
  md = report.markdown({**res, "methods": {**res["methods"], "liar": {**res["methods"]["liar"],
                                                                      "mismatch_list": many}}})
  listed = [l for l in md.splitlines() if l.startswith("  - question q")]
  assert len(listed) == report.MAX_LISTED_MISMATCHES and listed[0].startswith("  - question q0 (math)")


def test_kept_runs_of_another_batch_size_are_refused(tmp_path, prompt_file, methods, bomb):
  """Runs are kept by batch index: runs of batches of 2 resumed by a run of batches of 3 would be taken for the
  wrong prompts. The batch size is part of the work, as the seed is."""
  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  with pytest.raises(InputError, match="batch_size: 2 there, 3 here"):
    run_bench(dataclasses.replace(cfg, batch_size=3), methods, None, ByteTokenizer(), progress=False)


def test_kept_runs_of_other_prompt_text_are_refused(tmp_path, prompt_file, methods, bomb):
  """The same ids and categories with another text (a prompt edited in place) are other work."""
  cfg = BenchConfig(prompts=prompt_file, methods=("bomb",), max_new_tokens=6, batch_size=2, out=str(tmp_path / "o"))
  with pytest.raises(KeyboardInterrupt):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  bomb["armed"] = False
  rows = [json.loads(l) for l in open(prompt_file)]
  rows[0]["turns"] = ["another text for prompt 0"]
  edited = write_prompts(tmp_path / "edited.jsonl", rows)
  with pytest.raises(InputError, match=r"differs from this one \(the prompts \(their ids, categories or text\)\)"):
    run_bench(dataclasses.replace(cfg, prompts=edited), methods, None, ByteTokenizer(), progress=False)


def test_a_category_filter_naming_an_absent_category_is_refused(prompt_file):
  """`--categories math,poetry` on a file without poetry is a typo to report, not a run of math alone."""
  with pytest.raises(InputError, match="No prompts of the categories poetry in .*its categories are math, qa, rag"):
    load_prompts(prompt_file, categories=["math", "poetry"])
  assert [p.question_id for p in load_prompts(prompt_file, categories=["rag", "qa"])] == [0, 1, 5]


def test_option_bounds_are_inclusive_and_values_may_hold_equals_signs():
  """Whole-number options take 1..1024 (and gate/graft from 0), both ends included; a value is everything after the
  first '=' (a folder may have one in its name)."""
  for text in ("spec:gamma=1024", "spec:gamma=1", "lookup:gate=0", "bpd:gate=0", "opt-tree:lookup=1:graft=0",
               "bpd:k=16", "spec:stop=0", "opt-tree:threshold=0", "bpd-ngram:width=65536"):
    parse_method(text)
  for text in ("spec:gamma=1025", "spec:gamma=0", "jacobi:n=0", "opt-tree:graft=-1", "bpd:gate=-0.1",
               "opt-tree:width=1025"):
    with pytest.raises(InputError, match="must be"):
      parse_method(text)
  assert parse_method("bpd:heads=/data/run=3/heads:k=2")[2] == {"heads": "/data/run=3/heads", "k": "2"}
  # graft= says what to do with copies: without lookup= there are none, and the option would be dropped unsaid.
  from jaxspec.bench.methods import with_lookup
  with pytest.raises(InputError, match="graft= applies to copies: give lookup=M too"):
    with_lookup(object(), {"graft": "0"})
  with pytest.raises(InputError, match="graft= in 'opt-tree:graft=0' applies to copies: give lookup=M too"):
    parse_method("opt-tree:graft=0")  # when the string is read, before a model loads


def test_methods_are_built_with_the_runs_settings(tmp_path, prompt_file, methods, monkeypatch):
  """A method's build sees the run's sampling settings and seed, and the rows decoded together: no more than the
  prompts (a budget or a gate measured at 16 rows would be priced for a batch the run never decodes)."""
  import jaxspec.bench.runner as runner_mod

  seen = []

  def build(ctx, opts):
    seen.append((ctx.temperature, ctx.top_k, ctx.top_p, ctx.seed, ctx.batch_size))
    return loop_runner(ctx)

  monkeypatch.setitem(runner_mod.METHODS, "probe", MethodSpec("probe", "test: records its context", True, build))
  cfg = BenchConfig(prompts=prompt_file, methods=("probe",), max_new_tokens=3, batch_size=16, temperature=0.5,
                    top_k=4, top_p=0.9, seed=7, out=str(tmp_path / "o"))
  run_bench(cfg, methods, None, ByteTokenizer(), progress=False)
  assert seen == [(0.5, 4, 0.9, 7, 6)]


def test_kept_runs_of_another_machine_are_refused(monkeypatch):
  """Times and compiled programs belong to a backend and a device count: runs kept on others are other work."""
  from jaxspec.bench import progress as saved

  here = saved.fingerprint(BenchConfig(), [], [], ["greedy"])
  n = here["device_count"]
  monkeypatch.setattr(saved.jax, "device_count", lambda: n + 1)
  monkeypatch.setattr(saved.jax, "default_backend", lambda: "tpu")
  there = saved.fingerprint(BenchConfig(), [], [], ["greedy"])
  assert saved.differences(there, here) == [f"backend: 'tpu' there, {here['backend']!r} here",
                                            f"device_count: {n + 1} there, {n} here"]


def test_kept_runs_whose_relative_paths_lead_elsewhere_are_refused(tmp_path, monkeypatch):
  """A method's relative path (spec:draft=d) names the folder it leads to from where the command runs: the same
  command from another folder may name another draft, whose kept runs are other work. Runs kept by a jaxspec that
  did not record the paths still resume."""
  from jaxspec.bench import progress as saved

  labels = ["greedy", "spec:draft=d:gamma=4"]
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path / "a")
  there = saved.fingerprint(BenchConfig(), [], [], labels)
  assert saved.differences(there, saved.fingerprint(BenchConfig(), [], [], labels)) == []
  monkeypatch.chdir(tmp_path / "b")
  here = saved.fingerprint(BenchConfig(), [], [], labels)
  assert saved.differences(there, here) == [f"spec:draft=d:gamma=4: draft= leads to {tmp_path / 'a' / 'd'} there, "
                                            f"{tmp_path / 'b' / 'd'} here"]
  old = {k: v for k, v in there.items() if k != "method_paths"}
  assert saved.differences(old, here) == []


def test_kept_runs_compare_only_the_method_paths_that_moved(tmp_path, monkeypatch):
  """Of the methods' path options only those that lead elsewhere are named: `rescore=default` (the shipped rescorer,
  no path), an absolute path and a `~/` path (expanded as the command does) name the same work from any folder; a
  kept entry that is not a mapping (a damaged progress file) is not compared."""
  from jaxspec.bench import progress as saved

  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  labels = ["bpd-ngram:rescore=default", f"spec:draft={tmp_path / 'abs'}", "spec:draft=~/d", "spec:draft=d:gamma=3"]
  assert saved.method_paths(labels[:1]) == {}
  assert saved.method_paths(labels[2:3]) == {labels[2]: {"draft": str(tmp_path / "home" / "d")}}
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path / "a")
  there = saved.fingerprint(BenchConfig(), [], [], labels)
  monkeypatch.chdir(tmp_path / "b")
  here = saved.fingerprint(BenchConfig(), [], [], labels)
  assert saved.differences(there, here) == [f"spec:draft=d:gamma=3: draft= leads to {tmp_path / 'a' / 'd'} there, "
                                            f"{tmp_path / 'b' / 'd'} here"]
  damaged = dict(there, method_paths={**there["method_paths"], labels[3]: "x"})
  assert saved.differences(damaged, here) == []


def test_kept_runs_of_other_methods_compare_the_paths_of_those_both_name(tmp_path, monkeypatch):
  """Runs kept for other methods (each with a path) are named by the methods line; the paths are compared only for
  the methods both runs name, and a method the other run lacks is no error."""
  from jaxspec.bench import progress as saved

  monkeypatch.chdir(tmp_path)
  there = saved.fingerprint(BenchConfig(), [], [], ["greedy", "spec:draft=d", "spec:draft=e"])
  here = saved.fingerprint(BenchConfig(), [], [], ["greedy", "spec:draft=d", "spec:draft=f"])
  assert saved.differences(there, here) == ["methods that can run: greedy, spec:draft=d, spec:draft=e there, greedy, "
                                            "spec:draft=d, spec:draft=f here"]


def test_method_paths_read_labels_as_the_methods_do(tmp_path, monkeypatch):
  """The paths a progress file records are read from each label by `parse_method`, as the build reads them, so the
  two cannot disagree: a path holding "=" is one value (split at the first "=" only), and `draft=default` names a
  folder called default, as the spec build loads it (it was recorded as no path at all, so runs kept with one
  folder's ./default resumed in another folder, with another draft); only `rescore=default` names the shipped one."""
  from jaxspec.bench import progress as saved
  from jaxspec.bench.methods import named_paths

  monkeypatch.chdir(tmp_path)
  for label in ("spec:draft=/tmp/x=y:gamma=2", "spec:draft=default", "bpd:heads=a=b", "bpd-ngram:rescore=default",
                "cllm:lora=~/l", "opt-tree:heads=h:rescore=r=s"):
    opts = parse_method(label)[2]
    want = {k: os.path.realpath(v) for k, v in named_paths(opts).items()}
    assert saved.method_paths([label]) == ({label: want} if want else {}), label
  assert saved.method_paths(["spec:draft=/tmp/x=y:gamma=2"]) == {"spec:draft=/tmp/x=y:gamma=2": {"draft": "/tmp/x=y"}}
  assert saved.method_paths(["spec:draft=default"]) == {"spec:draft=default": {"draft": str(tmp_path / "default")}}
  assert saved.method_paths(["spec:draft=a:draft=b"]) == {}  # refused by parse_method, so run by no build
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path / "a")
  there = saved.fingerprint(BenchConfig(), [], [], ["spec:draft=default"])
  monkeypatch.chdir(tmp_path / "b")
  assert saved.differences(there, saved.fingerprint(BenchConfig(), [], [], ["spec:draft=default"])) == [
      f"spec:draft=default: draft= leads to {tmp_path / 'a' / 'default'} there, {tmp_path / 'b' / 'default'} here"]


def test_a_reference_that_cannot_run_stops_the_run(tmp_path, prompt_file, methods, monkeypatch):
  """Speedups and exactness are measured against greedy decoding: without it there is nothing to report."""
  import jaxspec.bench.runner as runner_mod

  def unavailable(ctx, opts):
    raise Unavailable("no greedy here")

  monkeypatch.setitem(runner_mod.METHODS, "greedy", MethodSpec("greedy", "test: cannot run", True, unavailable))
  cfg = BenchConfig(prompts=prompt_file, methods=("oracle",), max_new_tokens=3, out=str(tmp_path / "o"))
  with pytest.raises(InputError, match="The reference method cannot run: no greedy here"):
    run_bench(cfg, methods, None, ByteTokenizer(), progress=False)


def test_results_name_the_jaxspec_source_they_were_measured_with(tmp_path, monkeypatch):
  """results.json and report.md say which jaxspec ran: its version, and the commit of a git checkout it runs from
  (benchmarks/results hold runs of many commits), marked where its files had changes."""
  import shutil
  import subprocess

  import jaxspec
  from jaxspec.bench import report, runner

  env = runner.environment()
  assert env["jaxspec"] == jaxspec.__version__
  if shutil.which("git") is None:
    pytest.skip("git is not installed: the commit cannot be read (the version is checked above)")
  # A checkout of its own, so the answer does not depend on the state of the tests' checkout.
  src = tmp_path / "src"
  (src / "jaxspec" / "bench").mkdir(parents=True)
  (src / "jaxspec" / "x.py").write_text("x = 1\n")
  git = lambda *a: subprocess.run(["git", "-C", str(src), *a], check=True, capture_output=True, text=True).stdout
  git("init", "-q")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", "--allow-empty")
  git("add", "jaxspec")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "y")
  head = git("rev-parse", "HEAD").strip()
  monkeypatch.setattr(runner, "__file__", str(src / "jaxspec" / "bench" / "runner.py"))
  assert runner.source_commit() == head
  (src / "jaxspec" / "x.py").write_text("x = 2\n")
  first = runner.source_commit()
  assert first.startswith(head + "+changes:") and runner.source_commit() == first
  (src / "jaxspec" / "x.py").write_text("x = 3\n")  # another edit of the same commit is another source
  assert runner.source_commit().startswith(head + "+changes:") and runner.source_commit() != first
  (src / "other.txt").write_text("not jaxspec")
  git("add", "other.txt")
  (src / "jaxspec" / "x.py").write_text("x = 1\n")
  assert runner.source_commit() == head  # changes outside jaxspec's code do not count
  shutil.rmtree(src / ".git")
  assert runner.source_commit() is None  # not a checkout (an installed package)
  from jaxspec.bench.prompts import Prompt

  prompts = [Prompt(0, "qa", "a")]
  specs = {"greedy": MethodSpec("greedy", "greedy", True, None)}
  res = report.results(BenchConfig(prompts="p.jsonl", methods=("greedy",)), dict(env, jaxspec_commit=head + "+changes"),
                       prompts, specs, {}, {"greedy": [_record(0, "qa", 1.0, 4, 3, 3)]}, {"greedy": 0.0},
                       {"greedy": 0}, {"greedy": []}, {}, complete=True, wall_s=1.0, peak_rss_bytes=0)
  assert res["environment"]["jaxspec"] == jaxspec.__version__
  assert f"- jaxspec {jaxspec.__version__} (commit {head}+changes), jax " in report.markdown(res)


def test_the_t5x_runner_takes_the_compiled_program_generate_compiles_with():
  """_run_t5x compiles through generate's program cache (compiled_program), whose tuple it unpacks: checked without
  a T5X checkout (the T5X tests skip without one), with a stand-in for T5X's program."""
  import functools

  import jax
  import jax.numpy as jnp

  from jaxspec.bench import baselines

  @functools.partial(jax.jit, static_argnums=0,
                     static_argnames=("decoding", "capacity", "max_new", "eos_id", "topk", "topp"))
  def program(model, params, arr, lengths, key, temperature, *, decoding, capacity, max_new, eos_id, topk, topp):
    return jnp.pad(arr, ((0, 0), (0, max_new))) + 1  # "T5X's output": every token one more

  ctx = BenchContext(None, {"w": jnp.zeros(2)}, ByteTokenizer())
  arr = np.array([[5, 6, 0, 0]], np.int32)
  res = baselines._run_t5x(ctx, None, program, arr, [2], 128, 3, 0, -1, starts=[2])
  assert res.tokens == [[1, 1, 1]] and res.program_bytes >= 0


def test_finished_results_of_a_method_written_another_way_compare_where_its_paths_led(tmp_path, monkeypatch):
  """Finished results of `spec:draft=d` written in one folder, and `spec:draft=./d` asked for in another: the two
  spellings are the same method only where their paths lead to the same place, judged where each was written (the
  results' recorded paths, not this folder's); a damaged paths entry is read from here."""
  from jaxspec.bench import progress as saved
  from jaxspec.bench.runner import _finished_other_work

  for name in ("a", "b"):
    (tmp_path / name).mkdir()
  cfg = BenchConfig(methods=("spec:draft=d",), out=str(tmp_path / "out"))
  monkeypatch.chdir(tmp_path / "a")
  there = saved.fingerprint(cfg, [], [], ["greedy", "spec:draft=d"])
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "results.json").write_text(json.dumps(
      {"config": dataclasses.asdict(cfg), "fingerprint": there, "complete": True}))
  again = dataclasses.replace(cfg, methods=("spec:draft=./d",))
  for folder, refused in (("a", False), ("b", True)):
    monkeypatch.chdir(tmp_path / folder)
    why = _finished_other_work(tmp_path / "out", saved.fingerprint(again, [], [], ["greedy", "spec:draft=./d"]),
                               again)
    assert (why is not None) == refused, (folder, why)
    if refused:
      assert "methods: spec:draft=d there, spec:draft=./d here" in why


def test_relabel_leaves_a_damaged_or_doubled_file_as_it_is(tmp_path):
  """`relabel` of a progress file no bench of ours wrote so: two saved labels of one method (both would take this
  run's one label, their runs merged) stay as they are; a paths entry that is not a mapping, or a path in it that is
  not a string, counts as none recorded (the label's own path is read), never an error."""
  from jaxspec.bench import progress as saved

  runs = {(0, "spec"): {"method": "spec"}, (0, "spec:gamma=4"): {"method": "spec:gamma=4"}}
  head = saved.fingerprint(BenchConfig(), [], [], ["greedy", "spec", "spec:gamma=4"])
  assert saved.relabel(head, runs, ["greedy", "spec:gamma=04"]) == (head, runs)
  path = os.path.realpath(tmp_path / "d")
  label, written = f"spec:draft={path}", f"spec:gamma=4:draft={path}"
  runs = {(0, label): {"method": label}}
  for entry in ("x", ["x"], {"draft": 5}, {"draft": ["x"]}):
    head = dict(saved.fingerprint(BenchConfig(), [], [], ["greedy", label]), method_paths={label: entry})
    assert saved.relabel(head, runs, ["greedy", written])[1] == {(0, written): {"method": written}}, entry


def test_relabel_reads_this_run_s_paths_through_links_as_the_file_recorded_them(tmp_path, monkeypatch):
  """A kept label's paths were recorded where they led (through links); this run's spelling of the same method is read
  the same way (`method_paths`), so `spec:draft=link` kept goes on under `spec:gamma=4:draft=link`."""
  from jaxspec.bench import progress as saved

  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  monkeypatch.chdir(tmp_path)
  head = saved.fingerprint(BenchConfig(), [], [], ["greedy", "spec:draft=link"])
  assert head["method_paths"] == {"spec:draft=link": {"draft": os.path.realpath(tmp_path / "real")}}
  runs = {(0, "spec:draft=link"): {"method": "spec:draft=link"}}
  assert saved.method_key("spec:gamma=4:draft=link") == saved.method_key("spec:draft=link", head["method_paths"][
      "spec:draft=link"])
  assert saved.relabel(head, runs, ["greedy", "spec:gamma=4:draft=link"])[1] == {
      (0, "spec:gamma=4:draft=link"): {"method": "spec:gamma=4:draft=link"}}


def test_a_bench_of_greedy_decoding_alone_is_no_bench_of_methods_that_cannot_run(tmp_path, prompt_file, methods):
  """No method asked for (methods=(), greedy decoding alone, as the API allows) is not "none of the methods asked for
  can run": the run times greedy decoding, as before."""
  cfg = BenchConfig(prompts=prompt_file, methods=(), max_new_tokens=3, limit=1, out=str(tmp_path / "o"))
  res = run_bench(cfg, methods, None, ByteTokenizer(), progress=False, require_all=True)
  assert list(res["methods"]) == ["greedy"]
