"""Loading errors (re-exported from `jaxspec.errors`), and the checks that turn a model file's bad settings into
them."""

from __future__ import annotations

import logging
import math

import jax.numpy as jnp
import numpy as np

from jaxspec.errors import ModelLoadError

__all__ = ["ContextError", "ModelLoadError", "check_finite", "flag", "model_config", "more_layers", "positive_number",
           "unread_tensors", "whole_number"]

logger = logging.getLogger("jaxspec.loading")


class ContextError(ModelLoadError):
  """A requested context (`load_model(..., context=N)`) the model cannot be loaded with: longer than its file
  declares, past a bound, or asked of a model whose context is not set on loading."""


def _restore(where: str, value: bool = True) -> str:
  """What to do about a bad setting in `where`: a config file is restored (or its value); a GGUF file's metadata,
  written by a converter, is not edited by hand (the message read "or the original the GGUF metadata")."""
  if "GGUF" in where:
    return "download or convert the model again"
  if value:
    return f"restore the value the model was trained with (or the original {where})"
  return f"restore the model's original {where}"


def _damaged(where: str, key: str, value, want: str) -> ModelLoadError:
  return ModelLoadError(f"{where} sets {key} to {value!r}, which is not {want}. The file is damaged or was edited: "
                        f"{_restore(where)}.")


def whole_number(value, key: str, where: str, minimum: int = 1) -> int:
  """`value` as an int of at least `minimum`; `ModelLoadError` naming `key` and the file `where` otherwise.

  Accepts ints and floats with no fraction (`576.0`), as JSON writers may produce; refuses strings, booleans, None.
  """
  want = f"a whole number of at least {minimum}"
  if isinstance(value, (bool, str, bytes)) or value is None:
    raise _damaged(where, key, value, want)
  try:
    number = float(value)
    whole = int(value)
  except (TypeError, ValueError, OverflowError):
    raise _damaged(where, key, value, want) from None
  if not math.isfinite(number) or number != whole or whole < minimum:
    raise _damaged(where, key, value, want)
  return whole


def check_finite(w, name: str, where: str) -> None:
  """`ModelLoadError` when the weight `w` (numpy or jax) holds a NaN or an infinity: every logit downstream would be
  NaN, decoding a run of one token with no error."""
  xp = np if isinstance(w, np.ndarray) else jnp
  if not bool(xp.isfinite(w).all()):
    raise ModelLoadError(f"{name} in {where} holds NaN or infinite values: the file is damaged (or was saved from a "
                         "run that diverged). Download or convert it again.")


def flag(cfg: dict, key: str, where: str, default: bool) -> bool:
  """`cfg[key]` as a bool (`default` where absent or null); `ModelLoadError` naming `key` and the file `where` for
  anything but true or false: a string "false" is truthy, and read as such it would switch the setting on."""
  value = cfg.get(key)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise _damaged(where, key, value, "true or false")
  return value


def positive_number(value, key: str, where: str) -> float:
  """`value` as a finite float above 0; `ModelLoadError` naming `key` and the file `where` otherwise."""
  want = "a finite number above 0"
  if isinstance(value, (bool, str, bytes)) or value is None:
    raise _damaged(where, key, value, want)
  try:
    number = float(value)
  except (TypeError, ValueError, OverflowError):
    raise _damaged(where, key, value, want) from None
  if not math.isfinite(number) or number <= 0:
    raise _damaged(where, key, value, want)
  return number


def model_config(cls, where: str, **fields):
  """`cls(**fields)`, with the config's own consistency checks (heads a multiple of kv heads, ...) as
  `ModelLoadError`."""
  try:
    return cls(**fields)
  except ValueError as e:
    raise ModelLoadError(f"{where} describes a model that cannot be built: {e}. The file is damaged or was edited: "
                         f"{_restore(where, value=False)}.") from None


def unread_tensors(shown: str, names: list[str], what: str = "outside the layers that jaxspec's LLaMA does not read",
                   note: str = "skipped. A text model with extra parts (a vision tower, a projector) runs as the text "
                               "model without them; if the model needs them it is another architecture, and its "
                               "outputs will differ.") -> None:
  """Warns of the tensors `names` a loader skips (`shown`: the file or folder; `what`: which they are; `note`: why
  skipping them is allowed and what it risks). The defaults are the LLaMA loaders': inside the layers an unknown
  tensor is refused (it changes what every layer computes); outside them it may be a part a text model runs
  without, such as a multimodal model's vision tower, so it is skipped and named."""
  if names:
    logger.warning("%s holds %d %s %s, e.g. %r; %s", shown, len(names), "tensor" if len(names) == 1 else "tensors",
                   what, names[0], note)


def bounded_context(context: int, key: str, bounds: list, log: bool = True, requested: int | None = None,
                    rope_original: int | None = None) -> int:
  """The model's context (`LlamaConfig.max_seq_len`) from the config's `context` (its `key`).

  By default `context` shortened to the least of `bounds`, `(bound or None, why)` pairs (the lengths within which
  jaxspec computes the model exactly) and to `rope_original`, LongRoPE's original context, within which its short
  factors apply as transformers applies them; each bound that shortens it is logged with its reason. `requested` (a
  user's `context=`) replaces that: at most `context` and within every bound, and past `rope_original` it turns
  LongRoPE's long factors on at every position (`jaxspec.models.llama.rope_divisors`), as llama.cpp does for a
  context longer than the original.

  Raises:
    ContextError: a requested context that is not a whole number, or longer than the model's or a bound.
  """
  if requested is not None:
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
      raise ContextError(f"context={requested!r}: give the model's context as a whole number of tokens (prompt and "
                         "output), or None for the default.")
    if requested > context:
      raise ContextError(f"context={requested} is longer than the model's ({key}={context}): ask for {context} "
                         "tokens or fewer.")
    for bound, why in bounds:
      if bound is not None and bound < requested:
        raise ContextError(f"context={requested} passes {why}; ask for {bound} tokens or fewer.")
    if rope_original is not None and requested > rope_original:
      logger.warning("LongRoPE's long factors apply at every position: the context (%d tokens) passes the original "
                     "%d (below it transformers computes with the short factors).", requested, rope_original)
    return requested
  if rope_original is not None:
    bounds = [*bounds, (rope_original, "its LongRoPE scaling's original context, within which the short factors "
                        "apply (a longer context, --context, turns the long factors on)")]
  for bound, why in bounds:
    if bound is not None and bound < context:
      if log:
        logger.warning("The model's context is bounded to %d tokens (prompt and output), from %s=%d, by %s.", bound,
                       key, context, why)
      context = bound
  return context


def more_layers(shown: str, layers: int, found: int, key: str) -> ModelLoadError:
  """The error for weights of more layers than the config names (`shown`: the file or folder, as the message shows
  it)."""
  return ModelLoadError(f"{shown} holds weights for {found} layers and its config says {layers} ({key}); running it "
                        f"with {layers} would compute another model. Set {key} to the number of layers the weights "
                        "were trained with.")
