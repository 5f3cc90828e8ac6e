"""Blockwise parallel decoding (Stern, Shazeer, Uszkoreit 2018) as a drafter on the shared loop.

Predict: the k heads read the target's hidden state at the last committed token (and the embedding of the pending
token the target chose after it) and propose the k tokens after the pending one. Verify: the target runs
`[pending, d_1..d_k]` in one forward. Accept: the longest prefix equal to the target's argmax (exact), or, with
`TopKAcceptance`, Stern's approximate rule (each token within the target's top-k; not lossless). The verify
forward's hidden state at the last accepted position is what the heads read next, so scoring and proposing share
one target call per step.

`draft_params` is built once per model and heads by `bpd_draft_params` (the heads, their output projection and the
target's embedding table, which the heads read for the pending token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.accept import prefix_length
from jaxspec.decoding.protocol import Acceptance, Draft, PrefillInfo, Verified, require_entries, width_check
from jaxspec.decoding.sampling import SamplingParams, argmax
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDModel, output_projection

Array = jax.Array


def bpd_draft_params(model, target_params, bpd: BPDModel, bpd_params: dict) -> dict:
  """The arrays the BPD drafter needs inside the jitted loop, for the target they are used with.

  Args:
    model: the target (e.g. `LlamaLM`) whose hidden states the heads read.
    target_params: its params; the heads project through its output table (the rows of `vocab_ids` where the heads
      were trained on a subset of the vocabulary) and read its input embeddings (`use_next_token`).
    bpd: the heads' module (`jaxspec.models.bpd.load_bpd`).
    bpd_params: the heads' params, from the same `load_bpd` call.

  Raises:
    InputError: heads whose vocabulary subset holds ids past the target's vocabulary (heads trained for another
      target), or heads of another width.
  """
  width_check(model, bpd.cfg.d_model, "these BPD heads")
  _check_subset_ids(model, bpd_params)
  out = {"bpd": bpd_params, "proj_DxM": output_projection(model, target_params, bpd_params)}
  if bpd.cfg.use_next_token:
    out["embed_VxD"] = model.input_table(target_params)
  return out


def _check_subset_ids(target, bpd_params) -> None:
  """Heads over a vocabulary subset (`vocab_ids`) must name ids of the target's vocabulary; checked where the ids
  are on hand (not traced, and on this host)."""
  ids = bpd_params.get("vocab_ids") if isinstance(bpd_params, dict) else None
  vocab = getattr(target, "vocab_size", None)
  if ids is None or vocab is None or isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True):
    return
  ids = np.asarray(ids)
  if ids.size and (int(ids.max()) >= vocab or int(ids.min()) < 0):
    raise InputError(f"These BPD heads predict token ids up to {int(ids.max())}, past this target's vocabulary of "
                     f"{vocab} tokens: they were trained for another target; use heads trained for this one.")


def check_bpd_draft_params(target, draft_params: dict) -> None:
  """Raises `InputError` where `draft_params` are not BPD draft params (`bpd_draft_params`; the heads' own params
  alone were a KeyError inside tracing), or were built with another target than `target`: an output table over
  another vocabulary would draft ids the target cannot embed (NaN, then token 0 everywhere)."""
  # "bpd" only: drafters built on BPDDrafter may score the heads another way (an oracle's heads need no table).
  require_entries("A drafter from BPD heads", draft_params, ("bpd",), "jaxspec.decoding.bpd.bpd_draft_params(model, "
                  "params, bpd, heads)")
  if "proj_DxM" not in draft_params:
    return
  vocab = getattr(target, "vocab_size", None)
  if vocab is None:
    return
  rows = int(np.shape(draft_params["proj_DxM"])[-1])
  subset = "vocab_ids" in draft_params.get("bpd", {})
  embed = draft_params.get("embed_VxD")
  embed_rows = int(np.shape(embed)[0]) if embed is not None else vocab
  if (not subset and rows != vocab) or embed_rows != vocab:
    got = embed_rows if embed_rows != vocab else rows
    raise InputError(f"These BPD draft params were built for a target with {got} tokens, and this target has "
                     f"{vocab}: build them for it, bpd_draft_params(model, params, bpd, heads) with this model's "
                     "params.")
  _check_subset_ids(target, draft_params.get("bpd"))


def chain_draft(tokens_BxN: Array) -> Draft:
  b, n = tokens_BxN.shape
  depth = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (b, n))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n))
  parent = jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n))
  return Draft(tokens_BxN, depth, mask, parent)


@dataclasses.dataclass(frozen=True)
class BPDDrafter:
  """k heads propose a chain of k tokens; `dstate` is the hidden state `[B, D]` that predicted the pending token."""

  bpd: BPDModel
  is_chain: bool = True
  calls_per_step: int = 0  # the heads run on the target's own forward: no separate drafter calls
  needs_params = "jaxspec.decoding.bpd.bpd_draft_params(model, params, bpd, heads)"
  draft_replaceable = True  # update reads the verify outcome only (`jaxspec.decoding.lookup.WithLookup`)
  # > 0: skip verifying a draft whose expected accepted length, sum_i prod_{j<=i} p_j over the heads' top
  # probabilities, is below `gate`; that step is then a one-token step of the target (output unchanged).
  gate: float = 0.0

  @property
  def num_nodes(self) -> int:
    return self.bpd.num_heads

  def head_logits(self, draft_params, hidden_BxD: Array, pending_B: Array) -> Array:
    """`[B, k, M]` logits of the heads over their vocabulary."""
    emb = draft_params["embed_VxD"][pending_B].astype(jnp.float32) if self.bpd.cfg.use_next_token else None
    states_BxKxD = self.bpd.head_states(draft_params["bpd"], hidden_BxD, emb)
    return jnp.einsum("bkd,dm->bkm", states_BxKxD, draft_params["proj_DxM"])

  def check_target(self, target) -> None:
    width_check(target, self.bpd.cfg.d_model, "these BPD heads")

  def check_draft_params(self, target, draft_params) -> None:
    check_bpd_draft_params(target, draft_params)

  def init(self, draft_params, prefill: PrefillInfo):
    return prefill.hidden_BxD.astype(jnp.float32)

  def propose(self, draft_params, dstate, loop):
    logits_BxKxM = self.head_logits(draft_params, dstate, loop.pending_B)
    top_BxK = argmax(logits_BxKxM)
    if "vocab_ids" in draft_params["bpd"]:
      top_BxK = draft_params["bpd"]["vocab_ids"][top_BxK]
    draft = chain_draft(top_BxK)
    if self.gate > 0:
      p_BxK = jnp.exp(jnp.max(logits_BxKxM, axis=-1) - jax.nn.logsumexp(logits_BxKxM, axis=-1))  # top probability
      draft = draft.replace(verify_B=jnp.sum(jnp.cumprod(p_BxK, axis=-1), axis=-1) >= self.gate)
    return draft, dstate

  def skip_propose(self, draft_params, dstate, loop):
    """The state `propose` would leave, without running the heads (`WithLookup`: every active row copies)."""
    return dstate

  def update(self, draft_params, dstate, verified: Verified):
    last_B = verified.acceptance.n_commit_B - 1
    h_BxD = jnp.take_along_axis(verified.hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return jnp.where(verified.active_B[:, None], h_BxD, dstate)


@dataclasses.dataclass(frozen=True)
class TopKAcceptance:
  """Stern's approximate acceptance: keep drafted tokens that are within the target's top-k at their position; the
  token after them is the target's argmax. NOT lossless: the output can differ from greedy decoding."""

  top_k: int = 2
  lossless = False
  handles_unproposed = True  # a -1 token is in no top-k: the prefix ends there and the target's argmax follows

  def first_token(self, rng: Array, logits_BxV: Array, sp: SamplingParams) -> Array:
    return argmax(logits_BxV)

  def accept(self, rng: Array, draft: Draft, logits_BxTxV: Array, sp: SamplingParams, is_chain: bool) -> Acceptance:
    if not is_chain:
      raise InputError("TopKAcceptance (Stern's approximate acceptance) verifies chains: use a chain drafter such as "
                       "BPDDrafter, not a tree.")
    b, t, v = logits_BxTxV.shape
    if self.top_k > v:
      raise InputError(f"approximate acceptance within the top {self.top_k} tokens: the model has {v}; use a smaller "
                       "k (bpd:approx=K with K <= the vocabulary size).")
    target_BxT = argmax(logits_BxTxV)
    path_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if t == 1:
      return Acceptance(target_BxT, path_BxT, jnp.ones((b,), jnp.int32))
    _, top_BxNxK = jax.lax.top_k(logits_BxTxV[:, :-1], self.top_k)
    ok_BxN = jnp.any(top_BxNxK == draft.tokens_BxN[..., None], axis=-1)
    n_acc_B = prefix_length(ok_BxN)
    drafted_BxT = jnp.concatenate([draft.tokens_BxN, jnp.zeros((b, 1), jnp.int32)], axis=1)
    fix_B = jnp.take_along_axis(target_BxT, n_acc_B[:, None], axis=1)[:, 0]
    emitted_BxT = jnp.where(jnp.arange(t)[None] < n_acc_B[:, None], drafted_BxT, fix_B[:, None])
    return Acceptance(emitted_BxT, path_BxT, n_acc_B + 1)
