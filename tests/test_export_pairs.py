"""Every export is a config plus the weights it describes, renamed into place one file after another: a kill between
two renames leaves the new weights beside the old config. Each loader refuses such a folder, naming the fix, instead
of running one export's weights under another's config; an export of the same weights writes the same bytes; folders
written before the check (no tag in their config) still load."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxspec import files
from jaxspec.errors import ModelLoadError
from tests.conftest import make_tiny


def _bpd(model, params, seed):
  from jaxspec.models.bpd import BPDConfig, BPDModel, load_bpd, save_bpd
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  return (lambda folder: save_bpd(folder, bpd, bpd.init_params(jax.random.key(seed))),
          lambda folder: load_bpd(folder, target_params=params), ["heads.safetensors"])


def _draft(model, params, seed):
  from jaxspec.models.draft import load_draft, save_draft
  draft, dp = make_tiny(seed, n_layers=1)
  dp = {**dp, "embed": params["embed"]}  # a draft shares its target's embedding
  return (lambda folder: save_draft(folder, draft, dp, vocab_ids=[seed, 7, 9]),
          lambda folder: load_draft(folder, params), ["model.safetensors", "vocab_ids.safetensors"])


def _eagle(model, params, seed):
  from jaxspec.models.eagle import EagleDraft, load_eagle, save_eagle
  draft = EagleDraft(model.cfg, 1)
  dp = draft.init_params(jax.random.key(seed), params, [1, 5, 9], init="random")
  return (lambda folder: save_eagle(folder, draft, dp, dtype="float32"),
          lambda folder: load_eagle(folder, model, params), ["model.safetensors", "vocab_ids.safetensors"])


def _lora(model, params, seed):
  from jaxspec.models.lora import LoraConfig, init_lora, load_lora, save_lora
  cfg = LoraConfig(rank=2, alpha=4.0)
  lora = jax.tree.map(lambda x: x + seed, init_lora(params, cfg, seed))
  return lambda folder: save_lora(folder, lora, cfg), load_lora, ["lora.safetensors"]


def _ngram(model, params, seed):
  from jaxspec.models.ngram import build_ngram, load_ngram, save_ngram
  lm, tables, _ = build_ngram([[1, 2, 3, 4, 1, 2, seed + 5]], 3, model.vocab_size)
  return lambda folder: save_ngram(folder, lm, tables), load_ngram, ["ngram.safetensors"]


def _hf(model, params, seed):
  from jaxspec.loading.hf import load_hf, save_hf
  other, other_params = make_tiny(seed)
  return lambda folder: save_hf(str(folder), other, other_params), lambda folder: load_hf(str(folder)), \
      ["model.safetensors"]


def _t5(model, params, seed):
  from jaxspec.loading.hf import load_hf
  from jaxspec.loading.t5_hf import save_t5
  from jaxspec.models.t5 import T5LM, tiny_t5_config
  t5 = T5LM(tiny_t5_config())
  t5_params = t5.init_params(jax.random.key(seed))
  return lambda folder: save_t5(str(folder), t5, t5_params), lambda folder: load_hf(str(folder)), \
      ["model.safetensors"]


@pytest.mark.parametrize("kind", [_bpd, _draft, _eagle, _lora, _ngram, _hf, _t5], ids=lambda f: f.__name__[1:])
def test_a_folder_whose_files_come_from_two_exports_is_refused(tiny, tmp_path, kind):
  model, params = tiny
  save_a, load, weights = kind(model, params, 1)
  save_b, _, _ = kind(model, params, 2)
  save_a(tmp_path / "a")
  save_b(tmp_path / "b")
  config = "config.json"
  tag = json.loads((tmp_path / "a" / config).read_text())[files.EXPORT_TAG]
  assert tag != json.loads((tmp_path / "b" / config).read_text())[files.EXPORT_TAG]
  for name in weights:  # every weights file of the export carries its config's tag
    assert files.safetensors_metadata(tmp_path / "a" / name)[files.EXPORT_TAG] == tag
  load(tmp_path / "a")
  # The same export written again: the same bytes (a rerun's weights files equal the first run's).
  # (safetensors writes metadata keys in a random order per call: six more writes catch an unsorted one but for 1/64)
  before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
  for _ in range(6):
    save_a(tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
  # Killed between the renames: b's weights in place, a's config still there.
  for name in weights:
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a", mixed, dirs_exist_ok=True)
    shutil.copyfile(tmp_path / "b" / name, mixed / name)
    with pytest.raises(ModelLoadError, match=f"its config and {name} come from different exports .*rerun the "
                                             "command that wrote it"):
      load(mixed)
    shutil.rmtree(mixed)
  # A folder written before the tag existed (or by another program) is not checked.
  raw = json.loads((tmp_path / "a" / config).read_text())
  del raw[files.EXPORT_TAG]
  (tmp_path / "a" / config).write_text(json.dumps(raw))
  load(tmp_path / "a")


def test_a_vocabulary_list_added_to_a_draft_joins_its_export(tiny, tmp_path):
  from jaxspec.models.draft import load_draft, load_draft_vocab, save_draft, save_draft_vocab
  model, params = tiny
  draft, dp = make_tiny(3, n_layers=1)
  save_draft(tmp_path, draft, {**dp, "embed": params["embed"]})
  save_draft_vocab(tmp_path, [4, 2])
  load_draft(tmp_path, params)
  np.testing.assert_array_equal(load_draft_vocab(tmp_path), [2, 4])


def test_exports_stay_readable_by_transformers_layout_rules(tiny, tmp_path):
  """transformers 4.x refuses a safetensors file whose metadata has no `format` it knows; the Hugging Face exports say
  `pt` (their tensors are in its layout)."""
  for i, kind in enumerate((_hf, _t5, _draft)):  # a draft folder is a Hugging Face LLaMA folder too
    kind(*tiny, 1)[0](tmp_path / str(i))
    assert files.safetensors_metadata(tmp_path / str(i) / "model.safetensors")["format"] == "pt"


def test_weights_another_program_rewrote_beside_a_tagged_config_still_load(tiny, tmp_path):
  """transformers' save_pretrained of a model loaded from an export keeps the config's unknown keys (the tag among
  them) and writes weights with {"format": "pt"} alone: such a folder is not one a kill left half replaced."""
  from safetensors.numpy import load_file, save_file

  from jaxspec.loading.hf import load_hf, save_hf
  model, params = tiny
  save_hf(str(tmp_path), model, params)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  assert files.EXPORT_TAG in json.loads((tmp_path / "config.json").read_text())
  load_hf(str(tmp_path))


@pytest.mark.parametrize("header", [b"[1,2]", b'{"__metadata__":"x"}', b'{"__metadata__":["a"]}'])
def test_a_damaged_header_is_the_loader_s_error_not_a_traceback(tiny, tmp_path, header):
  import struct
  save, load, weights = _bpd(*tiny, 1)
  save(tmp_path)
  (tmp_path / weights[0]).write_bytes(struct.pack("<Q", len(header)) + header)
  with pytest.raises(ModelLoadError, match="unreadable"):
    load(tmp_path)


def test_metadata_with_non_ascii_text_is_written_in_one_order(tmp_path):
  tensors = {"a": np.arange(3, dtype=np.float32)}
  seen = set()
  for _ in range(12):
    files.save_safetensors(tensors, tmp_path / "x.safetensors", {"b": "\u00e9", "a": "x", "c": "y"})
    seen.add((tmp_path / "x.safetensors").read_bytes())
  assert len(seen) == 1


def test_the_tag_covers_names_dtypes_shapes_bytes_and_every_group_in_any_key_order():
  """Weights that differ in any of these are other weights, so their tags differ; the order a dict was built in is
  not part of them (flattening a tree may list the same arrays in another order)."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.ones(2, np.int32)
  tag = files.export_tag({"a": a, "b": b})
  assert files.export_tag({"b": b, "a": a}) == tag
  assert files.export_tag({"a": a.copy(), "b": b.copy()}) == tag
  for other in ({"a": a.reshape(3, 2), "b": b},  # same bytes, another shape
                {"a": a.view(np.int32), "b": b},  # same bytes, another dtype
                {"a": a, "c": b},  # another name (in the same sorted place)
                {"a": a + 1, "b": b}):  # other values
    assert files.export_tag(other) != tag, other
  ids = {"vocab_ids": np.array([1, 2])}
  assert files.export_tag({"a": a}, ids) != files.export_tag({"a": a}, {"vocab_ids": np.array([1, 3])})


def test_metadata_of_two_keys_is_written_in_one_order(tmp_path):
  """An export's metadata is often just `format` and the tag: two keys, written in a random order per process."""
  tensors = {"a": np.arange(3, dtype=np.float32)}
  seen = set()
  for metadata in ({"format": "pt", "z": "1"}, {"z": "1", "format": "pt"}):
    for _ in range(8):
      files.save_safetensors(tensors, tmp_path / "x.safetensors", metadata)
      seen.add((tmp_path / "x.safetensors").read_bytes())
  assert len(seen) == 1
  assert list(files.safetensors_metadata(tmp_path / "x.safetensors")) == ["format", "z"]


@pytest.mark.parametrize("length", [0, 1, 2 ** 63])
def test_a_header_length_no_file_can_have_is_refused_before_reading(tmp_path, length):
  """The first 8 bytes give the header's length: one too short for JSON, or too long to read (a file damaged there,
  or not a safetensors file), is the loader's "no safetensors header", not a MemoryError or a read of the whole file."""
  path = tmp_path / "x.safetensors"
  path.write_bytes(length.to_bytes(8, "little") + b"{}" + b" " * 6)
  with pytest.raises(ValueError, match="has no safetensors header"):
    files.safetensors_metadata(path)


def test_a_config_that_is_no_json_object_records_no_tag(tmp_path):
  """Its weights are then not checked: the loader's own reading of the config says what is wrong with it."""
  for text in ("[1, 2]", "{not json", '"text"'):
    (tmp_path / "config.json").write_text(text)
    assert files.recorded_tag(tmp_path) is None
    files.check_export_tag(tmp_path, ["model.safetensors"])
