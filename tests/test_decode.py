"""The decode loop: exact token sequences with fake models, greedy equivalence, batching, buckets, sampling."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import BigramLM, OracleChain, OracleTree, ScriptTree
from jaxspec.decoding import generate as gen
from jaxspec.decoding.accept import GreedyAcceptance
from jaxspec.decoding.loop import decode
from jaxspec.decoding.sampling import SamplingParams, Warp, argmax, categorical
from jaxspec.errors import InputError

LM = BigramLM.random(32, seed=3)


def test_greedy_follows_the_model_exactly():
  res = gen.generate(LM, None, [[5, 9], [4]], max_new_tokens=12)
  assert res.tokens[0] == LM.greedy(9, 12)
  assert res.tokens[1] == LM.greedy(4, 12)
  assert res.target_calls == 11  # the first token comes from prefill
  assert res.tau == 1.0


def test_eos_and_per_row_max_new_tokens():
  seq = LM.greedy(9, 20)
  eos = seq[6]
  first = seq.index(eos)
  res = gen.generate(LM, None, [[9], [9], [9]], max_new_tokens=[20, 3, 20], eos_ids=[eos])
  assert res.tokens[0] == seq[:first + 1]  # EOS kept, nothing after it
  assert res.tokens[1] == seq[:3]
  assert res.tokens[2] == res.tokens[0]


@pytest.mark.parametrize("k", [0, 3])
def test_every_eos_id_ends_a_row(k):
  """Tokenizers often have several EOS ids (a chat model's end-of-turn and end-of-text): any of them ends a row, in
  one-token steps and inside an accepted block. Only the first was checked, and no test had two (an audit's
  mutant)."""
  seq = LM.greedy(9, 20)
  late, early = seq[12], seq[4]
  assert early not in seq[:4] and late not in seq[:seq.index(early) + 1]
  unused = next(t for t in range(LM.vocab_size) if t not in seq)
  drafter = OracleChain(LM, k) if k else None
  for eos in ([late, early], [unused, early], [early, unused]):
    res = gen.generate(LM, None, [[9], [9]], max_new_tokens=20, eos_ids=eos, drafter=drafter)
    assert res.tokens == [seq[:5], seq[:5]], eos


@dataclasses.dataclass(frozen=True)
class VerifyWhenDone(OracleChain):
  """Right drafts that ask to be verified (`Draft.verify_B`) only in rows that have finished."""

  def propose(self, draft_params, dstate, loop):
    draft, dstate = super().propose(draft_params, dstate, loop)
    return draft.replace(verify_B=loop.done_B), dstate


def test_only_active_rows_decide_whether_a_gated_step_verifies():
  """A gated step verifies the block when some active row asks for it; a finished row's request does not count (it
  would make the rows still decoding pay a verify forward none of them asked for). Here only finished rows ask, so
  every step is a one-token step, before and after the short row ends."""
  res = gen.generate(LM, None, [[9], [2]], max_new_tokens=[3, 12], drafter=VerifyWhenDone(LM, 3))
  assert res.tokens == [LM.greedy(9, 3), LM.greedy(2, 12)]
  assert res.active_calls == [2, 11] and res.accept_hist[:, 2:].sum() == 0


def test_a_row_done_after_prefill_takes_no_step():
  """A first token that is an EOS, or max_new_tokens=1, ends a row at prefill: it never becomes active, so it is
  counted in no step's calls nor histogram, and its output is that one token (the other row decodes on)."""
  seq = LM.greedy(9, 12)
  for kw in (dict(eos_ids=[seq[0]], max_new_tokens=[12, 12]), dict(max_new_tokens=[1, 12])):
    res = gen.generate(LM, None, [[9], [4]], drafter=OracleChain(LM, 2), **kw)
    assert res.tokens == [seq[:1], LM.greedy(4, 12)], kw
    assert res.active_calls[0] == 0 and res.accept_hist[0].sum() == 0 and res.step_tokens[0] == 0, kw
    assert res.active_calls[1] > 0


@pytest.mark.parametrize("k", [1, 3, 6])
def test_oracle_chain_accepts_k_plus_one_per_call(k):
  res = gen.generate(LM, None, [[9], [2]], max_new_tokens=1 + (k + 1) * 5, drafter=OracleChain(LM, k))
  assert res.tokens[0] == LM.greedy(9, 1 + (k + 1) * 5)
  assert res.tokens[1] == LM.greedy(2, 1 + (k + 1) * 5)
  assert res.active_calls == [5, 5]
  assert res.tau == k + 1
  assert res.accept_hist[:, k + 1].tolist() == [5, 5]


def test_wrong_drafts_are_rejected_and_output_stays_greedy():
  drafter = OracleChain(LM, 4, wrong=(2,))  # nodes 0, 1 right, node 2 wrong: 2 accepted + 1 bonus per call
  res = gen.generate(LM, None, [[9]], max_new_tokens=31, drafter=drafter)
  assert res.tokens[0] == LM.greedy(9, 31)
  assert res.active_calls == [10]
  assert res.accept_hist[0, 3] == 10


def test_tree_acceptance_takes_the_longest_right_branch():
  # Children of pending: 0 (wrong), 1 (right), 2 (right); 3 under 1 (wrong), 4 under 2 (right), 5 under 4 (right).
  drafter = OracleTree(LM, parents=(-1, -1, -1, 1, 2, 4), good=(1, 2, 4, 5))
  res = gen.generate(LM, None, [[9], [3]], max_new_tokens=1 + 4 * 6, drafter=drafter)
  assert res.tokens[0] == LM.greedy(9, 25)
  assert res.tokens[1] == LM.greedy(3, 25)
  assert res.active_calls == [6, 6]  # 3 nodes + bonus per call


def test_tree_on_a_real_model_matches_greedy(tiny):
  model, params = tiny
  prompts = [[1, 2, 3, 4, 5], [7, 8]]
  want = gen.generate(model, params, prompts, max_new_tokens=24).tokens
  # A tree of tokens unrelated to the tiny model: whatever is accepted must not change the output.
  drafter = OracleTree(LM, parents=(-1, -1, 0, 1, 2), good=(0, 1, 2, 3, 4))
  got = gen.generate(model, params, prompts, max_new_tokens=24, drafter=drafter)
  assert got.tokens == want
  # A tree that follows the greedy output on some nodes: accepted paths of every depth, on either branch, are moved
  # into the cache, and the output is still greedy.
  got = gen.generate(model, params, prompts, max_new_tokens=24, drafter=script_tree(want, model))
  assert got.tokens == want
  assert_every_accept_length(got, 4)


def script_tree(want, model):
  """Two branches of the greedy output under the pending token, of depths 3 and 2 (nodes 0-2-4 and 1-3)."""
  return ScriptTree(tuple(map(tuple, want)), parents=(-1, -1, 0, 1, 2), vocab_size=model.vocab_size)


def assert_every_accept_length(res, most):
  """Steps committed each of 1 .. `most` tokens (the drafts' accepted prefixes took every length)."""
  per_length = res.accept_hist.sum(0)[1:most + 1]
  assert (per_length > 0).all(), res.accept_hist


@pytest.mark.parametrize("dtype,param_dtype,scan", [("bfloat16", "bfloat16", False), ("float32", "bfloat16", False),
                                                     ("float32", "float32", True)])
def test_drafts_verify_in_bfloat16_and_with_stacked_layers(tiny, dtype, param_dtype, scan):
  """Models as `--dtype bfloat16`, `--param-dtype bfloat16` or `--scan-layers` load them, through the draft -> verify
  loop: a layer-skip draft (the first layer, sliced out of the stacked arrays when scanned) and a tree that follows
  the greedy output on some nodes leave the output equal to greedy decoding of the same model. The tiny model's
  choices are far from ties, so bfloat16 rounding does not move them here; on the default model it does
  (benchmarks/README.md, "bfloat16")."""
  from conftest import make_tiny
  from jaxspec.decoding.speculative import DraftModelDrafter, layerskip_draft
  from jaxspec.models.llama import LlamaLM, stack_layers, tiny_config

  prompts = [[1, 2, 3, 4, 5], [7, 8]]
  if scan:  # the session's tiny model, its layers stacked: the same function
    model, params = LlamaLM(tiny_config(scan_layers=True)), stack_layers(tiny[1], tiny[0].cfg.n_layers)
  else:
    model, params = make_tiny(dtype=dtype, param_dtype=param_dtype)
    assert jax.tree.leaves(params["layers_0"])[0].dtype == jnp.bfloat16
  want = gen.generate(model, params, prompts, max_new_tokens=16).tokens
  if scan:
    assert want == gen.generate(*tiny, prompts, max_new_tokens=16).tokens
  draft, draft_params = layerskip_draft(model, params, 1)
  got = gen.generate(model, params, prompts, max_new_tokens=16, drafter=DraftModelDrafter(draft, 3),
                     draft_params=draft_params)
  assert got.tokens == want and got.target_calls < 15  # 15 one-token steps without drafts: some were accepted
  got = gen.generate(model, params, prompts, max_new_tokens=16, drafter=script_tree(want, model))
  assert got.tokens == want and got.accept_hist[:, 2:].sum() > 0  # some tree paths were accepted


def _reference_greedy(model, params, prompt, n, width=32):
  """Greedy by recomputing the whole sequence every step, no cache reuse (right-padded: causal attention makes the
  padding invisible to earlier positions)."""
  fwd = jax.jit(lambda seq: model.forward(params, seq, jnp.arange(width)[None], model.init_cache(1, width),
                                          jnp.tril(jnp.ones((width, width), bool)))[0])
  seq = list(prompt)
  for _ in range(n):
    logits = fwd(jnp.asarray([seq + [0] * (width - len(seq))]))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_loop_equals_uncached_greedy(tiny):
  model, params = tiny
  prompt = [3, 1, 4, 1, 5, 9, 2, 6]
  assert gen.generate(model, params, [prompt], max_new_tokens=20).tokens[0] == _reference_greedy(
      model, params, prompt, 20)


def test_each_batch_row_equals_its_batch_of_one(tiny):
  model, params = tiny
  prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [200, 100, 50]]
  batch = gen.generate(model, params, prompts, max_new_tokens=[10, 17, 4]).tokens
  for p, n, row in zip(prompts, [10, 17, 4], batch):
    assert row == gen.generate(model, params, [p], max_new_tokens=n).tokens[0]


def test_prompt_lengths_in_one_bucket_share_one_program(tiny):
  model, params = tiny
  gen.generate(model, params, [[1] * 17], max_new_tokens=8)
  n = len(gen._PROGRAMS)
  gen.generate(model, params, [[2] * 30], max_new_tokens=8)
  gen.generate(model, params, [[3] * 20], max_new_tokens=8, temperature=0.0)
  assert len(gen._PROGRAMS) == n
  r1 = gen.generate(model, params, [[3] * 20], max_new_tokens=8, temperature=0.7)
  r2 = gen.generate(model, params, [[3] * 20], max_new_tokens=8, temperature=1.3)
  assert r1.compile_s > 0 and r2.compile_s == 0  # a new temperature does not recompile


def test_decode_is_jittable_and_matches_outside_jit(tiny):
  model, params = tiny
  arr, lengths, max_new, out_len, cap = gen.prepare([[1, 2, 3]], 6, 512, 0, 0)
  args = (model, params, jnp.asarray(arr), jnp.asarray(lengths), jnp.asarray(max_new), jnp.asarray([-1]),
          jax.random.key(0), SamplingParams.make())
  kw = dict(drafter=gen.NoDraft(), acceptor=GreedyAcceptance(), out_len=out_len, capacity=cap)
  with jax.disable_jit():
    eager = decode(*args, **kw)
  np.testing.assert_array_equal(eager.tokens_BxO, gen.decode_jit(*args, **kw).tokens_BxO)


def test_bad_requests_are_clear_errors(tiny):
  model, params = tiny
  with pytest.raises(InputError, match="empty"):
    gen.generate(model, params, [[]])
  with pytest.raises(InputError, match="cache length 64"):
    gen.generate(model, params, [[1] * 60], max_new_tokens=10, max_len=64)
  with pytest.raises(InputError, match="temperature"):
    gen.generate(model, params, [[1]], temperature=-1.0)


def test_prompt_batches_as_arrays_decode_like_lists(tiny):
  model, params = tiny
  rows = [[5, 6, 7], [9, 10, 11]]
  want = gen.generate(model, params, rows, max_new_tokens=5).tokens
  assert gen.generate(model, params, np.asarray(rows), max_new_tokens=np.int64(5)).tokens == want
  assert gen.generate(model, params, jnp.asarray(rows), max_new_tokens=jnp.int32(5)).tokens == want


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[5, 6, 7]), "give a list of prompts"),
    (dict(prompts=np.asarray([5, 6, 7])), "must be 2-D"),
    (dict(prompts="hello"), "not text"),
    # a list of texts was told to give "a list of prompts", which it was: the fix is the tokenizer
    (dict(prompts=["hello", "world"]), r"not text: encode each prompt with the model's tokenizer"),
    (dict(prompts=[[5, 6], b"hi"]), "not text"),
    (dict(prompts=[[5, 6.5]]), "whole numbers"),
    (dict(prompts=[[5, float("nan")]]), "whole numbers"),
    (dict(prompts=[[5, 2 ** 70]]), "int32 range"),
    (dict(max_new_tokens=4.5), "whole numbers"),
    (dict(max_new_tokens=[2]), "1 values for 2 prompts"),
    (dict(max_new_tokens=[2, 0]), ">= 1, got 0"),
    (dict(eos_ids=2), r"list or tuple of token ids, e.g. \[2\]"),
    (dict(eos_ids=[None]), "contains None"),
    (dict(eos_ids=[2 ** 40]), "int32 range"),
    (dict(eos_ids=[2 ** 31]), "int32 range"),  # the first value past it
    (dict(pad_id=-1), "pad_id=-1 is outside"),
    # Each sampling setting is checked on the call that has it, greedy or not, before anything is traced: before,
    # some ended in Python's TypeError or a tracer error, some ran with another value (top_k=2.5 as 2, max_len=0 as
    # unset), and an EOS id past the vocabulary could never end a row.
    (dict(temperature=None), r"temperature must be a number, got None"),
    (dict(temperature="0.7"), r"temperature must be a number, got '0.7'"),
    (dict(temperature=1.0, top_p=None), r"top_p must be a number, got None"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0 \(0: greedy\), got inf"),
    (dict(temperature=1.0, seed=1.5), r"seed must be a whole number or a typed JAX key \(jax.random.key\(n\)\), "
                                      r"got 1.5"),
    (dict(seed=2 ** 64), r"seed must be in"),
    (dict(temperature=1.0, top_k=2.5), r"top_k \(0: no top-k filter\) must be a whole number, got 2.5"),
    (dict(top_k=-1), r"top_k \(0: no top-k filter\) must be >= 0, got -1"),
    (dict(max_len=0), r"max_len \(None: the model's context length\) must be >= 1, got 0"),
    (dict(eos_ids=[999]), r"eos_ids has 999, outside the model's vocabulary \[0, 256\)"),
    (dict(eos_ids=[7, 256]), r"eos_ids has 256, outside the model's vocabulary \[0, 256\)"),  # the first id past it
    (dict(eos_ids=[-5]), r"eos_ids has -5"),
    (dict(eos_ids=[[1, 2]]), r"eos_ids must be a flat list of token ids"),
    (dict(eos_ids={3}), r"eos_ids must be a list or tuple of token ids, e.g. \[3\], got \{3\}"),
    (dict(eos_ids=np.int64(2)), r"eos_ids must be a list or tuple of token ids, e.g. \[2\], got"),
])
def test_malformed_arguments_are_clear_errors(tiny, kwargs, match):
  model, params = tiny
  args = dict(prompts=[[5, 6, 7], [9]], max_new_tokens=4) | kwargs
  with pytest.raises(InputError, match=match):
    gen.generate(model, params, args.pop("prompts"), **args)


def test_a_drafter_acceptor_or_model_of_the_wrong_kind_is_a_clear_error(tiny):
  """A method's name as the CLI takes it, a class instead of an instance, or the model and params swapped ended in
  an AttributeError (or a TypeError) from inside tracing."""
  from jaxspec.decoding.lookup import LookupDrafter
  model, params = tiny
  cases = [(dict(drafter="bpd"), r"drafter must be a drafter object \(e.g. BPDDrafter\(bpd\).*got 'bpd'.*jaxspec "
                                 r"command"),
           (dict(drafter=LookupDrafter), r"drafter=LookupDrafter is a class: pass an instance, LookupDrafter\(...\)"),
           (dict(acceptor="greedy"), r"acceptor must be an acceptance rule \(e.g. GreedyAcceptance\(\)"),
           (dict(acceptor=GreedyAcceptance), r"acceptor=GreedyAcceptance is a class")]
  for kwargs, match in cases:
    with pytest.raises(InputError, match=match):
      gen.generate(model, params, [[5, 6]], max_new_tokens=2, **kwargs)
  with pytest.raises(InputError, match=r"model must be a LanguageModel \(the model load_model returns first"):
    gen.generate(params, model, [[5, 6]], max_new_tokens=2)
  assert len(gen.generate(model, params, [[5, 6]], max_new_tokens=2, drafter=LookupDrafter()).tokens[0]) == 2


def test_a_missing_model_or_a_partial_drafter_is_a_clear_error(tiny):
  """None stands for "no drafter" and "no acceptor", not for the model; and a drafter is checked for each method the
  decode loop calls (an object with num_nodes alone failed inside tracing)."""
  import types
  model, params = tiny
  with pytest.raises(InputError, match=r"model must be a LanguageModel .*got a NoneType, which has no init_cache"):
    gen.generate(None, params, [[5, 6]], max_new_tokens=2)
  with pytest.raises(InputError, match=r"drafter must be a drafter object .*got a SimpleNamespace, which has no "
                                       r"init\.$"):
    gen.generate(model, params, [[5, 6]], max_new_tokens=2, drafter=types.SimpleNamespace(num_nodes=lambda: 2))
  # each of an acceptor's and a model's methods is asked for too, not only the first
  with pytest.raises(InputError, match=r"acceptor must be an acceptance rule .*got a SimpleNamespace, which has no "
                                       r"first_token\.$"):
    gen.generate(model, params, [[5, 6]], max_new_tokens=2, acceptor=types.SimpleNamespace(accept=lambda: None))
  with pytest.raises(InputError, match=r"model must be a LanguageModel .*got a SimpleNamespace, which has no "
                                       r"forward\.$"):
    gen.generate(types.SimpleNamespace(init_cache=model.init_cache), params, [[5, 6]], max_new_tokens=2)


def test_numpy_and_jax_scalars_are_settings_like_python_numbers(tiny):
  """The settings' checks take a number in any form a caller holds it: numpy and JAX scalars and 0-d arrays."""
  model, params = tiny
  plain = gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, temperature=0.7, top_k=4, top_p=0.9, seed=3,
                       max_len=64).tokens
  for kinds in ((jnp.float32, jnp.int32, jnp.float32), (np.float64, np.int64, np.asarray)):
    real, whole, third = kinds
    got = gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, temperature=real(0.7), top_k=whole(4),
                       top_p=third(0.9), seed=whole(3), max_len=whole(64)).tokens
    assert got == plain


def test_a_pad_id_past_the_vocabulary_is_refused_not_decoded_as_nan(tiny):
  """Padding slots are embedded: an id past the vocabulary embeds as NaN, and 0 * NaN through the masked attention
  turned every row into token 0 before this was checked."""
  model, params = tiny
  with pytest.raises(InputError, match=f"pad_id={model.vocab_size} is outside"):
    gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, pad_id=model.vocab_size)


def test_argmax_is_jnp_argmax():
  """The two-reduction argmax the greedy rules use picks what jnp.argmax picks: the first maximum on ties, the first
  NaN, index 0 of an all -inf row; on random logits of a verify block's shape too."""
  special = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [jnp.nan, 1.0, jnp.nan, 5.0], [-jnp.inf] * 4,
                         [0.0, jnp.inf, 1.0, jnp.inf],
                         [2.0, 2.0, 2.0, 2.0]])
  rand = jnp.round(jax.random.normal(jax.random.key(0), (3, 17, 999)), 1)  # rounding makes ties common
  for x in (special, rand, rand.astype(jnp.bfloat16)):
    got = jax.jit(argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))


def test_categorical_is_jax_random_categorical():
  """The sampler built on that argmax draws the token jax.random.categorical draws from the same key: on warped
  logits with -inf entries (top-k / top-p), rows of one hot logit, batches and bf16."""
  logits = jax.random.normal(jax.random.key(1), (4, 999)) * 3
  cut = logits.at[:, 7:].set(-jnp.inf)
  one = jnp.full((2, 999), -jnp.inf).at[:, 5].set(0.0)
  for x in (logits, cut, one, logits.astype(jnp.bfloat16), logits[0]):
    for i in range(20):
      key = jax.random.key(i)
      got = jax.jit(categorical)(key, x)
      assert got.dtype == jnp.int32
      np.testing.assert_array_equal(got, jax.random.categorical(key, x, axis=-1))
  assert set(np.asarray(jax.jit(categorical)(jax.random.key(0), cut)).tolist()) <= set(range(7))


def test_warp_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  sp = SamplingParams.make(temperature=1.0, top_p=0.8)
  kept = np.isfinite(np.asarray(Warp(use_top_p=True).log_probs(logits, sp))) & (
      np.asarray(Warp(use_top_p=True).probs(logits, sp)) > 0)
  assert kept.tolist() == [[True, True, True, False, False]]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
  p = np.asarray(Warp(top_k=2).probs(logits, SamplingParams.make(1.0)))
  np.testing.assert_allclose(p, [[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]], atol=1e-6)
  # A top_p too small for float32 (it reads as 0 on CPU) keeps the most likely token, as any small top_p does, instead
  # of keeping nothing and sampling uniformly.
  for tiny_p in (1e-6, 1e-39):
    p = np.asarray(Warp(use_top_p=True).probs(logits, SamplingParams.make(1.0, tiny_p)))
    np.testing.assert_allclose(p, [[1, 0, 0, 0, 0]], atol=1e-6)


def test_top_p_equal_to_the_mass_of_a_prefix_keeps_just_that_prefix():
  """Top-p keeps the smallest prefix of the most likely tokens whose mass reaches top_p: where top_p is exactly the
  mass of the first k tokens (dyadic probabilities, exact in float32), the (k+1)-th token is dropped."""
  p = np.asarray([0.5, 0.25, 0.125, 0.0625, 0.0625])
  logits = jnp.log(jnp.asarray([p], jnp.float32))
  np.testing.assert_array_equal(np.asarray(Warp().probs(logits, SamplingParams.make(1.0))), [p])  # masses are exact
  for k in (1, 2, 3):
    got = np.asarray(Warp(use_top_p=True).probs(logits, SamplingParams.make(1.0, float(p[:k].sum()))))
    np.testing.assert_allclose(got, [np.where(np.arange(5) < k, p, 0) / p[:k].sum()], atol=1e-6)


def test_bfloat16_logits_are_warped_as_their_float32_values():
  """A bf16 model's logits are warped in float32: taking the largest logit off in bf16 rounded the gaps to it, and
  the log-probabilities of these logits (up to ~100 apart) came out up to 0.5 off at T = 1."""
  logits = (jax.random.normal(jax.random.key(0), (4, 50)) * 30).astype(jnp.bfloat16)
  for warp in (Warp(), Warp(top_k=20, use_top_p=True)):
    for temperature in (1.0, 0.3):
      sp = SamplingParams.make(temperature, 0.99)
      np.testing.assert_allclose(np.asarray(warp.log_probs(logits, sp)),
                                 np.asarray(warp.log_probs(logits.astype(jnp.float32), sp)), rtol=1e-6)


def numpy_warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """The warped distribution written out for one row, independently of `Warp`: softmax(logits / T), then the top-k
  tokens, then the smallest set of most likely tokens whose mass reaches top_p, renormalised each time."""
  p = np.exp((logits - logits.max()) / temperature)
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  if top_k:
    p[order[top_k:]] = 0
    p /= p.sum()
  if top_p < 1:
    before = np.cumsum(p[order]) - p[order]
    p[order[before >= top_p]] = 0
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (1.0, 0, 1.0), (1.7, 0, 1.0), (0.5, 3, 1.0),
                                                     (0.5, 0, 0.7), (1.7, 0, 0.9), (0.8, 4, 0.6)])
def test_warp_matches_a_numpy_reference(temperature, top_k, top_p):
  """The χ² tests compare samplers with `Warp.probs`; this checks `Warp.probs` itself at T != 1 with top-k / top-p."""
  logits = np.asarray(jax.random.normal(jax.random.key(3), (6, 50)) * 2.5, np.float64)
  got = np.asarray(Warp(top_k, top_p < 1).probs(jnp.asarray(logits, jnp.float32),
                                                   SamplingParams.make(temperature, top_p)))
  want = np.stack([numpy_warp(row, temperature, top_k, top_p) for row in logits])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert ((got > 0) == (want > 0)).all()


def test_warp_at_small_temperatures_keeps_the_gaps_between_logits():
  """Below T = 1e-6 the temperature was clamped to 1e-6, and near it logits / T (~1e7) lost their gaps to float32
  rounding: two logits 9.5e-7 apart got probabilities 0.72 / 0.28 at T = 1e-7 (exactly: 0.99993 / 0.00007), and a
  static tree's prior calibrated at temperature 0 got a top-child probability above 1."""
  logits = np.asarray([[10.0, 10.0 - 9.5e-7, 3.0, -np.inf]], np.float32)
  gap = float(logits[0, 0]) - float(logits[0, 1])  # the gap float32 keeps
  for temperature in (1e-7, 1e-6, 1e-3):
    got = np.asarray(Warp().probs(jnp.asarray(logits), SamplingParams.make(temperature)))
    want = np.asarray([1.0, np.exp(-gap / temperature), 0.0, 0.0])
    np.testing.assert_allclose(got[0], want / want.sum(), rtol=1e-4, atol=1e-6)
  big = np.asarray(jax.random.normal(jax.random.key(5), (4, 300)) * 30.0, np.float32)  # logits up to ~100
  for temperature in (0.0, 1e-30, 1e-9):  # all the mass on the largest logit, never above 1 nor NaN
    p = np.asarray(Warp(top_k=5, use_top_p=True).probs(jnp.asarray(big), SamplingParams.make(temperature, 0.9)))
    np.testing.assert_array_equal(p, np.eye(300)[big.argmax(-1)])
  ties = jnp.asarray([[2.0, 5.0, 5.0, 1.0]])
  np.testing.assert_allclose(np.asarray(Warp().probs(ties, SamplingParams.make(0.0))), [[0, 0.5, 0.5, 0]])


def test_an_argmax_acceptor_refuses_a_temperature():
  """An acceptor that keeps tokens by the target's argmax (greedy, BPD's approximate top-k rule) with temperature > 0
  gave greedy output labelled as sampled; generate now says so."""
  from jaxspec.decoding.bpd import TopKAcceptance
  for acceptor in (GreedyAcceptance(), TopKAcceptance(2)):
    with pytest.raises(InputError, match=f"{type(acceptor).__name__} keeps tokens by the target's argmax, so it "
                                         "does not sample: with temperature=1.5 leave acceptor unset"):
      gen.generate(LM, None, [[1, 2, 3]], max_new_tokens=3, temperature=1.5, acceptor=acceptor)
    gen.generate(LM, None, [[1, 2, 3]], max_new_tokens=3, acceptor=acceptor)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.6, 0, 1.0), (0.7, 0, 0.9), (1.5, 5, 1.0)])
def test_sampled_first_tokens_follow_the_warped_distribution(temperature, top_k, top_p):
  """`generate`'s own sampling options reach the sampler: 20000 first tokens of an 8-token model fit its warped
  softmax (χ²), and the same counts are rejected against the unwarped softmax, so a `generate` that dropped the
  temperature, top-k or top-p would fail (the χ² tests of the methods call the loop with their own settings)."""
  from test_speculative import chi2_pvalue, small_lm

  model, params = small_lm(0)
  prompt = [3, 1, 4, 1, 5]
  res = gen.generate(model, params, [prompt] * 20_000, max_new_tokens=1, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=1)
  t = len(prompt)
  logits = model.forward(params, jnp.asarray([prompt]), jnp.arange(t)[None], model.init_cache(1, 8),
                         jnp.tril(jnp.ones((t, t), bool)))[0][:, -1]

  def probs(warp, sp):
    p = np.asarray(warp.probs(logits, sp), np.float64)[0]
    return p / p.sum()

  counts = np.bincount([r[0] for r in res.tokens], minlength=model.vocab_size)
  assert chi2_pvalue(counts, probs(Warp(top_k, top_p < 1), SamplingParams.make(temperature, top_p))) > 1e-3
  assert chi2_pvalue(counts, probs(Warp(0, False), SamplingParams.make(1.0, 1.0))) < 1e-6


@pytest.mark.parametrize("case", ["plain", "tree", "sampled"])
def test_cache_buckets_leave_the_output_unchanged(tiny, monkeypatch, case):
  """Buckets from 16 slots: the rows cross four of them; every token and call count equals reading the whole cache
  (a bucket chosen too small would drop committed context and change the tokens)."""
  model, params = tiny
  monkeypatch.setattr(gen, "BUCKET_SMALLEST", 16)
  prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
  kw = dict(max_new_tokens=[100, 70])
  if case == "tree":  # compacts accepted paths into the cache
    greedy = gen.generate(model, params, prompts, **kw).tokens
    kw["drafter"] = script_tree(greedy, model)
  if case == "sampled":
    kw["temperature"] = 1.0
  before = set(gen._PROGRAMS)
  on = gen.generate(model, params, prompts, buckets=True, **kw)
  (key,) = set(gen._PROGRAMS) - before
  assert dict(key[1])["attn_buckets"] == (16, 32, 64, 128, 256)
  off = gen.generate(model, params, prompts, buckets=False, **kw)
  assert on.tokens == off.tokens and on.active_calls == off.active_calls
  assert [len(t) for t in on.tokens] == [100, 70]
  if case == "tree":
    assert on.tokens == greedy
    assert_every_accept_length(on, 4)


def test_bucketed_loop_does_not_copy_the_cache(tiny, monkeypatch):
  """The bucket switch reads the cache in its branches and the new entries are written after it; a branch that
  wrote the cache itself would make XLA:CPU copy every buffer in and out on every step."""
  from test_model import cache_copies

  model, params = tiny
  monkeypatch.setattr(gen, "BUCKET_SMALLEST", 16)
  before = set(gen._PROGRAMS)
  gen.generate(model, params, [list(range(1, 41))], max_new_tokens=90, buckets=True)
  (key,) = set(gen._PROGRAMS) - before
  static = dict(key[1])
  cap = static["capacity"]
  assert len(static["attn_buckets"]) > 2
  k, h = model.cfg.n_kv_heads, model.cfg.head_dim
  hlo, cache_shape = gen._PROGRAMS[key][0].as_text(), rf"f32\[1,{k},({h},{cap}|{cap},{h})\]"
  assert re.search(cache_shape, hlo), "the program no longer shows the cache buffers: update the shape"
  copies = cache_copies(hlo, cache_shape)
  assert [c for c in copies if not c[0].startswith("main")] == []


def test_forward_cost_times_every_size_alone_and_in_a_loop(tiny):
  """The verify-cost probe runs the forward at every size, called on its own and inside a loop (the decode loop's
  setting, which budget and gate choices read)."""
  from jaxspec.bench.cost import forward_cost

  model, params = tiny
  for in_loop in (0, 3):
    cost = forward_cost(model, params, [4, 1, 4, 2], context=8, repeats=2, in_loop=in_loop)
    assert sorted(cost) == [1, 2, 4]
    assert all(0 < s < 10 for s in cost.values())


def test_forward_cost_keeps_each_sizes_fastest_round_per_forward(tiny, monkeypatch):
  """On a clock that says how long each probe took: a size's cost is its fastest round (not its last), and a looped
  probe's time is divided by the forwards it ran."""
  import types

  from jaxspec.bench import cost as cost_mod

  model, params = tiny
  for in_loop in (0, 3):
    took = iter([3.0, 5.0, 7.0, 2.0, 6.0, 4.0])  # round 1: sizes 1, 2, 4; round 2: the same
    clock = {"now": 0.0, "calls": 0}

    def perf_counter():
      clock["calls"] += 1
      if clock["calls"] % 2 == 0:  # the end of a probe
        clock["now"] += next(took)
      return clock["now"]

    monkeypatch.setattr(cost_mod, "time", types.SimpleNamespace(perf_counter=perf_counter))
    cost = cost_mod.forward_cost(model, params, [4, 1, 2], context=8, repeats=2, in_loop=in_loop)
    per = max(in_loop, 1)
    assert cost == pytest.approx({1: 2.0 / per, 2: 5.0 / per, 4: 4.0 / per}), in_loop
