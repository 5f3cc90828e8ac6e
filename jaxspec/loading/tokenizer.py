"""Tokenizers for jaxspec models: byte-level or SentencePiece BPE built from GGUF metadata, or a `tokenizer.json`.

Both paths produce a `tokenizers.Tokenizer` (the Rust library, no torch or transformers), wrapped in `Tokenizer`,
which adds the model's special token ids and its chat template rendered with a sandboxed jinja2 environment.

A GGUF file carries no `tokenizer.json`, only llama.cpp's description of one: the vocabulary, the merges (for
SentencePiece vocabularies a score per token instead), a type per token and the name of the pre-tokenizer
(`tokenizer.ggml.pre`) whose regular expressions llama.cpp hard-codes. We rebuild the same pipeline from those, so
ids match llama.cpp and the model's original Hugging Face tokenizer (scripts/llama_cpp_vocab_check.py runs
llama.cpp's own tokenizer tests).
"""

from __future__ import annotations

import datetime
import json
import logging
import mmap
import operator
import os
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from jaxspec import files
from jaxspec.errors import InputError
from jaxspec.loading.errors import ModelLoadError

logger = logging.getLogger(__name__)

# llama.cpp's token types (`llama_token_type`), as stored in `tokenizer.ggml.token_type`.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Control and unknown tokens are special: matched whole in text and dropped by `decode(skip_special_tokens=True)`.
# User-defined ones (e.g. `<think>`) are also matched whole, as llama.cpp does, but are ordinary text on decode.
_SPECIAL_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL)

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.chat_template", "tokenizer.ggml.scores",
    "tokenizer.ggml.add_space_prefix", "general.name", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
)

# Where a turn ends for a GGUF file's chat model. GGUF files rarely name their end-of-turn token, and a converter
# writes the tokenizer's EOS, which for many chat vocabularies ends text, not turns (Llama 3's <|end_of_text|>, Phi-3's
# and Qwen2's <|endoftext|>), so llama.cpp ends generation at tokens it knows by their text too. Of its list, jaxspec
# takes the end-of-turn and end-of-message tokens (`_end_of_turn`); not the end-of-text ones (<|endoftext|>, </s>:
# in Qwen2's vocabulary "</s>" is plain text) or the fill-in-the-middle ones, which a file's EOS already covers or a
# chat never writes, and which would make one-EOS baselines (T5X's) unusable.
_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]",
               "<end_of_utterance>")


def _end_of_turn(tokens: Sequence[str], named: list[int]) -> list[int]:
  """`named` (the metadata's EOS, end of turn and of message), and the vocabulary's `_TURN_TEXTS` tokens (each text's
  last id, as llama.cpp's map keeps). As llama.cpp does for gpt-oss's and Solar Open's vocabularies, `<|end|>` is
  left out where `<|return|>` and `<|call|>`, or `<|calls|>` and `<|flush|>`, are in the vocabulary: there it ends a
  message within a turn."""
  ids = {t: i for i, t in enumerate(tokens)}
  texts = set(_TURN_TEXTS)
  if {"<|return|>", "<|call|>"} <= ids.keys() or {"<|calls|>", "<|flush|>"} <= ids.keys():
    texts.discard("<|end|>")
  return list(dict.fromkeys([*named, *sorted(ids[t] for t in texts if t in ids)]))


# Phi-3's tokenizer.json strips the whitespace after its chat tokens (rstrip: the line break after <|user|> or <|end|>
# that its template writes is not tokenized). GGUF has no field for it: llama.cpp sets it on every special and
# user-defined token of a file whose general.name says Phi-3, but these three.
_PHI3_NAMES = ("phi-3", "phi3")
_PHI3_KEEP_WHITESPACE = ("<unk>", "<s>", "<|endoftext|>")


def _with_phi3_rstrip(meta: Mapping[str, Any], added: list[AddedToken]) -> list[AddedToken]:
  name = str(meta.get("general.name") or "").lower()
  if not any(n in name for n in _PHI3_NAMES):
    return added
  return [AddedToken(t.content, special=t.special, normalized=False, rstrip=t.content not in _PHI3_KEEP_WHITESPACE)
          for t in added]


def _gpt2_byte_level_pre_tokenizer():
  # The GPT-2 regex ('s|'t|...| ?\p{L}+| ?\p{N}+|...) is built into ByteLevel; no prefix space, as llama.cpp.
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer():
  # llama.cpp's "smollm" splits every digit on its own, then applies the GPT-2 regex; the original SmolLM
  # tokenizer.json says the same with Digits(individual_digits=True) before ByteLevel.
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      _gpt2_byte_level_pre_tokenizer(),
  ])


# The split of Llama 3 and Qwen2 (llama.cpp's "llama-bpe" and "qwen2" pre-tokenizers, as their tokenizer.json files
# write it): contractions in any case, letters with at most one non-letter before them, digits one at a time (Qwen2)
# or up to three together (Llama 3), punctuation runs with their line breaks, then whitespace. Qwen3.5's ("qwen35")
# keeps combining marks with the letters they follow: its letters are [\p{L}\p{M}].
_LETTERS_DIGITS_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?%(letters)s+|\p{N}%(digits)s"
                         r"| ?[^\s%(not_letters)s\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _regex_then_bytes(regex: str):
  """A pre-tokenizer maker: `regex`'s matches as pieces (and what lies between them), then the byte alphabet."""
  def make():
    split = pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return make


def _split_then_bytes(digits: str, marks: bool = False):
  letter_props = r"\p{L}\p{M}" if marks else r"\p{L}"
  return _regex_then_bytes(_LETTERS_DIGITS_SPLIT % {"letters": f"[{letter_props}]" if marks else letter_props,
                                                     "not_letters": letter_props, "digits": digits})


def _deepseek_coder_pre_tokenizer():
  # DeepSeek Coder (LLaMA architecture; 1.3B drafts for 6.7B and 33B): each line break alone, then letters with at
  # most one whitespace before them, then punctuation the same way, then runs of CJK ideographs and Hangul, then every
  # digit on its own, each split keeping what the earlier ones cut out; no GPT-2 regex after them.
  splits = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"]
  return pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated", invert=False) for r in splits]
      + [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])


# The letters of DeepSeek LLM's split (llama.cpp's "deepseek-llm"), as (first, last) code points: upper-, lower- and
# title-case letters of Latin, Greek, Cyrillic, Coptic, Glagolitic, Cherokee, Deseret, Osage, Adlam and a few other
# scripts, capital Armenian and Georgian, letter-like symbols and the full-width Latin letters. This is the model's own
# list, not all of Unicode's cased letters: lower-case Armenian and Georgian, the newer Latin Extended-D letters, the
# mathematical letters and every uncased script (CJK, Arabic, Hebrew, Thai, ...) are left out of it.
_DEEPSEEK_LLM_LETTERS = (
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386),
    (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B),
    (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
    (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D),
    (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184),
    (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943),
)


def _char_class(ranges) -> str:
  """A regular expression's class of the (first, last) code point ranges, each code point written as \\x{HHHH}."""
  return "[" + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b != a else "") for a, b in ranges) + "]"


def _deepseek_llm_pre_tokenizer():
  # DeepSeek LLM (LLaMA architecture; 7B and 67B), llama.cpp's "deepseek-llm": each line break alone; then runs of the
  # letters above with at most one whitespace before them; then runs of ASCII punctuation and symbols, their
  # full-width forms, the curly quotes and the ideographic space, comma and full stop, again with at most one
  # whitespace before; then the whitespace that ends a piece; then runs of CJK ideographs, Hangul and everything from
  # U+0800 up to the ideographs; then runs of digits (any numeric character). Each split works within the pieces the
  # earlier ones left and keeps what it cuts out. The ASCII range of the punctuation split runs from ":" to "~" over
  # the ASCII letters, so it also cuts ASCII letters out of a letter run that holds others (" Été" becomes " É", "t",
  # "é"), in llama.cpp as in the model's tokenizer.json. That file (as others copy it) splits each digit off where
  # llama.cpp keeps a run together; no token of the vocabulary holds two numeric characters, so the ids are the same.
  # No GPT-2 regex after the splits. As with DeepSeek Coder, llama.cpp takes a space beyond ASCII (U+2003, U+3000,
  # ...) as whitespace only, where these expressions (with transformers too) also let the CJK split's range from
  # U+0800 and the punctuation split's ideographic space take it, so a text with such a space can split differently.
  punctuation = ((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F), (0x3000, 0x3002))
  splits = [r"[\r\n]", r"\s?" + _char_class(_DEEPSEEK_LLM_LETTERS) + "+", r"\s?" + _char_class(punctuation) + "+",
            r"\s+$", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"]
  return pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated", invert=False) for r in splits]
      + [pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])


def _falcon_pre_tokenizer():
  # Falcon's split (llama.cpp's "falcon"): runs of punctuation and of the symbols $+<=>^~|` first,
  # then the GPT-2 regex on each piece, then groups of three ASCII digits within the digit runs it leaves.
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(r"[\p{P}$+<=>^~|`]+"), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      pre_tokenizers.Split(tokenizers.Regex("[0-9]{3}"), behavior="isolated", invert=False),
  ])


# GPT-4o's split (o200k; Phi-4-mini's GGUF files, "gpt-4o") and Mistral's Tekken split (Mistral NeMo, "tekken"), as
# the models' tokenizer.json files write them: a word is an optional non-letter, then upper-case-like letters followed
# by lower-case-like ones (or the other way round), so "helloWorld" splits before "World"; combining marks stay in
# words. GPT-4o keeps an English contraction on its word and takes digits up to three together, Tekken takes each
# digit alone; punctuation keeps the line breaks and slashes after it. llama.cpp runs a rewrite of these expressions
# without the Unicode classes, which splits combining marks off (an "e" + U+0301 is two pieces there, one in
# tokenizer.json): jaxspec follows tokenizer.json, as transformers does.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CASED_WORDS_SPLIT = (r"[^\r\n\p{L}\p{N}]?%(upper)s*%(lower)s+%(tail)s|[^\r\n\p{L}\p{N}]?%(upper)s+%(lower)s*%(tail)s"
                      r"|\p{N}%(digits)s| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _cased_words_then_bytes(contractions: bool, digits: str):
  tail = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?" if contractions else ""
  return _regex_then_bytes(_CASED_WORDS_SPLIT % {"upper": _UPPER, "lower": _LOWER, "tail": tail, "digits": digits})


# The pre-tokenizer names llama.cpp reads as Llama 3's among LLaMA-architecture models' (Falcon3's GGUF files say
# "falcon3": the Llama 3 split, whole vocabulary words and BOS by default, as llama.cpp reads them).
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "falcon3")
# Those whose words found whole in the vocabulary are taken whole before merging, as llama.cpp reads them.
_WHOLE_WORDS = (*_LLAMA3_NAMES, "tekken")

# `tokenizer.ggml.pre` values we reproduce exactly, for `tokenizer.ggml.model == "gpt2"`, each with the other names
# llama.cpp gives the same split (scripts/llama_cpp_vocab_check.py checks them against llama.cpp's own tests where it
# has them; GPT-4o's and Tekken's follow tokenizer.json, above). Others have their own regular expressions in
# llama.cpp; guessing them would silently give wrong ids, so they are refused.
GGUF_PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    **dict.fromkeys(("gpt-2", "mpt"), _gpt2_byte_level_pre_tokenizer),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r"), _smollm_pre_tokenizer),
    **dict.fromkeys(_LLAMA3_NAMES, _split_then_bytes("{1,3}")),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _split_then_bytes("")),
    "qwen35": _split_then_bytes("", marks=True),
    "deepseek-coder": _deepseek_coder_pre_tokenizer,
    "deepseek-llm": _deepseek_llm_pre_tokenizer,
    "falcon": _falcon_pre_tokenizer,
    "gpt-4o": _cased_words_then_bytes(True, "{1,3}"),
    "tekken": _cased_words_then_bytes(False, ""),
}
SUPPORTED_GGUF_MODELS = ("gpt2", "llama")


def _added_token(token: str, ttype: int) -> AddedToken | None:
  """Control, unknown and user-defined tokens as added tokens: matched whole in the raw text, as written (their vocab
  entry gives their id); control and unknown ones special. None for the others."""
  if ttype in _SPECIAL_TYPES or ttype == TOKEN_USER_DEFINED:
    return AddedToken(token, special=ttype in _SPECIAL_TYPES, normalized=False)
  return None


def _byte_level_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int], name: str):
  """GPT-2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with the file's pre-tokenizer and merges.

  Returns the backend (its added tokens not yet registered), each id's vocabulary spelling and the added tokens.
  """
  pre = meta.get("tokenizer.ggml.pre")
  if pre not in GGUF_PRE_TOKENIZERS:
    raise ModelLoadError(
        f"{name}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; jaxspec reproduces "
        f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}. Load the model from its Hugging Face folder instead "
        "(config.json, *.safetensors and tokenizer.json: --model FOLDER).")
  if not meta.get("tokenizer.ggml.merges") and any(
      len(t) > 1 and ty not in (*_SPECIAL_TYPES, TOKEN_USER_DEFINED) for t, ty in zip(tokens, types)):
    # Without merges every text would be split into single bytes (llama.cpp refuses such a file too). A vocabulary of
    # bytes alone has none to give (gguf-py writes no empty array).
    raise ModelLoadError(f"{name}: the byte-level BPE vocabulary has no merges (tokenizer.ggml.merges), so text would "
                         "be split into single bytes: convert the model again (llama.cpp's convert_hf_to_gguf.py), "
                         "or load its Hugging Face folder (--model FOLDER).")
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
  alphabet = _bytes_to_unicode()
  alphabet_chars = frozenset(alphabet.values())
  vocab: dict[str, int] = {}
  spelled: list[str] = []
  added: list[AddedToken] = []
  for i, (token, ttype) in enumerate(zip(tokens, types)):
    whole = _added_token(token, ttype)
    if whole is None and not alphabet_chars.issuperset(token):
      # A normal token written as raw text (some converters do): respell it in the byte alphabet the BPE uses.
      token = "".join(alphabet[b] for b in token.encode("utf-8"))
    # A token listed twice encodes to its last id, as in llama.cpp (whose text -> id map keeps the last write).
    vocab[token] = i
    spelled.append(token)
    if whole is not None:
      added.append(whole)
  # Llama 3's vocabulary holds words that its merges do not build (' Việt'); its tokenizer takes a word that is in the
  # vocabulary whole before merging, as llama.cpp does for this pre-tokenizer and tokenizer.json says.
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                            ignore_merges=pre in _WHOLE_WORDS))
  backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
  backend.decoder = decoders.ByteLevel()
  return backend, spelled, added


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int], name: str):
  """SentencePiece BPE (`tokenizer.ggml.model == "llama"`: Llama 1/2, Mistral 7B v0.1, TinyLlama, Phi-3).

  SentencePiece encodes by repeatedly joining the adjacent pair whose join is the vocabulary entry of highest score
  (llama.cpp does the same, from `tokenizer.ggml.scores`). A `tokenizers` BPE does it when its merges are every
  split of every entry into two entries, ranked by the entry's score, which is how the model's own tokenizer.json was
  converted from its SentencePiece file. Spaces are written '▁', one is put in front of the text and of the text after
  each special token (`tokenizer.ggml.add_space_prefix`, default true), and characters outside the vocabulary are
  spelled as their UTF-8 bytes' tokens (`<0x0A>`), or are the unknown token where the vocabulary has no byte tokens.

  One difference remains: where two joins have the same score, SentencePiece takes the left-most and the merges the
  lower id. Trained vocabularies give every piece its own score (Llama 2's share one only among its runs of spaces,
  where it made no difference on llama.cpp's tests and 3,000 random texts); gguf-py's fallback converter, which
  writes -1000 for every token, gives files where it can.
  """
  from tokenizers import normalizers

  scores = meta.get("tokenizer.ggml.scores")
  if scores is None or len(scores) != len(tokens):
    raise ModelLoadError(f"{name}: a SentencePiece vocabulary (tokenizer.ggml.model 'llama') needs a score per token "
                         f"(tokenizer.ggml.scores), and the file has {0 if scores is None else len(scores)} for "
                         f"{len(tokens)} tokens: convert the model again with llama.cpp's convert_hf_to_gguf.py.")
  vocab = {token: i for i, token in enumerate(tokens)}
  added = [t for t in map(_added_token, tokens, types) if t is not None]
  whole = {t.content for t in added}
  unknown = _token_at(tokens, meta.get("tokenizer.ggml.unknown_token_id"))
  if unknown is None:  # llama.cpp's fallback: the token typed unknown
    unknown = next((t for t, ttype in zip(tokens, types) if ttype == TOKEN_UNKNOWN), None)
  if unknown is None and not all(f"<0x{b:02X}>" in vocab for b in range(256)):
    raise ModelLoadError(f"{name}: the SentencePiece vocabulary has neither the 256 byte tokens (<0x00> ... <0xFF>) "
                         "nor an unknown token, so characters outside it could not be encoded: convert the model "
                         "again with llama.cpp's convert_hf_to_gguf.py, or load it from its Hugging Face folder.")
  ranked = []
  for token, i in vocab.items():
    if token in whole:
      continue
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        ranked.append((-float(scores[i]), i, cut, left, right))
  ranked.sort()
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                                            fuse_unk=True, byte_fallback=True, unk_token=unknown))
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  space = [normalizers.Replace(" ", "\u2581")]
  backend.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + space)
  backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                      + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return backend, list(tokens), added


def _token_at(tokens: Sequence[str], token_id) -> str | None:
  return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters, in which byte-level vocabularies are spelled."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  mapping = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


# --- GGUF metadata --------------------------------------------------------------------------------------------------

# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


def read_gguf_metadata(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, Any]:
  """Reads the key/value metadata of a GGUF file, without its tensors.

  `gguf.GGUFReader` builds a numpy view per array element, which takes seconds on a 49k-token vocabulary; this
  walks the header once with `struct` and takes tens of milliseconds.

  Args:
    path: the .gguf file.
    keys: if given, only these keys are returned (the others are still walked over: GGUF has no index).

  Returns:
    A dict from key to value: str, int, float, bool, or a list of those for arrays (as `GGUFReader`'s
    `field.contents()` would give).

  Raises:
    ModelLoadError: the file is missing, is not GGUF, or is truncated.
  """
  wanted = None if keys is None else set(keys)
  try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      return _parse_gguf_metadata(buf, wanted)
  except FileNotFoundError as e:
    raise ModelLoadError(f"No model file at {os.fspath(path)!r}.") from e
  except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
    if isinstance(e, ModelLoadError):
      raise ModelLoadError(f"{os.fspath(path)!r}: {e}") from e
    raise ModelLoadError(f"{os.fspath(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}). "
                         "The file is truncated or corrupt: download or convert it again.") from e


GGUF_MAGIC = b"GGUF"
NOT_GGUF = "not a GGUF file: it does not begin with the GGUF magic bytes"


def _parse_gguf_metadata(buf, wanted: set[str] | None) -> dict[str, Any]:
  if bytes(buf[:4]) != GGUF_MAGIC:
    raise ModelLoadError(f"{NOT_GGUF}.")
  # A big-endian file reads its small version number as a multiple of 2**16 when taken as little-endian.
  order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
  version = struct.unpack_from(order + "I", buf, 4)[0]
  if version < 2:
    raise ModelLoadError(f"GGUF version {version} is too old; convert the model again with a recent llama.cpp.")
  _, kv_count = struct.unpack_from(order + "QQ", buf, 8)
  u64 = struct.Struct(order + "Q")
  u32 = struct.Struct(order + "I")
  off = 24

  def read_string(off: int) -> tuple[str, int]:
    n = u64.unpack_from(buf, off)[0]
    start = off + 8
    return buf[start:start + n].decode("utf-8"), start + n

  def skip_string(off: int) -> int:
    return off + 8 + u64.unpack_from(buf, off)[0]

  def read_value(vtype: int, off: int, keep: bool) -> tuple[Any, int]:
    if vtype == _GGUF_STRING:
      return read_string(off) if keep else (None, skip_string(off))
    if vtype in _GGUF_SCALARS:
      s = struct.Struct(order + _GGUF_SCALARS[vtype])
      return (s.unpack_from(buf, off)[0] if keep else None), off + s.size
    if vtype == _GGUF_ARRAY:
      etype = u32.unpack_from(buf, off)[0]
      count = u64.unpack_from(buf, off + 4)[0]
      off += 12
      if etype in _GGUF_SCALARS:
        s = struct.Struct(f"{order}{count}{_GGUF_SCALARS[etype]}")
        return (list(s.unpack_from(buf, off)) if keep else None), off + s.size
      if etype == _GGUF_STRING:
        if not keep:
          for _ in range(count):
            off = skip_string(off)
          return None, off
        items = []
        append = items.append
        for _ in range(count):
          n = u64.unpack_from(buf, off)[0]
          off += 8
          append(buf[off:off + n].decode("utf-8"))
          off += n
        return items, off
      items = []
      for _ in range(count):  # arrays of arrays: rare, never large
        item, off = read_value(etype, off, keep)
        items.append(item)
      return (items if keep else None), off
    raise ModelLoadError(f"Unknown GGUF value type {vtype}.")

  out: dict[str, Any] = {}
  for _ in range(kv_count):
    key, off = read_string(off)
    vtype = u32.unpack_from(buf, off)[0]
    keep = wanted is None or key in wanted
    value, off = read_value(vtype, off + 4, keep)
    if keep:
      out[key] = value
  return out


def _reader_metadata(reader, keys: Iterable[str]) -> dict[str, Any]:
  """The same dict as `read_gguf_metadata`, from an already opened `gguf.GGUFReader`."""
  out = {}
  for key in keys:
    field = reader.fields.get(key)
    if field is not None:
      out[key] = field.contents()
  return out


# --- chat templates -------------------------------------------------------------------------------------------------


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
  # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the text the model sees.
  return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise_exception(message):
  import jinja2
  raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _generation_block_extension():
  """The `{% generation %}...{% endgeneration %}` block of Hugging Face chat templates, which marks the assistant's
  text for training masks (LFM2's and others' templates use it); rendering a prompt, it writes its body unchanged."""
  from jinja2 import nodes
  from jinja2.ext import Extension

  class GenerationBlock(Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.Scope(body, lineno=lineno)

  return GenerationBlock


def _compile_chat_template(source: str):
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  # The same environment settings as Hugging Face's chat templates, which these templates are written for; the
  # sandbox stops a template shipped inside a model file from reaching Python internals.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols", _generation_block_extension()])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


# --- files next to tokenizer.json -------------------------------------------------------------------------------------


def _read_json_object(path: str, fix: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when there is no such file.

  Raises:
    ModelLoadError: the file is unreadable or holds something other than an object; the message ends with `fix`.
  """
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"Could not read {path!r} ({type(e).__name__}: {e}): {fix}.") from e
  if not isinstance(value, dict):
    raise ModelLoadError(f"{path!r} holds a JSON {type(value).__name__}, not an object: {fix}.")
  return value


# tokenizer_config.json's key for `Tokenizer`'s aliases, written by `save` (other programs ignore it)
ALIASES_KEY = "jaxspec_token_aliases"
# and its key for special tokens at aliased ids (their text alone would read back as the other id)
ALIAS_SPECIAL_IDS_KEY = "jaxspec_alias_special_ids"


def _read_aliases(value, path: str) -> dict[int, int]:
  if value is None:
    return {}
  try:
    return {int(k): int(v) for k, v in value.items()}
  except (AttributeError, TypeError, ValueError):
    raise ModelLoadError(f"{path}: tokenizer_config.json's {ALIASES_KEY} is not a map of token ids to token ids: "
                         "export the tokenizer again (jaxspec writes it), or delete the key.") from None


def _model_config_ids(folder: str, vocab_size: int) -> dict[str, list[int]]:
  """`bos_token_id` and `eos_token_id` (each a list, maybe empty) of the model's generation_config.json, else its
  config.json: where transformers' `generate` takes them when the tokenizer config names none."""
  out: dict[str, list[int]] = {"bos_token_id": [], "eos_token_id": []}
  for name in ("generation_config.json", "config.json"):
    cfg = _read_json_object(os.path.join(folder, name), "fix it or download it again") or {}
    for key in out:
      value = cfg.get(key)
      values = value if isinstance(value, list) else [value]
      ids = [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size]
      if ids and not out[key]:
        out[key] = ids
  return out


# --- the tokenizer --------------------------------------------------------------------------------------------------


class Tokenizer:
  """A model's tokenizer: text <-> ids, special token ids and the chat template.

  Build one with `Tokenizer.from_gguf` or `Tokenizer.from_tokenizer_json`.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, unk_id: int | None = None, chat_template: str | None = None,
               add_bos_token: bool = False, name: str = "model", eos_ids: Sequence[int] | None = None,
               aliases: Mapping[int, int] | None = None):
    """Wraps a `tokenizers.Tokenizer`.

    Args:
      backend: the tokenizer doing the work.
      bos_id: beginning-of-sequence id, or None if the model has none.
      eos_id: end-of-sequence id (for chat models, the end-of-turn token), or None.
      pad_id: padding id, or None.
      unk_id: unknown-token id, or None.
      chat_template: the jinja2 chat template source, or None if the model has none.
      add_bos_token: whether the model expects BOS in front of every prompt (only informs `encode(add_bos=None)`).
      name: where the tokenizer came from, used in error messages.
      eos_ids: every id that ends generation, when the model names several (a generation_config.json list);
        default `[eos_id]`.
      aliases: ids whose text another id holds in `backend` (a GGUF vocabulary listing one token twice): id -> that
        id. They decode as it does; text encodes to the other id, as llama.cpp does.
    """
    self._backend = backend
    self._bos_id = bos_id
    self._eos_id = eos_id
    self._pad_id = pad_id
    self._unk_id = unk_id
    self._chat_template = chat_template
    self._compiled_template = None
    self.add_bos_token = bool(add_bos_token)
    self.name = name
    ids = [] if eos_id is None else [int(eos_id)]
    self._eos_ids = tuple(dict.fromkeys([*ids, *(int(i) for i in eos_ids or ())]))
    self._aliases = {int(k): int(v) for k, v in (aliases or {}).items()}

  # -- construction --

  @classmethod
  def from_gguf(cls, path_or_reader) -> "Tokenizer":
    """Builds the tokenizer described by a GGUF file's metadata.

    Args:
      path_or_reader: a .gguf path, or a `gguf.GGUFReader` already opened on it (its fields are reused, so a
        caller that loads the weights too parses the file once).

    Returns:
      The tokenizer, with special ids and chat template from the file.

    Raises:
      ModelLoadError (a ValueError): the file has no tokenizer, or one of a kind we do not rebuild exactly
        (`tokenizer.ggml.model` other than "gpt2" and "llama", or an unknown `tokenizer.ggml.pre`).
    """
    if hasattr(path_or_reader, "fields"):
      meta = _reader_metadata(path_or_reader, _TOKENIZER_KEYS)
      name = os.fspath(getattr(getattr(path_or_reader, "data", None), "filename", None) or "GGUF reader")
    else:
      name = os.fspath(path_or_reader)
      meta = read_gguf_metadata(name, _TOKENIZER_KEYS)
    return cls._from_gguf_metadata(meta, name)

  @classmethod
  def _from_gguf_metadata(cls, meta: Mapping[str, Any], name: str) -> "Tokenizer":
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
      raise ModelLoadError(f"{name}: the GGUF file has no tokenizer (no tokenizer.ggml.model / tokens).")
    if kind not in SUPPORTED_GGUF_MODELS:
      raise ModelLoadError(
          f"{name}: GGUF tokenizer model {kind!r} is not supported; jaxspec builds {', '.join(SUPPORTED_GGUF_MODELS)} "
          "(byte-level BPE, and SentencePiece BPE as Llama 2 and Mistral use). Load the model from its Hugging Face "
          "folder instead (config.json, *.safetensors and tokenizer.json: --model FOLDER), whose tokenizer.json "
          "jaxspec reads whatever its kind.")
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
      raise ModelLoadError(f"{name}: {len(tokens)} tokens but {len(types)} token types in the GGUF metadata.")
    if kind == "llama":
      backend, spelled, added = _sentencepiece_backend(meta, tokens, types, name)
      add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
      backend, spelled, added = _byte_level_backend(meta, tokens, types, name)
      add_bos_default = meta.get("tokenizer.ggml.pre") in _WHOLE_WORDS  # llama.cpp: BOS by default for these
    added = _with_phi3_rstrip(meta, added)
    # Special and user-defined tokens are registered in id order; their content is in the vocab already, so
    # adding them grows nothing and only makes them matched whole.
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    vocab = {t: i for i, t in enumerate(spelled)}  # a token listed twice: its last id, as in llama.cpp

    def token_id(key):
      value = meta.get(key)
      return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

    return cls(
        backend,
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"),
        pad_id=token_id("tokenizer.ggml.padding_token_id"),
        unk_id=token_id("tokenizer.ggml.unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        name=name,
        # end of turn and end of message (Llama 3.1's <|eot_id|>, <|eom_id|>) end generation too, as in llama.cpp
        eos_ids=_end_of_turn(tokens, [i for i in (
            token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.eot_token_id"),
            token_id("tokenizer.ggml.eom_token_id")) if i is not None]),
        aliases={i: vocab[t] for i, t in enumerate(spelled) if vocab[t] != i},  # the earlier ids of repeated tokens
    )

  @classmethod
  def from_tokenizer_json(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a Hugging Face `tokenizer.json`, with `tokenizer_config.json` next to it if present.

    The config gives the chat template and the bos/eos/pad/unk tokens; a `chat_template.jinja` file next to it, as
    newer Hugging Face saves write, takes precedence for the template. Where the config names no BOS or EOS, the
    model's `generation_config.json` or `config.json` next to it (`bos_token_id`, `eos_token_id`: an id or a list)
    give them, as they do for transformers' `generate`; every id of that `eos_token_id` ends generation too
    (`eos_ids`), as there.

    Args:
      path: the tokenizer.json file, or the folder holding it.

    Raises:
      ModelLoadError (a ValueError): no tokenizer.json there, or one `tokenizers` cannot read, or an unreadable
        tokenizer_config.json (or, when they are needed for the special ids, generation_config.json / config.json).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ModelLoadError(f"No tokenizer.json at {path!r}.")
    try:
      # Read here, not by tokenizers: its from_file cannot open a path with bytes that are not UTF-8 (a folder named
      # in Latin-1), and said that the file was damaged.
      with open(path, "rb") as f:
        backend = tokenizers.Tokenizer.from_str(f.read().decode("utf-8"))
    except OSError as e:
      raise ModelLoadError(f"Cannot read {path!r}: {e.strerror or e}.") from None
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ModelLoadError(f"{path!r} is not a readable tokenizer.json ({e}): it is damaged or cut short; copy it "
                           "again from where the model came from (or rerun the training command that exported "
                           "it).") from e

    folder = os.path.dirname(path)
    config = _read_json_object(
        os.path.join(folder, "tokenizer_config.json"),
        "copy it again from the model's original folder, or delete it (the special tokens then come from "
        "generation_config.json / config.json, and there is no chat template)") or {}

    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the one named "default" is the chat template
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path, encoding="utf-8") as f:
        template = f.read()

    def token_id(key):
      value = config.get(key)
      if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
      return backend.token_to_id(value) if isinstance(value, str) else None

    aliases = _read_aliases(config.get(ALIASES_KEY), path)
    # An aliased id (the earlier id of a token listed twice) is not what its text encodes to: `save` writes it.
    named = config.get(ALIAS_SPECIAL_IDS_KEY) if aliases else None
    named = named if isinstance(named, dict) else {}

    def special_id(key):
      value = named.get(key)
      return int(value) if isinstance(value, int) and int(value) in aliases else token_id(key)

    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    # (every id: a token listed twice is one entry of tokenizer.json, its earlier id an alias)
    model_ids = _model_config_ids(folder, backend.get_vocab_size(with_added_tokens=True) + len(aliases))
    if bos_id is None and model_ids["bos_token_id"]:
      bos_id = model_ids["bos_token_id"][0]
    if eos_id is None and model_ids["eos_token_id"]:
      eos_id = model_ids["eos_token_id"][0]
    # Generation ends at the tokenizer's EOS and at every id of the model's eos_token_id, where transformers'
    # `generate` ends (Llama 3.1 Instruct: <|eot_id|>, and <|eom_id|> and <|end_of_text|> from generation_config.json).
    eos_ids = model_ids["eos_token_id"]
    if eos_id is None:
      # Not an error (a bare tokenizer.json is a valid tokenizer), but generation then only stops at its length limit.
      logger.warning("%s: no EOS token (no eos_token in tokenizer_config.json, no eos_token_id in "
                     "generation_config.json or config.json next to it); generation stops only at the token limit.",
                     path)
    return cls(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=special_id("pad_token"),
        unk_id=special_id("unk_token"),
        chat_template=template,
        add_bos_token=bool(config.get("add_bos_token", False)),
        name=path,
        eos_ids=eos_ids,
        aliases=aliases,
    )

  def save(self, folder: str | os.PathLike) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` into `folder`, readable by `from_tokenizer_json`; and,
    where more ids than the EOS end generation (`eos_ids`), them as generation_config.json's `eos_token_id` (added
    to a generation_config.json already there)."""
    config: dict[str, Any] = {"add_bos_token": self.add_bos_token}
    for key, token_id in (("bos_token", self._bos_id), ("eos_token", self._eos_id), ("pad_token", self._pad_id),
                          ("unk_token", self._unk_id)):
      if token_id is not None:
        config[key] = self.id_to_token(token_id)
    if self._chat_template is not None:
      config["chat_template"] = self._chat_template
    if self._aliases:  # tokenizer.json's vocabulary cannot hold a token twice
      config[ALIASES_KEY] = {str(k): v for k, v in sorted(self._aliases.items())}
      # a special token at an aliased id: its text reads back as the last id, so the id itself is kept
      special = {key: token_id for key, token_id in (("bos_token", self._bos_id), ("eos_token", self._eos_id),
                                                     ("pad_token", self._pad_id), ("unk_token", self._unk_id))
                 if token_id is not None and token_id in self._aliases}
      if special:
        config[ALIAS_SPECIAL_IDS_KEY] = special
    # (the text written here, as save() writes it: tokenizers cannot open a path that is not UTF-8 itself)
    written = {"tokenizer.json": files.text_writer(self._backend.to_str(pretty=True)),
               "tokenizer_config.json": files.text_writer(json.dumps(config, ensure_ascii=False, indent=2))}
    if len(self._eos_ids) > 1:
      generation = _read_json_object(os.path.join(folder, "generation_config.json"), "fix it or delete it") or {}
      generation["eos_token_id"] = list(self._eos_ids)
      written["generation_config.json"] = files.text_writer(json.dumps(generation, indent=2))
    files.write_files(folder, written)

  # -- text <-> ids --

  def encode(self, text: str, *, add_bos: bool | None = False) -> list[int]:
    """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) become their single ids.

    Args:
      text: the text.
      add_bos: False: the text's own tokens only, for text that already holds the special tokens the model needs,
        as `apply_chat_template` output does (a template writes the BOS itself). True: `bos_id` first too. None:
        plain text as the model's own tokenizer encodes it, like transformers' `tokenizer(text)`: with the special
        tokens of tokenizer.json's post-processor (e.g. Llama 3's BOS in front, T5's </s> at the end), and `bos_id`
        first where the model sets `add_bos_token`.
    """
    if not isinstance(text, str):
      hint = ("encode each: [tok.encode(t) for t in texts]" if isinstance(text, (list, tuple)) else
              "decode bytes to str first (data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else
              "pass the prompt's text")
      raise InputError(f"encode takes one text (a str), got {type(text).__name__}: {hint}.")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8 on the command line or in a file
      raise InputError(f"The text holds {text[e.start:e.end]!r} at character {e.start}, which is not a Unicode "
                       "character (bytes that were not UTF-8?): pass UTF-8 text.") from None
    ids = self._backend.encode(text, add_special_tokens=False).ids
    if add_bos is None:
      if self._backend.post_processor is not None:
        ids = self._post_processed(text, ids)
      add_bos = self.add_bos_token
    if add_bos and self._bos_id is not None and (not ids or ids[0] != self._bos_id):
      ids = [self._bos_id] + ids
    return ids

  def _post_processed(self, text: str, ids: list[int]) -> list[int]:
    """The ids of `text` with the special tokens the post-processor adds, `ids` being those without."""
    full = self._backend.encode(text, add_special_tokens=True).ids
    # A text that already starts with BOS or ends with EOS keeps one, as `add_bos=True` does: the model never saw
    # two in a row in training.
    bos, eos = self._bos_id, self._eos_id
    if bos is not None and ids[:1] == [bos] and full[:2] == [bos, bos]:
      full = full[1:]
    if eos is not None and ids[-1:] == [eos] and full[-2:] == [eos, eos]:
      full = full[:-1]
    return full

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """The text of `ids`. With the default `skip_special_tokens=False`, `decode(encode(s)) == s` exactly.

    Args:
      ids: token ids (any iterable of ints, e.g. a list or a numpy array).
      skip_special_tokens: drop control tokens such as `<|im_end|>`.

    Ids past the tokenizer's vocabulary decode to nothing, as in `tokenizers` (a model's output table can have more
    rows than its tokenizer has entries).

    Raises:
      InputError: a negative id, or something other than one sequence of whole numbers (a batch of rows, text).
    """
    if isinstance(ids, (str, bytes)):
      raise InputError(f"decode takes token ids, got {type(ids).__name__} {ids[:20]!r}: pass the ids (e.g. "
                       "res.tokens[0]).")
    ids = [_token_id(i) for i in ids]
    if ids and min(ids) < 0:
      raise InputError(f"Token id {min(ids)} is negative: token ids start at 0.")
    if self._aliases:
      ids = [self._aliases.get(i, i) for i in ids]
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str | None:
    """The vocabulary entry of `token_id` (byte-level spelling, e.g. 'Ġthe'), or None."""
    token_id = int(token_id)
    return self._backend.id_to_token(self._aliases.get(token_id, token_id))

  def token_to_id(self, token: str) -> int | None:
    """The id of a vocabulary entry, or None."""
    return self._backend.token_to_id(token)

  # -- properties --

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer`."""
    return self._backend

  @property
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None."""
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    """End-of-sequence id (for chat models the end-of-turn token, e.g. `<|im_end|>`), or None."""
    return self._eos_id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends generation: `eos_id` first, then, from a folder, the ids of generation_config.json's (else
    config.json's) `eos_token_id`, and from a GGUF file its end-of-turn and end-of-message ids."""
    return self._eos_ids

  @property
  def pad_id(self) -> int | None:
    """Padding id, or None."""
    return self._pad_id

  @property
  def unk_id(self) -> int | None:
    """Unknown-token id, or None."""
    return self._unk_id

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self._backend.get_vocab_size(with_added_tokens=True) + len(self._aliases)

  @property
  def chat_template(self) -> str | None:
    """The jinja2 chat template source, or None."""
    return self._chat_template

  # -- chat --

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                          **kwargs: Any) -> str:
    """Renders a conversation into the prompt text the model was trained on.

    Args:
      messages: e.g. `[{"role": "user", "content": "Hi"}]`.
      add_generation_prompt: end with the header of an assistant turn, so the model answers.
      **kwargs: extra template variables (e.g. `tools`).

    Returns:
      The text; pass it to `encode` (it already holds any special tokens the template writes).

    Raises:
      InputError (a ValueError): the model has no chat template, or the template rejected the messages.
    """
    if self._chat_template is None:
      raise InputError(f"{self.name}: the model has no chat template; give it a raw prompt instead of chat "
                       "messages (on the command line: leave out --chat).")
    import jinja2

    if self._compiled_template is None:
      try:
        self._compiled_template = _compile_chat_template(self._chat_template)
      except jinja2.exceptions.TemplateSyntaxError as e:
        raise InputError(f"{self.name}: the chat template is not valid jinja2 (line {e.lineno}: {e.message}); fix "
                         "it in the model's files (chat_template.jinja, or chat_template in tokenizer_config.json), "
                         "or with `jaxspec generate` leave out --chat.") from e
    variables = {"bos_token": self._text_of(self._bos_id), "eos_token": self._text_of(self._eos_id),
                 "pad_token": self._text_of(self._pad_id), "unk_token": self._text_of(self._unk_id)}
    variables.update(kwargs)
    try:
      return self._compiled_template.render(
          messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
      raise InputError(f"{self.name}: the chat template failed: {e}") from e

  def _text_of(self, token_id: int | None) -> str:
    return "" if token_id is None else self.decode([token_id])

  def __repr__(self) -> str:
    return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self._bos_id}, eos_id={self._eos_id}, "
            f"pad_id={self._pad_id}, chat_template={'yes' if self._chat_template else 'no'})")


def _token_id(value) -> int:
  """One token id for `Tokenizer.decode`: a Python, numpy or JAX integer (or a whole float); a nested sequence is a
  batch, which `decode` does not take (`int()` failed on it with a TypeError, and truncated 2.5 to 2)."""
  if not isinstance(value, bool):
    try:
      return operator.index(value)
    except TypeError:
      pass
  # a float of any kind (numpy's and JAX's float32 too, not only Python's float and np.float64 that subclasses it)
  if isinstance(value, float) or getattr(getattr(value, "dtype", None), "kind", None) == "f" and not value.ndim:
    if float(value).is_integer():
      return int(value)
  if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0):
    raise InputError("decode takes one sequence of token ids, and this one holds sequences (a batch?): decode each "
                     "row, e.g. [tok.decode(row) for row in res.tokens].")
  raise InputError(f"decode takes token ids (whole numbers), got {value!r}.")


def end_ids(tokenizer) -> list[int]:
  """Every id that ends a row for `tokenizer`: its `eos_ids` (a model may name several: a generation_config.json list,
  a GGUF file's end-of-turn id), or, for a tokenizer without them, its `eos_id` alone."""
  ids = getattr(tokenizer, "eos_ids", None)
  if ids is not None:
    return list(ids)
  return [tokenizer.eos_id] if tokenizer.eos_id is not None else []
