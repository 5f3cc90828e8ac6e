"""jaxspec's GGUF tokenizers against llama.cpp's own tokenizer tests.

llama.cpp ships vocabulary-only GGUF files of real models' tokenizers (`models/ggml-vocab-<name>.gguf`) with test
texts (`.gguf.inp`, separated by `__ggml_vocab_test__` lines) and the ids llama.cpp gives them (`.gguf.out`, a line of
ids per text, without BOS). This script encodes every text with `Tokenizer.from_gguf` and compares, and checks that
decoding gives the text back. The files come from the llama-cpp-python source package on PyPI, which vendors
llama.cpp; nothing is copied into the project.

  python scripts/llama_cpp_vocab_check.py                 # downloads llama-cpp-python's sdist (76 MB) once
  python scripts/llama_cpp_vocab_check.py PATH            # a llama.cpp models/ folder, or the .tar.gz

Prints a line per vocabulary: ids equal / texts, round trips, or why jaxspec refuses the vocabulary (a kind or
pre-tokenizer it does not rebuild). Exits 1 if a vocabulary jaxspec loads gives a different id or text.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile

SDIST = "llama-cpp-python==0.3.36"
SEPARATOR = "\n__ggml_vocab_test__\n"


def cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jaxspec", "llama-cpp-python")


def download(folder: str | None = None) -> str:
  """The llama-cpp-python sdist's path, downloaded with pip into `folder` (default: the user's cache) if missing."""
  folder = folder or cache_dir()
  version = SDIST.split("==")[1]
  path = os.path.join(folder, f"llama_cpp_python-{version}.tar.gz")
  if not os.path.exists(path):
    os.makedirs(folder, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST,
                    "-d", folder], check=True)
  return path


def vocab_files(path: str) -> dict[str, dict[str, bytes]]:
  """{vocabulary name: {"gguf": bytes, "inp": bytes, "out": bytes}} for the vocabularies that have tests."""
  found: dict[str, dict[str, bytes]] = {}
  pattern = re.compile(r"(?:^|/)models/ggml-vocab-([\w.-]+?)\.gguf(\.inp|\.out)?$")
  if os.path.isdir(path):
    entries = ((os.path.join("models", name), os.path.join(path, name)) for name in sorted(os.listdir(path)))
    for member, full in entries:
      match = pattern.search(member)
      if match:
        with open(full, "rb") as f:
          found.setdefault(match.group(1), {})[(match.group(2) or ".gguf")[1:]] = f.read()
  else:
    with tarfile.open(path) as tar:
      for member in tar.getmembers():
        match = pattern.search(member.name)
        if match and member.isfile():
          found.setdefault(match.group(1), {})[(match.group(2) or ".gguf")[1:]] = tar.extractfile(member).read()
  return {name: files for name, files in sorted(found.items()) if {"gguf", "inp", "out"} <= files.keys()}


def cases(inp: bytes, out: bytes) -> list[tuple[str, list[int]]]:
  texts = inp.decode("utf-8").split(SEPARATOR)
  if texts and texts[-1] == "":
    texts.pop()
  lines = out.decode("utf-8").split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if len(texts) != len(lines):
    raise ValueError(f"{len(texts)} texts but {len(lines)} lines of ids")
  return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def check(path: str) -> list[dict]:
  """One record per vocabulary: name, loaded (or the refusal), texts, equal ids, equal round trips, first misses."""
  from jaxspec.loading.errors import ModelLoadError
  from jaxspec.loading.tokenizer import Tokenizer

  records = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, files in vocab_files(path).items():
      gguf_path = os.path.join(tmp, f"ggml-vocab-{name}.gguf")
      with open(gguf_path, "wb") as f:
        f.write(files["gguf"])
      record = {"name": name, "loaded": True, "texts": 0, "ids_equal": 0, "round_trips": 0, "misses": []}
      try:
        tok = Tokenizer.from_gguf(gguf_path)
      except ModelLoadError as e:
        record.update(loaded=False, refusal=str(e).split(": ", 1)[-1].split(";")[0])
        records.append(record)
        continue
      for text, expected in cases(files["inp"], files["out"]):
        got = tok.encode(text, add_bos=False)
        record["texts"] += 1
        record["ids_equal"] += got == expected
        record["round_trips"] += tok.decode(got) == text
        if got != expected and len(record["misses"]) < 3:
          record["misses"].append({"text": text, "expected": expected, "got": got})
      records.append(record)
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", nargs="?", help="llama.cpp's models/ folder or llama-cpp-python's sdist (.tar.gz); "
                      f"default: download {SDIST}'s sdist into {cache_dir()}")
  args = parser.parse_args(argv)
  path = args.path or download()
  records = check(path)
  bad = False
  print("| vocabulary | ids equal to llama.cpp's | decode gives the text |")
  print("|---|---|---|")
  for r in records:
    if not r["loaded"]:
      print(f"| {r['name']} | refused: {r['refusal']} | |")
      continue
    bad |= r["ids_equal"] != r["texts"] or r["round_trips"] != r["texts"]
    print(f"| {r['name']} | {r['ids_equal']} / {r['texts']} | {r['round_trips']} / {r['texts']} |")
    for miss in r["misses"]:
      print(f"    {miss['text']!r}: llama.cpp {miss['expected']}, jaxspec {miss['got']}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
