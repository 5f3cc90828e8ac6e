"""What `jaxspec` says when the input is wrong: the user's own words quoted, the CLI's flags named, and what to do.

Cheap: the tiny random LLaMA (conftest's `tiny`) or the small shipped T5 stands in for the target, and every case
stops before decoding.
"""

from pathlib import Path

import pytest

import jaxspec.loading
from jaxspec import cli, sharding
from jaxspec.bench.methods import ASSETS, METHODS, BenchContext, Unavailable, parse_method
from jaxspec.errors import InputError, ModelLoadError

T5_HEADS = ASSETS / "bpd_t5_numbers"


class CharTokenizer:
  """One id per character (id 0 unused), no chat template: the prompt's length in tokens is its length in chars."""

  chat_template = None
  eos_id = None
  pad_id = 0

  def encode(self, text, add_bos=None):
    return [1 + ord(c) % 255 for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return " ".join(map(str, ids))


@pytest.fixture
def tiny_target(monkeypatch, tiny):
  """The CLI's model is the tiny LLaMA (vocabulary 256, context 512, d_model 32)."""
  model, params = tiny
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda path=None, **kw: (model, params, CharTokenizer()))
  return model, params


@pytest.fixture(scope="module")
def t5():
  """The shipped T5 numbers model (d_model 128), whose BPD heads are jaxspec/assets/bpd_t5_numbers."""
  from jaxspec.loading import load_model
  return load_model(str(ASSETS / "t5_numbers"))


def fails(argv, capsys) -> str:
  """The one-line error of a command that must fail with exit code 2."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxspec: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  return err


def build(ctx, method):
  _, name, opts = parse_method(method)
  return METHODS[name].build(ctx, opts)


# ---- opt-tree deeper than the heads ------------------------------------------------------------------------------

def test_opt_tree_quotes_the_depth_that_was_asked(t5):
  ctx = BenchContext(*t5)
  with pytest.raises(InputError) as e:
    build(ctx, f"opt-tree:heads={T5_HEADS}:depth=20")  # nodes=16 cuts the tree to 16 levels: still say 20
  msg = str(e.value)
  assert "depth=20 reads one BPD head per level" in msg and "holds 6 heads" in msg and "Use depth=6 or less" in msg
  assert "depth 16" not in msg and "a dynamic" not in msg
  with pytest.raises(InputError, match=r"shape=chain with the default nodes=16 reads one BPD head per node.*"
                                       r"Use nodes=6 or fewer"):
    build(ctx, f"opt-tree:heads={T5_HEADS}:shape=chain")


def test_a_file_of_a_part_s_folder_names_the_folder(t5):
  """bpd:heads=DIR/heads.safetensors said "no BPD heads in DIR/heads.safetensors ... train them", and
  bpd-ngram:rescore=DIR/ngram.safetensors that the n-gram model was unreadable (NotADirectoryError): --model with a
  file of a model folder names the folder to pass, and so do these."""
  ctx = BenchContext(*t5)
  for name in ("heads.safetensors", "config.json"):
    with pytest.raises(Unavailable, match=rf"{name} is a file, not a folder of BPD heads: pass the folder that "
                                          rf"holds it \(.*bpd_t5_numbers\)\.$"):
      build(ctx, f"bpd:heads={T5_HEADS / name}")
  rescorer = ASSETS / "bpd_rescore_smollm2"
  with pytest.raises(Unavailable, match=r"ngram.safetensors is a file, not a folder of the n-gram tables of BPD "
                                        r"lattice rescoring: pass the folder that holds it \(.*bpd_rescore_smollm2\)"):
    build(ctx, f"bpd-ngram:rescore={rescorer / 'ngram.safetensors'}")


# ---- a draft with another tokenizer ------------------------------------------------------------------------------

def test_a_draft_with_another_tokenizer_of_the_same_size_is_warned_about(t5, tmp_path, caplog):
  """Same number of ids, other tokens: the vocabulary-size check passes and the output stays the target's, but the
  drafts name other tokens. The bench says so; the draft that shares the target's tokenizer gets no warning."""
  import json
  import shutil

  ctx = BenchContext(*t5)
  with caplog.at_level("WARNING", logger="jaxspec.bench.methods"):
    build(ctx, f"spec:draft={ASSETS / 't5_numbers_draft'}")
  assert "another tokenizer" not in caplog.text
  other = tmp_path / "draft"
  shutil.copytree(ASSETS / "t5_numbers_draft", other)
  tok = json.loads((other / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  a, b = sorted(vocab, key=vocab.get)[-2:]  # two ordinary tokens swap their ids
  vocab[a], vocab[b] = vocab[b], vocab[a]
  (other / "tokenizer.json").write_text(json.dumps(tok))
  with caplog.at_level("WARNING", logger="jaxspec.bench.methods"):
    build(ctx, f"spec:draft={other}")
  assert f"draft={other} has another tokenizer than the target: 2 of the target's 148 tokens are spelled" in caplog.text


def test_the_other_tokenizer_warning_counts_over_the_target_s_tokens(caplog):
  """The counts are the target's: of its tokens, how many the draft's tokenizer spells or numbers otherwise (a draft
  tokenizer with more tokens than the target's, whose extra ones are not counted)."""
  import types

  from jaxspec.bench.methods import _warn_other_tokenizer

  def fake(vocab):
    return types.SimpleNamespace(backend=types.SimpleNamespace(get_vocab=lambda with_added_tokens: dict(vocab)))

  target, draft = fake({"a": 0, "b": 1, "c": 2}), fake({"a": 0, "b": 2, "c": 1, "d": 3, "e": 4})
  with caplog.at_level("WARNING", logger="jaxspec.bench.methods"):
    _warn_other_tokenizer("D", target, draft)
  assert "draft=D has another tokenizer than the target: 2 of the target's 3 tokens are spelled" in caplog.text


def test_a_t5_draft_of_another_vocabulary_for_a_decoder_only_target_says_why():
  """The message said the CLI resizes a draft= model's vocabulary, for the draft= model it had just declined to resize
  (found by a review): an encoder-decoder draft is not resized, and the message now says so."""
  from tests.conftest import make_tiny

  model, params = make_tiny()
  with pytest.raises(Unavailable, match=r"t5_numbers_draft is an encoder-decoder \(T5\) model of another vocabulary "
                                        r"\(148 ids, the target \d+\), which jaxspec does not resize"):
    build(BenchContext(model, params, CharTokenizer()), f"spec:draft={ASSETS / 't5_numbers_draft'}")


# ---- meshes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["foo", "2,4,8", "2", "data=2,4"])  # the last: named and bare sizes mixed
def test_a_bad_mesh_quotes_the_string_and_shows_the_forms(spec):
  with pytest.raises(InputError) as e:
    sharding.parse_mesh_shape(spec)
  msg = str(e.value)
  assert f"Bad mesh {spec!r}" in msg and "data=2,model=4" in msg and "model=4" in msg and "2,4" in msg
  assert "[" not in msg  # not the parsed list


def test_an_encoder_decoders_limit_is_its_decoders_tokens(capsys, tmp_path):
  """An encoder input longer than max_seq_len decodes (the decoder's cache holds its own tokens only); the new tokens
  are what the limit bounds, and shortening the prompt is no advice there."""
  t5 = str(ASSETS / "t5_numbers")
  (tmp_path / "long.txt").write_text(" ".join(["twelve"] * 2100))
  assert cli.main(["generate", "--model", t5, "--prompt-file", str(tmp_path / "long.txt"),
                   "--max-new-tokens", "2"]) == 0
  assert "prompt 2100 tokens" in capsys.readouterr().err  # past max_seq_len, 2048
  err = fails(["generate", "--model", t5, "--prompt", "12", "--max-new-tokens", "2048"], capsys)
  assert ("The decoder's start token plus 2048 new tokens needs 2049 cache slots, more than the cache length 2048: "
          "lower --max-new-tokens (to 2047 or fewer) or raise --max-len.") in err
  # --cache-buckets bounds a decoder-only model's attention; on T5 it was silently a no-op (found by an audit).
  err = fails(["generate", "--model", t5, "--prompt", "12", "--max-new-tokens", "2", "--cache-buckets"], capsys)
  assert "--cache-buckets bounds a decoder-only (LLaMA-family) model's attention" in err and "leave the option" in err


def test_a_bad_mesh_on_the_command_line(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda *a, **k: pytest.fail("the mesh is checked first"))
  err = fails(["generate", "--prompt", "x", "--mesh", "foo"], capsys)
  assert "Bad mesh 'foo'" in err and "data=2,model=4" in err
  config = tmp_path / "c.yaml"
  config.write_text(f"task: bpd\nout: {tmp_path / 'out'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  err = fails(["train", str(config), "mesh=foo"], capsys)
  assert "Bad mesh 'foo'" in err and "data=2,model=4" in err
  # An empty --mesh is refused, not run on one device; a repeated axis is named; tabs are spaces.
  assert "The mesh is empty" in fails(["generate", "--prompt", "x", "--mesh", ""], capsys)
  assert "axis data is given twice" in fails(["generate", "--prompt", "x", "--mesh", "data=2,data=4"], capsys)
  assert sharding.parse_mesh_shape("data=2,\tmodel=4") == {"data": 2, "model": 4}


# ---- config files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,where", [("task: [\n", "line 2, column 1"),
                                        ("task: bpd\n  heads: 2\n", "line 2, column 8"),
                                        ('task: "bpd\n', "line 1, column 7")])
def test_malformed_yaml_is_one_line_with_its_position(tmp_path, capsys, text, where):
  config = tmp_path / "bad.yaml"
  config.write_text(text)
  err = fails(["train", str(config)], capsys)
  assert "is not valid YAML" in err and where in err


def test_a_key_written_twice_is_refused_and_merges_still_work(tmp_path, capsys):
  """PyYAML keeps the last of two equal keys without a word: a second `task:` line ran another task. Both places
  are named; YAML merge keys (`<<: *base`), whose keys a mapping may override, still load."""
  from training.config import read_config_file
  config = tmp_path / "twice.yaml"
  for text, want in (("task: seq2seq\ntask: bpd\n", "key 'task' appears twice (line 1 and line 2)"),
                     ("task: bpd\ntrain:\n  steps: 0\n  steps: 10\n", "key 'steps' appears twice (line 3 and line 4)"),
                     # a key written as an alias is named at the alias, not at its anchor
                     ("keys: [&s steps]\ntrain:\n  steps: 0\n  *s : 10\n",
                      "key 'steps' appears twice (line 3 and line 4)")):
    config.write_text(text)
    err = fails(["train", str(config)], capsys)
    assert "is not valid YAML" in err and want in err, err
  config.write_text("base: &b {steps: 3, lr: 1}\ntrain:\n  <<: *b\n  steps: 5\n")
  assert read_config_file(config)["train"] == {"steps": 5, "lr": 1}


def test_train_refuses_an_override_given_twice(tmp_path, capsys):
  """`jaxspec train CONFIG train.steps=2 train.steps=5` trained 5 steps without a word, also with the second override
  after an option (`--check`), where the CLI adds it to the others. Refused in one line naming the key and both."""
  config = tmp_path / "c.yaml"
  config.write_text(f"task: bpd\nout: {tmp_path / 'out'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  err = fails(["train", str(config), "train.steps=2", "--check", "train.steps=5"], capsys)
  assert err.endswith(": override 'train.steps' appears twice (train.steps=2, then train.steps=5): give it once.\n")
  assert "'optim={lr: 2}' gives the section 'optim' whole" in fails(
      ["train", str(config), "--check", "optim.lr=1", "optim={lr: 2}"], capsys)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_train_check_of_each_shipped_config_with_a_wrong_override_is_one_line(config, capsys, tmp_path, monkeypatch):
  """A walk-through of every config with one wrong override of each kind (an unknown key, a wrong type, a count below
  1, a missing file): one line and exit 2 from --check. Counts below 1 of the seq2seq and rescore tasks passed it
  (data.src_len, data.tgt_len, data.vocab_size, data.eval_examples ended the run in a traceback from numpy, the
  tokenizer trainer or islice; train.exact_match_examples=-1 scored all but one example, and 0 reported an exact
  match of 0; tune.k and tune.neural_layers were refused once the target had loaded), and an n-gram order outside
  2..4 failed only after the target's data was built, rescoring weights outside 0..1 at the first decode with them."""
  import yaml

  monkeypatch.chdir(CONFIGS.parent)  # the configs' paths are the repository's
  raw = yaml.safe_load((CONFIGS / config).read_text())
  missing = tmp_path / "missing"
  if raw["task"] == "seq2seq":
    counts = ["data.src_len=-1", "data.tgt_len=0", "data.vocab_size=-1", "data.eval_examples=-1",
              "train.exact_match_examples=0"]
    read = (f"data.tokenizer={missing}", f"data.tokenizer: no tokenizer.json at '{missing}'")
  else:
    counts = (["tune.k=0", "tune.neural_layers=-1", "ngram.order=1", "ngram.order=5", "tune.weights=[-0.1,0.5]",
               "tune.neural_weights=[1.5]", "tune.weights=[]"] if raw["task"] == "rescore" else ["train.steps=-1"])
    key = f"{'collect' if raw['task'] == 'cllm' else 'data'}.prompts"
    read = (f"{key}={missing}", f"Prompt file {missing} not found: pass a JSONL file in Spec-Bench format as {key}=")
  section = "tune" if raw["task"] == "rescore" else "train"
  wrong = [(f"{section}.batch_sise=4", "unknown key"), (f"{section}.batch_size=four", "must be int, got 'four'"),
           *((c, "each in 0..1 (and at least one)" if "weights" in c else
              f"must be {'in 2..4' if 'order' in c else '>= 1'}") for c in counts), read]
  for override, want in wrong:
    assert want in fails(["train", "--check", str(CONFIGS / config), override, f"out={tmp_path / 'out'}"],
                         capsys), override


def test_train_check_prints_the_settings_and_trains_nothing(tmp_path, capsys, monkeypatch):
  """`jaxspec train CONFIG --check [overrides]`: the settings the run would use (overrides applied) on stdout, exit
  0, no task run and no folder written; a config that fails a check fails the same way as a run."""
  import json

  import training.tasks as tasks
  monkeypatch.setitem(tasks.TASKS, "bpd", (tasks.TASKS["bpd"][0], lambda *a, **k: pytest.fail("trained")))
  config = tmp_path / "c.yaml"
  config.write_text(f"task: bpd\nout: {tmp_path / 'out'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  assert cli.main(["train", str(config), "--check", "optim.lr=1e-4", "heads.num_heads=3"]) == 0
  out, err = capsys.readouterr()
  settings = json.loads(out)
  assert settings["task"] == "bpd" and settings["optim"]["lr"] == 1e-4 and settings["heads"]["num_heads"] == 3
  assert "passes the checks made before any work" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
  assert "did you mean 'optim.lr'" in fails(["train", str(config), "--check", "optim.lrr=1"], capsys)
  (tmp_path / "out").write_text("a file")
  assert "is a file, not a folder" in fails(["train", str(config), "--check"], capsys)


def test_train_check_reads_the_prompt_files_folders_and_mesh_a_run_reads(tmp_path, capsys):
  """--check passed configs whose prompt file, rescoring heads or neural draft was missing, or whose mesh was
  malformed or did not fit the devices (found by a review): the run failed on them once it started."""
  config = tmp_path / "c.yaml"
  config.write_text(f"task: bpd\nout: {tmp_path / 'out'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  missing = tmp_path / "missing.jsonl"
  assert "not found: pass a JSONL file in Spec-Bench format as data.prompts=" in fails(
      ["train", str(config), "--check", f"data.prompts={missing}"], capsys)
  assert "Bad mesh 'foo'" in fails(["train", str(config), "--check", "mesh=foo"], capsys)
  assert "needs 9 devices" in fails(["train", str(config), "--check", "mesh=data=9"], capsys)
  assert cli.main(["train", str(config), "--check", "mesh=data=-1,model=1"]) == 0
  capsys.readouterr()
  config.write_text(f"task: cllm\nout: {tmp_path / 'lora'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  assert "as collect.prompts=" in fails(["train", str(config), "--check", f"collect.prompts={missing}"], capsys)
  config.write_text(f"task: rescore\nout: {tmp_path / 'rescore'}\n")
  assert "is not a folder of trained BPD heads (no config.json or heads.safetensors)" in fails(
      ["train", str(config), "--check", f"heads={tmp_path / 'none'}"], capsys)
  (tmp_path / "half").mkdir()  # a config without its weights (an export killed before them, or copied in part)
  (tmp_path / "half" / "config.json").write_text("{}")
  assert "(no heads.safetensors)" in fails(["train", str(config), "--check", f"heads={tmp_path / 'half'}"], capsys)
  assert "tune.neural_draft=" in fails(["train", str(config), "--check", f"tune.neural_draft={tmp_path / 'none'}"],
                                       capsys)
  assert cli.main(["train", str(config), "--check", "tune.neural_draft=layerskip"]) == 0


def test_train_check_makes_the_checks_a_run_made_before_loading_its_target(tmp_path, capsys):
  """--check passed a model.path or seq2seq data.tokenizer that does not exist, BPD settings that do not go together,
  and a resume whose settings differ from its checkpoints' (found by a README walk-through): a run refused each of
  them seconds later, once started."""
  from training.config import record_run_config
  from training.tasks import load_task_config

  config = tmp_path / "c.yaml"
  config.write_text(f"task: bpd\nout: {tmp_path / 'out'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  assert f"model.path='{tmp_path / 'none.gguf'}' does not exist: give a .gguf file or a Hugging Face" in fails(
      ["train", str(config), "--check", f"model.path={tmp_path / 'none.gguf'}"], capsys)
  (tmp_path / "empty").mkdir()  # a folder that is no model (it passed --check; the run refused it once started)
  assert f"model.path='{tmp_path / 'empty'}': " in (err := fails(
      ["train", str(config), "--check", f"model.path={tmp_path / 'empty'}"], capsys)) and "config.json" in err
  assert cli.main(["train", str(config), "--check", f"model.path={ASSETS / 't5_numbers'}"]) == 0  # a model folder
  gguf = Path(__file__).parent / "fixtures" / "llama_cpp_gguf" / "qwen3-f32.gguf"  # a file: no folder checks
  assert cli.main(["train", str(config), "--check", f"model.path={gguf}"]) == 0
  capsys.readouterr()
  # A damaged model file passed --check too (the run refused it once loading): a cut-short copy, a file of junk.
  (tmp_path / "cut.gguf").write_bytes(gguf.read_bytes()[:4096])
  (tmp_path / "junk.gguf").write_bytes(b"not a model" * 100)
  cut = f"model.path={tmp_path / 'cut.gguf'}"
  assert "is not a readable GGUF file" in fails(["train", str(config), "--check", cut], capsys)
  assert "model.path=" in (err := fails(["train", str(config), "--check", f"model.path={tmp_path / 'junk.gguf'}"],
                                        capsys)) and "download or convert it again" in err
  assert "use train.targets=tokens there" in fails(
      ["train", str(config), "--check", "train.objective=joint", "train.targets=teacher"], capsys)
  assert "apply to train.objective=joint only" in fails(["train", str(config), "--check", "train.base_lr_scale=0.5"],
                                                        capsys)
  # Checkpoints of a run with train.seed=0: a resume with another seed is refused, one with more steps is not.
  cfg, _ = load_task_config(str(config))
  record_run_config(cfg, tmp_path / "ckpt")
  (tmp_path / "ckpt" / "250").mkdir()
  assert "holds checkpoints of a run with other settings (train.seed: 0 there, 1 now)" in fails(
      ["train", str(config), "--check", "train.seed=1"], capsys)
  assert cli.main(["train", str(config), "--check", "train.steps=5000"]) == 0
  capsys.readouterr()
  config.write_text(f"task: seq2seq\nout: {tmp_path / 'draft'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ck2'}\n")
  assert "data.tokenizer: no tokenizer.json at" in fails(
      ["train", str(config), "--check", f"data.tokenizer={tmp_path / 'none'}"], capsys)
  assert cli.main(["train", str(config), "--check", f"data.tokenizer={ASSETS / 't5_numbers'}"]) == 0


def test_train_check_passes_a_seq2seq_resume_whose_tokenizer_folder_is_gone(tmp_path, capsys):
  """A resumed seq2seq run takes the tokenizer its checkpoint folder saved, not `data.tokenizer`'s folder (which may
  be gone since): the run resumed, and --check (and the run's own checks) must not refuse it."""
  import shutil

  from jaxspec.loading.tokenizer import Tokenizer
  from training import seq2seq
  from training.tasks import load_task_config

  target = tmp_path / "target"
  shutil.copytree(ASSETS / "t5_numbers", target)
  config = tmp_path / "c.yaml"
  config.write_text(f"task: seq2seq\nout: {tmp_path / 'draft'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ck'}\n"
                    f"data:\n  tokenizer: {target}\n")
  cfg, _ = load_task_config(str(config))
  seq2seq._save_tokenizer(Tokenizer.from_tokenizer_json(target / "tokenizer.json"), tmp_path / "ck" / "tokenizer",
                          seq2seq.built_with(cfg))
  shutil.rmtree(target)
  assert cli.main(["train", str(config), "--check"]) == 0
  capsys.readouterr()
  assert "data.tokenizer: no tokenizer.json at" in fails(["train", str(config), "--check", "data.vocab_size=300"],
                                                         capsys)  # another tokenizer than the saved one: read again


def test_a_list_setting_given_one_value_shows_the_bracket_form(tmp_path, capsys):
  """`data.extra_dataset_dirs=/tmp/x` said only "must be a list of str, got '/tmp/x' (str)": how an override writes a
  list (YAML's brackets) was nowhere. A list given in brackets is checked item by item as before."""
  config = tmp_path / "c.yaml"
  config.write_text(f"task: bpd\nout: {tmp_path / 'out'}\ntrain:\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
  err = fails(["train", str(config), "--check", f"data.extra_dataset_dirs={tmp_path}"], capsys)
  assert f"an override writes a list in brackets, data.extra_dataset_dirs=[{tmp_path}]" in err
  err = fails(["train", str(config), "--check", "data.extra_dataset_dirs=[a,"], capsys)  # not [[a,]: YAML's fault
  assert err.endswith("got '[a,' (str): '[a,' is not a YAML list or mapping (an unclosed bracket or quote?)\n")
  for text in ("{a", " [a,"):  # a mapping's brace, and a bracket after a space, are YAML's fault too
    err = fails(["train", str(config), "--check", f"data.extra_dataset_dirs={text}"], capsys)
    assert err.endswith(f"{text!r} is not a YAML list or mapping (an unclosed bracket or quote?)\n"), err
  config.write_text(f"task: rescore\nout: {tmp_path / 'rescore'}\n")
  assert "tune.weights=[0.5]" in fails(["train", str(config), "--check", "tune.weights=0.5"], capsys)
  err = fails(["train", str(config), "--check", "tune.weights=[a]"], capsys)
  assert "'tune.weights[0]' must be a finite float" in err and "brackets" not in err
  err = fails(["train", str(config), "--check", "tune.weights=abc"], capsys)  # [abc] would be refused too
  assert "'tune.weights' must be a" in err and "brackets" not in err
  config.write_text(f"task: rescore\nout: {tmp_path / 'rescore'}\ntune:\n  weights: 0.5\n")
  assert "brackets" not in fails(["train", str(config), "--check"], capsys)  # a file's YAML is not an override


# ---- generate's flags --------------------------------------------------------------------------------------------

def test_top_k_and_top_p_at_temperature_0_are_said_to_do_nothing(tiny_target, capsys):
  assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--top-k", "5", "--top-p", "0.5"]) == 0
  err = capsys.readouterr().err
  assert ("jaxspec: --top-k and --top-p filter sampling only: at --temperature 0 (the default) decoding is greedy and "
          "ignores them.") in err
  assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--top-p", "0.5"]) == 0
  assert "--top-p filters sampling only: at --temperature 0 (the default) decoding is greedy and ignores it." in (
      capsys.readouterr().err)
  assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--top-k", "5", "--temperature", "1"]) == 0
  assert "sampling only" not in capsys.readouterr().err


def test_generate_names_its_flags(tiny_target, capsys):
  err = fails(["generate", "--prompt", "w" * 500, "--max-new-tokens", "20"], capsys)
  assert ("needs 520 cache slots, more than the cache length 512: shorten --prompt or lower --max-new-tokens (to 12 "
          "or fewer).") in err
  err = fails(["generate", "--prompt", "w" * 600, "--max-new-tokens", "4"], capsys)  # no answer fits: no such advice
  assert "needs 604 cache slots, more than the cache length 512: shorten --prompt." in err
  err = fails(["generate", "--prompt", "w" * 50, "--max-len", "64"], capsys)
  assert ("shorten --prompt, lower --max-new-tokens (to 14 or fewer), or raise --max-len (up to the model's context "
          "length, 512)") in err
  err = fails(["generate", "--prompt", "w" * 600, "--max-new-tokens", "4", "--context", "512"], capsys)
  assert ("needs 604 cache slots, more than the cache length 512: shorten --prompt or load the model with a longer "
          "--context than 512 where its file allows one (leave the option out for the file's own context).") in err
  err = fails(["generate", "--prompt", "hi", "--max-len", "1000"], capsys)
  assert "--max-len 1000 is more than the model's context length (512 tokens)" in err
  err = fails(["generate", "--prompt", "hi", "--method", "greedy,bpd"], capsys)
  assert "--method 'greedy,bpd' names several methods: generate runs one (a comma list is for `jaxspec bench" in err
  err = fails(["generate", "--prompt", "hi", "--temperature", "1", "--top-k", "300"], capsys)
  assert "--top-k 300 is more than the model's vocabulary (256 tokens)" in err
  for command in (["generate", "--prompt", "hi", "--top-p", "2"], ["bench", "--top-p", "0", "--out", "unused"]):
    with pytest.raises(SystemExit) as e:  # argparse's usage error, like every other bad number
      cli.main(command)
    assert e.value.code == 2 and "argument --top-p: must be in (0, 1]" in capsys.readouterr().err
  assert not Path("unused").exists()


def test_text_that_encodes_to_no_tokens_is_said_so(tiny, monkeypatch, capsys):
  """Not "the prompt is empty": the user gave text, which this tokenizer has no tokens for."""
  class AsciiDigitsOnly(CharTokenizer):
    def encode(self, text, add_bos=None):
      return [1 + ord(c) for c in text if c.isdigit()]

  model, params = tiny
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda path=None, **kw: (model, params, AsciiDigitsOnly()))
  err = fails(["generate", "--prompt", "xyz"], capsys)
  assert "encodes to no tokens with this model's tokenizer" in err


def test_a_sampled_run_is_not_labelled_greedy(tiny_target, capsys):
  assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0.8",
                   "--top-p", "0.9"]) == 0
  err = capsys.readouterr().err
  assert err.startswith("[sampling, temperature 0.8, top-p 0.9: 3 tokens in "), err
  assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "3", "--method", "lookup"]) == 0
  assert capsys.readouterr().err.startswith("[lookup: 3 tokens in ")


def test_generate_takes_the_t5x_checkout_its_message_names(tiny_target, tmp_path, capsys):
  err = fails(["generate", "--prompt", "hi", "--method", "t5x-greedy", "--t5x-src", str(tmp_path)], capsys)
  assert f"{tmp_path} is not a T5X checkout" in err


def test_a_file_that_is_no_gguf_says_so(tmp_path, capsys):
  (tmp_path / "notes.md").write_text("# not a model\n")
  err = fails(["generate", "--prompt", "hi", "--model", str(tmp_path / "notes.md")], capsys)
  assert "is not a GGUF file: it does not begin with the GGUF magic bytes. Pass a .gguf model file" in err


def test_the_method_help_says_which_methods_differ_from_greedy():
  sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["generate"]
  text = " ".join(sub.format_help().split())
  assert "cllm" in text and "approx" in text and "all but approximate" not in text


def test_distributed_goes_after_the_command_name():
  """As README.md says: anywhere after `train` (overrides may come before and after it), not before the command."""
  for argv in (["train", "--distributed", "c.yaml", "a=1", "b=2"], ["train", "c.yaml", "a=1", "b=2", "--distributed"],
               ["train", "c.yaml", "a=1", "--distributed", "b=2"], ["train", "c.yaml", "--distributed", "a=1", "b=2"]):
    args = cli.parse_args(argv)
    assert args.distributed and args.config == "c.yaml" and args.overrides == ["a=1", "b=2"], argv
  for argv in (["--distributed", "train", "c.yaml"], ["train", "c.yaml", "--distributed", "a=1", "--bogus"],
               ["train", "c.yaml", "--distributed", "a=1", "stray"], ["generate", "--prompt", "x", "a=1"]):
    with pytest.raises(SystemExit) as e:
      cli.parse_args(argv)
    assert e.value.code == 2, argv


def test_a_leading_tilde_the_shell_leaves_is_expanded_in_paths(monkeypatch, tmp_path):
  """`--model=~/m`, `--out=~/o` and `spec:draft=~/d`: the shell expands a leading ~ of a word only, so these reached
  jaxspec as is; "No model at '~/m'", and bench wrote its results into a folder named ./~/o. They are expanded, as
  train's config paths are (a ~ elsewhere in a path is a name)."""
  from jaxspec.bench.methods import parse_method

  monkeypatch.setenv("HOME", str(tmp_path))
  args = cli.parse_args(["generate", "--prompt-file=~/p.txt", "--model=~/m", "--t5x-src=~/t5x"])
  assert (args.prompt_file, args.model, args.t5x_src) == (f"{tmp_path}/p.txt", f"{tmp_path}/m", f"{tmp_path}/t5x")
  args = cli.parse_args(["bench", "--prompts=~/p.jsonl", "--out=~/o", "--model", "a~b"])
  assert (args.prompts, args.out, args.model) == (f"{tmp_path}/p.jsonl", f"{tmp_path}/o", "a~b")
  label, name, opts = parse_method("spec:draft=~/d:gamma=4")
  assert label == "spec:draft=~/d:gamma=4" and opts == {"draft": f"{tmp_path}/d", "gamma": "4"}


def test_an_unknown_option_is_named_by_the_commands_own_usage(capsys):
  """A misspelled option after a command shows that command's usage (the options it takes), not the top level's."""
  for argv, command in ((["train", "c.yaml", "a=1", "--distributd"], "train"),
                        (["generate", "--prompt", "x", "--max-new-tokenz", "4"], "generate")):
    with pytest.raises(SystemExit) as e:
      cli.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: jaxspec {command} " in err, err
    assert f"jaxspec {command}: error: unrecognized arguments: " in err, err


def test_a_misspelled_option_is_named_not_taken_for_a_missing_prompt(capsys):
  """`generate --promt x` said "one of the arguments --prompt --prompt-file is required": argparse checks the required
  group before it returns the unknown arguments. The unknown option is named, with the one it is close to."""
  for argv, said in ((["generate", "--promt", "x"],
                      "unrecognized arguments: --promt x (--promt: did you mean --prompt?)"),
                     (["generate", "--prompt", "x", "--max-tokens", "4"],
                      "(--max-tokens: did you mean --max-new-tokens?)"),
                     (["bench", "--catagories", "qa"], "(--catagories: did you mean --categories?)"),
                     (["generate"], "jaxspec generate: error: one of the arguments --prompt --prompt-file is required"),
                     (["generate", "--prompt", "x", "--prompt-file", "f"], "not allowed with argument --prompt")):
    with pytest.raises(SystemExit) as e:
      cli.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err, err
    if argv[0] == "generate":  # the usage line still shows the group as required
      assert "(--prompt PROMPT | --prompt-file PATH)" in err, err
  assert cli.parse_args(["generate", "--prompt-file", "-"]).prompt_file == "-"


def test_list_methods_says_it_lists_the_options_too(capsys):
  """`bench --help` said --list-methods prints "the method names"; it prints each method's options as well."""
  with pytest.raises(SystemExit):
    cli.parse_args(["bench", "--help"])
  assert "print the methods and their options, and exit" in " ".join(capsys.readouterr().out.split())
  assert cli.main(["bench", "--list-methods"]) == 0
  out = capsys.readouterr().out
  assert "\nbpd " in out and "k=  heads used" in out


def test_a_mesh_that_starts_with_minus_one_is_a_value(capsys):
  """README: a mesh may be written `2,4`, and -1 takes the devices left over; `--mesh -1,4` was refused by argparse
  ("--mesh: expected one argument"), which takes a value starting with "-" for an option."""
  assert cli.parse_args(["generate", "--mesh", "-1,4", "--prompt", "x"]).mesh == "-1,4"
  assert cli.parse_args(["bench", "--mesh", "-1,1", "--methods", "greedy"]).mesh == "-1,1"
  assert cli.parse_args(["generate", "--prompt", "x", "--mesh=-1,2"]).mesh == "-1,2"
  assert sharding.parse_mesh_shape("-1,4") == {"data": -1, "model": 4}
  # train's mesh is a config key: the option is unknown there, and the message says which key it is
  with pytest.raises(SystemExit):
    cli.parse_args(["train", "c.yaml", "--mesh", "-1,4"])
  assert "train takes it as the config key, mesh=VALUE" in capsys.readouterr().err


def test_an_option_before_the_command_says_where_it_goes(capsys):
  """argparse called `--distributed` unknown there (under a usage line listing it), and took a value for the command."""
  for argv, option, command in ((["--distributed", "train", "c.yaml"], "--distributed", "train"),
                                (["--max-new-tokens", "3", "generate", "--prompt", "x"], "--max-new-tokens",
                                 "generate"),
                                (["--mesh=data=2", "bench"], "--mesh", "bench")):
    with pytest.raises(SystemExit) as e:
      cli.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {option} goes after the command's name: jaxspec {command} " in err, err
  assert cli.parse_args(["generate", "--prompt", "train"]).prompt == "train"  # a command's name as a value is fine
  # The command named is one that takes the option, not an option's value that is a command's name.
  with pytest.raises(SystemExit):
    cli.parse_args(["--prompt-file", "bench", "generate"])
  assert "jaxspec generate --prompt-file ..." in capsys.readouterr().err
  for argv, said in ((["genrate", "--prompt", "train"], "invalid choice: 'genrate'"),  # argparse's own words
                     (["--prompt", "train"], "error: ")):
    with pytest.raises(SystemExit):
      cli.parse_args(argv)
    err = capsys.readouterr().err
    assert said in err and "goes after" not in err, err


def test_distributed_reads_the_process_layout_from_the_environment(monkeypatch):
  """Outside the clusters JAX detects, JAX_NUM_PROCESSES and JAX_PROCESS_ID (with JAX_COORDINATOR_ADDRESS, which
  JAX reads itself) say where this process stands; a value that is not a number is one clear line."""
  from jaxspec import sharding
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  sharding.initialize_distributed()
  assert calls == [{"num_processes": 4, "process_id": 3}]
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.delenv("JAX_PROCESS_ID")
  sharding.initialize_distributed()
  assert calls[-1] == {}  # left to JAX's own detection
  monkeypatch.setenv("JAX_PROCESS_ID", "first")
  with pytest.raises(InputError, match="JAX_PROCESS_ID='first' is not a whole number"):
    sharding.initialize_distributed()
  monkeypatch.delenv("JAX_PROCESS_ID")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "notahost")  # JAX's own error was "list index out of range"
  with pytest.raises(InputError, match="JAX_COORDINATOR_ADDRESS='notahost' is not host:port"):
    sharding.initialize_distributed()
  for bad in ("10.0.0.2:1234/x", "10.0.0.2:123456"):  # the whole value is host:port, not just a part of it
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", bad)
    with pytest.raises(InputError, match="is not host:port"):
      sharding.initialize_distributed()
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  sharding.initialize_distributed()
  assert calls[-1] == {}

# ---- what to do about heads, drafts and files ---------------------------------------------------------------------

def test_heads_of_another_width_name_the_option_and_the_shipped_ones(t5, monkeypatch, capsys):
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda path=None, **kw: t5)
  err = fails(["generate", "--prompt", "spell: 12", "--method", "bpd"], capsys)
  assert "d_model 576, this target's is 128" in err and "heads=FOLDER" in err
  assert "bpd_t5_numbers (for jaxspec/assets/t5_numbers)" in err and "task: bpd" in err


def test_too_many_heads_says_how_many_there_are_and_how_to_train_more(tiny_target, capsys):
  err = fails(["generate", "--prompt", "hi", "--method", "bpd:k=12"], capsys)
  assert "k=12 asks for 12 heads" in err and "use k=8 or fewer" in err
  assert "jaxspec train configs/bpd_smollm2.yaml heads.num_heads=12" in err and "then heads=DIR" in err
  # Past the most heads a BPD model has, nothing is advised to train: the option is refused when it is read.
  err = fails(["generate", "--prompt", "hi", "--method", "bpd:k=20"], capsys)
  assert "k='20' of 'bpd' must be a whole number in 1..16" in err and "train" not in err
  from jaxspec.models.bpd import load_bpd
  with pytest.raises(ModelLoadError, match=r"has 6: ask for 1 to 6, or train more \(heads.num_heads"):
    load_bpd(T5_HEADS, 7)


def test_a_corrupt_weights_file_says_to_get_it_again(tmp_path, tiny):
  from jaxspec.loading import load_model
  from jaxspec.loading.hf import save_hf
  model, params = tiny
  save_hf(str(tmp_path), model, params)
  (tmp_path / "model.safetensors").write_bytes(b"\x07" * 100)
  with pytest.raises(ModelLoadError, match="truncated or corrupt: download or export it again"):
    load_model(str(tmp_path))


def test_a_bad_draft_folder_names_the_draft_option(tiny_target, tmp_path, capsys):
  err = fails(["generate", "--prompt", "hi", "--method", f"spec:draft={tmp_path}"], capsys)
  assert f"draft={tmp_path} is a folder without config.json" in err and "model.safetensors" in err
  assert "pass a Hugging Face model folder" not in err  # the --model wording


def test_a_bad_draft_is_the_method_s_problem_as_a_bad_heads_folder_is(tiny, tmp_path):
  """Building the method says Unavailable (reported for that method), not a load error that ends the bench."""
  from jaxspec.bench import BenchConfig, run_bench
  from jaxspec.loading.hf import save_hf
  model, params = tiny
  ctx = BenchContext(model, params, CharTokenizer())
  empty, corrupt, missing = tmp_path / "empty", tmp_path / "corrupt", tmp_path / "missing"
  empty.mkdir()
  save_hf(str(corrupt), model, params)
  (corrupt / "model.safetensors").write_bytes(b"\x07" * 100)
  for folder in (empty, corrupt, missing):
    for method in (f"spec:draft={folder}", f"bpd:heads={folder}"):
      with pytest.raises(Unavailable):
        build(ctx, method)
  # Named methods must all run: the bench stops before decoding anything, naming the method and its draft= option.
  cfg = BenchConfig(methods=("greedy", f"spec:draft={empty}"), limit=1, categories=("qa",), max_new_tokens=4,
                    out=str(tmp_path / "out"))
  with pytest.raises(InputError) as e:
    run_bench(cfg, model, params, CharTokenizer(), progress=False, require_all=True)
  assert f"Cannot run spec:draft={empty}: draft={empty} is a folder without config.json" in str(e.value)


def test_heads_for_another_model_are_the_method_s_problem_and_name_the_option(tiny, tmp_path):
  """Heads whose ids are past the target's vocabulary (the shipped SmolLM2 heads on a 576-wide model of another
  tokenizer), or of the right shapes but trained for another model (told by the embedding fingerprint their config
  records), make the method unavailable (a bench of every method goes on), with the folder and the option named."""
  import jax
  import numpy as np

  from jaxspec.models.bpd import BPDConfig, BPDModel, load_bpd, save_bpd
  from jaxspec.models.draft import embed_fingerprint
  from tests.conftest import make_tiny

  model, params = tiny
  d = model.cfg.d_model
  subset = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8, vocab_subset=4))
  save_bpd(tmp_path / "far", subset, subset.init_params(jax.random.key(1), vocab_ids=np.array([300, 301, 302, 303])))
  ctx = BenchContext(model, params, CharTokenizer())
  with pytest.raises(Unavailable, match=f"the heads in {tmp_path / 'far'}: These BPD heads predict token ids up to "
                     r"303, past this target's vocabulary of 256 .* Pass heads=FOLDER with heads trained for this"):
    build(ctx, f"bpd:heads={tmp_path / 'far'}")
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8))
  save_bpd(tmp_path / "mine", bpd, bpd.init_params(jax.random.key(0)),
           meta={"target": {"embed_fingerprint": embed_fingerprint(params)}})
  build(ctx, f"bpd:heads={tmp_path / 'mine'}")  # their own target
  load_bpd(tmp_path / "mine", target_params=params)
  other, other_params = make_tiny(1)  # the same shapes, other weights
  with pytest.raises(Unavailable, match="trained for a target whose embedding has fingerprint bf16-crc32:.*this "
                     "target's is bf16-crc32:.*another model.*Use heads trained for this one, with heads=FOLDER"):
    build(BenchContext(other, other_params, CharTokenizer()), f"bpd:heads={tmp_path / 'mine'}")
  with pytest.raises(ModelLoadError, match="trained for a target whose embedding has fingerprint"):
    load_bpd(tmp_path / "mine", target_params=other_params)
  load_bpd(tmp_path / "far", target_params=other_params)  # heads saved without a fingerprint are not checked


def test_the_default_draft_on_a_t5_target_names_the_shipped_t5_draft(t5):
  model, params, tok = t5
  with pytest.raises(Unavailable, match=r"draft=.*draft_smollm2: .*this target is an encoder-decoder \(T5: its "
                                        r"table is params\['shared'\]\), not a decoder-only model: .* Give a draft "
                                        r"trained for this one; a shipped draft for this target's vocabulary: "
                                        r"draft=.*jaxspec/assets/t5_numbers_draft$"):
    build(BenchContext(model, params, tok), "spec")
  with pytest.raises(Unavailable, match=r"trained for this one; a shipped"):  # no other method's option named
    build(BenchContext(model, params, tok), "opt-tree:drafter=draft")
  build(BenchContext(model, params, tok), f"spec:draft={ASSETS / 't5_numbers_draft'}")


def test_a_shipped_draft_that_fails_is_not_offered_in_its_own_place(t5, monkeypatch):
  """The hint names another shipped draft for this target's vocabulary, never the one that just failed."""
  import jaxspec.decoding.speculative as speculative

  def refuse(target, draft):
    raise InputError("refused here")

  monkeypatch.setattr(speculative, "vocab_check", refuse)
  model, params, tok = t5
  with pytest.raises(Unavailable, match=r"draft=.*t5_numbers_draft: refused here$"):
    build(BenchContext(model, params, tok), f"spec:draft={ASSETS / 't5_numbers_draft'}")


def test_a_draft_of_another_model_names_a_shipped_draft_only_where_it_fits_this_one(default_model, tmp_path):
  """Your own model with the default model's tokenizer: a draft of another target was refused with "a shipped draft
  for this target's vocabulary: draft=.../draft_smollm2", which was distilled for the default model and is refused
  too. The shipped distilled drafts are named only for the target they were trained for."""
  from jaxspec.models.draft import save_draft
  from tests.conftest import make_tiny
  from training.draft import init_draft

  vocab = default_model[0].vocab_size
  model, params = make_tiny(0, vocab_size=vocab)
  other, other_params = make_tiny(1, vocab_size=vocab)  # the same shapes and tokenizer, other weights
  save_draft(tmp_path / "d", *init_draft(model, params, 1), dtype="float32")
  with pytest.raises(Unavailable) as e:
    build(BenchContext(other, other_params, default_model[2]), f"spec:draft={tmp_path / 'd'}")
  assert "trained for a target whose embedding has fingerprint" in str(e.value)
  assert "draft_smollm2" not in str(e.value) and "a shipped draft" not in str(e.value)
  with pytest.raises(Unavailable, match=r"a shipped draft for this target's vocabulary: draft=.*draft_smollm2$"):
    build(BenchContext(*default_model), f"spec:draft={tmp_path / 'd'}")  # the default model: it fits


def test_the_shipped_heads_record_their_target(default_model, t5):
  """The shipped heads carry the fingerprint of their own target (SmolLM2's equals its distilled draft's; T5's
  covers the shared embedding), and each refuses the other's."""
  import json

  from jaxspec.models.bpd import check_heads_target, target_fingerprint
  from jaxspec.models.draft import embed_fingerprint

  smollm2, t5_params = default_model[1], t5[1]
  for folder, params, other in (("bpd_smollm2", smollm2, t5_params), ("bpd_t5_numbers", t5_params, smollm2)):
    check_heads_target(ASSETS / folder, params)
    with pytest.raises(ModelLoadError, match="trained for another model"):
      check_heads_target(ASSETS / folder, other)
    assert json.loads((ASSETS / folder / "config.json").read_text())["target"]["embed_fingerprint"] == \
        target_fingerprint(params)
  assert target_fingerprint(smollm2) == embed_fingerprint(smollm2)
  shared_only = {"shared": t5_params["shared"]}
  assert target_fingerprint(shared_only) != target_fingerprint({"shared": {"embedding": t5_params["shared"][
      "embedding"] * 2}})  # a tied T5's fingerprint is its shared embedding's


def test_layer_skipping_a_one_layer_target_says_there_is_nothing_to_skip(tmp_path):
  from jaxspec.decoding.speculative import layerskip_draft
  from tests.conftest import make_tiny

  model, params = make_tiny(0, n_layers=1)
  with pytest.raises(InputError, match="this target has 1 layer, so there is nothing to skip"):
    layerskip_draft(model, params, 1)
  ctx = BenchContext(model, params, CharTokenizer())
  for method in ("layerskip", "opt-tree:drafter=layerskip"):
    with pytest.raises(Unavailable, match="this target has 1 layer, so there is nothing to skip"):
      build(ctx, method)
  two, two_params = make_tiny(0)  # 2 layers: the option the user wrote is the one named, with the range
  for method in ("layerskip:layers=5", "opt-tree:drafter=layerskip:layers=5"):
    with pytest.raises(InputError, match=r"^Method option layers=5: A layer-skip draft keeps 1 to 1 of the target's "
                                         r"2 layers, not 5\.$") as e:
      build(BenchContext(two, two_params, CharTokenizer()), method)
    assert "n_layers" not in str(e.value)


def test_a_rescorer_brings_its_heads_and_names_rescore_for_another_vocabulary(tiny, tmp_path):
  """bpd-ngram / bpd-neural with rescore=DIR use the heads that rescorer was tuned with (recorded in its config),
  not the shipped ones; an n-gram LM over another vocabulary names the option to change."""
  from jaxspec.models.ngram import build_ngram, save_ngram

  model, params = tiny
  ctx = BenchContext(model, params, CharTokenizer())
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, model.vocab_size)
  gone = tmp_path / "heads_gone"
  save_ngram(tmp_path / "rescore", lm, tables, meta={"tuned": {"k": 2, "heads": str(gone)}})
  with pytest.raises(Unavailable, match=f"was tuned with the heads in {gone} \\(its config.json\\), which are not "
                     "there: pass heads=FOLDER"):
    build(ctx, f"bpd-ngram:rescore={tmp_path / 'rescore'}")
  import jax

  from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  save_bpd(tmp_path / "heads", bpd, bpd.init_params(jax.random.key(0)))
  build(ctx, f"bpd-ngram:rescore={tmp_path / 'rescore'}:heads={tmp_path / 'heads'}")  # heads= overrides them
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, 512)
  save_ngram(tmp_path / "other", lm, tables, meta={"tuned": {"k": 2}})
  with pytest.raises(Unavailable, match="has a vocabulary of 512, the target 256: pass rescore=FOLDER"):
    build(ctx, f"bpd-ngram:rescore={tmp_path / 'other'}")


def test_a_rescorer_of_another_model_names_a_rescorer_for_this_one_not_heads(tiny, tmp_path):
  """rescore=DIR built for another model of the same tokenizer: its recorded heads are refused by fingerprint, and
  the message said "Use heads trained for this one, with heads=FOLDER", which would leave the other model's n-gram LM
  and tuned weights in place. It names the rescorer and a rescorer built for this model."""
  import jax

  from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
  from jaxspec.models.draft import embed_fingerprint
  from jaxspec.models.ngram import build_ngram, save_ngram
  from tests.conftest import make_tiny

  model, params = tiny
  other, other_params = make_tiny(1)  # the same shapes, other weights
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  save_bpd(tmp_path / "heads", bpd, bpd.init_params(jax.random.key(0)),
           meta={"target": {"embed_fingerprint": embed_fingerprint(params)}})
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, model.vocab_size)
  save_ngram(tmp_path / "rescore", lm, tables, meta={"tuned": {"k": 2, "heads": str(tmp_path / "heads")}})
  build(BenchContext(model, params, CharTokenizer()), f"bpd-ngram:rescore={tmp_path / 'rescore'}")  # its own model
  # (opt-tree's rescored tree reads the rescorer's heads as bpd-ngram does, and said "with heads=FOLDER")
  for method in ("bpd-ngram", "opt-tree:nodes=4:depth=2"):
    with pytest.raises(Unavailable) as e:
      build(BenchContext(other, other_params, CharTokenizer()), f"{method}:rescore={tmp_path / 'rescore'}")
    assert f"The BPD heads in {tmp_path / 'heads'} were trained for a target whose embedding" in str(e.value)
    assert f"The rescorer in {tmp_path / 'rescore'} was tuned with them, for that model: pass rescore=FOLDER" in str(
        e.value)
    assert "heads=FOLDER" not in str(e.value) and "Use heads trained for this one" not in str(e.value)
  with pytest.raises(Unavailable, match="Use heads trained for this one, with heads=FOLDER$"):  # heads= given
    build(BenchContext(other, other_params, CharTokenizer()),
          f"bpd-ngram:rescore={tmp_path / 'rescore'}:heads={tmp_path / 'heads'}")


def test_a_rescorer_that_names_no_heads_leaves_the_heads_to_heads_option(tiny, tmp_path, monkeypatch):
  """A rescorer that recorded no heads runs with the default ones: heads of another model are then the heads
  option's problem (heads=FOLDER), not the rescorer's."""
  import jax

  import jaxspec.bench.methods as methods
  from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
  from jaxspec.models.draft import embed_fingerprint
  from jaxspec.models.ngram import build_ngram, save_ngram
  from tests.conftest import make_tiny

  model, params = tiny
  other, other_params = make_tiny(1)
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  save_bpd(tmp_path / "heads", bpd, bpd.init_params(jax.random.key(0)),
           meta={"target": {"embed_fingerprint": embed_fingerprint(params)}})
  monkeypatch.setattr(methods, "DEFAULT_BPD_HEADS", tmp_path / "heads")
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, model.vocab_size)
  save_ngram(tmp_path / "rescore", lm, tables, meta={"tuned": {"k": 2}})
  with pytest.raises(Unavailable) as e:
    build(BenchContext(other, other_params, CharTokenizer()), f"bpd-ngram:rescore={tmp_path / 'rescore'}")
  assert str(e.value).endswith(", with heads=FOLDER") and "The rescorer in" not in str(e.value)


def test_the_shipped_rescorer_and_heads_on_another_model_name_both_options(tiny, tmp_path, monkeypatch):
  """bpd-ngram (or bpd-neural, opt-tree:rescore=default) on another model than the default, with neither heads= nor
  rescore=: the shipped heads and the shipped rescorer, tuned with them, are both the default model's. The error said
  only "pass heads=FOLDER" (or, over another vocabulary, only rescore=), leaving the other part of another model in
  place. Here a rescorer of the tiny target's vocabulary stands in for the shipped one, as it would for a model of
  SmolLM2's tokenizer; a rescorer the user names, or heads= given, keep their own messages."""
  import shutil

  import jax

  import jaxspec.bench.methods as methods
  from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
  from jaxspec.models.draft import embed_fingerprint
  from jaxspec.models.ngram import build_ngram, save_ngram
  from tests.conftest import make_tiny

  model, params = tiny
  ctx = BenchContext(model, params, CharTokenizer())
  both = "pass heads=FOLDER and rescore=FOLDER with BPD heads and a rescorer built for this model"
  # The real shipped rescorer (SmolLM2's vocabulary) on the tiny target: its vocabulary is the first check.
  for method in ("bpd-ngram", "bpd-neural", "opt-tree:rescore=default"):
    with pytest.raises(Unavailable, match="has a vocabulary of 49152, the target 256: " + both):
      build(ctx, method)
  with pytest.raises(Unavailable, match="the target 256: pass rescore=FOLDER with a rescorer built for this model "
                                        r"\(a `task: rescore`"):
    build(ctx, f"bpd-ngram:heads={tmp_path}")  # heads= given: only the rescorer is left to change
  # A stand-in of the target's vocabulary: then the shipped heads (d_model 576) are what does not fit.
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, model.vocab_size)
  save_ngram(tmp_path / "shipped_rescore", lm, tables, meta={"tuned": {"k": 2}})
  monkeypatch.setattr(methods, "DEFAULT_RESCORE", tmp_path / "shipped_rescore")
  for method in ("bpd-ngram", "bpd-neural", "opt-tree:rescore=default:nodes=4:depth=2"):
    with pytest.raises(Unavailable, match="d_model 576, this target's is 32: " + both):
      build(ctx, method)
  # Heads of the target's width, trained for another model (its embedding fingerprint): both are named again.
  other, other_params = make_tiny(1)
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  save_bpd(tmp_path / "heads", bpd, bpd.init_params(jax.random.key(0)),
           meta={"target": {"embed_fingerprint": embed_fingerprint(other_params)}})
  monkeypatch.setattr(methods, "DEFAULT_BPD_HEADS", tmp_path / "heads")
  with pytest.raises(Unavailable) as e:
    build(ctx, "bpd-ngram")
  assert "were trained for a target whose embedding" in str(e.value) and both[1:] in str(e.value)
  assert "with heads=FOLDER" not in str(e.value)
  # A rescorer the user names, recording no heads, leaves the heads to heads= (as before).
  shutil.copytree(tmp_path / "shipped_rescore", tmp_path / "user_rescore")
  with pytest.raises(Unavailable, match="Use heads trained for this one, with heads=FOLDER$"):
    build(ctx, f"bpd-ngram:rescore={tmp_path / 'user_rescore'}")


def test_a_rescorer_s_recorded_layers_are_not_called_a_method_option(tiny, tmp_path):
  """bpd-neural with a rescorer tuned on a deeper target's layer-skip draft (neural_layers=5 for a 2-layer one):
  the error is the draft's, not "Method option layers=5", which the user never wrote."""
  import jax

  from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
  from jaxspec.models.ngram import build_ngram, save_ngram

  model, params = tiny
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  save_bpd(tmp_path / "heads", bpd, bpd.init_params(jax.random.key(0)))
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, model.vocab_size)
  save_ngram(tmp_path / "rescore", lm, tables, meta={"tuned": {"k": 2, "heads": str(tmp_path / "heads"),
                                                               "neural_lm": "layerskip", "neural_layers": 5}})
  ctx = BenchContext(model, params, CharTokenizer())
  with pytest.raises(InputError, match=r"^A layer-skip draft keeps 1 to 1 of the target's 2 layers, not 5"):
    build(ctx, f"bpd-neural:rescore={tmp_path / 'rescore'}")
  with pytest.raises(InputError, match=r"^Method option layers=5: A layer-skip draft"):
    build(ctx, f"bpd-neural:rescore={tmp_path / 'rescore'}:layers=5")


def test_the_command_line_prints_sharding_fallbacks(capsys):
  """A replicated dimension changes what a mesh buys: the CLI shows the sharding's INFO records on stderr, once each
  however often `main` runs (tests and library callers run it many times in one process: a handler added at each
  call printed each record once per call)."""
  import logging
  import sys

  from jaxspec import cli, sharding

  log, root = logging.getLogger("jaxspec.sharding"), logging.getLogger()
  handlers, level, propagate = list(log.handlers), log.level, log.propagate
  root_handler = logging.StreamHandler(sys.stderr)  # as when a library has configured the root logger (under train)
  root_handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
  root.addHandler(root_handler)
  try:
    for h in handlers:
      log.removeHandler(h)
    cli._show_sharding_choices()
    cli._show_sharding_choices()  # as a second run of `main` does
    sharding._note_fallback("heads (9) do not divide model=4: replicated (test)")
    err = capsys.readouterr().err
    assert "jaxspec: sharding: heads (9) do not divide model=4" in err
    assert err.count("heads (9) do not divide") == 1  # once, not again through the root logger
  finally:
    root.removeHandler(root_handler)
    for h in list(log.handlers):
      log.removeHandler(h)
    for h in handlers:
      log.addHandler(h)
    log.setLevel(level)
    log.propagate = propagate


# ---- the edges of each rule ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,dest,value", [
    (["--max-new-tokens", "1"], "max_new_tokens", 1),
    (["--top-k", "0"], "top_k", 0),  # "0: no top-k filter"
    (["--temperature", "0"], "temperature", 0.0),  # "0: greedy"
    (["--temperature", "1e6"], "temperature", 1e6),  # "at most 1e6"
    (["--top-p", "1"], "top_p", 1.0),  # "(0, 1]"
    (["--seed", str(2 ** 62 - 1)], "seed", 2 ** 62 - 1),  # "less than 2**62"
    (["--seed", str(1 - 2 ** 62)], "seed", 1 - 2 ** 62),
])
def test_the_edge_values_each_rule_names_are_accepted(flags, dest, value):
  """The values each flag's own rule allows at its edge ("must be >= 0 (0: no top-k filter)", "(0, 1]", ...) parse:
  the defaults (0 for --top-k and --temperature, 1 for --top-p) never pass through the parsers, so a rule that
  refused them went unnoticed."""
  args = cli.parse_args(["generate", "--prompt", "x", *flags])
  assert getattr(args, dest) == value and type(getattr(args, dest)) is type(value)


@pytest.mark.parametrize("flags,message", [
    (["--seed", str(2 ** 62)], "less than 2**62"),
    (["--seed", str(-2 ** 62)], "greater than -2**62"),
    (["--temperature", "inf"], "must be a finite number >= 0"),  # said as not finite, not as "at most 1e6"
    (["--temperature", "1000001"], "must be at most 1e6"),
])
def test_just_past_the_edge_is_refused(flags, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.parse_args(["generate", "--prompt", "x", *flags])
  assert e.value.code == 2 and message in capsys.readouterr().err


def _fits(n_prompt, context_is_limit=True, **flags):
  """`generate`'s checks (`cli._check_fits`) for a decoder-only model of 256 tokens and a 512-token context."""
  import argparse
  import types

  model = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=256, max_seq_len=512),
                                context_is_limit=context_is_limit)
  args = argparse.Namespace(**{"temperature": 0.0, "top_k": 0, "max_len": None, "max_new_tokens": 16,
                               "prompt_file": None, **flags})
  cli._check_fits(args, model, n_prompt)


def test_what_fits_exactly_is_accepted():
  """The checks refuse what does not fit, and nothing that does: a cache filled to its last slot, --max-len at the
  context length, --top-k of the whole vocabulary; greedy decoding, which applies no top-k filter, ignores --top-k."""
  _fits(500, max_new_tokens=12)  # 512 slots of 512
  _fits(50, max_len=64, max_new_tokens=14)
  _fits(10, max_len=512)
  _fits(10, temperature=1.0, top_k=256)
  _fits(10, temperature=0.0, top_k=1000)
  with pytest.raises(InputError, match="needs 513 cache slots, more than the cache length 512"):
    _fits(500, max_new_tokens=13)
  with pytest.raises(InputError, match="--top-k 257 is more than"):
    _fits(10, temperature=1.0, top_k=257)
  with pytest.raises(InputError, match="--max-len 513 is more than"):
    _fits(10, max_len=513)


def test_a_prompt_that_fills_the_cache_gets_no_advice_to_lower_new_tokens():
  """A prompt of exactly the cache's length leaves no slot for any answer: "lower --max-new-tokens (to 0 or fewer)"
  is no fix (--max-new-tokens must be >= 1)."""
  with pytest.raises(InputError) as e:
    _fits(512, max_new_tokens=1)
  assert str(e.value).endswith("more than the cache length 512: shorten --prompt."), e.value
  with pytest.raises(InputError) as e:  # a context that is not a hard limit: --max-len may go past it
    _fits(512, context_is_limit=False, max_new_tokens=1)
  assert str(e.value).endswith(": shorten --prompt or raise --max-len."), e.value


@pytest.mark.parametrize("flags,message", [(["--methods", " , "], "--methods names no method"),
                                           (["--categories", ","], "--categories names no category")])
def test_a_list_of_no_names_is_refused_before_the_bench_runs(flags, message, monkeypatch, capsys, tmp_path):
  """Not an empty tuple handed on (which the bench reads as "nothing to run", or as no filter)."""
  monkeypatch.setattr("jaxspec.bench.run_bench", lambda *a, **k: pytest.fail("the list is checked first"))
  assert message in fails(["bench", "--out", str(tmp_path / "o"), *flags], capsys)


def test_help_before_a_command_is_the_programs_help(capsys):
  """`jaxspec -h bench` shows the top-level help (exit 0), not "-h goes after the command's name": every command
  takes -h too, which the check for options written before the command would otherwise find."""
  with pytest.raises(SystemExit) as e:
    cli.parse_args(["-h", "bench"])
  out = capsys.readouterr().out
  assert e.value.code == 0 and out.startswith("usage: jaxspec [-h]") and "goes after" not in out


def test_an_option_after_train_s_overrides_is_not_taken_as_one(capsys):
  """`key=value` words after train's options are overrides; an unknown option with an = in it is not one."""
  with pytest.raises(SystemExit) as e:
    cli.parse_args(["train", "c.yaml", "a=1", "--bogus=2"])
  assert e.value.code == 2 and "unrecognized arguments: --bogus=2" in capsys.readouterr().err


def test_train_without_its_package_is_one_clear_message(monkeypatch, capsys):
  """An installed wheel has no `training` package (it ships from a source checkout): the message says how to get it."""
  import sys
  monkeypatch.setitem(sys.modules, "training.tasks", None)  # importing it raises ImportError
  err = fails(["train", "c.yaml"], capsys)
  assert "The training package is not importable" in err and "pip install -e ." in err


def test_prompt_file_edge_cases(tmp_path, monkeypatch, capsys):
  """Only the newlines that end the file are dropped, as `$(cat FILE)` drops them: trailing spaces are text. A path
  through a file is one message; so is standard input that is closed (`jaxspec ... --prompt-file - <&-`: Python's
  sys.stdin is None there, and reading it was an AttributeError traceback)."""
  (tmp_path / "q.txt").write_text("Say hi.  \n\n", encoding="utf-8")
  assert cli._read_prompt_file(str(tmp_path / "q.txt")) == "Say hi.  "
  err = fails(["generate", "--prompt-file", str(tmp_path / "q.txt" / "x")], capsys)
  assert f"Cannot read --prompt-file {tmp_path / 'q.txt' / 'x'}: Not a directory." in err
  monkeypatch.setattr("sys.stdin", None)
  err = fails(["generate", "--prompt-file", "-"], capsys)
  assert "standard input, which is closed" in err


def test_a_draft_model_loads_at_the_target_s_context_where_its_file_allows(monkeypatch):
  """A draft loaded as a model of its own gets the target's context: a LongRoPE draft then computes with the factors
  the target's context calls for. Where its file declares less, it loads with its own."""
  import dataclasses

  from jaxspec.loading.hf import load_hf
  from jaxspec.models.llama import LlamaLM

  folder = str(Path(__file__).parent / "fixtures" / "llama_variants" / "phi3_longrope")  # declares 1280 tokens
  asked = []

  def load(path, **kw):
    asked.append(kw.get("context"))
    return (*load_hf(path, context=kw.get("context")), None)

  monkeypatch.setattr(jaxspec.loading, "load_model", load)
  model, params = load_hf(folder, context=1280)
  for target_context, draft_context in ((1280, 1280), (300, 300), (2000, 320)):
    target = LlamaLM(dataclasses.replace(model.cfg, max_seq_len=target_context))
    ctx = BenchContext(target, params, None)
    build(ctx, f"spec:draft={folder}")
    assert ctx.cache[("draft", folder)][0].cfg.max_seq_len == draft_context
  assert asked == [1280, 300, 2000, None]


def test_a_prompt_past_longrope_s_original_context_is_told_about_context(monkeypatch, capsys):
  """A LongRoPE model loads bounded to its original context; a request that does not fit is told that --context
  lifts the bound (where --max-len cannot go past it)."""
  from jaxspec.loading.hf import load_hf
  from tests.test_bpd import ByteTokenizer

  model, params = load_hf(str(Path(__file__).parent / "fixtures" / "llama_variants" / "phi3_longrope"))
  monkeypatch.setattr(jaxspec.loading, "load_model", lambda path=None, **kw: (model, params, ByteTokenizer()))
  err = fails(["generate", "--prompt", "x" * 300, "--max-new-tokens", "40"], capsys)
  assert err == ("jaxspec: error: A prompt of 300 tokens plus 40 new tokens needs 340 cache slots, more than the cache "
                 "length 320: shorten --prompt, lower --max-new-tokens (to 20 or fewer), or load the model with a "
                 "longer --context (past LongRoPE's original 320 tokens its long factors apply).\n")


def test_the_shipped_heads_and_rescorer_on_another_model_say_how_to_train_and_pass_each_part(tiny, tmp_path,
                                                                                            monkeypatch):
  """bpd-ngram with the shipped heads and rescorer (a stand-in of the target's vocabulary here) on another model: each
  message names both parts as a sentence of its own ("Pass heads=FOLDER and rescore=FOLDER"), and the heads' width
  says which config trains each part; bpd alone still names heads= and the BPD config only."""
  import jax
  import numpy as np

  import jaxspec.bench.methods as methods
  from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
  from jaxspec.models.draft import embed_fingerprint
  from jaxspec.models.ngram import build_ngram, save_ngram
  from tests.conftest import make_tiny

  model, params = tiny
  ctx = BenchContext(model, params, CharTokenizer())
  both = "Pass heads=FOLDER and rescore=FOLDER with BPD heads and a rescorer built for this model"
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 5, 1, 2, 3]], 3, model.vocab_size)
  save_ngram(tmp_path / "shipped_rescore", lm, tables, meta={"tuned": {"k": 2}})
  monkeypatch.setattr(methods, "DEFAULT_RESCORE", tmp_path / "shipped_rescore")
  with pytest.raises(Unavailable) as e:  # the shipped heads: d_model 576
    build(ctx, "bpd-ngram")
  assert str(e.value).endswith("`jaxspec train` trains the heads from a `task: bpd` config and the rescorer from a "
                               "`task: rescore` one, each with this model as model.path (README, \"Training for your "
                               "own model\")")
  with pytest.raises(Unavailable) as e:
    build(ctx, "bpd")
  assert "pass heads=FOLDER with heads trained for this model" in str(e.value) and "rescore" not in str(e.value)
  assert str(e.value).endswith("trains them from a `task: bpd` config whose model.path is this model, as "
                               "configs/bpd_t5_numbers.yaml does for jaxspec/assets/t5_numbers")
  d = model.cfg.d_model
  other = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8))  # trained for another model (its fingerprint)
  save_bpd(tmp_path / "other", other, other.init_params(jax.random.key(0)),
           meta={"target": {"embed_fingerprint": embed_fingerprint(make_tiny(1)[1])}})
  far = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8, vocab_subset=4))  # ids past the target's vocabulary
  save_bpd(tmp_path / "far", far, far.init_params(jax.random.key(1), vocab_ids=np.array([300, 301, 302, 303])))
  for heads in ("other", "far"):
    monkeypatch.setattr(methods, "DEFAULT_BPD_HEADS", tmp_path / heads)
    with pytest.raises(Unavailable) as e:
      build(ctx, "bpd-ngram")
    assert f". {both}" in str(e.value), (heads, str(e.value))


def test_a_run_for_another_model_that_keeps_the_configs_folders_is_warned(tmp_path, capsys, caplog):
  """Following README "Training for your own model" with one folder setting forgotten (`data.dataset_dir`), the run
  wrote its model's answers into the default model's data folder without a word: `--check` and the run name each
  folder setting left at the config file's value while model.path names another model, and say nothing when every
  folder is the run's own or the model is the file's."""
  model = Path(__file__).parent / "fixtures" / "llama_cpp_gguf" / "qwen3-f32.gguf"  # (--check reads its header)
  config = str(CONFIGS / "bpd_smollm2.yaml")
  own = [f"out={tmp_path}/heads", f"train.checkpoint_dir={tmp_path}/ckpt", f"data.greedy_dataset_dir={tmp_path}/g"]
  assert cli.main(["train", config, "--check", f"model.path={model}", *own]) == 0
  assert (f"model.path={model} is another model than {config}'s, but data.dataset_dir=runs/smollm2_sampled/data "
          "keeps its folders, which hold (or will hold) that model's data, checkpoints or export: give it a path of "
          "your own (README: \"Training for your own model\")") in caplog.text
  caplog.clear()
  assert cli.main(["train", config, "--check", f"model.path={model}", *own, f"data.dataset_dir={tmp_path}/s"]) == 0
  assert "is another model" not in caplog.text
  assert cli.main(["train", config, "--check", *own]) == 0  # the file's own model: its folders are its own
  assert "is another model" not in caplog.text
  caplog.clear()
  assert cli.main(["train", config, "--check", f"model.path={model}", f"out={tmp_path}/heads"]) == 0
  assert ("but data.dataset_dir=runs/smollm2_sampled/data, data.greedy_dataset_dir=runs/bpd_smollm2/data, "
          "train.checkpoint_dir=runs/bpd_smollm2/ckpt keep its folders, which hold (or will hold) that model's data, "
          "checkpoints or export: give them paths of your own") in caplog.text


def test_the_folders_left_to_a_config_are_each_folder_setting_with_home_paths_as_the_run_reads_them(tmp_path,
                                                                                                  monkeypatch):
  """Every folder setting (out, the data folders, the checkpoints) kept at the file's value is named; a file that
  writes its model and folders from the home folder (`~/...`) is compared as the run reads it, expanded."""
  from training.tasks import folders_left_to_the_config, load_task_config

  monkeypatch.setenv("HOME", str(tmp_path))
  path = tmp_path / "mine.yaml"
  path.write_text("task: bpd\nout: ~/heads\nmodel:\n  path: ~/models/a.gguf\ndata:\n  dataset_dir: ~/data\n"
                  "  greedy_dataset_dir: runs/g\n  more_dataset_dir: runs/m\ntrain:\n  checkpoint_dir: runs/ck\n")
  assert folders_left_to_the_config(str(path), load_task_config(str(path))[0]) == []  # the file's own model
  other = load_task_config(str(path), [f"model.path={tmp_path}/models/b.gguf"])[0]
  assert folders_left_to_the_config(str(path), other) == [
      f"out={tmp_path}/heads", f"data.dataset_dir={tmp_path}/data", "data.greedy_dataset_dir=runs/g",
      "data.more_dataset_dir=runs/m", "train.checkpoint_dir=runs/ck"]
