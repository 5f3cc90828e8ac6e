"""SentencePiece vocabularies in GGUF files (`tokenizer.ggml.model == "llama"`: Llama 1/2, Mistral 7B v0.1,
TinyLlama, Phi-3) against SentencePiece itself.

A BPE model is trained here with `sentencepiece` on the project's training prompts, with the settings of Llama's
tokenizer (no normalization, a space prefix, digits split, byte fallback), and written to GGUF the way llama.cpp's
converter writes one: its pieces, their scores and their types. jaxspec rebuilds the tokenizer from that metadata
alone; SentencePiece's own encoder on the trained model is the reference.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import sentencepiece as spm  # the test extra (pip install -e '.[test]')

from jaxspec.loading.errors import ModelLoadError
from jaxspec.loading.tokenizer import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_UNUSED, Tokenizer

PROMPTS = os.path.join(os.path.dirname(__file__), os.pardir, "training", "data", "prompts.jsonl")

# Texts the training prompts do not hold: other scripts and emoji (spelled as bytes), runs of spaces, tabs and line
# breaks, leading and trailing spaces, digits, and words the merges build only in part.
TEXTS = [
    "Hello world", " Hello world", "  two leading spaces", "trailing space ", "a  b   c    d", "tab\there",
    "line one\nline two\n\nthree", "\n", " ", "   ", "", "12345 and 0.5 and 1,000,000", "Café crème brûlée",
    "нещо на български", "日本語のテキスト", "emoji 🦙 and 👍🏽", "x" * 40, "Write a short blog post about bread.",
    "unbelievably-hyphenated_words_with_underscores", "  \n  mixed \t whitespace\t\n",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!", "ʕ•ᴥ•ʔ ¯\\_(ツ)_/¯",
]


def _corpus() -> list[str]:
  with open(PROMPTS, encoding="utf-8") as f:
    return [turn for line in f if line.strip() for turn in json.loads(line)["turns"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A SentencePiece BPE model trained with Llama's settings, and its GGUF metadata written as llama.cpp does."""
  folder = tmp_path_factory.mktemp("spm")
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(_corpus()), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(folder / "m"), model_type="bpe", vocab_size=1200, byte_fallback=True,
      split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2,
      user_defined_symbols=["<tool>"])
  return spm.SentencePieceProcessor(model_file=str(folder / "m.model")), folder


def _types(sp) -> list[int]:
  def kind(i):
    if sp.IsUnknown(i):
      return TOKEN_UNKNOWN
    if sp.IsControl(i):
      return TOKEN_CONTROL
    if sp.IsUnused(i):
      return TOKEN_UNUSED
    if sp.IsByte(i):
      return TOKEN_BYTE
    return 4 if sp.IdToPiece(i) == "<tool>" else TOKEN_NORMAL  # llama.cpp's USER_DEFINED
  return [kind(i) for i in range(sp.GetPieceSize())]


def _add_vocabulary(writer, sp, *, scores=True, order=None, added=(), unk_id=True) -> None:
  """The SentencePiece model's vocabulary as GGUF metadata. `order`: the SentencePiece id at each GGUF id (default:
  the same ids); `added`: control tokens after them, as chat models add (<|user|>, ...); `unk_id`: write
  tokenizer.ggml.unknown_token_id."""
  order = list(range(sp.GetPieceSize())) if order is None else order
  writer.add_tokenizer_model("llama")
  writer.add_token_list([sp.IdToPiece(i) for i in order] + list(added))
  if scores:
    writer.add_token_scores([sp.GetScore(i) for i in order] + [0.0] * len(added))
  types = _types(sp)
  writer.add_token_types([types[i] for i in order] + [TOKEN_CONTROL] * len(added))
  writer.add_bos_token_id(sp.bos_id())
  writer.add_eos_token_id(sp.eos_id())
  if unk_id:
    writer.add_unk_token_id(sp.unk_id())


def _write(path, sp, *, add_bos=None, add_space_prefix=None, arch="llama", name=None, **vocabulary) -> str:
  """A vocabulary-only GGUF file (`vocabulary`: `_add_vocabulary`'s options); `name`: the file's general.name."""
  writer = gguf.GGUFWriter(str(path), arch)
  if name is not None:
    writer.add_name(name)
  _add_vocabulary(writer, sp, **vocabulary)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  if add_space_prefix is not None:
    writer.add_add_space_prefix(add_space_prefix)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.fixture(scope="module")
def pair(trained):
  sp, folder = trained
  return sp, Tokenizer.from_gguf(_write(folder / "spm.gguf", sp))


def test_ids_equal_sentencepiece_on_the_training_prompts(pair):
  sp, tok = pair
  texts = _corpus()[::7]
  assert len(texts) > 50
  for text in texts:
    assert tok.encode(text) == sp.encode(text), text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_equal_sentencepiece(pair, text):
  sp, tok = pair
  ids = tok.encode(text)
  assert ids == sp.encode(text)
  assert tok.decode(ids) == sp.decode(ids) == text


def test_merges_follow_the_scores_not_the_ids(trained, tmp_path):
  """SentencePiece joins the pair of highest score first. Trained vocabularies list pieces by falling score, so the
  normal pieces are shuffled here: the ids move with them and the pieces chosen must not change."""
  sp, _ = trained
  n = sp.GetPieceSize()
  normal = [i for i, t in enumerate(_types(sp)) if t == TOKEN_NORMAL]
  shuffled = list(np.random.default_rng(0).permutation(normal))
  order = list(range(n))
  for slot, i in zip(normal, shuffled):
    order[slot] = int(i)
  new_id = {old: new for new, old in enumerate(order)}
  tok = Tokenizer.from_gguf(_write(tmp_path / "shuffled.gguf", sp, order=order))
  for text in TEXTS + _corpus()[::41]:
    ids = tok.encode(text)
    assert ids == [new_id[i] for i in sp.encode(text)], text
    assert tok.decode(ids) == text


def test_the_texts_use_byte_fallback_and_multi_character_pieces(pair):
  """The cases above reach the paths that matter: characters outside the vocabulary spelled as byte tokens, and
  pieces built by several merges."""
  sp, tok = pair
  ids = [i for text in TEXTS for i in tok.encode(text)]
  assert any(sp.IsByte(i) for i in ids)
  assert max(len(sp.IdToPiece(i)) for i in ids) >= 5


def test_special_tokens_in_text_and_bos(pair):
  """Control and user-defined tokens written in the text are single ids, and the text after one gets the space
  prefix again, as llama.cpp tokenizes it. SentencePiece vocabularies want BOS unless the file says not."""
  sp, tok = pair
  tool = sp.PieceToId("<tool>")
  assert tok.encode("<s>Hello world</s>") == [sp.bos_id(), *sp.encode("Hello world"), sp.eos_id()]
  assert tok.encode("a<tool>b") == [*sp.encode("a"), tool, *sp.encode("b")]
  assert tok.add_bos_token and tok.encode("Hi", add_bos=None) == [sp.bos_id(), *sp.encode("Hi")]
  assert tok.decode(tok.encode("<s>Hi"), skip_special_tokens=True) == "Hi"


@pytest.mark.parametrize("name", ["Phi3", "Phi-3-mini-4k-instruct"])
def test_phi3_chat_tokens_take_the_whitespace_after_them(trained, tmp_path, name):
  """Phi-3's tokenizer.json strips the whitespace after its chat tokens (rstrip), and llama.cpp does the same for a
  GGUF file whose general.name says Phi-3 (all special and user-defined tokens but <unk>, <s> and <|endoftext|>):
  the line break a chat template writes after <|user|> or <|end|> is not tokenized, and the text after it gets the
  space prefix as after any special token."""
  sp, _ = trained
  n = sp.GetPieceSize()
  added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
  eot, assistant, end, user = range(n, n + len(added))
  tok = Tokenizer.from_gguf(_write(tmp_path / "phi3.gguf", sp, arch="phi3", name=name, added=added))
  prompt = "<s><|user|>\nWrite a poem.<|end|>\n<|assistant|>\n"
  assert tok.encode(prompt) == [sp.bos_id(), user, *sp.encode("Write a poem."), end, assistant]
  # <s>, <unk> and <|endoftext|> keep the whitespace after them; a user-defined token (<tool>) takes it too.
  assert tok.encode("<s>\nHi") == [sp.bos_id(), *sp.encode("\nHi")]
  assert tok.encode("<|endoftext|> Hi") == [eot, *sp.encode(" Hi")]
  assert tok.encode("a<tool> b") == [*sp.encode("a"), sp.PieceToId("<tool>"), *sp.encode("b")]
  # another model's file keeps the whitespace after its special tokens, as llama.cpp does
  other = Tokenizer.from_gguf(_write(tmp_path / "other.gguf", sp, name="Llama-2-7b-chat", added=added))
  assert other.encode("<|user|>\nHi") == [user, *sp.encode("\nHi")]
  # the rule is kept by save / from_tokenizer_json
  tok.save(tmp_path / "saved")
  assert Tokenizer.from_tokenizer_json(tmp_path / "saved").encode(prompt) == tok.encode(prompt)


def test_add_bos_and_space_prefix_from_the_file(trained, tmp_path):
  sp, _ = trained
  tok = Tokenizer.from_gguf(_write(tmp_path / "flags.gguf", sp, add_bos=False, add_space_prefix=False))
  assert not tok.add_bos_token
  # No space put in front: a text with its own leading space encodes as SentencePiece's prefixed text.
  for text in ("Hello world", "bread and butter"):
    assert tok.encode(" " + text) == sp.encode(text)
    assert tok.encode(text) != sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_a_vocabulary_without_scores_is_refused(trained, tmp_path):
  sp, _ = trained
  path = _write(tmp_path / "noscores.gguf", sp, scores=False)
  with pytest.raises(ModelLoadError, match="needs a score per token .tokenizer.ggml.scores.*convert_hf_to_gguf"):
    Tokenizer.from_gguf(path)


def test_a_vocabulary_without_byte_tokens_uses_its_unknown_token(trained, tmp_path):
  """Without the 256 byte tokens a character outside the vocabulary is the unknown token (the one the file names, or
  else the one typed unknown, as llama.cpp falls back); without either it would vanish from the ids, so such a
  vocabulary is refused."""
  sp, _ = trained
  types = _types(sp)
  no_bytes = [i for i, t in enumerate(types) if t != TOKEN_BYTE]
  for unk_id in (True, False):
    tok = Tokenizer.from_gguf(_write(tmp_path / f"nobytes{unk_id}.gguf", sp, order=no_bytes, unk_id=unk_id))
    ids = tok.encode("a🦙b")
    assert no_bytes.index(sp.unk_id()) in ids and len(ids) >= 3
  no_unknown = [i for i in no_bytes if types[i] != TOKEN_UNKNOWN]
  path = _write(tmp_path / "nothing.gguf", sp, order=no_unknown, unk_id=False)
  with pytest.raises(ModelLoadError, match="neither the 256 byte tokens .* nor an unknown token"):
    Tokenizer.from_gguf(path)


def test_save_and_reload_keeps_the_ids(pair, tmp_path):
  """`Tokenizer.save` writes a tokenizer.json (as exports do); it reads back with the same ids and text."""
  sp, tok = pair
  tok.save(tmp_path)
  again = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
  for text in TEXTS:
    assert again.encode(text) == sp.encode(text)
    assert again.decode(again.encode(text)) == text


@pytest.mark.slow
def test_llama_cpp_vocabulary_tests():
  """llama.cpp's own tokenizer tests on real models' vocabularies (scripts/llama_cpp_vocab_check.py: the files come
  with llama-cpp-python's source package, downloaded once into the user's cache): every vocabulary jaxspec loads
  gives llama.cpp's ids and decodes back to the text."""
  import importlib.util
  import subprocess

  script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "llama_cpp_vocab_check.py")
  spec = importlib.util.spec_from_file_location("llama_cpp_vocab_check", script)
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  try:
    path = check.download()
  except subprocess.CalledProcessError as e:
    pytest.skip(f"could not download {check.SDIST}'s sdist from PyPI ({e}); pass a llama.cpp models/ folder to "
                "scripts/llama_cpp_vocab_check.py instead")
  records = {r["name"]: r for r in check.check(path)}
  wanted = {"llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2", "mpt", "falcon", "deepseek-coder", "deepseek-llm",
            "starcoder", "command-r", "qwen35"}
  assert wanted <= {name for name, r in records.items() if r["loaded"]}
  for r in records.values():
    if r["loaded"]:
      assert r["texts"] > 40 and r["ids_equal"] == r["round_trips"] == r["texts"], r


def test_a_llama_2_style_gguf_model_generates_through_the_cli(trained, tmp_path, capsys):
  """A LLaMA GGUF file with a SentencePiece vocabulary (as Llama 2 and TinyLlama files are) loads and decodes with
  `jaxspec generate`; its prompt is the vocabulary's ids and the printed answer is the decoded tokens. Greedy and
  Jacobi decoding print the same text."""
  from jaxspec import cli
  from jaxspec.loading import load_model
  from tests.conftest import make_tiny
  from tests.test_loading import write_gguf

  sp, _ = trained
  n = sp.GetPieceSize()
  model, params = make_tiny(seed=0, embed_scale=3.0, vocab_size=n)

  path = str(tmp_path / "llama2_style.gguf")
  write_gguf(path, model, params, gguf.GGMLQuantizationType.F32, extra=lambda w: _add_vocabulary(w, sp))
  _, _, tok = load_model(path)
  prompt = "Write a short blog post about bread."
  assert tok.encode(prompt, add_bos=None) == [sp.bos_id(), *sp.encode(prompt)]
  texts = []
  for method in ("greedy", "jacobi"):
    assert cli.main(["generate", "--model", path, "--prompt", prompt, "--max-new-tokens", "8", "--method",
                     method]) == 0
    texts.append(capsys.readouterr().out)
  assert texts[0] == texts[1] and texts[0].strip()
