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
  # The same weights exported again: the same bytes (a rerun's export equals the first one's).
  before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
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
  """transformers refuses a safetensors file whose metadata has no `format` it knows; the Hugging Face exports say
  `pt` (their tensors are in its layout)."""
  from jaxspec.loading.hf import save_hf
  model, params = tiny
  save_hf(str(tmp_path), model, params)
  assert files.safetensors_metadata(tmp_path / "model.safetensors")["format"] == "pt"
