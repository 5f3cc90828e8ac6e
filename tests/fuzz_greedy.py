"""Randomized differential checks of greedy decoding: the generators and checkers that
tests/test_random_differential.py runs (a helper module: pytest does not collect it).

`run(seed)` builds one random tiny LLaMA target from the seed (vocabulary, grouped-query shapes, tied or untied
embeddings, a sliding window or query/key norms, a short context, how peaked its next-token distributions are),
random drafting parts for it in a temporary folder (BPD heads, the target itself saved as a draft model, a 1-layer
draft that may score a subset of the vocabulary, a random EAGLE draft, an n-gram rescorer with tuned settings), and
random lossless method labels, read and built the way `jaxspec bench` reads and builds them
(`jaxspec.bench.methods.parse_method` and `build`). Each label decodes a few random ragged batches (per-row
`max_new_tokens`, one to three EOS ids, most of them tokens the greedy output reaches early) and every row must be
token-identical to plain greedy decoding of the same batch, with counters that add up (`check_stats`).

`reference_check(seed)` checks greedy decoding itself: `generate` against a recomputation of every step over the
whole sequence without a cache.

Each problem found is a dict that `describe` turns into a message with a reproducer: `reproduce(**problem)` rebuilds
the target and parts from the seed and decodes the one label on the one batch again.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.bench import methods
from jaxspec.decoding import generate as gen
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDConfig, BPDModel, save_bpd
from jaxspec.models.draft import save_draft
from jaxspec.models.eagle import EagleDraft, save_eagle
from jaxspec.models.llama import LlamaLM
from jaxspec.models.ngram import build_ngram, save_ngram
from tests.conftest import make_tiny

VOCABS = (64, 100, 256)
# (query heads, key/value heads): multi-head, grouped and multi-query attention
HEAD_SHAPES = ((4, 4), (4, 2), (4, 1), (2, 1), (8, 2))
# (embedding scale, attention on): how peaked the next-token distributions are and whether they read the context
# (tests/conftest.py, `make_tiny`)
LOGIT_SHAPES = ((1.5, False), (3.0, True), (3.0, True), (6.0, True), (40.0, True))
# A failure to build or run that is an answer, not a crash: a method that cannot serve this target or batch.
REFUSALS = (InputError, methods.Unavailable)
# Labels name the parts' folder as PARTS (its path differs from run to run): `label.replace(PARTS, folder)`.
PARTS = "{parts}"
RECOMPUTE = "greedy vs recompute"  # the label of `reference_check`'s problems


class Tok:
  """The few tokenizer members the bench methods read: ids from characters (for the calibration prompts of static
  trees) and the EOS ids of the batch being decoded (`eos_ids`, set per batch)."""
  chat_template = None
  eos_id = None
  pad_id = 0

  def __init__(self, vocab: int):
    self.vocab = vocab
    self.eos_ids: list[int] = []

  def encode(self, text, add_bos=None):
    return [1 + ord(c) % (self.vocab - 1) for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return " ".join(map(str, ids))


def make_target(rng) -> tuple[LlamaLM, dict, dict]:
  """A random tiny LLaMA: `(model, params, what was drawn)`."""
  heads, kv = HEAD_SHAPES[rng.integers(len(HEAD_SHAPES))]
  over = dict(vocab_size=int(rng.choice(VOCABS)), n_layers=int(rng.integers(2, 5)), n_heads=heads, n_kv_heads=kv,
              head_dim=8, tie_embeddings=bool(rng.integers(2)))
  if rng.random() < 0.25:
    over["sliding_window"] = int(rng.choice([3, 6, 12]))
  elif rng.random() < 0.15:
    over["qk_norm"] = True
  over["max_seq_len"] = int(rng.choice([40, 64, 80])) if rng.random() < 0.3 else 512
  scale, attend = LOGIT_SHAPES[rng.integers(len(LOGIT_SHAPES))]
  model, params = make_tiny(int(rng.integers(1 << 30)), embed_scale=scale, attend=attend, **over)
  return model, params, dict(over, embed_scale=scale, attend=attend)


def make_parts(model, params, root: Path, rng) -> dict:
  """Writes the drafting parts for `model` under `root` as training writes them: `heads` (2 to 6 random BPD heads),
  `self` (the target as a draft: every greedy draft is right), `draft` (one layer on the target's embedding, maybe
  the target's own first layer, maybe scoring half the vocabulary), `eagle` (a random one-layer EAGLE draft) and
  `rescore` (a 3-gram LM counted on the target's greedy outputs, with random tuned settings that may name the
  heads). Returns what the method labels need to know about them."""
  kmax = int(rng.integers(2, 7))
  bpd = BPDModel(BPDConfig(num_heads=kmax, d_model=model.cfg.d_model, d_hidden=16,
                           use_next_token=bool(rng.integers(2))))
  seed = int(rng.integers(1 << 20))
  p = bpd.init_params(jax.random.key(seed))
  spread = float(rng.choice([0.1, 0.5, 1.0]))  # how confident the heads are
  p["heads"]["w_out"] = jax.random.normal(jax.random.key(seed + 1), p["heads"]["w_out"].shape) * spread
  save_bpd(root / "heads", bpd, p)
  save_draft(root / "self", model, params, dtype="float32")
  dcfg = dataclasses.replace(model.cfg, n_layers=1)
  dmodel = LlamaLM(dcfg)
  dparams = dict(dmodel.init_params(jax.random.key(seed + 2)))
  dparams["embed"] = params["embed"]
  if not dcfg.tie_embeddings:
    dparams["lm_head"] = params["lm_head"]
  if rng.random() < 0.5:  # the target's first layer: drafts partly right
    dparams["layers_0"] = params["layers_0"]
  ids = None
  if rng.random() < 0.5:
    ids = np.sort(rng.choice(model.vocab_size, size=model.vocab_size // 2, replace=False))
  save_draft(root / "draft", dmodel, dparams, dtype="float32", vocab_ids=ids)
  eagle = EagleDraft(model.cfg, 1)
  save_eagle(root / "eagle", eagle, eagle.init_params(jax.random.key(seed + 3), params, None, init="random"),
             dtype="float32")
  seqs = gen.generate(model, params, [[i % model.vocab_size, (i + 1) % model.vocab_size] for i in range(1, 60, 3)],
                      max_new_tokens=24).tokens
  lm, tables, _ = build_ngram(seqs, 3, model.vocab_size)
  tuned = {"k": int(rng.integers(1, kmax + 1)), "top_t": int(rng.integers(1, 6)), "beams": int(rng.integers(1, 4)),
           "width": int(rng.integers(0, 12)), "ngram_weight": float(rng.choice([0.0, 0.3, 0.5, 1.0])),
           "neural_lm": "layerskip", "neural_layers": 1, "neural_weight": float(rng.choice([0.0, 0.4, 1.0]))}
  tuned_heads = bool(rng.integers(2))
  if tuned_heads:  # the rescorer names its heads: the rescoring methods read them without heads=
    tuned["heads"] = str(root / "heads")
  save_ngram(root / "rescore", lm, tables, meta={"tuned": tuned})
  return dict(root=root, kmax=kmax, has_ids=ids is not None, tuned_heads=tuned_heads, vocab=model.vocab_size)


class Draws:
  """The few kinds of draw a method label is made of (tests/fuzz_sampling.py draws its labels with them too)."""

  def __init__(self, rng):
    self.rng = rng

  def pick(self, xs):
    return xs[self.rng.integers(len(xs))]

  def maybe(self, p: float) -> bool:
    return self.rng.random() < p

  def upto(self, hi: int, lo: int = 1) -> int:
    return int(self.rng.integers(lo, hi + 1))

  def between(self, lo: float, hi: float) -> float:
    """A uniform number in [lo, hi), rounded to 2 decimals so that a label shows it exactly."""
    return round(float(self.rng.uniform(lo, hi)), 2)


def random_method(rng, parts: dict, n_layers: int) -> str:
  """A random label of a lossless method on the parts of `make_parts` (`jaxspec bench --methods` syntax), its
  folders under PARTS."""
  kmax = parts["kmax"]
  d = Draws(rng)
  pick, maybe, upto = d.pick, d.maybe, d.upto
  kind = pick(["bpd", "bpd", "bpd-ngram", "bpd-neural", "bpd-oracle", "spec", "spec", "eagle", "lookup", "lookup",
               "layerskip", "jacobi", "opt-tree", "opt-tree", "opt-tree", "opt-tree"])
  o = {}
  if kind == "bpd":
    o["heads"] = PARTS + "/heads"
    if maybe(0.7):
      o["k"] = upto(kmax)
    if maybe(0.4):
      o["gate"] = pick([0.1, 0.5, 0.9, 2.0])
    if maybe(0.4):
      o["lookup"] = upto(3)
  elif kind in ("bpd-ngram", "bpd-neural"):
    if not parts["tuned_heads"] or maybe(0.5):
      o["heads"] = PARTS + "/heads"
    o["rescore"] = PARTS + "/rescore"
    if maybe(0.6):
      o["k"] = upto(kmax)
    if maybe(0.6):
      o["t"] = upto(6)
    if maybe(0.4):
      o["weight"] = pick([0.0, 0.2, 0.7, 1.0])
    if kind == "bpd-ngram":
      if maybe(0.5):
        o["beams"] = upto(5)
      if maybe(0.5):
        o["width"] = upto(39)
    elif maybe(2 / 3):  # the rescoring LM: the target's first layers or a draft model, else the tuned one
      if maybe(0.5):
        o["layers"] = upto(n_layers - 1)  # a layer-skip LM keeps fewer layers than the target
      else:
        o["draft"] = PARTS + pick(["/self", "/draft"])
  elif kind == "bpd-oracle":
    o["heads"] = PARTS + "/heads"
    o["k"] = upto(kmax)
    o["t"] = pick([1, 2, 5, 16, parts["vocab"]])  # up to every token
  elif kind == "spec":
    o["draft"] = PARTS + pick(["/self", "/draft"])
    if maybe(0.6):
      o["gamma"] = upto(6)
    if maybe(0.3):
      o["stop"] = pick([0.05, 0.3, 0.6, 0.95])
    if maybe(0.3):
      o["gate"] = pick([0.1, 0.5, 1.5])
    if maybe(0.4):
      o["vocab"] = pick(["auto", "full"] + (["subset"] if parts["has_ids"] and o["draft"].endswith("/draft") else []))
    if maybe(0.3):
      o["lookup"] = upto(3)
  elif kind == "eagle":
    o["draft"] = PARTS + "/eagle"
    if maybe(0.6):
      o["gamma"] = upto(6)
    if maybe(0.3):
      o["gate"] = pick([0.1, 0.5, 1.5])
    if maybe(0.3):
      o["lookup"] = upto(3)
  elif kind == "lookup":
    o["n"] = upto(11)
    o["ngram"] = upto(3)
    if maybe(0.4):
      o["gate"] = upto(o["ngram"], 0)
  elif kind == "layerskip":
    o["layers"] = upto(n_layers - 1)
    if maybe(0.6):
      o["gamma"] = upto(6)
    if maybe(0.3):
      o["stop"] = pick([0.05, 0.3, 0.6])
    if maybe(0.3):
      o["gate"] = pick([0.1, 0.5, 1.5])
  elif kind == "jacobi":
    o["n"] = upto(11)
    if maybe(0.3):
      o["lookup"] = upto(3)
  else:  # opt-tree
    _tree_options(o, d, parts, n_layers)
  return ":".join([kind] + [f"{k}={v}" for k, v in o.items()])


def _tree_options(o: dict, d: Draws, parts: dict, n_layers: int) -> None:
  """opt-tree's options, into `o`: a drafter and its parts, then the tree's shape and budget."""
  kmax = parts["kmax"]
  pick, maybe, upto = d.pick, d.maybe, d.upto
  drafter = pick(["heads", "heads", "heads-rescore", "eagle", "draft", "layerskip"])
  reach = 8  # the deepest tree a drafter model is asked for; heads reach kmax
  if drafter == "heads-rescore":
    if not parts["tuned_heads"] or maybe(0.5):
      o["heads"] = PARTS + "/heads"
    o["rescore"] = PARTS + "/rescore"
    if maybe(0.5):
      o["t"] = upto(5)
    if maybe(0.3):
      o["weight"] = pick([0.0, 0.5, 1.0])
    reach = kmax
  else:
    o["drafter"] = drafter
    if drafter == "heads":
      o["heads"] = PARTS + "/heads"
      reach = kmax
    elif drafter == "eagle":
      o["draft"] = PARTS + "/eagle"
    elif drafter == "draft":
      o["draft"] = PARTS + pick(["/self", "/draft"])
      if maybe(0.3):
        o["vocab"] = pick(["auto", "full"])
    else:
      o["layers"] = upto(n_layers - 1)
  shape = pick(["dynamic", "dynamic", "static", "chain"])
  if shape != "dynamic":
    o["shape"] = shape
  if shape == "chain":
    o["nodes"] = upto(reach)
  else:
    o["nodes"] = upto(20)
    # the default depth (6) is past what fewer heads reach: heads trees mostly name one
    if maybe(0.7) or (reach < 6 and drafter in ("heads", "heads-rescore")):
      o["depth"] = upto(reach)
    if maybe(0.4):
      o["width"] = upto(5)
    if maybe(0.4):
      o["branch"] = upto(5)
    if maybe(0.2):
      o["threshold"] = pick([0.01, 0.1, 0.5])
  if maybe(0.3):
    o["gate"] = pick([0.2, 1.0, 3.0])
  if maybe(0.3):
    o["lookup"] = upto(3)
    if maybe(0.5):
      o["graft"] = upto(1, 0)


def draw_batch(rng, model, rows: int, prompt_bucket: int, out_bucket: int) -> tuple[list, list]:
  """Random prompts whose longest fills `prompt_bucket` (16 or 32) and per-row `max_new_tokens` whose largest fills
  `out_bucket` (a multiple of 32), within the model's context, so that a group's batches share compiled programs.
  Edge lengths (one token, the whole bucket, one or two new tokens) come often, and some prompts repeat a short
  pattern (which prompt lookup copies)."""
  vocab, ctx = model.vocab_size, model.cfg.max_seq_len
  lo = 1 if prompt_bucket == 16 else 17
  prompts = []
  for b in range(rows):
    edge = rng.random()
    n = lo if edge < 0.2 else prompt_bucket if edge < 0.4 else int(rng.integers(lo, prompt_bucket + 1))
    if b > 0 and rng.random() < 0.5:  # rows of other lengths in the same bucket
      n = int(rng.integers(1, prompt_bucket + 1))
    if rng.random() < 0.3 and n >= 4:
      prompts.append((rng.integers(0, vocab, size=int(rng.integers(1, 4))).tolist() * n)[:n])
    else:
      prompts.append(rng.integers(0, vocab, size=n).tolist())
  if max(map(len, prompts)) < lo:
    prompts[0] = (prompts[0] * prompt_bucket)[:lo]
  max_new = []
  for p in prompts:
    cap = min(out_bucket, ctx - len(p))
    r = rng.random()
    m = 1 if r < 0.15 else 2 if r < 0.25 else cap if r < 0.5 else int(rng.integers(1, cap + 1))
    max_new.append(max(1, min(m, cap)))
  i = int(rng.integers(rows))  # one row asks for enough to fill the out bucket
  cap = min(out_bucket, ctx - len(prompts[i]))
  if cap > out_bucket - 32:
    max_new[i] = int(rng.integers(max(out_bucket - 31, 1), cap + 1))
  return prompts, max_new


def check_stats(res) -> list[str]:
  """What does not add up in a `GenerationResult`'s counters: every token after a row's first comes from a verify
  step the row was active in, each active call commits at least one token, and the batch's target calls are its
  busiest row's."""
  errs = []
  for b, toks in enumerate(res.tokens):
    n = len(toks)
    if res.step_tokens[b] != n - 1:
      errs.append(f"row {b}: step_tokens {res.step_tokens[b]} != new tokens - 1 = {n - 1}")
    if res.active_calls[b] > max(n - 1, 0):
      errs.append(f"row {b}: active_calls {res.active_calls[b]} > new tokens - 1 = {n - 1}")
    if n > 1 and res.active_calls[b] < 1:
      errs.append(f"row {b}: active_calls {res.active_calls[b]} with {n} new tokens")
    if int(res.accept_hist[b].sum()) != res.active_calls[b]:
      errs.append(f"row {b}: accept_hist sums to {int(res.accept_hist[b].sum())}, active_calls {res.active_calls[b]}")
    if res.accept_hist[b, 0] != 0:
      errs.append(f"row {b}: accept_hist[0] = {res.accept_hist[b, 0]} (a verify step commits at least one token)")
  longest = max(map(len, res.tokens))
  if res.target_calls > longest - 1 or (longest > 1 and res.target_calls < 1):
    errs.append(f"target_calls {res.target_calls} with {longest} tokens in the longest row")
  if res.target_calls != max(res.active_calls):
    errs.append(f"target_calls {res.target_calls} != the most active_calls of a row, {max(res.active_calls)}")
  if res.drafter_calls < 0:
    errs.append(f"drafter_calls {res.drafter_calls}")
  return errs


def check_greedy(res, max_new: list[int], eos: list[int]) -> list[str]:
  """`check_stats` and what greedy decoding itself must give: one token per target call, rows that end at their
  first EOS or at their max_new_tokens."""
  errs = check_stats(res)
  if res.target_calls != max(map(len, res.tokens)) - 1:
    errs.append(f"greedy target_calls {res.target_calls} != the longest row's tokens - 1")
  for b, toks in enumerate(res.tokens):
    ends = [i for i, t in enumerate(toks) if t in eos]
    if ends and ends[0] != len(toks) - 1:
      errs.append(f"row {b}: goes on past EOS {toks[ends[0]]} at {ends[0]}")
    if not ends and len(toks) != max_new[b]:
      errs.append(f"row {b}: {len(toks)} tokens without an EOS, max_new_tokens {max_new[b]}")
  return errs


@dataclasses.dataclass
class _Setup:
  model: LlamaLM
  params: dict
  parts: dict
  tok: Tok


def _setup(seed: int, root: Path):
  """The target and parts of `seed`, and the generator that drew them (for what `run` draws next)."""
  rng = np.random.default_rng(seed)
  model, params, desc = make_target(rng)
  parts = make_parts(model, params, root, rng)
  return _Setup(model, params, parts, Tok(model.vocab_size)), desc, rng


def _first_difference(got, want) -> int:
  return next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))


def _check_label(s: _Setup, ctx, seed: int, label: str, batches: list[dict]) -> list[dict]:
  """Builds `label` and decodes each batch with it: the problems (at most one refusal, which ends the label)."""
  where = dict(seed=seed, label=label, buckets=ctx.buckets)
  try:
    _, name, opts = methods.parse_method(label.replace(PARTS, str(s.parts["root"])))
    runner = methods.build(ctx, name, opts)
  except REFUSALS as e:
    return [dict(where, kind="refused", stage="build", error=f"{type(e).__name__}: {e}")]
  except Exception:  # noqa: BLE001 (any other error is a crash to report)
    return [dict(where, kind="crash", stage="build", error=traceback.format_exc(limit=-8))]
  assert getattr(runner, "lossless", methods.METHODS[name].lossless), label
  problems = []
  for batch in batches:
    prompts, max_new, eos = batch["prompts"], batch["max_new"], batch["eos"]
    repro = dict(where, prompts=prompts, max_new=max_new, eos=eos)
    asked = max_new[0] if len(set(max_new)) == 1 else max_new  # one number where the rows agree
    if name == "bpd-oracle" and not isinstance(asked, int):
      continue  # its runner takes one max_new_tokens for the batch
    s.tok.eos_ids = eos
    try:
      res = runner(prompts, asked, 0)
    except REFUSALS as e:
      problems.append(dict(repro, kind="refused", stage="run", error=f"{type(e).__name__}: {e}"))
      break
    except Exception:  # noqa: BLE001
      problems.append(dict(repro, kind="crash", stage="run", error=traceback.format_exc(limit=-8)))
      continue
    for b, (got, want) in enumerate(zip(res.tokens, batch["want"])):
      if got != want:
        problems.append(dict(repro, kind="mismatch", row=b, at=_first_difference(got, want), got=got, want=want))
        break
    errs = check_stats(res)
    if errs:
      problems.append(dict(repro, kind="stats", errors=errs))
  return problems


def _greedy_batch(s: _Setup, ctx, prompts, max_new, eos) -> tuple[dict, list[str]]:
  """The batch with plain greedy decoding's tokens (`want`), and what is wrong with greedy decoding's result."""
  s.tok.eos_ids = eos
  ref = methods.loop_runner(ctx)(prompts, max_new, 0)
  return dict(prompts=prompts, max_new=max_new, eos=eos, want=ref.tokens), check_greedy(ref, max_new, eos)


def _with_buckets(buckets: bool):
  """Sets `generate`'s smallest attention bucket for a run that bounds attention by buckets: 32 slots, so that these
  short contexts cross a few (the default, 512, is past them all). Returns the value to put back."""
  saved = gen.BUCKET_SMALLEST
  if buckets:
    gen.BUCKET_SMALLEST = 32
  return saved


def draw_plan(rng, model, parts: dict, n_labels: int) -> tuple[bool, list, list[str]]:
  """What a run decodes after drawing its target and parts: `(buckets, batch shapes, method labels)`. Each shape is
  (rows, prompt bucket, out bucket, number of EOS ids); the labels differ from each other."""
  buckets = bool(rng.random() < 0.25)
  shapes = []
  for _ in range(2):
    rows = int(rng.integers(1, 5))
    p_bucket = int(rng.choice([16, 32])) if model.cfg.max_seq_len > 40 else 16
    out_bucket = 64 if model.cfg.max_seq_len > 80 and rng.random() < 0.3 else 32
    shapes.append((rows, p_bucket, out_bucket, int(rng.integers(1, 4))))
  labels = []
  while len(labels) < n_labels:
    label = random_method(rng, parts, model.cfg.n_layers)
    if label not in labels:
      labels.append(label)
  return buckets, shapes, labels


def run(seed: int, n_labels: int = 10, n_draws: int = 3) -> list[dict]:
  """Decodes with `n_labels` random lossless methods on seed `seed`'s random target: `n_draws` batches in each of two
  batch shapes. Returns the problems found, each a dict with `kind` (mismatch, stats, crash or refused), the
  reproducer's fields (seed, label, buckets; prompts, max_new, eos where a batch was decoding) and the details. A
  "refused" entry is a method that answered InputError or Unavailable (an option this target cannot serve, say): not
  a failure, but a caller should see that most labels ran."""
  with tempfile.TemporaryDirectory(prefix="jaxspec-fuzz-") as tmp:
    s, desc, rng = _setup(seed, Path(tmp))
    buckets, shapes, labels = draw_plan(rng, s.model, s.parts, n_labels)
    saved = _with_buckets(buckets)
    try:
      ctx = methods.BenchContext(s.model, s.params, s.tok, buckets=buckets)
      problems, batches = [], []
      for rows, p_bucket, out_bucket, n_eos in shapes:
        for _ in range(n_draws):
          prompts, max_new = draw_batch(rng, s.model, rows, p_bucket, out_bucket)
          # EOS ids: mostly tokens the greedy output reaches early (read off a run with as many random EOS ids, so
          # that it shares the reference's compiled program), else random ones
          probe = gen.generate(s.model, s.params, prompts, max_new_tokens=max_new, buckets=buckets,
                               eos_ids=rng.integers(0, s.model.vocab_size, size=n_eos).tolist()).tokens
          eos = []
          for _ in range(n_eos):
            row = probe[int(rng.integers(rows))]
            if rng.random() < 0.6 and row:
              eos.append(int(row[int(rng.integers(min(len(row), 6)))]))
            else:
              eos.append(int(rng.integers(s.model.vocab_size)))
          if rng.random() < 0.2:  # one max_new_tokens for the batch (as one number: bpd-oracle runs only these)
            max_new = [min([max(max_new)] + [s.model.cfg.max_seq_len - len(p) for p in prompts])] * rows
          batch, errs = _greedy_batch(s, ctx, prompts, max_new, eos)
          if errs:
            problems.append(dict(seed=seed, label="greedy", buckets=buckets, prompts=prompts, max_new=max_new,
                                 eos=eos, kind="stats", errors=errs))
          batches.append(batch)
      for label in labels:
        problems += _check_label(s, ctx, seed, label, batches)
      for p in problems:
        p["target"] = desc
      return problems
    finally:
      gen.BUCKET_SMALLEST = saved
      gen.clear_programs()


def reproduce(seed: int, label: str, prompts, max_new, eos, buckets: bool, **_) -> list[dict]:
  """Decodes one batch with one method on seed `seed`'s target and parts, as `run` did: the problems found.
  `reproduce(**problem)` replays a problem `run` reported."""
  with tempfile.TemporaryDirectory(prefix="jaxspec-fuzz-") as tmp:
    s, desc, _ = _setup(seed, Path(tmp))
    saved = _with_buckets(buckets)
    try:
      ctx = methods.BenchContext(s.model, s.params, s.tok, buckets=buckets)
      batch, errs = _greedy_batch(s, ctx, prompts, max_new, eos)
      problems = [dict(seed=seed, label="greedy", kind="stats", errors=errs)] if errs else []
      problems += [] if label == "greedy" else _check_label(s, ctx, seed, label, [batch])
      return [dict(p, target=desc) for p in problems]
    finally:
      gen.BUCKET_SMALLEST = saved
      gen.clear_programs()


def seeds(default: tuple, var: str = "JAXSPEC_FUZZ_SEEDS") -> tuple:
  """The seeds the environment variable `var` names, or `default` without it: `A-B` is A to B inclusive, and commas
  join seeds and ranges (`3,8,20-25`)."""
  text = os.environ.get(var, "").strip()
  if not text:
    return default
  out = []
  for part in text.split(","):
    lo, _, hi = part.strip().partition("-")
    out += range(int(lo), int(hi or lo) + 1)
  return tuple(out)


def describe(problem: dict) -> str:
  """A problem as a message: what went wrong and the call that reproduces it."""
  p = problem
  head = f"{p['kind']} (seed {p['seed']}, {p['label']})"
  if p["kind"] == "mismatch":
    what = "generate differs from the recomputation" if p["label"] == RECOMPUTE else "differs from greedy decoding"
    head += f": row {p['row']}: {what} at new token {p['at']}:\n  got  {p['got']}\n  want {p['want']}"
  elif p["kind"] == "stats":
    head += ":\n  " + "\n  ".join(p["errors"])
  elif "error" in p:
    head += f" at {p['stage']}:\n{p['error']}"
  if "target" in p:
    head += f"\n  target: {p['target']}"
  if p["label"] == RECOMPUTE:
    fn, args = "reference_check", str(p["seed"])
  else:
    fn = "reproduce"
    args = ", ".join(f"{k}={p[k]!r}" for k in ("seed", "label", "prompts", "max_new", "eos", "buckets") if k in p)
  return f"{head}\n  reproduce: from tests.fuzz_greedy import {fn}; {fn}({args})"


def reference_check(seed: int, new: int = 24) -> list[dict]:
  """Greedy decoding of 1 to 3 random prompts on seed `seed`'s random target (`make_target`) against a reference
  that recomputes every step over the whole sequence with an empty cache: the rows that differ."""
  rng = np.random.default_rng(seed)
  model, params, desc = make_target(rng)
  rows = int(rng.integers(1, 4))
  prompts = [rng.integers(0, model.vocab_size, size=int(rng.integers(1, 33))).tolist() for _ in range(rows)]
  max_new = [min(new, model.cfg.max_seq_len - len(p)) for p in prompts]
  buckets = bool(rng.integers(2))
  width = 32 + new  # the longest prompt and its new tokens; positions past a sequence's end are padding
  mask = jnp.tril(jnp.ones((width, width), bool))
  forward = jax.jit(lambda seq: model.forward(params, seq, jnp.arange(width)[None], model.init_cache(1, width),
                                              mask)[0])
  saved = _with_buckets(buckets)
  try:
    got = gen.generate(model, params, prompts, max_new_tokens=max_new, buckets=buckets).tokens
  finally:
    gen.BUCKET_SMALLEST = saved
  problems = []
  for b, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(max_new[b]):
      logits = forward(jnp.asarray([seq + [0] * (width - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    want = seq[len(prompt):]
    if got[b] != want:
      problems.append(dict(kind="mismatch", seed=seed, label=RECOMPUTE, target=desc, buckets=buckets,
                           prompts=prompts, max_new=max_new, row=b, at=_first_difference(got[b], want), got=got[b],
                           want=want))
  return problems
