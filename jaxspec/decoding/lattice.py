"""Better BPD drafts (Kim et al. 2024): rescore the heads' top-t lattice before verifying.

The k BPD heads give, for each of the next k positions, a distribution over tokens; position i's top-t tokens form
column i of a lattice of t^k paths. Plain BPD verifies the path of per-column argmaxes, which ignores how the tokens
fit together (the heads do not see each other, so drafts often repeat a token or break the grammar). Rescoring picks
paths by an interpolated score, (1 - w) * log p_head + w * log p_LM, where w is a runtime weight (`draft_params`,
tuned on training prompts, so changing it does not recompile):

- `ngram`: global rescoring with an n-gram LM (`jaxspec.models.ngram`): a beam search over the lattice keeps the
  `width` best partial paths column by column (default p) and the p best complete ones are verified in one target
  forward as p branches of a tree. With the heads' scores alone any width is exact; with the LM's a path whose
  prefix left the beam is lost, so the p drafts are the p best of the t^k paths only approximately, unless
  width >= t^(k-1), where the beam holds every prefix and the search is exhaustive: Kim et al.'s exact p best.
- `neural`: local rescoring with a small neural LM (any model with the target's vocabulary; the bench's default is
  the shipped distilled draft, the target's first layers also work): left to right, the LM reads the chosen prefix
  and picks, in column i, the candidate with the best interpolated score. Only the t candidates' logits are computed
  (the LM's softmax normaliser is one constant per column, so it does not change the choice).
- `oracle`: the headroom. Given the greedy output, column i drafts the greedy token whenever it is in the column's
  top-t, so the accepted length is the longest prefix of greedy tokens inside the lattice: the block efficiency of
  a perfect rescorer.
- `none`: the per-column argmax, i.e. plain BPD (on the same code path, for comparisons).

Every draft is verified by the target with greedy acceptance, so outputs stay token-identical to greedy decoding
whatever the rescorer picks. The drafter also counts what the paper analyses: each head's entropy and top-1
probability, and the consecutive-repetition rate of the raw (per-column argmax) and of the verified first draft.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxspec.decoding.bpd import BPDDrafter, check_bpd_draft_params
from jaxspec.decoding.protocol import Draft, PrefillInfo, Verified, require_entries
from jaxspec.decoding.speculative import DraftModelDrafter
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDModel
from jaxspec.models.ngram import NgramLM

Array = jax.Array

RESCORERS = ("none", "ngram", "neural", "oracle")


@flax.struct.dataclass
class LatticeState:
  """What the drafter carries: the heads' input, the recent tokens, the neural LM's state and its counters."""

  hidden_BxD: Array  # the target's hidden state that predicted the pending token
  hist_BxH: Array  # the H committed tokens before the pending token, oldest first (-1: before the text)
  pending_B: Array  # the pending token of the last propose
  lm: Any  # the neural LM's `DraftState`, or ()
  entropy_K: Array  # sum over proposals of each head's entropy (nats)
  top1_K: Array  # sum over proposals of each head's top-1 probability
  proposals: Array  # proposals counted (active rows x steps)
  raw_repeats: Array  # adjacent equal tokens in [pending, raw draft] (k pairs per proposal)
  draft_repeats: Array  # the same in the first verified draft


def forest_draft(drafts_BxPxK: Array) -> Draft:
  """P chains of K tokens after the pending token as one tree of N = P * K nodes (chain j is nodes jK .. jK+K-1)."""
  b, p, k = drafts_BxPxK.shape
  i_N = jnp.tile(jnp.arange(k, dtype=jnp.int32), p)
  j_N = jnp.repeat(jnp.arange(p, dtype=jnp.int32), k)
  n_idx = jnp.arange(p * k, dtype=jnp.int32)
  parent_N = jnp.where(i_N == 0, -1, n_idx - 1)
  mask_NxN = (j_N[:, None] == j_N[None, :]) & (i_N[None, :] <= i_N[:, None])
  bc = lambda x: jnp.broadcast_to(x, (b,) + x.shape)
  return Draft(drafts_BxPxK.reshape(b, p * k), bc(i_N + 1), bc(mask_NxN), bc(parent_N))


def _repeats(pending_B: Array, draft_BxK: Array) -> Array:
  seq_BxT = jnp.concatenate([pending_B[:, None], draft_BxK], axis=1)
  return jnp.sum((seq_BxT[:, 1:] == seq_BxT[:, :-1]).astype(jnp.int32), axis=-1)


def _heads_vocab(bpd_params) -> int:
  """M, the tokens the heads draft from (a vocabulary subset's size, or the target's vocabulary)."""
  return int(jnp.shape(bpd_params["proj_DxM"])[-1])


def _check_top_t(top_t: int, bpd_params) -> None:
  m = _heads_vocab(bpd_params)
  if top_t > m:
    raise InputError(f"The lattice's t={top_t} candidates per column are more than the {m} tokens these heads draft "
                     f"from: give t={m} or less.")


def _check_ngram_vocab(ngram: NgramLM, target) -> None:
  vocab = getattr(target, "vocab_size", None)
  if vocab is not None and ngram.vocab_size != vocab:
    raise InputError(f"The n-gram LM was counted over {ngram.vocab_size} token ids and the target has {vocab}: "
                     "count it on the target's tokens (jaxspec.models.ngram.build_ngram with its vocabulary size).")


def _prompt_history(prefill: PrefillInfo, h: int) -> Array:
  """`[B, h]`: each prompt's last h tokens, oldest first (-1 before the text)."""
  idx_BxH = prefill.lengths_B[:, None] - h + jnp.arange(h, dtype=jnp.int32)[None]
  hist_BxH = jnp.where(idx_BxH >= 0, jnp.take_along_axis(prefill.tokens_BxP, jnp.maximum(idx_BxH, 0), axis=1), -1)
  return hist_BxH.astype(jnp.int32)


def _next_history(hist_BxH: Array, pending_B: Array, verified: Verified) -> Array:
  """The h committed tokens before the new pending one: the old history, the old pending token and the accepted
  drafts, read from there (active rows; the others keep theirs)."""
  acc = verified.acceptance
  h = hist_BxH.shape[1]
  buf_BxL = jnp.concatenate([hist_BxH, pending_B[:, None], acc.emitted_BxT.astype(jnp.int32)], axis=1)
  new_BxH = jnp.take_along_axis(buf_BxL, acc.n_commit_B[:, None] + jnp.arange(h, dtype=jnp.int32)[None], axis=1)
  return jnp.where(verified.active_B[:, None], new_BxH, hist_BxH)


def output_rows(model, params, ids: Array) -> Array:
  """Rows of a model's output projection for token ids: `[..., D]` f32."""
  return model.output_table(params)[ids].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LatticeDrafter:
  """BPD drafts chosen from the heads' top-t lattice by a rescorer.

  Greedy only (`greedy_only`: the loop refuses a sampling rule), as Kim et al. study it: the rescorers pick drafts to
  match the target's argmax (the oracle follows the greedy output), and no statistical test covers these drafts under
  rejection sampling.

  Attributes:
    bpd: the heads (static part; params in `draft_params["bpd"]`, built by `lattice_draft_params`).
    rescorer: "none", "ngram", "neural" or "oracle" (see the module docstring).
    top_t: candidates per lattice column.
    beams: p, drafts verified per step (ngram and none; neural and oracle verify one chain).
    width: partial paths the n-gram search keeps per column (0: p); t^(k-1) or more makes it exact.
    keep_raw: make the heads' own per-column argmax one of the p drafts (needs beams >= 2).
    ngram: the n-gram LM (rescorer "ngram").
    lm: the neural LM's drafter (rescorer "neural"): a greedy `DraftModelDrafter` with gamma = k.
  """

  bpd: BPDModel
  rescorer: str = "none"
  top_t: int = 16
  beams: int = 1
  width: int = 0
  keep_raw: bool = False
  ngram: NgramLM | None = None
  lm: DraftModelDrafter | None = None
  needs_params = "jaxspec.decoding.lattice.lattice_draft_params(bpd_draft_params(...), ...)"
  greedy_only = True

  def __post_init__(self):
    if self.rescorer not in RESCORERS:
      raise InputError(f"Unknown lattice rescorer {self.rescorer!r}; choose from {', '.join(RESCORERS)}.")
    if self.beams < 1 or self.top_t < self.beams:
      raise InputError(f"Need 1 <= beams <= top_t, got beams={self.beams}, top_t={self.top_t}.")
    if self.width and self.width < self.beams:
      raise InputError(f"The search width ({self.width}) must be at least the number of drafts it keeps (beams="
                       f"{self.beams}); 0 means as many as beams.")
    if self.rescorer in ("neural", "oracle") and self.beams != 1:
      raise InputError(f"The {self.rescorer} rescorer picks one draft per step: use beams=1.")
    if self.keep_raw and self.beams < 2:
      raise InputError("keep_raw verifies the raw draft beside rescored ones: it needs beams >= 2.")
    if self.rescorer == "ngram" and self.ngram is None:
      raise InputError("The ngram rescorer needs an n-gram LM.")
    if self.rescorer == "neural" and (self.lm is None or self.lm.gamma != self.bpd.num_heads):
      raise InputError("The neural rescorer needs a neural LM drafter with gamma equal to the number of heads.")

  @property
  def num_nodes(self) -> int:
    return self.bpd.num_heads * self.beams

  @property
  def is_chain(self) -> bool:
    return self.beams == 1

  @property
  def calls_per_step(self) -> int:
    return self.lm.calls_per_step if self.rescorer == "neural" else 0

  def check_draft_params(self, target, draft_params) -> None:
    require_entries("LatticeDrafter", draft_params, ("bpd",), self.needs_params)
    bpd_params = draft_params["bpd"]
    check_bpd_draft_params(target, bpd_params)
    require_entries("LatticeDrafter's heads", bpd_params, ("proj_DxM",), "jaxspec.decoding.bpd.bpd_draft_params")
    _check_top_t(self.top_t, bpd_params)

  def check_target(self, target) -> None:
    BPDDrafter(self.bpd).check_target(target)
    if self.rescorer == "neural":
      self.lm.check_target(target)
    if self.rescorer == "ngram":
      _check_ngram_vocab(self.ngram, target)

  @property
  def _hist_len(self) -> int:
    return self.ngram.order - 1 if self.ngram is not None else 1

  def init(self, draft_params, prefill: PrefillInfo) -> LatticeState:
    lm = self.lm.init(draft_params["lm"], prefill) if self.rescorer == "neural" else ()
    k = self.bpd.num_heads
    z_K = jnp.zeros((k,), jnp.float32)
    zero = jnp.int32(0)
    return LatticeState(prefill.hidden_BxD.astype(jnp.float32), _prompt_history(prefill, self._hist_len),
                        prefill.first_B.astype(jnp.int32), lm, z_K, z_K, zero, zero, zero)

  def lattice(self, draft_params, dstate: LatticeState, pending_B: Array) -> tuple[Array, Array, Array]:
    """`(candidates_BxKxT, head log-probs_BxKxT, full head log-probs_BxKxM)` of the current lattice."""
    logits_BxKxM = BPDDrafter(self.bpd).head_logits(draft_params["bpd"], dstate.hidden_BxD, pending_B)
    logp_BxKxM = jax.nn.log_softmax(logits_BxKxM, axis=-1)
    val_BxKxT, idx_BxKxT = jax.lax.top_k(logp_BxKxM, self.top_t)
    idx_BxKxT = idx_BxKxT.astype(jnp.int32)
    if "vocab_ids" in draft_params["bpd"]["bpd"]:
      idx_BxKxT = draft_params["bpd"]["bpd"]["vocab_ids"][idx_BxKxT]
    return idx_BxKxT, val_BxKxT, logp_BxKxM

  def propose(self, draft_params, dstate: LatticeState, loop) -> tuple[Draft, LatticeState]:
    pending_B = loop.pending_B
    cand_BxKxT, logp_BxKxT, full_BxKxM = self.lattice(draft_params, dstate, pending_B)
    raw_BxK = cand_BxKxT[..., 0]
    lm = dstate.lm
    if self.rescorer == "none":
      drafts_BxPxK = self._beam(draft_params, dstate, pending_B, cand_BxKxT, logp_BxKxT, use_ngram=False)
    elif self.rescorer == "ngram":
      drafts_BxPxK = self._beam(draft_params, dstate, pending_B, cand_BxKxT, logp_BxKxT, use_ngram=True)
    elif self.rescorer == "neural":
      chain_BxK, lm = self._neural(draft_params, dstate, pending_B, cand_BxKxT, logp_BxKxT)
      drafts_BxPxK = chain_BxK[:, None]
    else:
      drafts_BxPxK = self._oracle(draft_params, loop, cand_BxKxT, raw_BxK)[:, None]
    if self.keep_raw:
      drafts_BxPxK = jnp.concatenate([drafts_BxPxK[:, :self.beams - 1], raw_BxK[:, None]], axis=1)

    act_B = loop.active_B
    act_f = act_B.astype(jnp.float32)
    probs_BxKxM = jnp.exp(full_BxKxM)
    entropy_BxK = -jnp.sum(probs_BxKxM * full_BxKxM, axis=-1)
    act_i = act_B.astype(jnp.int32)
    dstate = dstate.replace(
        pending_B=pending_B, lm=lm,
        entropy_K=dstate.entropy_K + jnp.einsum("b,bk->k", act_f, entropy_BxK),
        top1_K=dstate.top1_K + jnp.einsum("b,bk->k", act_f, jnp.exp(logp_BxKxT[..., 0])),
        proposals=dstate.proposals + jnp.sum(act_i),
        raw_repeats=dstate.raw_repeats + jnp.sum(act_i * _repeats(pending_B, raw_BxK)),
        draft_repeats=dstate.draft_repeats + jnp.sum(act_i * _repeats(pending_B, drafts_BxPxK[:, 0])))
    return forest_draft(drafts_BxPxK), dstate

  def _beam(self, draft_params, dstate, pending_B, cand_BxKxT, logp_BxKxT, use_ngram: bool) -> Array:
    """The p best paths of a beam search over the lattice by (1 - w) * head + w * n-gram log-probability that keeps
    `width` partial paths: exact by heads alone (without the n-gram) at any width, and with it a path whose
    early prefix fell out of the beam is not found unless the width holds every prefix (t^(k-1))."""
    b, k, t = cand_BxKxT.shape
    p = self.beams
    width = min(self.width or p, t ** max(k - 1, 1))
    h = self._hist_len
    base_BxH = jnp.concatenate([dstate.hist_BxH, pending_B[:, None]], axis=1)[:, -h:]
    w = draft_params["weight"] if use_ngram else 0.0
    paths_BxWxK = jnp.zeros((b, 1, k), jnp.int32)
    score_BxW = jnp.zeros((b, 1), jnp.float32)
    for i in range(k):
      n = paths_BxWxK.shape[1]  # partial paths kept: min(width, t^i), so no slot ever holds an impossible path
      step_BxWxT = jnp.broadcast_to((1.0 - w) * logp_BxKxT[:, None, i], (b, n, t))
      if use_ngram:
        ctx_BxWxH = jnp.concatenate([jnp.broadcast_to(base_BxH[:, None], (b, n, h)), paths_BxWxK[:, :, :i]],
                                    axis=-1)[..., -h:]
        lp_BxWxT = self.ngram.log_prob(draft_params["ngram"], jnp.broadcast_to(ctx_BxWxH[:, :, None], (b, n, t, h)),
                                       jnp.broadcast_to(cand_BxKxT[:, None, i], (b, n, t)))
        step_BxWxT = step_BxWxT + w * lp_BxWxT
      keep = min(width, n * t) if i < k - 1 else p
      score_BxW, top_BxW = jax.lax.top_k((score_BxW[:, :, None] + step_BxWxT).reshape(b, n * t), keep)
      parent_BxW, c_BxW = top_BxW // t, top_BxW % t
      paths_BxWxK = jnp.take_along_axis(paths_BxWxK, parent_BxW[:, :, None], axis=1)
      paths_BxWxK = paths_BxWxK.at[:, :, i].set(jnp.take_along_axis(cand_BxKxT[:, i], c_BxW, axis=1))
    return paths_BxWxK

  def _neural(self, draft_params, dstate, pending_B, cand_BxKxT, logp_BxKxT) -> tuple[Array, Any]:
    """Left to right, the neural LM picks each column's candidate with the best interpolated score."""
    w = draft_params["weight"]
    lm_params = draft_params["lm"]
    lm_model = self.lm.draft_model

    def choose(hidden_BxD, x):
      cand_BxT, lp_BxT = x
      z_BxT = jnp.einsum("bd,btd->bt", hidden_BxD.astype(jnp.float32), output_rows(lm_model, lm_params, cand_BxT))
      j_B = jnp.argmax((1.0 - w) * lp_BxT + w * z_BxT, axis=-1)
      return jnp.take_along_axis(cand_BxT, j_B[:, None], axis=1)[:, 0], ()

    xs = (jnp.moveaxis(cand_BxKxT, 1, 0), jnp.moveaxis(logp_BxKxT, 1, 0))
    chain_BxK, _, lm = self.lm.roll(lm_params, dstate.lm, pending_B, choose, xs)
    return chain_BxK, lm

  def _oracle(self, draft_params, loop, cand_BxKxT, raw_BxK) -> Array:
    """The greedy continuation where it lies in the lattice, else the raw draft."""
    if "reference_BxR" not in draft_params:
      raise InputError("The oracle rescorer needs the reference continuation: pass lattice_draft_params(..., "
                       "reference_BxR=the greedy output).")
    ref_BxR = draft_params["reference_BxR"]
    k = raw_BxK.shape[1]
    idx_BxK = loop.n_out_B[:, None] - 1 + jnp.arange(1, k + 1, dtype=jnp.int32)[None]
    ref_BxK = jnp.take_along_axis(ref_BxR, jnp.minimum(idx_BxK, ref_BxR.shape[1] - 1), axis=1)
    hit_BxK = jnp.any(cand_BxKxT == ref_BxK[..., None], axis=-1)
    return jnp.where(hit_BxK, ref_BxK, raw_BxK)

  def update(self, draft_params, dstate: LatticeState, verified: Verified) -> LatticeState:
    acc = verified.acceptance
    active_B = verified.active_B
    n_commit_B = acc.n_commit_B
    last_B = jnp.take_along_axis(acc.path_BxT, (n_commit_B - 1)[:, None], axis=1)[:, 0]
    h_BxD = jnp.take_along_axis(verified.hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    lm = self.lm.update(draft_params["lm"], dstate.lm, verified) if self.rescorer == "neural" else dstate.lm
    return dstate.replace(hidden_BxD=jnp.where(active_B[:, None], h_BxD, dstate.hidden_BxD),
                          hist_BxH=_next_history(dstate.hist_BxH, dstate.pending_B, verified), lm=lm)

  def stats(self, dstate: LatticeState) -> dict[str, Array]:
    """Sums for the analysis (divide by `proposals`, or by k * `proposals` for the repeat counts)."""
    return {"head_entropy_K": dstate.entropy_K, "head_top1_K": dstate.top1_K, "proposals": dstate.proposals,
            "raw_repeats": dstate.raw_repeats, "draft_repeats": dstate.draft_repeats}


def lattice_draft_params(bpd_draft: dict, *, weight: float = 0.0, ngram: dict | None = None, lm: Any = None,
                         reference_BxR: Array | None = None) -> dict:
  """The drafter's arrays: the BPD drafter's (`bpd_draft_params`), the interpolation weight (0..1) and the
  rescorer's."""
  if not 0.0 <= float(weight) <= 1.0:  # (1 - w) * heads + w * LM: past 1 the heads' term would count against a token
    raise InputError(f"The rescoring weight is a share in 0..1 of the LM's score against the heads', got {weight}.")
  out = {"bpd": bpd_draft, "weight": jnp.float32(weight)}
  if ngram is not None:
    out["ngram"] = ngram
  if lm is not None:
    out["lm"] = lm
  if reference_BxR is not None:
    out["reference_BxR"] = jnp.asarray(reference_BxR, jnp.int32)
  return out


# --------------------------------------------------------------------------------------------------------------------
# Rescored trees: OPT-Tree over the heads' lattice, each node's children scored with the n-gram LM along its path.


@flax.struct.dataclass
class RescoredTreeState:
  hidden_BxD: Array  # the target's hidden state that predicted the pending token
  hist_BxH: Array  # the H committed tokens before the pending token, oldest first (-1: before the text)
  pending_B: Array  # the pending token of the last propose


@dataclasses.dataclass(frozen=True)
class NgramHeadsTreeSource:
  """OPT-Tree's distributions from BPD heads rescored by an n-gram LM along each node's path.

  A node at depth d - 1 proposes as children its depth's head's top-t tokens, each scored (1 - w) * log p_head +
  w * log p_ngram(token | the history, the pending token and the node's path): the same interpolation as the `ngram`
  lattice rescorer, here per tree node, so siblings under different parents get different scores (with the heads
  alone every node of a depth has the same children). The scores are not renormalised: at w = 0 the tree is the heads'
  own over their top-t tokens, and every score is <= 0, so a path never scores above its prefix and a frontier of N
  nodes still finds the N best paths. The scores only choose the nodes: each node's value, and so the tree's expected
  acceptance (what `nodes=auto`, a gate and the growth threshold read), is its path's probability under the heads,
  as in the heads' own tree. The output never depends on either: every draft is verified with greedy acceptance.
  Greedy only (no statistical test covers these scores as a sampling q).

  `draft_params`: `lattice_draft_params(bpd_draft_params(...), weight=w, ngram=tables)`. `width` is the tree's
  frontier width (the paths of its frontiers are kept in a buffer of that width).
  """

  bpd: BPDModel
  ngram: NgramLM
  top_t: int = 16
  width: int = 4
  needs_params = "jaxspec.decoding.lattice.lattice_draft_params(bpd_draft_params(...), weight=w, ngram=tables)"
  greedy_only = True

  def __post_init__(self):
    if self.top_t < 1 or self.width < 1:
      raise InputError(f"Need top_t >= 1 and width >= 1, got top_t={self.top_t}, width={self.width}.")

  @property
  def _heads(self):
    from jaxspec.decoding.opt_tree import HeadsTreeSource
    return HeadsTreeSource(self.bpd)

  @property
  def _hist_len(self) -> int:
    return self.ngram.order - 1

  def calls(self, depth):
    return 0

  def check_target(self, target) -> None:
    self._heads.check_target(target)
    _check_ngram_vocab(self.ngram, target)

  def check_draft_params(self, target, draft_params) -> None:
    require_entries("NgramHeadsTreeSource", draft_params, ("bpd", "ngram", "weight"), self.needs_params)
    self._heads.check_draft_params(target, draft_params["bpd"])
    _check_top_t(self.top_t, draft_params["bpd"])

  def init(self, draft_params, prefill: PrefillInfo, extra_slots: int, depth: int) -> RescoredTreeState:
    hidden_BxD = self._heads.init(draft_params["bpd"], prefill, extra_slots, depth)
    return RescoredTreeState(hidden_BxD, _prompt_history(prefill, self._hist_len), prefill.first_B.astype(jnp.int32))

  def to_tokens(self, draft_params, idx):
    return self._heads.to_tokens(draft_params["bpd"], idx)

  def _scores(self, draft_params, ctx_BxWxH, val_BxT, idx_BxT, ids_BxT, m: int) -> Array:
    """`[B, W, M]`: the interpolated scores of the t candidates after each of W contexts, -inf elsewhere."""
    b, w, h = ctx_BxWxH.shape
    t = val_BxT.shape[-1]
    wt = draft_params["weight"]
    lp_BxWxT = self.ngram.log_prob(draft_params["ngram"], jnp.broadcast_to(ctx_BxWxH[:, :, None], (b, w, t, h)),
                                   jnp.broadcast_to(ids_BxT[:, None], (b, w, t)))
    # <= 0 (both terms are, for a weight in 0..1; the minimum holds it for any weight): a path never scores above
    # its prefix, which keeps the chosen nodes a tree
    score_BxWxT = jnp.minimum((1.0 - wt) * val_BxT[:, None] + wt * lp_BxWxT, 0.0)
    out = jnp.full((b, w, m), -jnp.inf, jnp.float32)
    return out.at[jnp.arange(b)[:, None, None], jnp.arange(w)[None, :, None], idx_BxT[:, None]].set(score_BxWxT)

  def begin(self, draft_params, sstate: RescoredTreeState, loop, logp_fn):
    logits_BxKxM = BPDDrafter(self.bpd).head_logits(draft_params["bpd"], sstate.hidden_BxD, loop.pending_B)
    logp_BxKxM = logp_fn(logits_BxKxM)
    b, k, m = logp_BxKxM.shape
    val_BxKxT, idx_BxKxT = jax.lax.top_k(logp_BxKxM, min(self.top_t, m))
    ids_BxKxT = self.to_tokens(draft_params, idx_BxKxT)
    base_BxH = jnp.concatenate([sstate.hist_BxH, loop.pending_B[:, None].astype(jnp.int32)], axis=1)[:, 1:]
    root_BxM = self._scores(draft_params, base_BxH[:, None], val_BxKxT[:, 0], idx_BxKxT[:, 0], ids_BxKxT[:, 0], m)
    paths_BxR = jnp.zeros((b, k * self.width), jnp.int32)  # each depth's frontier tokens, depth by depth
    ctx = (logp_BxKxM, val_BxKxT, idx_BxKxT, ids_BxKxT, base_BxH, paths_BxR)
    # (scores that choose the children, the heads' log-probabilities that value them: `OptTreeDrafter`)
    return (root_BxM[:, 0], logp_BxKxM[:, 0]), ctx, sstate.replace(pending_B=loop.pending_B.astype(jnp.int32))

  def expand(self, draft_params, ctx, d: Array, front_BxW: Array, anc_BxWxR: Array, logp_fn) -> tuple[Array, Any]:
    """The children's scores `[B, W, M]` of the depth-(d-1) frontier `front_BxW`: its nodes' paths are their
    ancestors' tokens (one per earlier depth, read from the frontiers kept so far through `anc_BxWxR`) and their own."""
    logp_BxKxM, val_BxKxT, idx_BxKxT, ids_BxKxT, base_BxH, paths_BxR = ctx
    b, w = front_BxW.shape
    r = anc_BxWxR.shape[-1]
    h = self._hist_len
    paths_BxR = jax.lax.dynamic_update_slice_in_dim(paths_BxR, front_BxW.astype(jnp.int32), (d - 2) * w, axis=1)
    j = r // w  # earlier depths the ancestor mask covers
    anc_tok_BxWxJ = jnp.sum(jnp.where(anc_BxWxR.reshape(b, w, j, w), paths_BxR[:, None, :r].reshape(b, 1, j, w), 0),
                            axis=-1)
    path_BxWxJ = jax.lax.dynamic_update_slice_in_dim(anc_tok_BxWxJ, front_BxW[:, :, None].astype(jnp.int32), d - 2,
                                                     axis=2)  # depths 1 .. d-1; later ones unused
    seq_BxWxL = jnp.concatenate([jnp.broadcast_to(base_BxH[:, None], (b, w, h)), path_BxWxJ], axis=-1)
    ctx_BxWxH = jax.lax.dynamic_slice_in_dim(seq_BxWxL, d - 1, h, axis=2)  # the h tokens up to the node's own
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, d - 1, axis=1, keepdims=False)  # noqa: E731
    m = _heads_vocab(draft_params["bpd"])
    scores = self._scores(draft_params, ctx_BxWxH, pick(val_BxKxT), pick(idx_BxKxT), pick(ids_BxKxT), m)
    logp_BxWxM = jnp.broadcast_to(pick(logp_BxKxM)[:, None], (b, w, m))
    return (scores, logp_BxWxM), (logp_BxKxM, val_BxKxT, idx_BxKxT, ids_BxKxT, base_BxH, paths_BxR)

  def update(self, draft_params, sstate: RescoredTreeState, ctx, verified: Verified) -> RescoredTreeState:
    return sstate.replace(hidden_BxD=self._heads.update(draft_params["bpd"], sstate.hidden_BxD, None, verified),
                          hist_BxH=_next_history(sstate.hist_BxH, sstate.pending_B, verified))
