"""jaxspec's GGUF loader on files written by llama.cpp's own converter, `convert_hf_to_gguf.py`.

The tiny random checkpoints of tests/fixtures/llama_variants/ (written by scripts/llama_variants_reference.py, with
transformers' logits in llama_variants_reference.npz) are converted by llama.cpp's converter, as f32, f16 and q8_0
files, and loaded with `jaxspec.loading.gguf_loader.load_gguf`. The converter is the one vendored in llama-cpp-python's
source package on PyPI (scripts/llama_cpp_vocab_check.py downloads it); it runs in a separate venv holding torch,
transformers and sentencepiece (not jaxspec dependencies), with the package's own gguf-py on its path:

  /work/hfenv/bin/pip install -q sentencepiece "protobuf<5"       # beside torch and transformers
  python scripts/llama_cpp_convert_check.py [--python /work/hfenv/bin/python] [--llama-cpp PATH] [--out DIR]

The converter needs a tokenizer, which the checkpoints lack: each copy gets a `tokenizer.model`, a SentencePiece BPE
model of the checkpoint's vocabulary size trained here on a fixed text (both converters this checks, LLaMA's and
Qwen2's, read a `tokenizer.model` before anything else; their byte-level BPE path would need a pre-tokenizer whose
hash they know). tests/fixtures/llama_cpp_gguf/ holds f32 files it wrote (`--out tests/fixtures/llama_cpp_gguf
--outtypes f32 --variants llama3 linear qwen2`; a rerun writes the same bytes).

Prints a line per variant for the tokenizer (`Tokenizer.from_gguf`'s ids against SentencePiece's with the
`tokenizer.model` the converter read), and one per variant and outtype: the largest difference from the logits
jaxspec computes from the folder and from transformers' logits, or why jaxspec refuses the file. Every file must
give the folder's logits within `TOLERANCE` once the folder's weights are rounded as the file stores them (f16 and
q8_0 round the matrices; norms, biases and rope_freqs stay f32), so jaxspec must read exactly what the converter
wrote. Against transformers' f32 logits an f16 or q8_0 file differs by its rounding (on these weights about 5e-3 for
f16 and 0.15 for q8_0: q8_0 keeps 8 bits per weight, a step of 1/127 of the largest of 32), which `ROUNDING_BOUND`
bounds loosely. Exits 1 on a difference beyond these, on other ids than SentencePiece's, on a refusal `VARIANTS` does
not expect (or a load where it expects one), or when the converter fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
# Variant (a folder of tests/fixtures/llama_variants/ and a key prefix of llama_variants_reference.npz): None if
# jaxspec loads its GGUF files, else the refusal it gives (a regular expression).
VARIANTS = {
    "llama3": None,  # LlamaForCausalLM, Llama 3.1's RoPE scaling: the converter writes rope_freqs.weight
    "linear": None,  # LlamaForCausalLM, linear RoPE scaling: rope.scaling.type and factor in the metadata
    "qwen2": None,  # Qwen2ForCausalLM: q/k/v biases, Q/K rows not permuted, tied head
    "llama_bias": r"jaxspec reads a GGUF file's biases for Qwen2's q/k/v only",  # LLaMA with all seven biases
    "phi3": None,  # Phi3ForCausalLM: fused attn_qkv and ffn_up, a sliding window (a bounded context)
    "phi3_longrope": None,  # Phi-3's LongRoPE: rope_factors_short/long tensors and the attention factor
    "qwen2_yarn": None,  # Qwen2 with YaRN: rope.scaling.type yarn, factor and original context in the metadata
    "phi3_window": None,  # Phi-3 with a window of 48 tokens, which the references pass
    # (not mistral_window: llama.cpp's converter writes a Mistral model as "llama" without its window, the model
    # llama.cpp runs, so its files differ from transformers past the window whoever reads them)
    "phi4_mini": None,  # Phi-3 with rotary embeddings on 3/4 of each head (rope.dimension_count), LongRoPE, tied head
    "qwen3": None,  # Qwen3ForCausalLM: attn_q_norm / attn_k_norm, key_length 24 apart from width / heads, tied head
}
OUTTYPES = ("f32", "f16", "q8_0")
TOLERANCE = 1e-4  # largest |logit difference| from the folder (its weights rounded as the file stores them)
ROUNDING_BOUND = {"f32": 2e-4, "f16": 0.02, "q8_0": 0.5}  # largest |logit difference| from transformers' f32 logits
# The text the tokenizer is trained on (any fixed text that gives the vocabulary size will do).
TOKENIZER_TEXT = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)] + [
    "speculative decoding verifies the drafted tokens in one forward pass"] * 5
TOKENIZER_CHECKS = [" the  lazy dog", "quick\tbrown fox\n", "dog 12345 times", "Unseen letters: XYZ!", ""]
HF_PYTHON = os.environ.get("JAXSPEC_HF_PYTHON", "/work/hfenv/bin/python")
_CONVERTER_FILES = re.compile(r"^(?:.*/)?vendor/llama\.cpp/((?:convert_hf_to_gguf\.py)|(?:conversion|gguf-py)/.*)$")


def llama_cpp_source(path: str, tmp: str) -> str:
  """A folder holding llama.cpp's `convert_hf_to_gguf.py`: `path` itself, or the converter's files extracted from
  llama-cpp-python's sdist (`path`, or the sdist scripts/llama_cpp_vocab_check.py downloads) into `tmp`."""
  if path is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_cpp_vocab_check

    path = llama_cpp_vocab_check.download()
  if os.path.isdir(path):
    return path
  out = os.path.join(tmp, "llama.cpp")
  with tarfile.open(path) as tar:
    for member in tar.getmembers():
      match = _CONVERTER_FILES.match(member.name)
      if match and member.isfile():
        target = os.path.join(out, *match.group(1).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
          f.write(tar.extractfile(member).read())
  if not os.path.isfile(os.path.join(out, "convert_hf_to_gguf.py")):
    raise SystemExit(f"{path} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
  return out


def write_tokenizer(folder: str, vocab_size: int) -> None:
  """A SentencePiece BPE `tokenizer.model` of `vocab_size` pieces (<unk>, <s>, </s> at 0, 1, 2, as the checkpoints'
  configs say) in `folder`, its spaces kept as Llama's tokenizer keeps them. Training is deterministic: the same
  bytes on every run."""
  try:
    import sentencepiece as spm
  except ImportError as e:
    raise SystemExit("sentencepiece is missing: pip install -e '.[test]'") from e
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT), model_writer=model, vocab_size=vocab_size,
                                 model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
                                 remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 num_threads=1, minloglevel=2)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())


def check_tokenizer(path: str, folder: str) -> tuple[bool, str]:
  """(good, line): the ids `Tokenizer.from_gguf` gives the GGUF file at `path` against SentencePiece's with the
  `tokenizer.model` in `folder` that the converter read, on the training text and `TOKENIZER_CHECKS`."""
  import sentencepiece as spm

  from jaxspec.loading.tokenizer import Tokenizer

  sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
  tok = Tokenizer.from_gguf(path)
  texts = TOKENIZER_TEXT[:20] + TOKENIZER_CHECKS
  misses = [t for t in texts if tok.encode(t, add_bos=False) != sp.encode(t)]
  line = f"ids equal to SentencePiece's on {len(texts) - len(misses)}/{len(texts)} texts"
  if misses:
    t = misses[0]
    line += f"; {t!r}: SentencePiece {sp.encode(t)}, jaxspec {tok.encode(t, add_bos=False)}"
  return not misses, line


def convert(python: str, llama_cpp: str, folder: str, outfile: str, outtype: str) -> str | None:
  """Runs the converter; None when it wrote `outfile`, else the end of its output."""
  env = {**os.environ, "PYTHONPATH": os.path.join(llama_cpp, "gguf-py")}
  env.pop("NO_LOCAL_GGUF", None)
  run = subprocess.run([python, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), folder, "--outfile", outfile,
                        "--outtype", outtype], capture_output=True, text=True, env=env)
  if run.returncode == 0 and os.path.isfile(outfile):
    return None
  lines = (run.stdout + run.stderr).strip().splitlines()
  return lines[-1] if lines else f"exit status {run.returncode}"


def batch_logits(model, params, ids: np.ndarray) -> np.ndarray:
  """Teacher-forced logits of every row of `ids` at every 4th position (as llama_variants_reference.npz keeps them;
  tests/test_llama_variants.py computes them the same way)."""
  import jax.numpy as jnp

  b, t = ids.shape
  out = model.forward(params, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), (b, t)), model.init_cache(b, t),
                      jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)))[0]
  return np.asarray(out)[:, ::4]


def rounded_as_in(path: str, cfg, params: dict) -> dict:
  """`params` (a folder's) with every weight the GGUF file at `path` stores in another type than f32 rounded to that
  type, as the converter rounds it: what the file's weights should dequantize to."""
  import gguf
  import jax.numpy as jnp

  from jaxspec.loading.gguf_loader import _target

  reader = gguf.GGUFReader(path)
  arch = reader.fields["general.architecture"].contents()
  out = dict(params)
  for t in reader.tensors:
    path_, fn = _target(t.name, cfg, arch)
    if path_ is None or t.tensor_type == gguf.GGMLQuantizationType.F32:
      continue
    # A fused matrix (Phi-3's q/k/v, gate/up) is rounded part by part: its parts are whole rows.
    leaves = [(*path_[:-1], p, "kernel") for p in path_[-1]] if isinstance(path_[-1], tuple) else [path_]
    for leaf in leaves:
      node = out
      for k in leaf[:-1]:
        node[k] = dict(node[k])  # copy the branch: the folder's params stay as they are
        node = node[k]
      w = np.asarray(node[leaf[-1]], np.float32)
      # Kernels are [in, out]; the file holds [out, in] (Q/K rows permuted, which moves whole rows: rounding blocks
      # of a row commutes with it), and quantization blocks run along the last dimension.
      w = w.T if fn is not None else w
      w = gguf.quants.dequantize(gguf.quants.quantize(w, t.tensor_type), t.tensor_type).reshape(w.shape)
      node[leaf[-1]] = jnp.asarray(w.T if fn is not None else w)
  return out


def check_file(path: str, name: str, outtype: str, ref: dict, folder: tuple, folder_logits: np.ndarray
               ) -> tuple[bool, str]:
  """(good, line) for one converted file; `folder`: jaxspec's `(model, params)` from the variant's folder, and
  `folder_logits` what they compute."""
  from jaxspec.decoding.generate import generate
  from jaxspec.loading.errors import ModelLoadError
  from jaxspec.loading.gguf_loader import load_gguf

  expected_refusal = VARIANTS[name]
  try:
    model, params = load_gguf(path)
  except ModelLoadError as e:
    good = expected_refusal is not None and re.search(expected_refusal, str(e)) is not None
    return good, f"refused{'' if good else ' (not expected)'}: {e}"
  ids = ref[f"{name}_ids"]
  got = batch_logits(model, params, ids)
  folder_model, folder_params = folder
  exact = folder_logits if outtype == "f32" else batch_logits(
      folder_model, rounded_as_in(path, folder_model.cfg, folder_params), ids)
  d_folder = float(np.abs(got - exact).max())
  d_hf = float(np.abs(got - ref[f"{name}_logits"]).max())
  want = ref[f"{name}_greedy"].tolist()
  greedy = generate(model, params, [ids[0, :40].tolist()], max_new_tokens=len(want)).tokens[0]
  same = sum(a == b for a, b in zip(greedy, want))
  good = d_folder <= TOLERANCE and d_hf <= ROUNDING_BOUND[outtype] and (outtype != "f32" or same == len(want))
  scaling = dict(model.cfg.rope_scaling).get("rope_type", "none")
  line = (f"max |diff| from the folder{'' if outtype == 'f32' else ' rounded as the file'} {d_folder:.2e}, "
          f"from transformers {d_hf:.2e}; greedy {same}/{len(want)} equal; rope {scaling}, "
          f"biases q/k/v {model.cfg.qkv_bias}, tied head {model.cfg.tie_embeddings}")
  if expected_refusal is not None:
    good, line = False, line + " (loads, where VARIANTS expects a refusal: update the table)"
  return good, line


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--python", default=HF_PYTHON, help="the Python of a venv with torch, transformers and "
                      "sentencepiece (default: $JAXSPEC_HF_PYTHON or /work/hfenv/bin/python)")
  parser.add_argument("--llama-cpp", help="a llama.cpp source folder, or llama-cpp-python's sdist (.tar.gz); default: "
                      "the sdist scripts/llama_cpp_vocab_check.py downloads")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--outtypes", nargs="+", default=list(OUTTYPES), choices=OUTTYPES)
  parser.add_argument("--out", help="keep the converted files here, as <variant>-<outtype>.gguf")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.python):
    raise SystemExit(f"No Python at {args.python!r}: pass --python or set JAXSPEC_HF_PYTHON")
  from jaxspec.loading.hf import load_hf

  with np.load(os.path.join(FIXTURES, "llama_variants_reference.npz")) as z:
    ref = {k: z[k] for k in z.files}
  bad = False
  with tempfile.TemporaryDirectory() as tmp:
    llama_cpp = llama_cpp_source(args.llama_cpp, tmp)
    jobs = {}
    if args.out:
      os.makedirs(args.out, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
      for name in args.variants:
        folder = os.path.join(tmp, "models", name)  # the converter names the model after the folder
        shutil.copytree(os.path.join(FIXTURES, "llama_variants", name), folder)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
          write_tokenizer(folder, json.load(f)["vocab_size"])
        for outtype in args.outtypes:
          outfile = os.path.join(args.out or tmp, f"{name}-{outtype}.gguf")
          jobs[name, outtype] = (outfile, pool.submit(convert, args.python, llama_cpp, folder, outfile, outtype))
    for name in args.variants:
      outfile, job = jobs[name, args.outtypes[0]]
      if job.result() is None:
        good, line = check_tokenizer(outfile, os.path.join(tmp, "models", name))
        bad |= not good
        print(f"{name} tokenizer: {line}{'' if good else '  <-- FAIL'}")
      folder = load_hf(os.path.join(FIXTURES, "llama_variants", name))
      folder_logits = batch_logits(*folder, ref[f"{name}_ids"])
      for outtype in args.outtypes:
        outfile, job = jobs[name, outtype]
        failure = job.result()
        if failure is not None:
          bad = True
          print(f"{name} {outtype}: the converter failed: {failure}")
          continue
        good, line = check_file(outfile, name, outtype, ref, folder, folder_logits)
        bad |= not good
        print(f"{name} {outtype} ({os.path.getsize(outfile) / 1024:.0f} KiB): {line}{'' if good else '  <-- FAIL'}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
