"""The tokenizer against Hugging Face's on the default model (tests/fixtures/smollm2_hf_reference.npz), and on
small GGUF files written here."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import tokenizers

from jaxspec.loading.default import default_model_path
from jaxspec.errors import InputError
from jaxspec.loading.errors import ModelLoadError
from jaxspec.loading.tokenizer import Tokenizer, read_gguf_metadata

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_hf_reference.npz")

with np.load(FIXTURE) as _ref:
  STRINGS = [str(s) for s in _ref["strings"]]


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE) as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
  return Tokenizer.from_gguf(default_model_path())


def _ref_ids(ref, i: int, suffix: str = "") -> list[int]:
  offsets = ref["string_offsets" + suffix]
  return ref["string_ids" + suffix][offsets[i]:offsets[i + 1]].tolist()


# --- the default model against the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(STRINGS)), ids=[f"s{i}" for i in range(len(STRINGS))])
def test_ids_match_reference(tok, ref, i):
  assert tok.encode(STRINGS[i]) == _ref_ids(ref, i)


@pytest.mark.parametrize("i", range(len(STRINGS)), ids=[f"s{i}" for i in range(len(STRINGS))])
def test_decode_round_trip(tok, i):
  assert tok.decode(tok.encode(STRINGS[i])) == STRINGS[i]


def test_decode_refuses_negative_ids_and_skips_ids_past_the_vocabulary(tok):
  """A negative id was an OverflowError from inside `tokenizers`; an id past the tokenizer (a model's output table
  can be larger) decodes to nothing, as in `tokenizers`."""
  from jaxspec.errors import InputError
  with pytest.raises(InputError, match="Token id -1 is negative"):
    tok.decode([5, -1])
  assert tok.decode([5, tok.backend.get_vocab_size() + 10]) == tok.decode([5])


def test_encode_and_decode_of_the_wrong_kind_are_clear_errors(tok):
  """tok.decode(res.tokens) (a batch) was a TypeError from int(), tok.decode([2.5]) decoded id 2, and tok.encode of
  a list of texts, bytes or None an AttributeError: each is an InputError that says what to pass."""
  import jax.numpy as jnp
  with pytest.raises(InputError, match=r"holds sequences \(a batch\?\): decode each row, e.g. \[tok.decode\(row\)"):
    tok.decode([[5, 6], [7]])
  with pytest.raises(InputError, match="holds sequences"):
    tok.decode(np.asarray([[5, 6], [7, 8]]))
  with pytest.raises(InputError, match=r"decode takes token ids \(whole numbers\), got 2.5"):
    tok.decode([5, 2.5])
  with pytest.raises(InputError, match="decode takes token ids, got str"):
    tok.decode("hello")
  want = tok.decode([5, 6])
  assert tok.decode(np.asarray([5, 6])) == tok.decode(jnp.asarray([5, 6])) == tok.decode((np.int64(5), 6.0)) == want
  # whole floats of any kind, as of Python floats (np.float64 is one; np.float32 and JAX floats were refused)
  assert tok.decode(np.asarray([5, 6], np.float32)) == tok.decode(jnp.asarray([5.0, 6.0])) == want
  with pytest.raises(InputError, match=r"decode takes token ids \(whole numbers\), got .*2\.5"):
    tok.decode(np.asarray([5, 2.5], np.float32))
  with pytest.raises(InputError, match=r"encode takes one text \(a str\), got list: encode each: \[tok.encode"):
    tok.encode(["a", "b"])
  with pytest.raises(InputError, match=r"got bytes: decode bytes to str first"):
    tok.encode(b"abc")
  with pytest.raises(InputError, match="got NoneType"):
    tok.encode(None)
  # a tuple of texts as a list of them; bytes are not ids (each byte decoded as an id); True is not id 1
  with pytest.raises(InputError, match=r"got tuple: encode each: \[tok.encode"):
    tok.encode(("a", "b"))
  with pytest.raises(InputError, match="decode takes token ids, got bytes"):
    tok.decode(b"hi")
  with pytest.raises(InputError, match=r"decode takes token ids \(whole numbers\), got True"):
    tok.decode([5, True])
  # a bytearray is bytes; a batch of one-id rows of floats is a batch (float() read each row as its one id)
  with pytest.raises(InputError, match=r"got bytearray: decode bytes to str first"):
    tok.encode(bytearray(b"abc"))
  for rows in (np.asarray([[5.0], [6.0]], np.float32), jnp.asarray([[5.0], [6.0]])):
    with pytest.raises(InputError, match=r"holds sequences \(a batch\?\)"):
      tok.decode(rows)


def test_digits_split_like_llama_cpp_not_like_transformers_gguf(tok, ref):
  # The fixture holds strings where transformers' GGUF loader (no "smollm" pre-tokenizer) gives other ids; we follow
  # llama.cpp and the model's own tokenizer.json, which split digits off before the GPT-2 regex.
  differing = [i for i in range(len(STRINGS)) if _ref_ids(ref, i) != _ref_ids(ref, i, "_hf_gguf")]
  assert differing, "the fixture should exercise the whitespace-before-digit case"
  for i in differing:
    assert tok.encode(STRINGS[i]) == _ref_ids(ref, i)
  ids = tok.encode("a  12")
  assert [tok.id_to_token(t) for t in ids] == ["a", "ĠĠ", "1", "2"]


def test_chat_template_matches_reference(tok, ref):
  messages = json.loads(str(ref["chat_messages_json"]))
  text = tok.apply_chat_template(messages, add_generation_prompt=True)
  assert text == str(ref["chat_text"])
  assert tok.encode(text) == ref["prompt_ids"].tolist()
  assert tok.decode(ref["prompt_ids"]) == text


def test_special_tokens(tok, ref):
  assert tok.vocab_size == 49152
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert tok.add_bos_token is False
  assert tok.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
  assert tok.encode("<|im_start|>user\nHi<|im_end|>")[-1] == 2
  assert tok.decode([1, 4093, 2], skip_special_tokens=True) == tok.decode([4093])
  assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
  assert tok.encode("hi", add_bos=None) == tok.encode("hi")  # the model adds no BOS
  # The greedy reference continuation decodes and re-encodes to itself, special tokens included.
  text = tok.decode(ref["greedy_ids"])
  assert "<|im_end|>" in text
  assert tok.decode(tok.encode(text)) == text


def test_generation_prompt_flag(tok):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  with_prompt = tok.apply_chat_template(messages)
  without = tok.apply_chat_template(messages, add_generation_prompt=False)
  assert with_prompt == without + "<|im_start|>assistant\n"
  assert without == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_tokenizer_json_round_trip(tok, ref, tmp_path):
  # A bare tokenizer.json written by the `tokenizers` library: same ids, but no config means no special ids.
  bare = tmp_path / "bare"
  bare.mkdir()
  tok.backend.save(str(bare / "tokenizer.json"))
  loaded = Tokenizer.from_tokenizer_json(bare / "tokenizer.json")
  for i, s in enumerate(STRINGS):
    assert loaded.encode(s) == _ref_ids(ref, i), s
    assert loaded.decode(loaded.encode(s)) == s
  assert loaded.vocab_size == tok.vocab_size
  assert loaded.bos_id is None and loaded.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    loaded.apply_chat_template([{"role": "user", "content": "Hi"}])

  # With tokenizer_config.json next to it, from `save`: special ids and the chat template come back too.
  full = tmp_path / "full"
  tok.save(full)
  loaded = Tokenizer.from_tokenizer_json(full)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                          tok.unk_id)
  messages = json.loads(str(ref["chat_messages_json"]))
  assert loaded.apply_chat_template(messages) == str(ref["chat_text"])
  assert loaded.encode(str(ref["chat_text"])) == ref["prompt_ids"].tolist()


def test_tokenizer_config_variants(tok, tmp_path):
  tok.backend.save(str(tmp_path / "tokenizer.json"))
  config = {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
            "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}!"},
                              {"name": "tool_use", "template": "tools"}]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  loaded = Tokenizer.from_tokenizer_json(tmp_path)
  assert (loaded.bos_id, loaded.eos_id) == (1, 2)
  assert loaded.apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi!"
  # A chat_template.jinja file, as newer Hugging Face saves write, wins over the config's.
  (tmp_path / "chat_template.jinja").write_text("[{{ messages | length }}]")
  assert Tokenizer.from_tokenizer_json(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}]) == "[1]"


def test_a_chat_template_with_a_syntax_error_is_a_clear_error(tok, tmp_path):
  tok.backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")  # no endfor
  loaded = Tokenizer.from_tokenizer_json(tmp_path)
  with pytest.raises(InputError, match="the chat template is not valid jinja2 \\(line 1: .*endfor.*leave out --chat"):
    loaded.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_missing_tokenizer_json(tmp_path):
  with pytest.raises(ModelLoadError, match="No tokenizer.json"):
    Tokenizer.from_tokenizer_json(tmp_path)


def test_fast_metadata_reader_matches_gguf_reader(tok):
  # The tokenizer reads GGUF metadata with its own parser (GGUFReader takes seconds on a 49k vocabulary); it must
  # agree with the gguf package on every key, and a tokenizer built from a reader must equal one built from the path.
  path = default_model_path()
  reader = gguf.GGUFReader(path)
  ours = read_gguf_metadata(path)
  assert set(ours) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
  for key, value in ours.items():
    expected = reader.fields[key].contents()
    if isinstance(expected, float):
      assert value == pytest.approx(expected), key
    else:
      assert value == expected, key
  assert Tokenizer.from_gguf(reader).backend.to_str() == tok.backend.to_str()


# --- small GGUF files written here ---------------------------------------------------------------------------------


def _alphabet() -> list[str]:
  # The 256 byte-level characters, in byte order, so every text can be tokenized.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_gguf(path, *, model="gpt2", pre="smollm", endian=gguf.GGUFEndian.LITTLE, template=None, add_bos=None,
                eos_id=1, extra_tokens=(), extra_merges=(), extra=None, merges=True):
  tokens = ["<s>", "</s>", "<think>"] + _alphabet() + ["he", "ll", "hell", "hello", "Ġw", *extra_tokens]
  types = [3, 3, 4] + [1] * 256 + [1] * (5 + len(extra_tokens))
  merges = merges and ["h e", "l l", "he ll", "hell o", "Ġ w", *extra_merges]
  writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
  writer.add_uint32("llama.vocab_size", len(tokens))
  writer.add_float32("test.float", 0.5)
  writer.add_array("test.ints", [3, 1, 4])
  if model is not None:
    writer.add_tokenizer_model(model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  if merges:
    writer.add_token_merges(merges)
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(eos_id)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  if template is not None:
    writer.add_chat_template(template)
  if extra is not None:
    extra(writer)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def test_a_byte_level_vocabulary_without_merges_is_refused(tmp_path):
  """It split every text into single bytes, silently (found by a review; llama.cpp refuses such a file too)."""
  with pytest.raises(ModelLoadError, match=r"has no merges \(tokenizer\.ggml\.merges\).*convert the model again"):
    Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", merges=False))


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["little", "big"])
def test_small_gguf(tmp_path, endian):
  path = _write_gguf(tmp_path / "tiny.gguf", endian=endian, template="{% for m in messages %}<{{ m.content }}>"
                     "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
  meta = read_gguf_metadata(path)
  assert meta["test.ints"] == [3, 1, 4] and meta["test.float"] == 0.5 and meta["tokenizer.ggml.pre"] == "smollm"
  tok = Tokenizer.from_gguf(path)
  assert tok.vocab_size == 3 + 256 + 5
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
  hello = tok.token_to_id("hello")
  assert tok.encode("hello<s> world12") == [hello, 0, tok.token_to_id("Ġw"), *tok.encode("orld"), *tok.encode("1"),
                                            *tok.encode("2")]
  # User-defined tokens are matched whole but are text, not special: skip_special_tokens keeps them.
  ids = tok.encode("<think>hello</s>")
  assert ids == [2, hello, 1]
  assert tok.decode(ids, skip_special_tokens=True) == "<think>hello"
  for s in ["héllo wörld ✓ 😀", "a\n\tb  c", "<s></s><think>"]:
    assert tok.decode(tok.encode(s)) == s
  assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "<a><b></s>"
  assert tok.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=False) == "<a>"



@pytest.mark.parametrize("add_bos", [True, False, None], ids=["bos", "no-bos", "unset"])
def test_gguf_add_bos_token_decides_plain_prompts(tmp_path, add_bos):
  """tokenizer.ggml.add_bos_token says whether the model expects BOS in front of a plain prompt (Llama 2 and Mistral
  GGUFs set it): `encode(text, add_bos=None)` follows it, and text that already starts with BOS keeps one."""
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", add_bos=add_bos))
  assert tok.add_bos_token is bool(add_bos)
  hello = tok.token_to_id("hello")
  assert tok.encode("hello", add_bos=None) == ([0, hello] if add_bos else [hello])
  assert tok.encode("<s>hello", add_bos=None) == [0, hello]
  assert tok.encode("hello") == [hello]  # chat-template output: the text's own tokens only


def test_gguf_special_ids_outside_the_vocabulary_are_none(tmp_path):
  """A special id the vocabulary does not have (a converter's "unset" 2^32 - 1, say) is no id: None, not an id that
  would never be generated or would index past the embedding."""
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", eos_id=2**32 - 1))
  assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (0, None, ())
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "u.gguf", eos_id=3 + 256 + 5))  # one past the last token
  assert tok.eos_id is None


def test_gguf_tokens_written_as_raw_text_are_respelled_in_the_byte_alphabet(tmp_path):
  """Some converters write normal tokens as raw text (" wo") while the merges use the byte-level spelling ("Ġw o"):
  such tokens are respelled, so the merges reach them and they keep their ids."""
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "raw.gguf", extra_tokens=[" wo"], extra_merges=["Ġw o"]))
  space_wo = 3 + 256 + 5
  assert tok.encode(" wo") == [space_wo] and tok.encode("hello wo") == [tok.token_to_id("hello"), space_wo]
  assert tok.decode([space_wo]) == " wo"

@pytest.mark.parametrize("pre, pieces", [
    ("gpt-2", ["a", ".", "b", "Ġ", "12", "34", "5", "6", "7", "Ġ$=", "x"]),
    ("mpt", ["a", ".", "b", "Ġ", "12", "34", "5", "6", "7", "Ġ$=", "x"]),  # llama.cpp gives MPT the GPT-2 split
    # Falcon: punctuation and $+<=>^~|` runs apart (their space too), then digits in threes (no merge across them)
    ("falcon", ["a", ".", "b", "Ġ", "123", "4", "5", "6", "7", "Ġ", "$", "=", "x"]),
])
def test_gpt2_and_falcon_gguf_pre_tokenizers(tmp_path, pre, pieces):
  """Falcon splits symbol runs off before the GPT-2 regex and digit runs into threes after it: a merge ("3 4") that
  GPT-2's split lets cross a group of three digits does not apply."""
  path = _write_gguf(tmp_path / f"{pre}.gguf", pre=pre, extra_tokens=["12", "34", "123", "Ġ$", "Ġ$="],
                     extra_merges=["1 2", "3 4", "12 3", "Ġ $", "Ġ$ ="])
  tok = Tokenizer.from_gguf(path)
  text = "a.b 1234567 $=x"
  ids = tok.encode(text)
  assert [tok.id_to_token(i) for i in ids] == pieces
  assert tok.decode(ids) == text


@pytest.mark.parametrize("pre, pieces", [
    ("gpt-4o", ["hello", "World", " isn't", " ", "123", "45", " HTTPServer", " e\u0301t\u0301", " a", "/\n", "b"]),
    ("tekken", ["hello", "World", " isn", "'t", " ", "1", "2", "3", "4", "5", " HTTPServer", " e\u0301t\u0301", " a",
                "/\n", "b"]),
])
def test_gpt4o_and_tekken_split_cased_words(tmp_path, pre, pieces):
  """GPT-4o's and Tekken's splits as the models' tokenizer.json files write them: camel case split, contractions
  kept (GPT-4o) or not (Tekken), digits in threes or alone, combining marks kept in words. Tekken vocabularies take a
  word found whole before merging and want BOS by default, as llama.cpp reads them."""
  from jaxspec.loading.tokenizer import GGUF_PRE_TOKENIZERS

  text = "helloWorld isn't 12345 HTTPServer e\u0301t\u0301 a/\nb"
  byte_of = {c: b for b, c in enumerate(_alphabet())}  # the pieces come spelled in the byte alphabet
  split = [bytes(byte_of[c] for c in p).decode() for p, _ in GGUF_PRE_TOKENIZERS[pre]().pre_tokenize_str(text)]
  assert split == pieces
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / f"{pre}.gguf", pre=pre, extra_tokens=["Ġwow"]))
  assert tok.decode(tok.encode(text)) == text
  assert [tok.id_to_token(i) for i in tok.encode("hello wow")] == (["hello", "Ġwow"] if pre == "tekken" else
                                                                   ["hello", "Ġw", "o", "w"])
  assert tok.add_bos_token == (pre == "tekken")


@pytest.mark.parametrize("pre, joined", [("qwen2", False), ("qwen35", True)])
def test_qwen35_keeps_combining_marks_with_their_letters(tmp_path, pre, joined):
  """"e" + U+0301 (a combining acute accent, category Mn): Qwen2's split starts a new piece at the mark, Qwen3.5's
  keeps it in the word, where a merge of "e" with the mark's first byte applies."""
  first, second = (_alphabet()[b] for b in "\u0301".encode())
  path = _write_gguf(tmp_path / f"{pre}.gguf", pre=pre, extra_tokens=["e" + first], extra_merges=[f"e {first}"])
  tok = Tokenizer.from_gguf(path)
  text = "le\u0301t"
  ids = tok.encode(text)
  assert [tok.id_to_token(i) for i in ids] == (["l", "e" + first, second, "t"] if joined else ["l", "e", first, second,
                                                                                             "t"])
  assert tok.decode(ids) == text


@pytest.mark.parametrize("pre, pieces", [
    ("llama-bpe", ["I", "'VE", "Ġ", "123", "45", "Ġ", "ok", "!Ċ", "Ċ", "a"]),
    ("qwen2", ["I", "'VE", "Ġ", "1", "2", "3", "4", "5", "Ġ", "ok", "!Ċ", "Ċ", "a"]),
    ("gpt-2", ["I", "'", "V", "E", "Ġ", "123", "45", "Ġ", "ok", "!", "Ċ", "Ċ", "a"]),
    # DeepSeek Coder: letters, punctuation, line breaks and each digit apart, and a space stays with the letters
    ("deepseek-coder", ["I", "'", "V", "E", "Ġ", "1", "2", "3", "4", "5", "Ġ", "ok", "!", "Ċ", "Ċ", "a"]),
    # DeepSeek LLM: the same, but a run of digits stays together (llama.cpp's split), so merges within it apply
    ("deepseek-llm", ["I", "'", "V", "E", "Ġ", "123", "45", "Ġ", "ok", "!", "Ċ", "Ċ", "a"]),
])
def test_llama3_and_qwen2_gguf_pre_tokenizers(tmp_path, pre, pieces):
  """Llama 3's ("llama-bpe") and Qwen2's ("qwen2") splits, with merges that would cross them if the split were
  GPT-2's: contractions in any case stay whole, digits go in threes (Llama 3) or one by one (Qwen2), a space before
  a digit stands alone, and punctuation keeps the line breaks after it."""
  extra = ["12", "123", "45", "Ġ1", "'V", "'VE", "ok", "!Ċ"]
  path = _write_gguf(tmp_path / f"{pre}.gguf", pre=pre, extra_tokens=extra,
                     extra_merges=["1 2", "12 3", "4 5", "Ġ 1", "' V", "'V E", "o k", "! Ċ"])
  tok = Tokenizer.from_gguf(path)
  text = "I'VE 12345 ok!\n\na"
  ids = tok.encode(text)
  assert [tok.id_to_token(i) for i in ids] == pieces
  assert tok.decode(ids) == text


def test_deepseek_llm_split(tmp_path):
  """DeepSeek LLM's split ("deepseek-llm") as llama.cpp's splitter gives it: runs of the letters on its own list with
  one whitespace before them (lower-case Armenian is not on it, so " ք" and "Ж" part); ASCII punctuation's range
  covers the ASCII letters, so they are cut out again from a run that holds other letters (" Été"); full-width
  punctuation and CJK runs apart; digits in one run; the whitespace that ends a piece apart (after the emoji).
  DeepSeek Coder's split, for contrast, keeps " Été", " քЖ" and " 😀  " whole and splits every digit off."""
  from jaxspec.loading.tokenizer import GGUF_PRE_TOKENIZERS

  text = "Hi Été! քЖ ok，你好 12345 😀  \nx"
  byte_of = {c: b for b, c in enumerate(_alphabet())}  # the pieces come spelled in the byte alphabet
  def split(pre):
    return [bytes(byte_of[c] for c in p).decode() for p, _ in GGUF_PRE_TOKENIZERS[pre]().pre_tokenize_str(text)]
  assert split("deepseek-llm") == ["Hi", " É", "t", "é", "!", " ք", "Ж", " ok", "，", "你好", " ", "12345", " 😀",
                                   "  ", "\n", "x"]
  assert split("deepseek-coder") == ["Hi", " Été", "!", " քЖ", " ok", "，", "你好", " ", "1", "2", "3", "4", "5",
                                     " 😀  ", "\n", "x"]
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "deepseek-llm.gguf", pre="deepseek-llm"))
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("pre, whole", [("llama-bpe", True), ("llama3", True), ("llama-v3", True), ("falcon3", True),
                                         ("qwen2", False), ("gpt-2", False)])
def test_llama3_takes_a_word_of_its_vocabulary_whole(tmp_path, pre, whole):
  """Llama 3's vocabulary holds words its merges do not build (llama.cpp's test: ' Việt'); its tokenizer takes a
  word found in the vocabulary whole before merging (tokenizer.json's ignore_merges), the others merge. Llama 3
  vocabularies also want BOS when the file does not say (llama.cpp's default)."""
  path = _write_gguf(tmp_path / f"{pre}.gguf", pre=pre, extra_tokens=["Ġwow"])
  tok = Tokenizer.from_gguf(path)
  pieces = [tok.id_to_token(i) for i in tok.encode("hello wow")]
  assert pieces == (["hello", "Ġwow"] if whole else ["hello", "Ġw", "o", "w"])
  assert tok.add_bos_token == whole
  assert Tokenizer.from_gguf(_write_gguf(tmp_path / "no_bos.gguf", pre=pre, add_bos=False)).add_bos_token is False


@pytest.mark.parametrize("model,pre,match", [
    ("llama", None, "SentencePiece vocabulary .* needs a score per token"),
    ("bert", "smollm", "tokenizer model 'bert' is not supported"),
    ("gpt2", "viking", "pre-tokenizer 'viking'"),
    ("gpt2", None, "pre-tokenizer None"),
    (None, "smollm", "has no tokenizer"),
])
def test_unsupported_gguf_tokenizer(tmp_path, model, pre, match):
  path = _write_gguf(tmp_path / "bad.gguf", model=model, pre=pre)
  with pytest.raises(ValueError, match=match):
    Tokenizer.from_gguf(path)
  with pytest.raises(ModelLoadError, match=match):
    Tokenizer.from_gguf(gguf.GGUFReader(path))


def test_unreadable_gguf(tmp_path):
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all")
  with pytest.raises(ModelLoadError, match="junk.gguf.: not a GGUF file: it does not begin with the GGUF magic"):
    Tokenizer.from_gguf(junk)
  good = _write_gguf(tmp_path / "tiny.gguf")
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(open(good, "rb").read()[:200])
  with pytest.raises(ModelLoadError, match="truncated or corrupt"):
    Tokenizer.from_gguf(truncated)
  with pytest.raises(ModelLoadError, match="No model file"):
    Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_chat_template_environment(tmp_path):
  template = ("{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
              "{{ messages | tojson }}")
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", template=template))
  # tojson keeps the text as is: jinja2's own would HTML-escape <, > and &.
  assert tok.apply_chat_template([{"role": "user", "content": "<é & ü>"}]) == \
      '[{"role": "user", "content": "<é & ü>"}]'
  with pytest.raises(ValueError, match="no bad roles"):
    tok.apply_chat_template([{"role": "bad", "content": ""}])
  # The sandbox refuses to reach Python internals from a template shipped in a model file.
  evil = Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}")
  with pytest.raises(ValueError):
    evil.apply_chat_template([])


def test_end_of_turn_and_end_of_message_ids_end_generation(tmp_path):
  """A GGUF file may name an end-of-turn and an end-of-message token beside its EOS (Llama 3.1: <|eot_id|>,
  <|eom_id|>); llama.cpp ends generation at each, and so does `eos_ids`. An id outside the vocabulary is ignored."""
  def ids(w):
    w.add_uint32("tokenizer.ggml.eot_token_id", 2)
    w.add_uint32("tokenizer.ggml.eom_token_id", 10**6)
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "eot.gguf", extra=ids))
  assert tok.eos_id == 1 and tok.eos_ids == (1, 2)
  assert Tokenizer.from_gguf(_write_gguf(tmp_path / "plain.gguf")).eos_ids == (1,)
  # an export keeps them (generation_config.json's eos_token_id, beside settings already there)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "generation_config.json").write_text('{"temperature": 0.6}')
  tok.save(tmp_path / "out")
  again = Tokenizer.from_tokenizer_json(tmp_path / "out")
  assert (again.eos_id, again.eos_ids) == (1, (1, 2))
  assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"temperature": 0.6,
                                                                                   "eos_token_id": [1, 2]}


@pytest.mark.parametrize("extra, want", [
    (["<|end|>"], ["<|end|>"]),  # Phi-3: its EOS is <|endoftext|>
    (["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"], ["<|eot_id|>", "<|eom_id|>"]),  # Llama 3
    (["<|im_end|>", "<|endoftext|>", "<|fim_pad|>"], ["<|im_end|>"]),  # Qwen2: end of text and FIM are not turns
    (["<|end|>", "<|return|>", "<|call|>"], []),  # gpt-oss: <|end|> ends a message within a turn
    (["<|end|>", "<|calls|>", "<|flush|>"], []),  # Solar Open, likewise
    (["<|end|>", "<|return|>"], ["<|end|>"]),
], ids=["phi3", "llama3", "qwen2", "gpt-oss", "solar-open", "return-only"])
def test_end_of_turn_tokens_a_gguf_file_does_not_name_end_generation(tmp_path, extra, want):
  """A converter writes the tokenizer's EOS, which for many chat models ends text rather than a turn; llama.cpp ends
  generation at end-of-turn tokens it knows by their text, and so does `eos_ids` (llama.cpp's end-of-turn and
  end-of-message texts; not its end-of-text or fill-in-the-middle ones, see `_end_of_turn`)."""
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", extra_tokens=extra))
  assert tok.eos_id == 1
  assert [tok.backend.id_to_token(i) for i in tok.eos_ids] == ["</s>", *want]


def test_chat_template_generation_blocks_render_their_text(tmp_path):
  """Hugging Face templates may wrap the assistant's text in `{% generation %}...{% endgeneration %}` (a marker for
  training masks; LFM2's and Laguna's templates do): it was a syntax error, and now writes its body, variables set
  inside staying inside as in transformers."""
  template = ("{% set n = 'outer' %}{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
              "{% set n = 'inner' %}[{{ m.content }}]{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
              "{% endfor %}{{ n }}")
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "g.gguf", template=template))
  messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  assert tok.apply_chat_template(messages) == "a[b]outer"


def test_backend_is_a_tokenizers_tokenizer(tok):
  assert isinstance(tok.backend, tokenizers.Tokenizer)
  assert "vocab_size=49152" in repr(tok)


def test_a_gguf_token_listed_twice_encodes_to_its_last_id_and_both_ids_decode(tmp_path):
  """llama.cpp keeps a GGUF vocabulary's last id for a repeated token's text and decodes every id to its own text:
  the first id decoded to nothing here (tokenizer.json's vocabulary holds a token once), and text encoded to it."""
  tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "dup.gguf", extra_tokens=["hello", "ll"]))
  first, last = 3 + 256 + 3, 3 + 256 + 5  # "hello" after the base list's "he", "ll", "hell", and at the end
  first_ll, last_ll = 3 + 256 + 1, 3 + 256 + 6
  assert tok.vocab_size == 3 + 256 + 7  # every id counts
  assert tok.encode("hello") == [last] and tok.token_to_id("hello") == last
  assert tok.encode("ll") == [last_ll]
  assert tok.decode([first, last]) == "hellohello" and tok.decode([first_ll]) == "ll"
  assert tok.id_to_token(first) == tok.id_to_token(last) == "hello"
  for s in ["hello world", "ll hell"]:
    assert tok.decode(tok.encode(s)) == s
  # tokenizer.json cannot list a token twice: the saved tokenizer keeps the aliases beside it.
  tok.save(tmp_path / "saved")
  again = Tokenizer.from_tokenizer_json(tmp_path / "saved")
  assert again.vocab_size == tok.vocab_size and again.decode([first, first_ll]) == "helloll"
  assert again.encode("hello ll") == tok.encode("hello ll")
  config = tmp_path / "saved" / "tokenizer_config.json"
  good = json.loads(config.read_text())
  for bad in ({"262": "x"}, {"262": None}, [[262, 264]], "262"):
    config.write_text(json.dumps(dict(good, jaxspec_token_aliases=bad)))
    with pytest.raises(ModelLoadError, match="jaxspec_token_aliases is not a map of token ids"):
      Tokenizer.from_tokenizer_json(tmp_path / "saved")


def test_a_special_token_at_the_earlier_id_of_a_repeated_token_keeps_that_id_through_save(tmp_path):
  """The GGUF names the first id of a token listed twice as EOS (the id the model emits): the saved tokenizer stops at
  that id too, though the token's text reads back as the last id."""
  base = Tokenizer.from_gguf(_write_gguf(tmp_path / "dup.gguf", extra_tokens=["hello", "ll"]))
  first, last = 3 + 256 + 3, 3 + 256 + 5
  first_ll, last_ll = 3 + 256 + 1, 3 + 256 + 6
  tok = Tokenizer(base.backend, bos_id=0, eos_id=first, pad_id=first_ll, unk_id=first,
                  aliases={first: last, first_ll: last_ll})
  tok.save(tmp_path / "saved")
  again = Tokenizer.from_tokenizer_json(tmp_path / "saved")
  assert (again.bos_id, again.eos_id, again.eos_ids) == (0, first, (first,))
  assert (again.pad_id, again.unk_id) == (first_ll, first)  # every special id, not only EOS
  assert again.encode("hello") == [last]
  # A special id kept by that name that is no aliased id (the file edited since) is not taken: the text decides.
  config = tmp_path / "saved" / "tokenizer_config.json"
  config.write_text(json.dumps(dict(json.loads(config.read_text()), jaxspec_alias_special_ids={"eos_token": 5})))
  assert Tokenizer.from_tokenizer_json(tmp_path / "saved").eos_id == last


def test_a_saved_tokenizer_with_a_repeated_token_takes_an_eos_id_of_config_json_up_to_its_last_id(tmp_path):
  """Where tokenizer_config.json names no EOS, the model's config.json does: any id of the vocabulary counts, its
  last ones too, though tokenizer.json holds a repeated token once (fewer entries than ids)."""
  base = Tokenizer.from_gguf(_write_gguf(tmp_path / "dup.gguf", eos_id=2**32 - 1, extra_tokens=["hello", "ll"]))
  first, last_ll = 3 + 256 + 3, 3 + 256 + 6  # the earlier "hello", and the vocabulary's last id
  assert base.eos_id is None
  base.save(tmp_path / "saved")
  (tmp_path / "saved" / "config.json").write_text(json.dumps({"eos_token_id": [last_ll, first, 3 + 256 + 7]}))
  again = Tokenizer.from_tokenizer_json(tmp_path / "saved")
  assert (again.eos_id, again.eos_ids) == (last_ll, (last_ll, first))  # one past the last id is no id
