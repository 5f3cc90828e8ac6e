"""Randomized exactness checks of sampling: the generators and checkers that tests/test_random_sampling.py runs (a
helper module: pytest does not collect it).

`run(seed)` builds one random small LLaMA target from the seed (8 to 16 tokens, so that a few thousand samples fill
every likely token's cell; 1 to 3 layers; more or less peaked next-token distributions), random sampling settings
(temperature, top-k, top-p), one to three prompts (some repeating a short pattern, which prompt lookup copies), a
max_new_tokens per prompt and maybe an EOS id, and then a few random sampling methods with random drafting parts:
plain sampling; a draft model (`spec`: a random one, or a noisy copy of the target, whose drafts agree with it more
often; scoring the whole vocabulary, a subset of it or a resized one); the target's first layers (`layerskip`); a
random EAGLE draft; random BPD heads; prompt lookup; OPT-Tree trees (dynamic, static or chain) from heads, a draft
model, the target's first layers or EAGLE; with random gates, early stops and prompt-lookup copies. Each method
samples many generations in decode batches of a random number of rows (the rows cycle over the prompts, so batches
are ragged), maybe with attention bounded by cache buckets.

The samples are tested against the target itself. For each prompt and each new-token position k, the rows' k-th
tokens are grouped by the k - 1 tokens before them, and every group seen at least `MIN_GROUP` times must follow the
target's warped next-token distribution after that prefix: one Pearson χ² test per (prompt, k), its statistic and
degrees of freedom summed over the groups. The first two tokens are also tested jointly. The reference
distributions are computed here, in float64 from the target's logits (`warped`), independently of jaxspec's warp. A
sampled token the reference gives probability 0 is a problem of its own, as is a row that does not end at its first
EOS or at its max_new_tokens, and a decode batch whose counters do not add up (`tests.fuzz_greedy.check_stats`).

All the χ² tests of a run are judged together (Bonferroni): a run fails when one p-value is below `ALPHA` divided by
the number of its tests, so a correct sampler fails a seed with probability at most about `ALPHA` (about, because the
χ² distribution is an approximation of the statistic's). A broken rule is not near the threshold: with the rejection
rules broken on purpose (`run(broken=True)`) each fixed seed of tests/test_random_sampling.py has p-values that
underflow to 0. (Those flags leave chains of a draft's probabilities exact unless a gate or an early stop marks
tokens unproposed: the test's docstring names a one-line change that breaks the chain rule itself.)

Method labels read like `jaxspec bench` labels (`kind:option=value:...`) and also name the random parts they are built
from (`build`). Each problem found is a dict that `describe` turns into a message with a reproducer:
`reproduce(**problem)` rebuilds the seed's target and the one method and samples it again with the same keys.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
import zlib
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

from jaxspec.decoding.accept import SampleAcceptance
from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
from jaxspec.decoding.eagle import EagleDrafter, EagleTreeSource
from jaxspec.decoding.generate import GenerationResult
from jaxspec.decoding.lookup import LookupDrafter, WithLookup
from jaxspec.decoding.loop import NoDraft, cache_buckets, decode
from jaxspec.decoding.opt_tree import HeadsTreeSource, LMTreeSource, OptTreeDrafter, static_draft_params
from jaxspec.decoding.sampling import SamplingParams, Warp
from jaxspec.decoding.speculative import DraftModelDrafter, layerskip_draft
from jaxspec.models.bpd import BPDConfig, BPDModel
from jaxspec.models.eagle import EagleDraft
from jaxspec.models.subset import resize_vocab, subset_head
from tests.conftest import SAMPLING_COMPILE_OPTIONS, make_tiny
from tests.fuzz_greedy import Draws, check_stats

VOCABS = (8, 10, 12, 16)
KINDS = ("plain", "spec", "spec", "layerskip", "eagle", "eagle", "bpd", "bpd", "lookup", "opt-tree", "opt-tree",
         "opt-tree", "opt-tree")
TREE_DRAFTERS = ("heads", "draft", "layerskip", "eagle")
TREE_SHAPES = ("dynamic", "dynamic", "dynamic", "static", "chain")
ROWS = (1, 1, 2, 3, 8, 0)  # rows per decode batch; 0: every sample in one batch (a gate then decides for all)
SAMPLES = 20000  # generations per method
MIN_GROUP = 25  # rows sharing a prefix that make a group worth testing
ALPHA = 1e-4  # a run's false-alarm rate: a p-value below ALPHA / (the run's number of tests) fails it
STATS_CHECKED = 64  # decode batches of a method whose counters `check_stats` reads


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a seed draws before its methods: the target, how it is sampled and what it is asked."""
  vocab: int
  layers: int
  scale: float  # the target's embedding scale: how peaked its next-token distributions are
  target_seed: int
  temperature: float
  top_k: int
  top_p: float
  prompts: tuple
  max_new: tuple  # per prompt
  n_new: int  # the most new tokens a row may take (the loop's out_len)
  eos: int  # -1: none

  @property
  def warp(self) -> Warp:
    return Warp(self.top_k, self.top_p < 1.0)

  @property
  def sampling(self) -> SamplingParams:
    return SamplingParams.make(self.temperature, self.top_p)

  def target(self):
    return make_tiny(self.target_seed, embed_scale=self.scale, vocab_size=self.vocab, n_layers=self.layers)


def draw_setting(rng) -> Setting:
  """A random `Setting`. Prompt lengths, new tokens and layers are small so that each prompt's prefixes repeat often
  enough to be tested."""
  d = Draws(rng)
  vocab = int(d.pick(VOCABS))
  temperature = d.pick([1.0, d.between(0.3, 1.8)])
  top_k = d.upto(vocab - 1, 2) if d.maybe(0.3) else 0
  top_p = d.between(0.5, 0.97) if d.maybe(0.3) else 1.0
  prompts = []
  for _ in range(d.pick([1, 1, 2, 3])):
    n = d.upto(8)
    if n >= 3 and d.maybe(0.5):  # a short pattern repeated: prompt lookup finds copies
      pattern = rng.integers(0, vocab, size=d.upto(3)).tolist()
      prompts.append(tuple((pattern * n)[:n]))
    else:
      prompts.append(tuple(rng.integers(0, vocab, size=n).tolist()))
  n_new = d.upto(8, 3)
  max_new = tuple(n_new if d.maybe(0.7) else d.upto(n_new) for _ in prompts)
  eos = int(rng.integers(vocab)) if d.maybe(0.25) else -1
  return Setting(vocab=vocab, layers=d.upto(3), scale=d.between(2.0, 9.0), target_seed=int(rng.integers(1 << 20)),
                 temperature=temperature, top_k=top_k, top_p=top_p, prompts=tuple(prompts), max_new=max_new,
                 n_new=n_new, eos=eos)


def random_method(rng, s: Setting) -> str:
  """A random sampling method's label on the target of `s`."""
  d = Draws(rng)
  pick, maybe, upto, between = d.pick, d.maybe, d.upto, d.between
  kind = pick([k for k in KINDS if k != "layerskip" or s.layers > 1])
  o = {}
  if kind in ("spec", "layerskip", "eagle"):
    o["gamma"] = upto(5)
    if kind != "eagle" and maybe(0.4):
      o["stop"] = between(0.05, 0.7)
    if maybe(0.4):
      o["gate"] = between(0.0, min(o["gamma"], 1.2))
    if maybe(0.35):
      o["lookup"] = upto(3)
    if kind == "layerskip":
      o["layers"] = upto(s.layers - 1)
    elif kind == "spec":
      _draft_model_options(o, d, subsets=("full", "subset", "resized"))
    else:
      o["vocab"] = pick(["full", "full", "subset"])
      o["escale"] = between(0.5, 4.0)
  elif kind == "bpd":
    o["k"] = upto(5)
    if maybe(0.4):
      o["gate"] = between(0.2, 1.1)
    if maybe(0.35):
      o["lookup"] = upto(3)
    if maybe(0.25):
      o["vocab"] = "subset"
  elif kind == "lookup":
    o["n"] = upto(8)
    o["ngram"] = upto(3)
    o["gate"] = upto(o["ngram"], 0) if maybe(0.5) else 0
  elif kind == "opt-tree":
    _tree_options(o, d, s)
  return ":".join([kind] + [f"{k}={v}" for k, v in o.items()])


def _draft_model_options(o: dict, d: Draws, subsets: tuple) -> None:
  """A draft model's options, into `o`: a noisy copy of the target (`copy=NOISE`, in units of each weight's spread)
  or a random model (`dlayers` layers, embedding scale `dscale`), scoring the vocabulary `vocab` says."""
  if d.maybe(0.25):
    o["copy"] = d.between(0.02, 0.3)
  else:
    o["dlayers"] = d.upto(2)
    o["dscale"] = d.between(1.0, 9.0)
  o["vocab"] = d.pick(["full", "full"] + list(subsets[1:]))


def _tree_options(o: dict, d: Draws, s: Setting) -> None:
  """opt-tree's options, into `o`, every tree number given (nodes, depth, width, branch) and each pool large enough
  for its nodes: a drafter and its parts, the shape and budget, then a gate and copies."""
  pick, maybe, upto, between = d.pick, d.maybe, d.upto, d.between
  drafter = pick([t for t in TREE_DRAFTERS if t != "layerskip" or s.layers > 1])
  o["drafter"] = drafter
  if drafter == "draft":
    _draft_model_options(o, d, subsets=("full", "subset"))
  elif drafter == "layerskip":
    o["layers"] = upto(s.layers - 1)
  elif drafter == "eagle":
    o["escale"] = between(0.5, 4.0)
  shape = pick(TREE_SHAPES)
  o["shape"] = shape
  if shape == "chain":  # depth = nodes, width = branch = 1
    o["nodes"] = upto(5 if drafter == "heads" else 12)
  else:
    nodes = upto(12)
    depth = upto(min(nodes, 6))
    if drafter == "heads" and maybe(0.6):  # as wide as the budget
      width = branch = nodes
    else:
      width, branch = upto(4), upto(min(5, s.vocab))
      branch = max(branch, -(-nodes // (width * depth)))
    branch = min(branch, s.vocab)
    width = max(width, -(-nodes // (depth * branch)))
    if maybe(0.3):
      o["threshold"] = pick([0.01, 0.1, 0.4])
    o.update(nodes=nodes, depth=depth, width=width, branch=branch)
  if maybe(0.3):  # a tree's gate is an expected acceptance length, at most its depth: one that some trees reach
    o["gate"] = between(0.1, min(1.2, 0.8 * o.get("depth", o["nodes"])))
  if maybe(0.4):
    o["lookup"] = upto(3)
    if maybe(0.4):
      o["graft"] = 0


def draw_methods(rng, s: Setting, n: int) -> list[tuple[str, int, int]]:
  """`n` different methods: `(label, rows per decode batch, smallest attention bucket or 0 for none)`."""
  labels = []
  while len(labels) < n:
    label = random_method(rng, s)
    if label not in labels:
      labels.append(label)
  d = Draws(rng)
  return [(label, int(d.pick(ROWS)), int(d.pick([0, 0, 0, 4, 8]))) for label in labels]


def parse_label(label: str) -> tuple[str, dict]:
  """`(kind, options)` of a label, numbers read as numbers."""
  kind, *rest = label.split(":")
  opts = {}
  for item in rest:
    key, _, value = item.partition("=")
    for read in (int, float, str):
      try:
        opts[key] = read(value)
        break
      except ValueError:
        pass
  return kind, opts


# ---- building methods ---------------------------------------------------------------------------------------------

def _draft_model(target, o: dict, rng):
  """The draft model `_draft_model_options` describes: `(model, params)`."""
  model, params = target
  vocab = model.vocab_size
  if "copy" in o:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), len(leaves))
    noisy = [x + o["copy"] * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    draft = model, jax.tree.unflatten(tree, noisy)
  else:
    own_vocab = vocab + int(rng.choice([-3, -1, 2])) if o["vocab"] == "resized" else vocab
    draft = make_tiny(int(rng.integers(1 << 30)), embed_scale=o["dscale"], vocab_size=own_vocab,
                      n_layers=o["dlayers"])
  if o["vocab"] == "resized":
    return resize_vocab(*draft, vocab)
  if o["vocab"] == "subset":
    return subset_head(*draft, _subset(rng, vocab))
  return draft


def _subset(rng, vocab: int, least: int = 1) -> list[int]:
  return sorted(rng.choice(vocab, int(rng.integers(least, vocab)), replace=False).tolist())


def _heads(target, k: int, rng, vocab_ids=None):
  """k random BPD heads with spread-out output weights (confident, mostly wrong drafts): `(BPDModel, params)`."""
  model, params = target
  bpd = BPDModel(BPDConfig(num_heads=k, d_model=model.cfg.d_model, d_hidden=16, use_next_token=True))
  key = jax.random.key(int(rng.integers(1 << 30)))
  p = bpd.init_params(key)
  p["heads"]["w_out"] = jax.random.normal(jax.random.fold_in(key, 1), p["heads"]["w_out"].shape) * 0.5
  if vocab_ids is not None:
    p = {**p, "vocab_ids": jnp.asarray(vocab_ids, jnp.int32)}
  return bpd, bpd_draft_params(model, params, bpd, p)


def _eagle(target, o: dict, rng):
  """A random one-layer EAGLE draft whose feature projection is scaled by `escale`: `(EagleDraft, params)`."""
  model, params = target
  ids = _subset(rng, model.vocab_size) if o.get("vocab") == "subset" else None
  draft = EagleDraft(model.cfg, 1)
  dp = draft.init_params(jax.random.key(int(rng.integers(1 << 30))), params, ids, init="random")
  dp["fc"] = jax.tree.map(lambda x: x * o["escale"], dp["fc"])
  return draft, dp


def _with_lookup(drafter, o: dict):
  if "lookup" not in o:
    return drafter
  return WithLookup(drafter, min_match=o["lookup"], graft=bool(o.get("graft", 1)))


def parts_rng(seed: int, label: str):
  """The generator of a method's random parts: the same for the same seed and label, whatever else a run draws."""
  return np.random.default_rng([seed, zlib.crc32(label.encode())])


def build(s: Setting, target, seed: int, label: str):
  """`(drafter, draft_params)` of a label on the target of `s`, its random parts drawn from `parts_rng`.

  Options besides the drafters' own (gamma, stop, gate, lookup, graft, layers, k, n, ngram and the tree's): `copy=X`
  drafts with the target's weights plus X times each weight's spread of noise, `dlayers`/`dscale` with a random
  model of so many layers and embedding scale; `vocab` is the draft's vocabulary (`subset`: a random subset scored,
  `resized`: a draft of another size, resized); `escale` scales a random EAGLE draft's feature projection."""
  model, params = target
  kind, o = parse_label(label)
  rng = parts_rng(seed, label)
  warp = s.warp
  if kind == "plain":
    return NoDraft(), None
  if kind in ("spec", "layerskip"):
    dm, dp = layerskip_draft(model, params, o["layers"]) if kind == "layerskip" else _draft_model(target, o, rng)
    return DraftModelDrafter(dm, o["gamma"], warp=warp, greedy=False, stop=o.get("stop", 0.0),
                             gate=o.get("gate", 0.0), lookup=o.get("lookup", 0)), dp
  if kind == "eagle":
    draft, dp = _eagle(target, o, rng)
    return _with_lookup(EagleDrafter(draft, o["gamma"], warp=warp, greedy=False, gate=o.get("gate", 0.0)), o), dp
  if kind == "bpd":
    ids = _subset(rng, model.vocab_size, least=2) if o.get("vocab") == "subset" else None
    bpd, dp = _heads(target, o["k"], rng, ids)
    return _with_lookup(BPDDrafter(bpd, gate=o.get("gate", 0.0)), o), dp
  if kind == "lookup":
    return LookupDrafter(num_nodes=o["n"], max_ngram=o["ngram"], gate=o["gate"]), None
  if kind != "opt-tree":
    raise ValueError(f"unknown method kind {kind!r} in {label!r}")
  nodes = o["nodes"]
  depth, width, branch = (nodes, 1, 1) if o["shape"] == "chain" else (o["depth"], o["width"], o["branch"])
  if o["drafter"] == "heads":
    bpd, dp = _heads(target, depth, rng)
    source = HeadsTreeSource(bpd)
  elif o["drafter"] == "eagle":
    draft, dp = _eagle(target, o, rng)
    source = EagleTreeSource(draft, width)
  else:
    lm, dp = layerskip_draft(model, params, o["layers"]) if o["drafter"] == "layerskip" else _draft_model(target, o,
                                                                                                          rng)
    source = LMTreeSource(lm)
  gate = o.get("gate", 0.0)
  if o["shape"] == "chain":
    drafter = dataclasses.replace(OptTreeDrafter.chain(source, nodes, warp), gate=gate)
  else:
    drafter = OptTreeDrafter(source, nodes=nodes, depth=depth, width=width, branch=branch,
                             threshold=o.get("threshold", 0.0), shape=o["shape"], warp=warp, gate=gate)
    if o["shape"] == "static":  # a random prior: each depth's candidate log-probabilities, best first
      prior = np.log(rng.dirichlet(np.ones(width * branch), size=depth) + 1e-6)
      dp = static_draft_params(dp, np.ascontiguousarray(-np.sort(-prior, axis=-1)))
  return _with_lookup(drafter, o), dp


# ---- sampling -----------------------------------------------------------------------------------------------------

def sample(s: Setting, target, drafter, draft_params, acceptor, key, rows: int, buckets: int, samples: int):
  """`samples` generations (rounded up to whole decode calls) of the prompts of `s`, in decode batches of `rows`
  rows (0: one batch of them all) under `jax.vmap`, so that each batch decodes on its own as a batch of that size
  would. Returns `(tokens [R, n_new], lengths [R], prompt index [R], results)`, `results` holding `GenerationResult`s
  of the first few batches for `check_stats`."""
  model, params = target
  per_call = max(samples // 2, 1)
  batch = per_call if rows == 0 else rows
  groups = max(per_call // batch, 1)
  n_prompts = len(s.prompts)
  prompt_GxB = (np.arange(groups * batch) % n_prompts).reshape(groups, batch)
  width = max(map(len, s.prompts))
  prompts = np.zeros((groups, batch, width), np.int32)
  for i, p in enumerate(s.prompts):
    prompts[prompt_GxB == i, :len(p)] = p
  lens = np.asarray([len(p) for p in s.prompts], np.int32)[prompt_GxB]
  max_new = np.asarray(s.max_new, np.int32)[prompt_GxB]
  capacity = width + s.n_new + drafter.num_nodes + 1
  attn_buckets = cache_buckets(capacity, buckets) if buckets else None
  eos = jnp.asarray([s.eos], jnp.int32)

  def one(key, prompts, lens, max_new, params, draft_params, sp):
    out = decode(model, params, prompts, lens, max_new, eos, key, sp, draft_params, drafter=drafter,
                 acceptor=acceptor, out_len=s.n_new, capacity=capacity, pad_id=0, attn_buckets=attn_buckets)
    return out.tokens_BxO, out.lengths_B, out.stats

  arrays = (jnp.asarray(prompts), jnp.asarray(lens), jnp.asarray(max_new))
  program = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None, None, None))).lower(
      jax.random.split(key, groups), *arrays, params, draft_params, s.sampling).compile(SAMPLING_COMPILE_OPTIONS)
  tokens, lengths, results = [], [], []
  calls = math.ceil(samples / (groups * batch))
  for c in range(calls):
    toks, lns, st = program(jax.random.split(jax.random.fold_in(key, c), groups), *arrays, params, draft_params,
                            s.sampling)
    toks, lns = np.asarray(toks), np.asarray(lns)
    tokens.append(toks.reshape(-1, s.n_new))
    lengths.append(lns.reshape(-1))
    if c == 0:
      st = jax.tree.map(np.asarray, st)
      for g in range(min(groups, STATS_CHECKED)):
        results.append(GenerationResult(
            tokens=[row[:n].tolist() for row, n in zip(toks[g], lns[g])], target_calls=int(st.target_calls[g]),
            drafter_calls=int(st.drafter_calls[g]), active_calls=st.active_calls_B[g].tolist(),
            step_tokens=st.step_tokens_B[g].tolist(), accept_hist=st.accept_hist_BxA[g]))
  return np.concatenate(tokens), np.concatenate(lengths), np.tile(prompt_GxB.reshape(-1), calls), results


# ---- the reference ------------------------------------------------------------------------------------------------

def warped(logits, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """The sampling distributions `[n, V]` of logits `[n, V]` in float64, written here without jaxspec's warp:
  temperature, then the top k, then the smallest set of most likely tokens whose mass reaches top_p (ties with its
  least likely member kept)."""
  x = np.asarray(logits, np.float64)
  x = (x - x.max(-1, keepdims=True)) / temperature
  if top_k:
    kth = -np.sort(-x, axis=-1)[:, top_k - 1:top_k]
    x = np.where(x < kth, -np.inf, x)
  if top_p < 1:
    ordered = -np.sort(-x, axis=-1)
    p = np.exp(ordered - ordered[:, :1])
    p /= p.sum(-1, keepdims=True)
    keep = np.cumsum(p, -1) - p < top_p  # the mass before a token is short of top_p
    keep[:, 0] = True
    least = np.min(np.where(keep, ordered, np.inf), axis=-1, keepdims=True)
    x = np.where(x < least, -np.inf, x)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class Reference:
  """The target's next-token logits after given sequences: one forward over whole sequences with a fresh cache
  (nothing the decode loop keeps), compiled once per batch bucket."""

  def __init__(self, target, width: int):
    self.model, self.params = target
    self.width = width
    self.programs = {}

  def logits(self, seqs: list) -> np.ndarray:
    n, t = len(seqs), self.width
    bucket = 64
    while bucket < n:
      bucket *= 4
    arr = np.zeros((bucket, t), np.int32)
    last = np.zeros(bucket, np.int32)
    for i, seq in enumerate(seqs):
      arr[i, :len(seq)] = seq
      last[i] = len(seq) - 1
    if bucket not in self.programs:
      model = self.model

      def forward(params, seqs, last):
        # (the barrier keeps XLA from spending seconds folding the empty cache into a constant)
        cache = jax.lax.optimization_barrier(model.init_cache(bucket, t))
        logits = model.forward(params, seqs, jnp.broadcast_to(jnp.arange(t), (bucket, t)), cache,
                               jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (bucket, t, t)))[0]
        return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
      self.programs[bucket] = jax.jit(forward)
    return np.asarray(self.programs[bucket](self.params, jnp.asarray(arr), jnp.asarray(last)), np.float64)[:n]


def chi2_parts(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
  """Pearson's χ² statistic of counts against probabilities and its degrees of freedom, cells expected fewer than 5
  times pooled (a pool still under 5 joins the smallest other cell). `(0, 0)` when one cell is all there is."""
  n = counts.sum()
  expected = probs * n
  big = expected >= 5
  obs, exp = list(counts[big]), list(expected[big])
  if (~big).any():
    obs.append(counts[~big].sum())
    exp.append(expected[~big].sum())
    if exp[-1] < 5 and len(exp) > 1:
      i = int(np.argmin(exp[:-1]))
      obs[i] += obs.pop()
      exp[i] += exp.pop()
  obs, exp = np.asarray(obs, np.float64), np.asarray(exp, np.float64)
  if len(exp) <= 1:
    return 0.0, 0
  return float(np.sum((obs - exp) ** 2 / exp)), len(exp) - 1


def check_samples(s: Setting, ref: Reference, tokens, lengths, prompt_of_row) -> tuple[list[dict], list[dict]]:
  """The χ² tests of one method's samples (`{test, p, n, df}`; module docstring) and the problems that need no
  test: rows of a wrong length, tokens outside the warped target's support."""
  tests, problems = [], []
  jax_warp, sp = s.warp, s.sampling
  v = s.vocab
  for pi, prompt in enumerate(s.prompts):
    mine = prompt_of_row == pi
    tk, ln = tokens[mine], lengths[mine]
    want = np.full(len(ln), s.max_new[pi])
    if s.eos >= 0:
      is_eos = (tk == s.eos) & (np.arange(s.n_new)[None] < ln[:, None])
      want = np.where(is_eos.any(1), np.minimum(want, is_eos.argmax(1) + 1), want)
    wrong = np.flatnonzero(ln != want)
    if len(wrong):
      j = wrong[0]
      problems.append(dict(kind="length", details=f"prompt {pi}: {len(wrong)} rows end neither at EOS {s.eos} nor "
                           f"at max_new_tokens {s.max_new[pi]}, e.g. length {ln[j]}: {tk[j, :ln[j]].tolist()}"))
    for k in range(1, s.n_new + 1):
      groups = defaultdict(list)
      for row in tk[ln >= k, :k]:
        groups[tuple(row[:-1].tolist())].append(int(row[-1]))
      prefixes = [pf for pf, g in groups.items() if len(g) >= MIN_GROUP]
      if not prefixes:
        continue
      logits = ref.logits([list(prompt) + list(pf) for pf in prefixes])
      exact = warped(logits, s.temperature, s.top_k, s.top_p)
      # jaxspec's float32 warp may keep or drop a token right at a top-p boundary: such a prefix is left out
      theirs = np.asarray(jax_warp.probs(jnp.asarray(logits, jnp.float32), sp)) > 0
      stat, df, n = 0.0, 0, 0
      for pf, probs, support in zip(prefixes, exact, theirs):
        if not np.array_equal(probs > 0, support):
          continue
        counts = np.bincount(groups[pf], minlength=v)
        outside = np.flatnonzero((counts > 0) & (probs == 0))
        if len(outside):
          problems.append(dict(kind="support", details=f"prompt {pi}, after new tokens {list(pf)}: token "
                               f"{outside[0]} sampled {counts[outside[0]]} times, which the warped target never "
                               f"samples there (p = {probs.round(4).tolist()})"))
          continue
        st, d = chi2_parts(counts, probs)
        stat, df, n = stat + st, df + d, n + int(counts.sum())
      if df:
        tests.append(dict(test=f"prompt {pi} token {k}", p=float(sps.chi2.sf(stat, df)), n=n, df=df))
    # The first two tokens jointly (rows that have both)
    both = ln >= 2
    if both.sum() >= 200:
      first = warped(ref.logits([list(prompt)]), s.temperature, s.top_k, s.top_p)[0]
      second = warped(ref.logits([list(prompt) + [a] for a in range(v)]), s.temperature, s.top_k, s.top_p)
      joint = first[:, None] * second
      if s.eos >= 0:
        joint[s.eos] = 0  # a row whose first token is EOS has no second
      joint = (joint / joint.sum()).ravel()
      counts = np.bincount(tk[both, 0] * v + tk[both, 1], minlength=v * v)
      if not counts[joint == 0].any():  # (tokens outside the support are reported above)
        st, d = chi2_parts(counts, joint)
        if d:
          tests.append(dict(test=f"prompt {pi} tokens 1-2", p=float(sps.chi2.sf(st, d)), n=int(both.sum()), df=d))
  return tests, problems


# ---- runs ---------------------------------------------------------------------------------------------------------

def _check_method(s: Setting, target, ref: Reference, seed: int, label: str, rows: int, buckets: int, samples: int,
                  broken: bool) -> tuple[list[dict], list[dict], dict]:
  """Samples one method and checks it: `(tests, problems, facts)`; each test and problem carries the reproducer's
  fields, and `facts` what the run measured (tokens per target call, seconds)."""
  where = dict(seed=seed, label=label, rows=rows, buckets=buckets, samples=samples, broken=broken)
  try:
    drafter, draft_params = build(s, target, seed, label)
    acceptor = SampleAcceptance(s.warp, remove_rejected=not broken, skip_unproposed=not broken)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(label.encode()))
    tokens, lengths, prompt_of_row, results = sample(s, target, drafter, draft_params, acceptor, key, rows, buckets,
                                                     samples)
  except Exception:  # noqa: BLE001 (a crash is a problem to report)
    return [], [dict(where, kind="crash", details=traceback.format_exc(limit=-8))], {}
  tests, problems = check_samples(s, ref, tokens, lengths, prompt_of_row)
  for b, res in enumerate(results):
    errs = check_stats(res)
    if errs:
      problems.append(dict(kind="stats", details=f"decode batch {b}: " + "; ".join(errs[:3])))
      break
  calls = sum(sum(r.active_calls) for r in results)
  tau = sum(sum(r.step_tokens) for r in results) / max(calls, 1)
  return [dict(where, **t) for t in tests], [dict(where, **p) for p in problems], dict(label=label, tau=tau)


def judge(tests: list[dict], alpha: float = ALPHA) -> list[dict]:
  """The tests whose p-value is below `alpha` / (the number of tests), as problems (Bonferroni)."""
  threshold = alpha / max(len(tests), 1)
  return [dict(t, kind="chi2", threshold=threshold) for t in tests if t["p"] < threshold]


def run(seed: int, n_methods: int = 3, samples: int = SAMPLES, broken: bool = False) -> dict:
  """Samples `n_methods` random methods on seed `seed`'s random target and checks them (module docstring).
  `broken=True` samples with the rejection rules broken on purpose (tree rejection that keeps a rejected token's
  mass, chains that keep the draft's q at unproposed tokens: `SampleAcceptance`'s flags), to see that the check
  notices. Returns `{"problems", "tests", "methods"}`: the problems found (each a dict with `kind`: chi2, support,
  length, stats or crash; the reproducer's fields; `details` or the test's p-value), every χ² test, and each
  method's tokens per target call (τ, from the first batches)."""
  rng = np.random.default_rng(seed)
  s = draw_setting(rng)
  plan = draw_methods(rng, s, n_methods)
  target = s.target()
  ref = Reference(target, max(map(len, s.prompts)) + s.n_new)
  tests, problems, facts = [], [], []
  for label, rows, buckets in plan:
    t, p, f = _check_method(s, target, ref, seed, label, rows, buckets, samples, broken)
    tests += t
    problems += p
    facts.append(dict(f, label=label))
  return dict(problems=judge(tests) + problems, tests=tests, methods=facts)


def reproduce(seed: int, label: str, rows: int, buckets: int, samples: int = SAMPLES, broken: bool = False,
              threshold: float | None = None, **_) -> list[dict]:
  """Samples one method on seed `seed`'s target as `run` did (the same keys, so the same samples) and returns the
  problems found, judging the χ² tests by `threshold` (the run's, which `reproduce(**problem)` passes on; without
  it, by `ALPHA` over this method's tests alone). `reproduce(**problem)` replays a problem `run` reported."""
  s = draw_setting(np.random.default_rng(seed))
  target = s.target()
  ref = Reference(target, max(map(len, s.prompts)) + s.n_new)
  tests, problems, _ = _check_method(s, target, ref, seed, label, rows, buckets, samples, broken)
  failed = judge(tests) if threshold is None else [dict(t, kind="chi2", threshold=threshold) for t in tests
                                                   if t["p"] < threshold]
  return failed + problems


def describe(problem: dict) -> str:
  """A problem as a message: what went wrong and the call that reproduces it."""
  p = problem
  head = f"{p['kind']} (seed {p['seed']}, {p['label']}, decode batches of {p['rows'] or 'all'} rows)"
  if p["kind"] == "chi2":
    head += (f": {p['test']}: p = {p['p']:.3g} < {p['threshold']:.3g} (χ² over {p['n']} samples, {p['df']} degrees "
             "of freedom)")
  else:
    head += f":\n  {p['details']}"
  head += f"\n  setting: {draw_setting(np.random.default_rng(p['seed']))}"
  keys = ["seed", "label", "rows", "buckets"]
  keys += [k for k, default in (("samples", SAMPLES), ("broken", False)) if p[k] != default]
  keys += ["threshold"] if "threshold" in p else []
  args = ", ".join(f"{k}={p[k]!r}" for k in keys)
  return f"{head}\n  reproduce: from tests.fuzz_sampling import reproduce; reproduce({args})"
