"""jaxspec's chat-template rendering against transformers' on real models' templates.

llama.cpp keeps the chat templates of many models (`models/templates/*.jinja`, in llama-cpp-python's source package
on PyPI, which scripts/llama_cpp_vocab_check.py downloads). Each is rendered for three conversations (one user turn;
a system turn first; three turns), with and without the generation prompt, by transformers (run in a separate venv:
torch and transformers are not jaxspec dependencies) and by `jaxspec.loading.tokenizer.Tokenizer.apply_chat_template`,
and the texts compared.

  /work/hfenv/bin/python scripts/chat_template_check.py reference OUT.json [PATH]   # transformers' renders
  python scripts/chat_template_check.py compare OUT.json [PATH]                    # jaxspec's, against them

PATH: llama.cpp's models/ folder or llama-cpp-python's sdist (default: the sdist in the user's cache). Prints how many
renders are equal, differ, or fail on one side only (with the first difference); exits 1 if any differ or only
jaxspec fails. A template that fails in both (it refuses the conversation, say) is counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}],
    "multi": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": 'Tell me a joke <with> & "quotes".'}],
}
SPECIAL = {"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>", "unk_token": "<UNK>"}


def templates(path: str) -> dict[str, str]:
  pattern = re.compile(r"(?:^|/)models/templates/([^/]+\.jinja)$")
  found = {}
  if os.path.isdir(path):
    folder = os.path.join(path, "templates")
    for name in sorted(os.listdir(folder)):
      if name.endswith(".jinja"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
          found[name] = f.read()
  else:
    with tarfile.open(path) as tar:
      for member in tar.getmembers():
        match = pattern.search(member.name)
        if match and member.isfile():
          found[match.group(1)] = tar.extractfile(member).read().decode("utf-8")
  return dict(sorted(found.items()))


def cases():
  for conversation in CONVERSATIONS:
    for generation_prompt in (True, False):
      yield f"{conversation}|{generation_prompt}", CONVERSATIONS[conversation], generation_prompt


def render_reference(sources: dict[str, str]) -> dict[str, dict]:
  from transformers.utils.chat_template_utils import _compile_jinja_template

  out = {}
  for name, source in sources.items():
    for key, messages, generation_prompt in cases():
      try:
        text = _compile_jinja_template(source).render(messages=messages, add_generation_prompt=generation_prompt,
                                                      **SPECIAL)
        out[f"{name}|{key}"] = {"text": text}
      except Exception as e:  # the template's own refusal, or a construct transformers lacks
        out[f"{name}|{key}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
  return out


def render_jaxspec(sources: dict[str, str]) -> dict[str, dict]:
  import tokenizers

  from jaxspec.loading.tokenizer import Tokenizer

  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.add_special_tokens(list(SPECIAL.values()))
  out = {}
  for name, source in sources.items():
    tok = Tokenizer(backend, bos_id=0, eos_id=1, pad_id=2, unk_id=3, chat_template=source)
    for key, messages, generation_prompt in cases():
      try:
        out[f"{name}|{key}"] = {"text": tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)}
      except Exception as e:
        out[f"{name}|{key}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
  return out


def compare(reference: dict[str, dict], ours: dict[str, dict]) -> int:
  counts = {"equal": 0, "differ": 0, "both fail": 0, "only jaxspec fails": 0, "only transformers fails": 0}
  for key, ref in reference.items():
    got = ours[key]
    if "text" in ref and "text" in got:
      if ref["text"] == got["text"]:
        counts["equal"] += 1
        continue
      counts["differ"] += 1
      a, b = ref["text"], got["text"]
      i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
      print(f"{key}: differ at character {i}\n  transformers {a[max(0, i - 40):i + 60]!r}\n"
            f"  jaxspec      {b[max(0, i - 40):i + 60]!r}")
    elif "error" in ref and "error" in got:
      counts["both fail"] += 1
    elif "error" in got:
      counts["only jaxspec fails"] += 1
      print(f"{key}: jaxspec fails: {got['error']}")
    else:
      counts["only transformers fails"] += 1
      print(f"{key}: transformers fails: {ref['error']}")
  print(f"{len(reference)} renders of {len({k.split('|')[0] for k in reference})} templates: "
        + ", ".join(f"{name} {n}" for name, n in counts.items()))
  return 1 if counts["differ"] or counts["only jaxspec fails"] else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=("reference", "compare"))
  parser.add_argument("renders", help="the JSON file of transformers' renders (written by `reference`)")
  parser.add_argument("path", nargs="?", help="llama.cpp's models/ folder or llama-cpp-python's sdist (.tar.gz)")
  args = parser.parse_args(argv)
  path = args.path
  if path is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_cpp_vocab_check

    path = llama_cpp_vocab_check.download()
  sources = templates(path)
  if args.mode == "reference":
    with open(args.renders, "w", encoding="utf-8") as f:
      json.dump(render_reference(sources), f, ensure_ascii=False, indent=0)
    return 0
  with open(args.renders, encoding="utf-8") as f:
    reference = json.load(f)
  return compare(reference, render_jaxspec(sources))


if __name__ == "__main__":
  sys.exit(main())
