"""Fake models and drafters that drive the decode loop with known answers."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxspec.decoding.loop import LoopState
from jaxspec.decoding.protocol import Draft
from jaxspec.models.cache import KVCache


@dataclasses.dataclass(frozen=True)
class BigramLM:
  """A context-free model: the logits after token x are `table[x]` (a tuple of tuples, so the model is hashable).
  It keeps no real keys and values: its cache only tracks lengths."""

  table: tuple

  @property
  def vocab_size(self) -> int:
    return len(self.table)

  @classmethod
  def random(cls, vocab: int, seed: int = 0) -> "BigramLM":
    rng = np.random.default_rng(seed)
    return cls(tuple(map(tuple, rng.normal(size=(vocab, vocab)).round(3).tolist())))

  def next_token(self, x: int) -> int:
    return int(np.argmax(self.table[x]))

  def greedy(self, first: int, n: int) -> list[int]:
    out, x = [], first
    for _ in range(n):
      x = self.next_token(x)
      out.append(x)
    return out

  def init_cache(self, batch_size: int, capacity: int) -> KVCache:
    k = jnp.zeros((batch_size, 1, 1, capacity), jnp.float32)
    v = jnp.zeros((batch_size, 1, capacity, 1), jnp.float32)
    return KVCache(k=(k,), v=(v,), lengths=jnp.zeros((batch_size,), jnp.int32))

  def forward(self, params, tokens_BxT, positions_BxT, cache, mask_BxTxT, *, logits=True):
    table = jnp.asarray(self.table, jnp.float32)
    hidden = table[tokens_BxT]
    return (hidden if logits else None), hidden, cache

  def logits(self, params, hidden_BxTxD):
    return hidden_BxTxD


@dataclasses.dataclass(frozen=True)
class OracleChain:
  """Proposes the bigram model's own greedy continuation, with the nodes in `wrong` replaced by a wrong token."""

  lm: BigramLM
  num_nodes: int
  wrong: tuple = ()
  is_chain: bool = True
  calls_per_step: int = 0

  def init(self, draft_params, prefill):
    return ()

  def propose(self, draft_params, dstate, loop: LoopState):
    nxt = jnp.argmax(jnp.asarray(self.lm.table), axis=-1).astype(jnp.int32)
    toks, x = [], loop.pending_B
    for i in range(self.num_nodes):
      x = nxt[x]
      toks.append(jnp.where(i in self.wrong, (x + 1) % self.lm.vocab_size, x))
      if i in self.wrong:
        x = toks[-1]
    b, n = loop.pending_B.shape[0], self.num_nodes
    tokens = jnp.stack(toks, axis=1)
    depth = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (b, n))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n))
    parent = jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n))
    return Draft(tokens, depth, mask, parent), dstate

  def update(self, draft_params, dstate, verified):
    return dstate


def tree_arrays(parents: list[int]):
  """depth, ancestor-or-self mask for a tree given each node's parent (-1 = the pending token)."""
  n = len(parents)
  depth = np.zeros(n, np.int32)
  mask = np.zeros((n, n), bool)
  for i, p in enumerate(parents):
    depth[i] = 1 if p < 0 else depth[p] + 1
    mask[i, i] = True
    if p >= 0:
      mask[i] |= mask[p]
  return depth, mask


class _FixedTreeDrafter:
  """What the fixed-tree fakes share: a tree of `parents` (-1 = the pending token), no state, no drafter forwards."""

  is_chain = False
  calls_per_step = 0

  @property
  def num_nodes(self) -> int:
    return len(self.parents)

  def init(self, draft_params, prefill):
    return ()

  def update(self, draft_params, dstate, verified):
    return dstate

  def _draft(self, tokens_BxN) -> Draft:
    depth, mask = tree_arrays(list(self.parents))
    bc = lambda a: jnp.broadcast_to(jnp.asarray(a), (tokens_BxN.shape[0], *np.shape(a)))
    return Draft(tokens_BxN.astype(jnp.int32), bc(depth), bc(mask), bc(np.asarray(self.parents, np.int32)))


@dataclasses.dataclass(frozen=True)
class OracleTree(_FixedTreeDrafter):
  """A fixed tree whose branches follow the bigram model's greedy path only along `good` (node indices); all other
  nodes carry wrong tokens. `parents` lists each node's parent (-1 = pending), in topological order."""

  lm: BigramLM
  parents: tuple
  good: tuple

  def propose(self, draft_params, dstate, loop: LoopState):
    nxt = jnp.argmax(jnp.asarray(self.lm.table), axis=-1).astype(jnp.int32)
    toks = []
    for i, p in enumerate(self.parents):
      parent_tok = loop.pending_B if p < 0 else toks[p]
      right = nxt[parent_tok]
      toks.append(right if i in self.good else (right + 1 + i) % self.lm.vocab_size)
    return self._draft(jnp.stack(toks, 1)), dstate


@dataclasses.dataclass(frozen=True)
class ScriptTree(_FixedTreeDrafter):
  """A fixed tree for a real model whose greedy output is known in advance (`script`: each row's output tokens, from
  a plain greedy run). Node i carries the row's scripted token at its depth unless a hash of (row, output length,
  node) is 0 mod `miss`, where it carries a wrong one, so from step to step the accepted path changes length and
  branch: the verify forward and the cache compaction run on real keys and values with paths of every depth
  accepted."""

  script: tuple  # tuple of per-row tuples
  parents: tuple
  vocab_size: int
  miss: int = 3

  def propose(self, draft_params, dstate, loop: LoopState):
    b, n = loop.pending_B.shape[0], self.num_nodes
    width = max(map(len, self.script))
    rows = [list(r) + [0] * (width - len(r)) for r in self.script] + [[0] * width] * (b - len(self.script))
    script = jnp.asarray(rows, jnp.int32)
    depth, _ = tree_arrays(list(self.parents))
    # The node at depth d proposes output slot n_out + d - 1 (slot n_out - 1 holds the pending token).
    slot = jnp.minimum(loop.n_out_B[:, None] + jnp.asarray(depth)[None] - 1, width - 1)
    right = jnp.take_along_axis(script, slot, axis=1)
    k = lambda c: np.uint32(c)
    x = (loop.n_out_B.astype(jnp.uint32)[:, None] * k(0x9E3779B1)
         + jnp.arange(1, n + 1, dtype=jnp.uint32)[None] * k(0x85EBCA77)
         + jnp.arange(1, b + 1, dtype=jnp.uint32)[:, None] * k(0xC2B2AE3D))
    x = x ^ (x >> 15)
    x = x * k(0x2C1B3C6D)
    x = (x ^ (x >> 13)) % k(self.miss)
    hit = x != 0
    return self._draft(jnp.where(hit, right, (right + 1 + jnp.arange(n)[None]) % self.vocab_size)), dstate
