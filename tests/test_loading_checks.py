"""Loading refuses or fixes what would otherwise run silently wrong: special tokens a tokenizer.json's
post-processor adds, EOS ids only the model config names, unreadable tokenizer configs, model variants jaxspec does
not implement (other families, activations, biases, partial rotary embeddings, RoPE scalings but linear, llama3 and
longrope) or bounds the context where it computes the model exactly only within it (a sliding window), stray
weight files, file paths passed for folders, a missing tokenizer found only after the weights, and unsupported GGUF
quantizations.

Every folder and file is built here from tiny models with the tokenizers / safetensors / gguf libraries."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import types
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file, save_file
from tokenizers import models, pre_tokenizers, processors

from jaxspec.errors import ModelLoadError
from jaxspec.loading import gguf_loader, load_model
from jaxspec.loading.hf import load_hf, save_hf
from jaxspec.loading.tokenizer import Tokenizer
from jaxspec.models.llama import LlamaLM, tiny_config
from tests.conftest import make_tiny
from tests.test_loading import gguf_writer

FIXTURES = Path(__file__).parent / "fixtures"

# --- tokenizers -----------------------------------------------------------------------------------------------------

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<|user|>": 5}


def write_tokenizer(folder: Path, post=None, tok_config: dict | None = None, **json_files) -> Path:
  """A word-level tokenizer.json with `post` as its post-processor, tokenizer_config.json `tok_config` (none if
  None), and other JSON files by name (e.g. generation_config=...)."""
  folder.mkdir(parents=True, exist_ok=True)
  backend = tokenizers.Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens(["<unk>", "<s>", "</s>", "<|user|>"])
  if post is not None:
    backend.post_processor = post
  backend.save(str(folder / "tokenizer.json"))
  if tok_config is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
  for name, content in json_files.items():
    (folder / f"{name}.json").write_text(json.dumps(content))
  return folder


def test_a_tokenizer_in_a_folder_named_with_bytes_that_are_not_utf8_loads(tmp_path, caplog):
  """A folder named in Latin-1 (caf\xe9) reaches Python as a lone surrogate, which tokenizers' from_file cannot
  take: a sound tokenizer.json was called damaged. A damaged one still is."""
  import logging
  import os

  # The tokenizer's no-EOS warning names the path: a captured record holding a lone surrogate cannot be sent from a
  # pytest-xdist worker (it ended the whole `-n 2` run), so it is not emitted here.
  caplog.set_level(logging.ERROR, logger="jaxspec.loading.tokenizer")

  folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
  write_tokenizer(tmp_path / "plain").rename(folder)  # (tokenizers cannot save there either)
  tok = Tokenizer.from_tokenizer_json(folder)
  assert tok.encode("hello world") == [3, 4]
  tok.save(folder / "again")  # (an export into such a folder failed the same way)
  assert Tokenizer.from_tokenizer_json(folder / "again").encode("hello world") == [3, 4]
  (folder / "tokenizer.json").write_text('{"version": ')
  with pytest.raises(ModelLoadError, match="is not a readable tokenizer.json .*damaged or cut short"):
    Tokenizer.from_tokenizer_json(folder)


def test_a_tokenizer_json_that_cannot_be_opened_is_not_called_damaged(tmp_path, monkeypatch):
  """A tokenizer.json that cannot be read (no permission) is said as such, not as a damaged file to copy again."""
  import jaxspec.loading.tokenizer as tokenizer_mod

  folder = write_tokenizer(tmp_path / "tok")

  def refuse(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(tokenizer_mod, "open", refuse, raising=False)
  with pytest.raises(ModelLoadError) as e:
    Tokenizer.from_tokenizer_json(folder)
  assert str(e.value) == f"Cannot read {str(folder / 'tokenizer.json')!r}: Permission denied."


LLAMA3_POST = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
T5_POST = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 2)])
# A template that writes the BOS itself, as Llama 3's does.
CHAT = "{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("post,want", [(LLAMA3_POST, [1, 3, 4]), (T5_POST, [3, 4, 2])], ids=["llama3", "t5"])
def test_plain_text_gets_the_special_tokens_of_the_post_processor(tmp_path, post, want):
  """`encode(text, add_bos=None)` (a plain prompt, as the bench encodes one for a model without chat template) is
  what transformers' `tokenizer(text)` gives: the post-processor's BOS / EOS, with no add_bos_token in the config."""
  folder = write_tokenizer(tmp_path, post, {"bos_token": "<s>", "eos_token": "</s>"})
  tok = Tokenizer.from_tokenizer_json(folder)
  backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  assert tok.encode("hello world", add_bos=None) == backend.encode("hello world").ids == want
  assert tok.encode("hello world") == [3, 4]  # the text's own tokens, as for chat-template output
  from jaxspec.bench.runner import chat_prompt_ids
  assert chat_prompt_ids(tok, ["hello world"]) == [want]


def test_chat_prompt_keeps_one_bos(tmp_path):
  """A chat template that writes the BOS itself is encoded without a second one, as transformers'
  `apply_chat_template(tokenize=True)` does; plain text written with its own BOS keeps one too."""
  folder = write_tokenizer(tmp_path, LLAMA3_POST, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT})
  tok = Tokenizer.from_tokenizer_json(folder)
  from jaxspec.bench.runner import chat_prompt_ids
  assert chat_prompt_ids(tok, ["hello"]) == [[1, 5, 3]]
  assert tok.encode("<s> hello", add_bos=None) == [1, 3]
  t5 = Tokenizer.from_tokenizer_json(write_tokenizer(tmp_path / "t5", T5_POST, {"eos_token": "</s>"}))
  assert t5.encode("hello </s>", add_bos=None) == [3, 2]



def test_add_bos_token_of_the_tokenizer_config_gives_plain_prompts_a_bos(tmp_path):
  """A tokenizer_config.json with add_bos_token true and no post-processor (as older Llama 2 / Mistral folders): a
  plain prompt gets one BOS in front, as transformers' `tokenizer(text)` gives it, and text holding the special
  tokens already (a chat template's output) gets none added."""
  folder = write_tokenizer(tmp_path, None, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
  tok = Tokenizer.from_tokenizer_json(folder)
  assert tok.add_bos_token
  assert tok.encode("hello world", add_bos=None) == [1, 3, 4]
  assert tok.encode("<s> hello", add_bos=None) == [1, 3]
  assert tok.encode("hello world") == [3, 4]

def test_default_model_prompts_are_unchanged():
  """The default model (GGUF, no post-processor, add_bos_token false): plain and chat prompts get no BOS, and the
  chat prompt is the transformers reference's ids."""
  from jaxspec.bench.runner import chat_prompt_ids
  from jaxspec.loading.default import default_model_path
  tok = Tokenizer.from_gguf(default_model_path())
  with np.load(FIXTURES / "smollm2_hf_reference.npz") as ref:
    messages, prompt_ids = json.loads(str(ref["chat_messages_json"])), ref["prompt_ids"].tolist()
  assert tok.encode(tok.apply_chat_template(messages)) == prompt_ids
  assert tok.encode("Hello world", add_bos=None) == tok.encode("Hello world") == [19556, 905]
  assert chat_prompt_ids(tok, ["Hi"])[0] == tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))


@pytest.mark.parametrize("files,want_eos,want_all,want_bos", [
    ({"generation_config": {"bos_token_id": 1, "eos_token_id": [2, 5]}}, 2, (2, 5), 1),
    ({"config": {"bos_token_id": 1, "eos_token_id": 2}}, 2, (2,), 1),
    ({"generation_config": {"eos_token_id": 5}, "config": {"eos_token_id": 2}}, 5, (5,), None),
    ({"generation_config": {"bos_token_id": True, "eos_token_id": [99, True, 2, -1]}}, 2, (2,), None),
], ids=["generation_config-list", "config-int", "generation_config-first", "not-ids-skipped"])
def test_special_ids_fall_back_to_the_model_config(tmp_path, files, want_eos, want_all, want_bos):
  """Without tokenizer_config.json, BOS and EOS come from generation_config.json, else config.json (an id or a
  list), as transformers' generate takes them."""
  tok = Tokenizer.from_tokenizer_json(write_tokenizer(tmp_path, **files))
  assert (tok.eos_id, tok.eos_ids, tok.bos_id) == (want_eos, want_all, want_bos)


def test_tokenizer_config_wins_over_the_model_config(tmp_path):
  """tokenizer_config.json's EOS is `eos_id`; the model config's ids end generation too, as in transformers'
  `generate` (Llama 3.1 Instruct names <|eot_id|> in the first and three ids, <|eom_id|> among them, in the second)."""
  folder = write_tokenizer(tmp_path, tok_config={"eos_token": "<|user|>"}, generation_config={"eos_token_id": [2, 5]})
  tok = Tokenizer.from_tokenizer_json(folder)
  assert (tok.eos_id, tok.eos_ids) == (5, (5, 2))
  plain = Tokenizer.from_tokenizer_json(write_tokenizer(tmp_path / "plain", tok_config={"eos_token": "<|user|>"}))
  assert (plain.eos_id, plain.eos_ids) == (5, (5,))



def test_chat_template_gets_the_special_tokens_by_name(tmp_path):
  """A chat template reads bos_token, eos_token, pad_token and unk_token, each the text of its own token."""
  template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}"
  folder = write_tokenizer(tmp_path, None, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|user|>",
                                            "unk_token": "<unk>", "chat_template": template})
  assert Tokenizer.from_tokenizer_json(folder).apply_chat_template([]) == "<s>|</s>|<|user|>|<unk>"

def test_no_eos_anywhere_is_said(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger="jaxspec.loading.tokenizer"):
    tok = Tokenizer.from_tokenizer_json(write_tokenizer(tmp_path))
  assert tok.eos_id is None and tok.eos_ids == ()
  assert "no EOS token" in caplog.text


@pytest.mark.parametrize("content,what", [("{bad json", "JSONDecodeError"), ("[1, 2]", "holds a JSON list")])
def test_unreadable_tokenizer_config_is_a_clear_error(tmp_path, content, what):
  folder = write_tokenizer(tmp_path)
  (folder / "tokenizer_config.json").write_text(content)
  with pytest.raises(ModelLoadError, match=f"tokenizer_config.json.*{what}.*copy it again") as e:
    Tokenizer.from_tokenizer_json(folder)
  assert str(folder / "tokenizer_config.json") in str(e.value)


# --- Hugging Face folders -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A save_hf folder of a tiny LLaMA, with a tokenizer; tests copy it before changing it."""
  folder = tmp_path_factory.mktemp("hf") / "model"
  model, params = make_tiny()
  save_hf(str(folder), model, params)
  write_tokenizer(folder, tok_config={"eos_token": "</s>"})
  return folder


def copy_of(folder: Path, tmp_path: Path, **config_changes) -> Path:
  out = tmp_path / "copy"
  shutil.copytree(folder, out)
  cfg = json.loads((out / "config.json").read_text())
  for key, value in config_changes.items():
    if value is None:
      cfg.pop(key, None)
    else:
      cfg[key] = value
  (out / "config.json").write_text(json.dumps(cfg))
  return out


@pytest.mark.parametrize("changes,message", [
    ({"architectures": None, "model_type": "phi"},
     "model_type 'phi'; jaxspec loads llama, mistral, qwen2, qwen3, phi3"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'.*SiLU"),
    ({"attention_bias": True}, r"lacks tensors for \['model.layers.0.self_attn.k_proj.bias'"),
    ({"mlp_bias": True}, r"lacks tensors for \['model.layers.0.mlp.down_proj.bias'"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75; jaxspec turns part of each head for Phi-3 models "
     "only"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
    ({"architectures": ["UMT5ForConditionalGeneration"], "model_type": "umt5"},
     r"describes \['UMT5ForConditionalGeneration'\]; jaxspec loads .*Phi3ForCausalLM and the encoder-decoders "
     "T5ForConditionalGeneration, T5Model, MT5ForConditionalGeneration"),
], ids=["phi-model-type", "gelu", "attention-bias", "mlp-bias", "partial-rotary", "partial-rotary-in-rope",
        "dynamic-rope",
        "yarn-rope-parameters", "umt5"])
def test_unsupported_variants_are_refused(tiny_hf, tmp_path, changes, message):
  folder = copy_of(tiny_hf, tmp_path, **changes)
  with pytest.raises(ModelLoadError, match=message):
    load_hf(str(folder))


def test_quantized_and_incomplete_folders_are_refused_saying_why(tiny_hf, tmp_path):
  """Quantized weights read as floats gave wrong logits without an error, and a missing tensor was named by jaxspec's
  path with no hint (found by a review)."""
  from safetensors.numpy import load_file, save_file

  with pytest.raises(ModelLoadError, match=r"weights are quantized \(bitsandbytes\); jaxspec reads float weights"):
    load_hf(str(copy_of(tiny_hf, tmp_path, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})))
  folder = copy_of(tiny_hf, tmp_path / "int8")
  weights = load_file(folder / "model.safetensors")
  name = "model.layers.0.mlp.up_proj.weight"
  weights[name] = np.round(weights[name] * 100).astype(np.int8)  # as a quantizer stores it, its scale elsewhere
  save_file(weights, folder / "model.safetensors")
  with pytest.raises(ModelLoadError, match=rf"{name} in .* holds I8 values; jaxspec reads float weights"):
    load_hf(str(folder))
  folder = copy_of(tiny_hf, tmp_path / "untied", tie_word_embeddings=False)
  weights = load_file(folder / "model.safetensors")
  weights.pop("lm_head.weight", None)
  save_file(weights, folder / "model.safetensors")
  with pytest.raises(ModelLoadError, match=r"lacks tensors for \['lm_head.weight'\]\. config.json's "
                                           "tie_word_embeddings is false or absent"):
    load_hf(str(folder))


@pytest.mark.parametrize("key,value", [("tie_word_embeddings", "false"), ("attention_bias", "false"),
                                       ("mlp_bias", 0), ("use_sliding_window", "no")])
def test_switches_that_are_not_true_or_false_are_refused(tiny_hf, tmp_path, key, value):
  """A string "false" read for its truth switched the setting on: a tied head in place of the file's lm_head, or
  biases (found by a review). transformers refuses it too."""
  with pytest.raises(ModelLoadError, match=rf"sets {key} to {value!r}, which is not true or false"):
    load_hf(str(copy_of(tiny_hf, tmp_path, **{key: value, "sliding_window": 64})))


def test_weights_with_nan_or_infinity_are_refused_by_name(tiny_hf, tmp_path):
  """Every logit would be NaN and decoding one token over and over, with no error (found by a review)."""
  folder = copy_of(tiny_hf, tmp_path)
  weights = load_file(folder / "model.safetensors")
  name = "model.layers.1.input_layernorm.weight"
  weights[name][3] = np.nan
  save_file(weights, folder / "model.safetensors")
  with pytest.raises(ModelLoadError, match=rf"{name} in .* holds NaN or infinite values.*Download or convert it"):
    load_hf(str(folder))


def test_a_tokenizer_larger_than_the_model_s_vocabulary_is_named_when_it_loads(tiny_hf, tmp_path, caplog):
  """Such a folder loaded quietly, and a prompt with a high id was then refused as encoded with another tokenizer,
  where the prompt was the model's own tokenizer's and config.json and tokenizer.json disagree (found by a review)."""
  folder = copy_of(tiny_hf, tmp_path, vocab_size=4)
  weights = load_file(folder / "model.safetensors")
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    if name in weights:
      weights[name] = np.ascontiguousarray(weights[name][:4])
  save_file(weights, folder / "model.safetensors")
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    load_model(str(folder))
  assert any("tokenizer.json has 6 tokens but config.json's vocab_size is 4" in r.getMessage() for r in caplog.records)
  caplog.clear()
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    load_model(str(tiny_hf))
  assert not any("tokenizer.json has" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("changes", [
    {"sliding_window": 512}, {"sliding_window": 4096}, {"sliding_window": None}, {"hidden_act": "silu"},
    {"rope_scaling": {"rope_type": "default"}}, {"architectures": None}, {"architectures": None, "model_type": None},
    {"architectures": None, "model_type": "mistral"}, {"attention_bias": False, "mlp_bias": False},
    {"sliding_window": 64, "use_sliding_window": False},
], ids=["window-equal", "window-larger", "window-null", "silu", "default-rope", "llama-type-only", "bare",
        "mistral-type-only", "biases-off", "window-switched-off"])
def test_what_jaxspec_computes_exactly_still_loads(tiny_hf, tmp_path, changes):
  model, _ = load_hf(str(copy_of(tiny_hf, tmp_path, **changes)))
  assert model.cfg.max_seq_len == 512


def test_a_sliding_window_bounds_the_context(tiny_hf, tmp_path, caplog):
  """A LLaMA config's window (transformers' LLaMA has none; Qwen2's apply to some layers only) is not jaxspec's:
  within one window (prompt and output) attention is the model's, so a window shorter than max_position_embeddings
  bounds the context, and the load says so once. (Phi-3's and Mistral's windows apply: test_sliding_window.py.)"""
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    model, _ = load_hf(str(copy_of(tiny_hf, tmp_path, sliding_window=64)))
  assert model.cfg.max_seq_len == 64
  said = [r.getMessage() for r in caplog.records if "bounded" in r.getMessage()]
  assert said == ["The model's context is bounded to 64 tokens (prompt and output), from max_position_embeddings=512,"
                  " by its sliding window (sliding_window=64), which jaxspec applies to Phi-3 and Mistral models only: "
                  "within one window attention is the same."]


def test_rope_theta_is_read_from_rope_parameters(tiny_hf, tmp_path):
  """transformers 5 writes the RoPE base under rope_parameters; reading the default 10000 instead would be wrong."""
  folder = copy_of(tiny_hf, tmp_path, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
  assert load_hf(str(folder))[0].cfg.rope_theta == 5e5


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": "abc"}, "config.json sets hidden_size to 'abc', which is not a whole number of at least 1"),
    ({"num_attention_heads": 0}, "sets num_attention_heads to 0"),
    ({"num_key_value_heads": 0}, "sets num_key_value_heads to 0"),
    ({"num_hidden_layers": -1}, "sets num_hidden_layers to -1"),
    ({"intermediate_size": 1.5}, "sets intermediate_size to 1.5"),
    ({"rope_theta": "x"}, "sets rope_theta to 'x', which is not a finite number above 0"),
    ({"rms_norm_eps": 0}, "sets rms_norm_eps to 0"),
    ({"sliding_window": "x"}, "sets sliding_window to 'x'"),
    ({"num_key_value_heads": 3}, "cannot be built: n_heads=4 must be a multiple of n_kv_heads=3"),
    ({"head_dim": 5}, "cannot be built: head_dim=5 must be even"),
    ({"num_hidden_layers": 1}, "holds weights for 2 layers and its config says 1 \\(num_hidden_layers in config.json"),
], ids=["text", "zero-heads", "zero-kv-heads", "negative-layers", "fraction", "text-theta", "zero-eps", "text-window",
        "kv-heads-not-dividing", "odd-head-dim", "fewer-layers-than-weights"])
def test_bad_numbers_in_the_config_are_clear_errors(tiny_hf, tmp_path, changes, message):
  """Each is one `ModelLoadError` naming the key, not a ValueError or ZeroDivisionError from deep in the loader (and
  a config naming fewer layers than the weights hold is not run as a truncated model)."""
  with pytest.raises(ModelLoadError, match=message):
    load_hf(str(copy_of(tiny_hf, tmp_path, **changes)))


@pytest.mark.parametrize("archs", ["LlamaForCausalLM", "T5ForConditionalGeneration", [1]])
def test_architectures_that_are_not_a_list_of_names_are_a_clear_error(tiny_hf, tmp_path, archs):
  """A hand-written `"architectures": "LlamaForCausalLM"` was read letter by letter and refused as "config.json
  describes LlamaForCausalLM; jaxspec loads LlamaForCausalLM, ...", which contradicts itself."""
  with pytest.raises(ModelLoadError, match=r"has architectures=.*, not the list of class names transformers writes"):
    load_hf(str(copy_of(tiny_hf, tmp_path, architectures=archs)))


def test_what_to_do_about_a_bad_config_value_names_the_file(tiny_hf, tmp_path):
  """A bad value in config.json is restored (or the file); a config that cannot be built, the original file (GGUF
  metadata is downloaded or converted again: test_bad_numbers_in_gguf_metadata_are_clear_errors)."""
  with pytest.raises(ModelLoadError) as e:
    load_hf(str(copy_of(tiny_hf, tmp_path, num_attention_heads=0)))
  assert str(e.value).endswith("The file is damaged or was edited: restore the value the model was trained with (or "
                               "the original config.json).")
  shutil.rmtree(tmp_path / "copy")
  with pytest.raises(ModelLoadError) as e:
    load_hf(str(copy_of(tiny_hf, tmp_path, num_key_value_heads=3)))
  assert str(e.value).endswith("The file is damaged or was edited: restore the model's original config.json.")


def test_a_file_of_a_part_s_folder_names_its_folder_only_where_it_holds_a_part(tmp_path):
  """check_part names the folder that holds a file (DIR/heads.safetensors for DIR) where that folder has a
  config.json; a stray file elsewhere is only said to be no folder."""
  from jaxspec.loading.hf import check_part

  (tmp_path / "loose.safetensors").write_bytes(b"")
  with pytest.raises(ModelLoadError, match=r"loose\.safetensors is a file, not a folder of BPD heads\.$"):
    check_part(tmp_path / "loose.safetensors", "bpd")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ModelLoadError, match=rf"is a file, not a folder of BPD heads: pass the folder that holds it "
                                           rf"\({tmp_path}\)\.$"):
    check_part(tmp_path / "loose.safetensors", "bpd")


def test_whole_floats_in_the_config_still_load(tiny_hf, tmp_path):
  """JSON writers may write 64.0 for 64: that is the same number."""
  cfg = json.loads((tiny_hf / "config.json").read_text())
  model, _ = load_hf(str(copy_of(tiny_hf, tmp_path, hidden_size=float(cfg["hidden_size"]))))
  assert model.cfg.d_model == cfg["hidden_size"]


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_norm.weight",
                                  "lm_head.bias"])
def test_tensors_jaxspec_would_skip_are_refused(tiny_hf, tmp_path, name):
  folder = copy_of(tiny_hf, tmp_path)
  weights = load_file(str(folder / "model.safetensors"))
  weights[name] = np.ones(4, np.float32)
  save_file(weights, str(folder / "model.safetensors"))
  with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
    load_hf(str(folder))


def test_tensors_outside_the_layers_it_does_not_read_are_named(tiny_hf, tmp_path, caplog):
  """A vision tower's weights (and biases: the layers have none, a tower has) are skipped with a warning that names
  them; a rotary buffer is skipped quietly."""
  folder = copy_of(tiny_hf, tmp_path)
  weights = load_file(str(folder / "model.safetensors"))
  weights["model.vision_tower.proj.weight"] = np.ones((4, 4), np.float32)
  weights["model.vision_tower.proj.bias"] = np.ones(4, np.float32)
  weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  save_file(weights, str(folder / "model.safetensors"))
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    load_hf(str(folder))
  warned = [r.getMessage() for r in caplog.records if r.name == "jaxspec.loading"]
  assert len(warned) == 1 and "holds 2 tensors outside the layers" in warned[0], warned
  assert "e.g. 'model.vision_tower.proj." in warned[0], warned
  assert "inv_freq" not in warned[0]
  caplog.clear()
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    load_hf(str(tiny_hf))
  assert not [r for r in caplog.records if r.name == "jaxspec.loading"]


def _embedding(folder: Path) -> np.ndarray:
  return np.asarray(load_hf(str(folder))[1]["embed"]["embedding"])


def test_a_stray_safetensors_file_is_not_read(tiny_hf, tmp_path):
  want = _embedding(tiny_hf)
  folder = copy_of(tiny_hf, tmp_path)
  # Named to sort after model.safetensors, so that reading every file would let it win.
  save_file({"model.embed_tokens.weight": np.full_like(want, 7.0)}, str(folder / "training_args.safetensors"))
  np.testing.assert_array_equal(_embedding(folder), want)


def _shard(folder: Path) -> dict[str, str]:
  """Splits model.safetensors into two shards; returns the weight map."""
  weights = load_file(str(folder / "model.safetensors"))
  (folder / "model.safetensors").unlink()
  names = sorted(weights)
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({n: weights[n] for n in part}, str(folder / shard))
    weight_map.update({n: shard for n in part})
  return weight_map


def test_sharded_folders_follow_their_index(tiny_hf, tmp_path):
  want = _embedding(tiny_hf)
  folder = copy_of(tiny_hf, tmp_path)
  weight_map = _shard(folder)
  np.testing.assert_array_equal(_embedding(folder), want)  # model-*.safetensors without an index
  (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  save_file({"model.embed_tokens.weight": np.zeros_like(want)}, str(folder / "model-extra.safetensors"))
  np.testing.assert_array_equal(_embedding(folder), want)  # the index leaves the extra file out
  (folder / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(ModelLoadError, match="lists shards that are not in .*model-00002-of-00002"):
    load_hf(str(folder))


def test_a_tensor_in_two_files_is_refused(tiny_hf, tmp_path):
  folder = copy_of(tiny_hf, tmp_path)
  _shard(folder)
  save_file({"model.norm.weight": np.ones(64, np.float32)}, str(folder / "model-00003-of-00003.safetensors"))
  with pytest.raises(ModelLoadError, match="'model.norm.weight' is in both .* move it out"):
    load_hf(str(folder))


def test_several_files_none_a_model_s_are_refused(tiny_hf, tmp_path):
  folder = copy_of(tiny_hf, tmp_path)
  (folder / "model.safetensors").rename(folder / "weights.safetensors")
  want = _embedding(tiny_hf)
  np.testing.assert_array_equal(_embedding(folder), want)  # a single file is the model, whatever its name
  save_file({"x": np.ones(1, np.float32)}, str(folder / "other.safetensors"))
  with pytest.raises(ModelLoadError, match="which files hold the model is unclear"):
    load_hf(str(folder))


def test_t5_folder_ignores_a_stray_file(tmp_path):
  folder = tmp_path / "t5"
  shutil.copytree(FIXTURES / "t5_tiny_v11", folder)
  _, want = load_hf(str(folder))
  save_file({"shared.weight": np.zeros_like(np.asarray(want["shared"]["embedding"]))},
            str(folder / "training_args.safetensors"))  # sorts after model.safetensors
  _, got = load_hf(str(folder))
  np.testing.assert_array_equal(np.asarray(got["shared"]["embedding"]), np.asarray(want["shared"]["embedding"]))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_file_of_a_folder_says_to_pass_the_folder(tiny_hf, name):
  with pytest.raises(ModelLoadError, match="file of a Hugging Face model folder.*pass the folder that holds it") as e:
    load_model(str(tiny_hf / name))
  assert str(tiny_hf) in str(e.value)


def test_missing_tokenizer_is_found_before_the_weights_load(tiny_hf, tmp_path, monkeypatch):
  import jaxspec.loading.hf as hf
  loaded = []
  monkeypatch.setattr(hf, "load_hf", lambda *a, **k: loaded.append(a) or pytest.fail("weights loaded first"))
  folder = copy_of(tiny_hf, tmp_path)
  (folder / "tokenizer.json").unlink()
  with pytest.raises(ModelLoadError, match="has no tokenizer.json"):
    load_model(str(folder))
  write_tokenizer(folder)
  (folder / "tokenizer_config.json").write_text("{bad")
  with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
    load_model(str(folder))
  assert not loaded


def test_corrupt_weights_are_still_reported_as_such(tiny_hf, tmp_path):
  """The header check that now runs before the tokenizer one still names a corrupt weights file."""
  folder = copy_of(tiny_hf, tmp_path)
  (folder / "tokenizer.json").unlink()
  (folder / "model.safetensors").write_bytes(b"\x07" * 100)
  with pytest.raises(ModelLoadError, match="truncated or corrupt: download or export it again"):
    load_model(str(folder))


def test_the_tokenizer_of_a_folder_model_gets_the_config_eos(tiny_hf, tmp_path):
  folder = copy_of(tiny_hf, tmp_path, eos_token_id=[2, 5])
  (folder / "tokenizer_config.json").unlink()
  _, _, tok = load_model(str(folder))
  assert (tok.eos_id, tok.eos_ids) == (2, (2, 5))


# --- GGUF -----------------------------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType


def write_gguf(path: Path, extra: dict | None = None, raw: dict | None = None, meta: dict | None = None,
               drop: tuple[str, ...] = ()) -> Path:
  """A tiny LLaMA GGUF of F32 tensors (values as they come: these tests are about what loads), plus `extra`
  tensors, and tensors in `raw` replaced by (bytes array, quantization type), without the tensors `drop` names;
  `meta` changes the header's hyperparameters (LlamaConfig field names), not the tensors."""
  model, params = make_tiny(seed=1, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)
  cfg = model.cfg
  w = gguf_writer(path, types.SimpleNamespace(**{**dataclasses.asdict(cfg), **(meta or {})}))
  tensors = {"token_embd.weight": params["embed"]["embedding"], "output_norm.weight": params["final_norm"]["scale"]}
  for i in range(cfg.n_layers):
    p = params[f"layers_{i}"]
    tensors[f"blk.{i}.attn_norm.weight"] = p["attn_norm"]["scale"]
    tensors[f"blk.{i}.ffn_norm.weight"] = p["mlp_norm"]["scale"]
    for name, (mod, key) in (("attn_q", ("attn", "q")), ("attn_k", ("attn", "k")), ("attn_v", ("attn", "v")),
                             ("attn_output", ("attn", "o")), ("ffn_gate", ("mlp", "gate")), ("ffn_up", ("mlp", "up")),
                             ("ffn_down", ("mlp", "down"))):
      tensors[f"blk.{i}.{name}.weight"] = np.asarray(p[mod][key]["kernel"]).T  # torch layout [out, in]
  tensors.update(extra or {})
  for name in drop:
    del tensors[name]
  for name, arr in tensors.items():
    if raw and name in raw:
      data, qtype = raw[name]
      w.add_tensor(name, data, raw_dtype=qtype)
    else:
      w.add_tensor(name, np.ascontiguousarray(np.asarray(arr, np.float32)))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_plain_gguf_loads(tmp_path):
  model, params = gguf_loader.load_gguf(str(write_gguf(tmp_path / "m.gguf")))
  assert model.cfg.n_kv_heads == 2 and "layers_0" in params


@pytest.mark.parametrize("extra,message", [
    ({"blk.0.attn_q.bias": np.ones(64, np.float32)},
     "'blk.0.attn_q.bias'; jaxspec reads a GGUF file's biases for Qwen2's q/k/v only"),
    ({"blk.1.attn_q_norm.weight": np.ones(16, np.float32)}, "'blk.1.attn_q_norm.weight', a layer tensor"),
    ({"output.bias": np.ones(8, np.float32)}, "'output.bias'; jaxspec reads a GGUF file's biases for Qwen2"),
], ids=["bias", "qk-norm", "output-bias"])
def test_gguf_tensors_jaxspec_would_skip_are_refused(tmp_path, extra, message):
  with pytest.raises(ModelLoadError, match=message):
    gguf_loader.load_gguf(str(write_gguf(tmp_path / "m.gguf", extra=extra)))


def test_gguf_tensors_outside_the_layers_it_does_not_read_are_named(tmp_path, caplog):
  extra = {"mm.proj.weight": np.ones((4, 4), np.float32), "mm.proj.bias": np.ones(4, np.float32),
           "blk.0.attn_rot_embd.weight": np.ones(4, np.float32)}
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    gguf_loader.load_gguf(str(write_gguf(tmp_path / "m.gguf", extra=extra)))
  warned = [r.getMessage() for r in caplog.records if r.name == "jaxspec.loading"]
  assert len(warned) == 1 and "holds 2 tensors outside the layers" in warned[0], warned
  assert "e.g. 'mm.proj." in warned[0], warned
  caplog.clear()
  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    gguf_loader.load_gguf(str(write_gguf(tmp_path / "plain.gguf")))
  assert not [r for r in caplog.records if r.name == "jaxspec.loading"]


@pytest.mark.parametrize("meta,message", [
    ({"n_heads": 0}, "the GGUF metadata sets llama.attention.head_count to 0, which is not a whole number"),
    ({"n_kv_heads": 0}, "sets llama.attention.head_count_kv to 0"),
    ({"n_heads": 3}, "cannot be built: n_heads=3 must be a multiple of n_kv_heads=2"),
    ({"rope_theta": -1.0}, "sets llama.rope.freq_base to -1.0"),
    ({"n_layers": 1}, "the GGUF file holds weights for 2 layers and its config says 1 \\(block_count"),
], ids=["zero-heads", "zero-kv-heads", "kv-heads-not-dividing", "negative-theta", "fewer-layers-than-weights"])
def test_bad_numbers_in_gguf_metadata_are_clear_errors(tmp_path, meta, message):
  with pytest.raises(ModelLoadError, match=message) as e:
    gguf_loader.load_gguf(str(write_gguf(tmp_path / "m.gguf", meta=meta)))
  # (what to do was "restore ... the original the GGUF metadata")
  assert "the original the" not in str(e.value) and "original config.json" not in str(e.value)
  if "damaged or was edited" in str(e.value):
    assert str(e.value).endswith("The file is damaged or was edited: download or convert the model again.")


def test_a_gguf_missing_a_tensor_names_the_file_and_the_tensor_and_what_to_do(tmp_path):
  """The message named the last parameter read in place of the file, and jaxspec's path in place of the GGUF name
  (found by a review)."""
  path = write_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
  with pytest.raises(ModelLoadError, match=r"m\.gguf' lacks tensors for \['blk\.1\.ffn_up\.weight'\]\. The file is "
                                           "incomplete or damaged.*download or convert it again"):
    gguf_loader.load_gguf(str(path))
  nan = np.ones(64, np.float32)
  nan[5] = np.inf
  with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_norm\.weight in .*n\.gguf' holds NaN or infinite values"):
    gguf_loader.load_gguf(str(write_gguf(tmp_path / "n.gguf", extra={"blk.0.attn_norm.weight": nan})))


def test_unsupported_quantization_names_what_to_requantize_to(tmp_path, monkeypatch):
  """IQ4_NL (blocks of 32 values in 18 bytes): the message names the types to re-quantize to, and comes before any
  tensor is dequantized."""
  path = write_gguf(tmp_path / "iq.gguf", raw={"blk.1.ffn_up.weight": (np.zeros((64, 2 * 18), np.uint8), Q.IQ4_NL)})
  dequantized = []
  real = gguf_loader._dequantize
  monkeypatch.setattr(gguf_loader, "_dequantize", lambda t: dequantized.append(t.name) or real(t))
  with pytest.raises(ModelLoadError, match="'blk.1.ffn_up.weight' uses quantization IQ4_NL.*Re-quantize") as e:
    gguf_loader.load_gguf(str(path))
  assert all(q in str(e.value) for q in gguf_loader.SUPPORTED_QTYPES)
  assert dequantized == []


def test_a_damaged_gguf_is_still_a_damaged_gguf(tmp_path):
  """A .gguf without GGUF magic next to a config.json is not taken for a folder's file."""
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "m.gguf").write_bytes(b"\x00" * 64)
  with pytest.raises(ModelLoadError, match="not a GGUF file: it does not begin with the GGUF magic"):
    load_model(str(tmp_path / "m.gguf"))


def test_hf_round_trip_of_the_fixture_still_matches(tiny_hf):
  """save_hf's folders load unchanged (the checks above must not refuse them)."""
  model, params = make_tiny()
  loaded_model, loaded = load_hf(str(tiny_hf))
  tokens = jnp.asarray([[4, 8, 15, 16]])
  t = tokens.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  want = model.forward(params, tokens, jnp.arange(t)[None], model.init_cache(1, t), mask)[0]
  got = loaded_model.forward(loaded, tokens, jnp.arange(t)[None], loaded_model.init_cache(1, t), mask)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)



def _logits(model, params, tokens):
  t = tokens.shape[1]
  return model.forward(params, tokens, jnp.arange(t)[None], model.init_cache(1, t), jnp.tril(jnp.ones((t, t), bool)))[0]


def test_hf_config_values_reach_the_loaded_model(tmp_path):
  """rms_norm_eps, rope_theta, head_dim (here not hidden_size / num_attention_heads), max_position_embeddings and an
  untied head are read from config.json: the fixture above has the default epsilon and base, a tied head and
  head_dim = hidden_size / heads, so a loader that dropped any of them would still pass there."""
  model, params = make_tiny(seed=2, embed_scale=3.0, head_dim=16, norm_eps=0.25, rope_theta=300.0, max_seq_len=96,
                            tie_embeddings=False)
  save_hf(str(tmp_path), model, params)
  loaded_model, loaded = load_hf(str(tmp_path))
  assert loaded_model.cfg == model.cfg
  tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
  np.testing.assert_allclose(_logits(loaded_model, loaded, tokens), _logits(model, params, tokens), atol=1e-5)


def test_hf_head_follows_tie_word_embeddings(tmp_path):
  """transformers' LLaMA config unties the head when tie_word_embeddings is absent (its default is false), and a
  tied model's folder may still hold an lm_head.weight (a copy of the embedding), which the tied head ignores."""
  model, params = make_tiny(seed=2, embed_scale=3.0, tie_embeddings=False)
  save_hf(str(tmp_path / "untied"), model, params)
  folder = copy_of(tmp_path / "untied", tmp_path, tie_word_embeddings=None)
  loaded_model, loaded = load_hf(str(folder))
  assert not loaded_model.cfg.tie_embeddings
  np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])
  tied_model, tied = make_tiny(seed=3)
  save_hf(str(tmp_path / "tied"), tied_model, tied)
  weights = load_file(str(tmp_path / "tied" / "model.safetensors"))
  weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
  save_file(weights, str(tmp_path / "tied" / "model.safetensors"))
  loaded_model, loaded = load_hf(str(tmp_path / "tied"))
  assert loaded_model.cfg.tie_embeddings and "lm_head" not in loaded


def test_hf_config_without_num_key_value_heads_is_multi_head(tmp_path):
  """Without num_key_value_heads every head has its own keys and values (transformers' default), not one shared pair."""
  model, params = make_tiny(seed=2, embed_scale=3.0, n_heads=4, n_kv_heads=4)
  save_hf(str(tmp_path / "mha"), model, params)
  folder = copy_of(tmp_path / "mha", tmp_path, num_key_value_heads=None)
  loaded_model, loaded = load_hf(str(folder))
  assert loaded_model.cfg.n_kv_heads == 4
  tokens = jnp.asarray([[4, 8, 15, 16]])
  np.testing.assert_allclose(_logits(loaded_model, loaded, tokens), _logits(model, params, tokens), atol=1e-5)

# --- jaxspec's own parts in the wrong place ---------------------------------------------------------------------------

def test_a_part_of_another_kind_says_what_it_is_and_where_it_goes(tiny_hf):
  """Each loader of a part names what a folder holds when it is another part or a whole model (not "unreadable
  (KeyError: 'jaxspec_eagle'); retrain or re-copy it", which sends the user to rebuild a part that is fine)."""
  from jaxspec.bench.methods import ASSETS
  from jaxspec.models.bpd import load_bpd
  from jaxspec.models.draft import load_draft
  from jaxspec.models.lora import load_lora
  from jaxspec.models.ngram import load_ngram

  with pytest.raises(ModelLoadError, match="holds a distilled draft .*, not BPD heads: pass it to a draft method"):
    load_bpd(ASSETS / "draft_smollm2")
  with pytest.raises(ModelLoadError,
                     match="holds BPD heads, not the n-gram tables .*: pass them as --method bpd:heads"):
    load_ngram(ASSETS / "bpd_smollm2")
  with pytest.raises(ModelLoadError, match="holds a feature-level \\(EAGLE\\) draft, not a LoRA adapter"):
    load_lora(ASSETS / "eagle_smollm2")
  with pytest.raises(ModelLoadError, match="holds a model \\(a Hugging Face config.json\\), not BPD heads: load it as "
                                           "a model \\(--model FOLDER, or load_model\\(FOLDER\\) in Python\\)"):
    load_bpd(ASSETS / "t5_numbers")
  with pytest.raises(ModelLoadError, match="holds BPD heads, not a distilled draft"):
    load_draft(ASSETS / "bpd_t5_numbers")
  model, _ = load_draft(tiny_hf)  # a whole LLaMA model is a draft too
  assert model.vocab_size == make_tiny()[0].vocab_size


def test_the_matmul_precision_reaches_the_loaded_model(tiny_hf, tmp_path):
  """`load_model(matmul_precision=...)` (`--matmul-precision`, `model.matmul_precision`) sets the loaded model's
  config; highest by default; an unknown name is refused before any weight is read."""
  assert load_model(str(tiny_hf))[0].cfg.matmul_precision == "highest"
  assert load_model(str(tiny_hf), matmul_precision="default")[0].cfg.matmul_precision == "default"
  with pytest.raises(ModelLoadError, match="Unknown matmul precision 'fast': use one of highest, high, default"):
    load_model(str(tmp_path / "nothing here"), matmul_precision="fast")



def test_dtype_options_of_load_model_reach_a_folder_model(tiny_hf):
  """`load_model(dtype=, param_dtype=, scan_layers=)` hands each option to the folder loader (`load_hf`'s own
  handling of them is tested in test_loading.py)."""
  model, params, _ = load_model(str(tiny_hf), param_dtype="bfloat16")
  assert (model.cfg.dtype, model.cfg.param_dtype) == ("float32", "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  model, params, _ = load_model(str(tiny_hf), dtype="bfloat16", scan_layers=True)
  assert (model.cfg.dtype, model.cfg.param_dtype, model.cfg.scan_layers) == ("bfloat16", "bfloat16", True)
  assert "layers" in params and {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}

def test_untied_heads_give_float32_logits_of_bfloat16_products():
  """An untied output head in a bfloat16 model: float32 logits of the bfloat16 product, not bfloat16 values."""
  model = LlamaLM(tiny_config(tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16"))
  params = model.init_params(jax.random.key(0))
  hidden = jax.random.normal(jax.random.key(1), (1, 3, model.cfg.d_model)).astype(jnp.bfloat16)
  got = model.logits(params, hidden)
  kernel = params["lm_head"]["kernel"].astype(jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, hidden.astype(jnp.float32) @ kernel, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(got, got.astype(jnp.bfloat16).astype(jnp.float32))


def test_config_numbers_are_checked_as_the_values_they_must_be():
  """A JSON `true` is no layer count, nor an infinite or NaN epsilon a positive number: each is named as damaged,
  never run as 1 or inf. Whole floats (576.0, as some JSON writers produce) are whole numbers."""
  from jaxspec.loading.errors import positive_number, whole_number

  assert whole_number(576.0, "hidden_size", "config.json") == 576 and whole_number(0, "k", "f", minimum=0) == 0
  for value in (True, False, "2", None, 2.5, float("inf"), float("nan"), 0, -1):
    with pytest.raises(ModelLoadError, match=r"config.json sets hidden_size to .*, which is not a whole number of at "
                                             r"least 1\. The file is damaged or was edited"):
      whole_number(value, "hidden_size", "config.json")
  assert positive_number(1e-6, "rms_norm_eps", "config.json") == 1e-6 and positive_number(3, "k", "f") == 3.0
  for value in (True, "1e-6", None, float("inf"), float("-inf"), float("nan"), 0, -1e-6):
    with pytest.raises(ModelLoadError, match=r"sets rms_norm_eps to .*, which is not a finite number above 0"):
      positive_number(value, "rms_norm_eps", "config.json")


def test_skipped_tensors_are_named_only_when_there_are_some(caplog):
  from jaxspec.loading.errors import unread_tensors

  with caplog.at_level("WARNING", logger="jaxspec.loading"):
    unread_tensors("model.safetensors", [])
    assert caplog.text == ""
    unread_tensors("model.safetensors", ["vision.proj"])
  assert "model.safetensors holds 1 tensor outside the layers" in caplog.text and "'vision.proj'" in caplog.text
