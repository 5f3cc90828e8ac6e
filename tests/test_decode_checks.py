"""Checks of what the decode loop is given, and its counters: a draft with another vocabulary, prompt ids outside the
vocabulary, heads or drafts built for another target or given no params, an undersized cache or output buffer, the
row named in a too-long request, the drafter calls of trees that stop growing early, and the accepted-length
histogram of rows that have finished."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import BigramLM, OracleChain
from jaxspec.decoding import generate as gen
from jaxspec.decoding.accept import GreedyAcceptance
from jaxspec.decoding.bpd import BPDDrafter, TopKAcceptance, bpd_draft_params
from jaxspec.decoding.eagle import EagleDrafter, EagleTreeSource
from jaxspec.decoding.lattice import LatticeDrafter, lattice_draft_params
from jaxspec.decoding.lookup import WithLookup
from jaxspec.decoding.loop import NoDraft, decode, decode_jit
from jaxspec.decoding.opt_tree import HeadsTreeSource, LMTreeSource, OptTreeDrafter, static_draft_params
from jaxspec.decoding.sampling import SamplingParams
from jaxspec.decoding.speculative import DraftModelDrafter
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDConfig, BPDModel
from jaxspec.models.eagle import EagleDraft
from jaxspec.models.llama import LlamaLM
from jaxspec.models.ngram import build_ngram
from tests.conftest import make_tiny

LM = BigramLM.random(32, seed=3)


# --- The draft's vocabulary ----------------------------------------------------------------------------------------


def test_a_draft_with_another_vocabulary_is_refused_before_decoding(tiny):
  model, params = tiny  # 256 tokens
  table = np.zeros((512, 512))
  table[:, 300] = 5.0  # always proposes 300, an id the target does not have (it used to embed as NaN)
  big = BigramLM(tuple(map(tuple, table.tolist())))
  small, small_params = make_tiny(1, vocab_size=128)
  cases = [(DraftModelDrafter(big, 3), None, 0.0), (DraftModelDrafter(small, 3, greedy=False), small_params, 1.0),
           (OptTreeDrafter(LMTreeSource(small), nodes=4, depth=2, width=2, branch=2), small_params, 0.0)]
  for drafter, draft_params, temperature in cases:
    with pytest.raises(InputError, match=r"vocabularies differ: the target has 256 tokens, the draft (512|128)"):
      gen.generate(model, params, [[1, 2, 3]], max_new_tokens=6, drafter=drafter, draft_params=draft_params,
                   temperature=temperature)
  # The loop itself checks, for callers that skip `generate`.
  with pytest.raises(InputError, match="vocabularies differ"):
    decode_jit(model, params, jnp.asarray([[1, 2, 3]]), jnp.asarray([3]), jnp.asarray([4]), jnp.asarray([-1]),
               jax.random.key(0), SamplingParams.make(0.0), None, drafter=DraftModelDrafter(big, 3),
               acceptor=GreedyAcceptance(), out_len=4, capacity=16)


def test_an_eagle_tree_draft_with_another_vocabulary_is_refused(tiny):
  model, params = tiny
  other, other_params = make_tiny(1, vocab_size=128)
  draft = EagleDraft(other.cfg, 1)
  with pytest.raises(InputError, match="vocabularies differ"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, draft_params=draft.init_params(jax.random.key(0),
                                                                                                other_params),
                 drafter=OptTreeDrafter(EagleTreeSource(draft, 2), nodes=4, depth=2, width=2, branch=2))


# --- Heads and feature-level drafts built for another target; missing draft params ------------------------------


def _wide_and_narrow():
  """The session's tiny target (d_model 32) and a target of another width with the same 256-token vocabulary."""
  return make_tiny(1, vocab_size=256, d_model=48)


def test_heads_or_an_eagle_draft_for_another_width_are_refused_before_tracing(tiny):
  """Heads and EAGLE drafts read the target's hidden states: a width mismatch used to surface as flax's
  ScopeParamShapeError from deep inside tracing, or, for heads built without their params checked, not at all until
  the loop ran."""
  model, params = tiny
  other, other_params = _wide_and_narrow()
  assert other.cfg.d_model != model.cfg.d_model and other.vocab_size == model.vocab_size
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=other.cfg.d_model, d_hidden=8))
  heads = bpd.init_params(jax.random.key(0))
  eagle = EagleDraft(other.cfg, 1)
  eagle_params = eagle.init_params(jax.random.key(0), other_params, None, init="random")
  cases = [(BPDDrafter(bpd), bpd_draft_params(other, other_params, bpd, heads), "these BPD heads"),
           (OptTreeDrafter(HeadsTreeSource(bpd), nodes=2, depth=2, width=1, branch=1),
            bpd_draft_params(other, other_params, bpd, heads), "these BPD heads"),
           (EagleDrafter(eagle, 2), eagle_params, "this EAGLE draft"),
           (OptTreeDrafter(EagleTreeSource(eagle, 2), nodes=4, depth=2, width=2, branch=2), eagle_params,
            "this EAGLE draft")]
  for drafter, draft_params, what in cases:
    with pytest.raises(InputError, match=f"{what} read hidden states of width 48, but this target's are 32 wide"):
      gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=drafter, draft_params=draft_params)


def test_heads_or_draft_params_for_another_vocabulary_are_refused(tiny):
  """BPD heads over a vocabulary subset with ids past the target's, or draft params built with a target of the same
  width and a larger vocabulary, drafted ids the target embeds as NaN: greedy output turned into token 0 without a
  word. Both are refused, in every drafter that reads BPD params."""
  model, params = tiny
  d = model.cfg.d_model
  subset = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8, vocab_subset=4))
  far = subset.init_params(jax.random.key(1), vocab_ids=np.array([300, 301, 302, 303]))
  with pytest.raises(InputError, match="predict token ids up to 303, past this target's vocabulary of 256"):
    bpd_draft_params(model, params, subset, far)
  big, big_params = make_tiny(2, vocab_size=512)
  assert big.cfg.d_model == d
  for use_next in (True, False):
    bpd = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8, use_next_token=use_next))
    dp = bpd_draft_params(big, big_params, bpd, bpd.init_params(jax.random.key(0)))
    for drafter, p in ((BPDDrafter(bpd), dp), (WithLookup(BPDDrafter(bpd)), dp),
                       (OptTreeDrafter(HeadsTreeSource(bpd), nodes=2, depth=2, width=1, branch=2), dp),
                       (LatticeDrafter(bpd, "none", top_t=4), lattice_draft_params(dp))):
      with pytest.raises(InputError, match="built for a target with 512 tokens, and this target has 256"):
        gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=drafter, draft_params=p)
  # Subset heads: their ids, carried in the draft params, are checked at decode time too.
  ok = subset.init_params(jax.random.key(1), vocab_ids=np.array([1, 2, 3, 4]))
  dp = bpd_draft_params(model, params, subset, ok)
  gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=BPDDrafter(subset), draft_params=dp)
  dp["bpd"] = dict(dp["bpd"], vocab_ids=jnp.asarray([1, 2, 3, 400]))
  with pytest.raises(InputError, match="up to 400, past this target's vocabulary of 256"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=BPDDrafter(subset), draft_params=dp)
  with pytest.raises(InputError, match="up to 256, past this target's vocabulary of 256"):  # the first id past it
    bpd_draft_params(model, params, subset, dict(ok, vocab_ids=jnp.asarray([1, 2, 3, 256])))
  # Subset heads that read the next token's embedding, with draft params built with the larger target: the output
  # rows are the subset's either way, so the embedding's rows are what tells (a mutation audit found them unchecked).
  with pytest.raises(InputError, match="built for a target with 512 tokens, and this target has 256"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=BPDDrafter(subset),
                 draft_params=bpd_draft_params(big, big_params, subset, ok))


def test_params_of_another_model_are_an_input_error(tiny):
  """Params that do not fit the model (flax finds out while tracing) end as an InputError that says what to pass."""
  model, params = tiny
  small, small_params = make_tiny(1)
  wide, wide_params = _wide_and_narrow()
  with pytest.raises(InputError, match=r"The params do not fit the model .*shape \(256, 48\).*\(load_model\)"):
    gen.generate(model, wide_params, [[1, 2, 3]], max_new_tokens=4)
  with pytest.raises(InputError, match="draft params built for this drafter's model"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=DraftModelDrafter(small, 2),
                 draft_params=wide_params)


def test_params_not_shaped_as_params_and_wrong_settings_are_input_errors(tiny):
  """From using the library by hand: a wrapped params dict, None, a missing layer, a 2-D prompt inside the list,
  pad_id of the wrong type, and bools; each was a flax, numpy or lax error from deep inside tracing, or (the nested
  prompt) a silent run on the first tokens of the first row."""
  model, params = tiny
  with pytest.raises(InputError, match=r"a dict holding only 'params': pass params\['params'\]"):
    gen.generate(model, {"params": params}, [[1, 2, 3]], max_new_tokens=4)
  with pytest.raises(InputError, match="The params do not fit the model"):
    gen.generate(model, None, [[1, 2, 3]], max_new_tokens=4)
  with pytest.raises(InputError, match="The params do not fit the model"):
    gen.generate(model, {k: v for k, v in params.items() if k != "layers_1"}, [[1, 2, 3]], max_new_tokens=4)
  for prompts in ([np.array([[1, 2, 3], [4, 5, 6]])], [[[1, 2]]], [np.ones((20, 20), np.int32)], [[1, [2, 3]]]):
    with pytest.raises(InputError, match="Prompt 0 is not a flat sequence of token ids"):
      gen.generate(model, params, prompts, max_new_tokens=4)
  with pytest.raises(InputError, match="prompts must be a list of prompts"):
    gen.generate(model, params, None, max_new_tokens=4)
  for pad in (1.5, None, "0", True):
    with pytest.raises(InputError, match="pad_id must be a whole number"):
      gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, pad_id=pad)
  with pytest.raises(InputError, match="max_new_tokens must be whole numbers"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=True)
  with pytest.raises(InputError, match="Prompt 0 must be whole numbers"):
    gen.generate(model, params, np.array([[True, False]]), max_new_tokens=4)
  # Unset, max_len is the context length: no advice to raise it.
  with pytest.raises(InputError, match=r"more than the model's context length \(512 tokens\): shorten the prompt or "
                                       r"lower max_new_tokens\.$"):
    gen.generate(model, params, [[1] * 500], max_new_tokens=20)


def test_a_typed_key_is_a_seed(tiny):
  model, params = tiny
  run = lambda seed: gen.generate(model, params, [[1, 2, 3]] * 4, max_new_tokens=8, temperature=1.0,
                                  seed=seed).tokens
  assert run(jax.random.key(5)) == run(5)  # the key of a seed below 2**32 is jax.random.key(seed)
  assert run(jax.random.key(6)) != run(jax.random.key(5))
  for bad in (jax.random.PRNGKey(5), jax.random.split(jax.random.key(0), 2)):  # raw uint32 words; two keys
    with pytest.raises(InputError, match=r"seed must be a whole number or a typed JAX key \(jax.random.key\(n\)\)"):
      run(bad)


def test_draft_params_of_another_form_and_mismatched_widths_are_input_errors(tiny):
  """The heads' own params where bpd_draft_params' are due, or the target's params for an EAGLE draft, were a
  KeyError while tracing; an EAGLE tree source of another width than its tree a ValueError there."""
  model, params = tiny
  d = model.cfg.d_model
  for use_next in (True, False):
    bpd = BPDModel(BPDConfig(num_heads=2, d_model=d, d_hidden=8, use_next_token=use_next))
    heads = bpd.init_params(jax.random.key(0))
    for drafter, p in ((BPDDrafter(bpd), heads), (WithLookup(BPDDrafter(bpd)), heads),
                       (OptTreeDrafter(HeadsTreeSource(bpd), nodes=2, depth=2, width=1, branch=2), heads),
                       (OptTreeDrafter(HeadsTreeSource(bpd), nodes=2, depth=2, width=1, branch=2, shape="static"),
                        static_draft_params(heads, np.ones((2, 2)))),
                       (LatticeDrafter(bpd, "none", top_t=4), {"bpd": heads})):
      with pytest.raises(InputError, match="A drafter from BPD heads takes draft_params holding bpd, built by .*"
                                           "bpd_draft_params.*got a dict with .*missing bpd"):
        gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=drafter, draft_params=p)
  eagle = EagleDraft(model.cfg, 1)
  for drafter in (EagleDrafter(eagle, 2), OptTreeDrafter(EagleTreeSource(eagle, 2), nodes=4, depth=2, width=2,
                                                          branch=2)):
    with pytest.raises(InputError, match="takes draft_params holding embed_VxD, vocab_ids, table_MxD, built by "
                                         "jaxspec.models.eagle.load_eagle"):
      gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=drafter, draft_params=params)
  with pytest.raises(InputError, match=r"EagleTreeSource\(width=2\) serves trees of width 2, and this tree has "
                                       "width=4"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4,
                 draft_params=eagle.init_params(jax.random.key(0), params),
                 drafter=OptTreeDrafter(EagleTreeSource(eagle, 2), nodes=4, depth=2, width=4, branch=2))


def test_the_program_cache_is_bounded_and_can_be_cleared(tiny, monkeypatch):
  model, params = tiny
  monkeypatch.setattr(gen, "MAX_PROGRAMS", 2)
  gen.clear_programs()
  for n in (4, 40, 80):  # three output buffers: three programs
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=n)
  assert len(gen._PROGRAMS) == 2
  assert gen.generate(model, params, [[1, 2, 3]], max_new_tokens=80).compile_s == 0  # the latest stay
  assert gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4).compile_s > 0  # the oldest left
  gen.clear_programs()
  assert not gen._PROGRAMS


def test_cleared_programs_are_compiled_again_not_taken_back_from_jax(tiny):
  """`clear_programs()` emptied jaxspec's cache only: JAX's kept each executable, so the programs stayed in memory and
  the next call took the same one back (its compile_s a few milliseconds, where README says it frees them)."""
  model, params = tiny
  args = ([[1, 2, 3]],)
  gen.generate(model, params, *args, max_new_tokens=6)
  first = next(reversed(gen._PROGRAMS.values()))[0]
  gen.clear_programs()
  gen.generate(model, params, *args, max_new_tokens=6)
  again = next(reversed(gen._PROGRAMS.values()))[0]
  assert again.runtime_executable() is not first.runtime_executable()


def test_a_greedy_only_drafter_refuses_sampling(tiny):
  from jaxspec.decoding.jacobi import JacobiDrafter
  model, params = tiny
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  lattice_params = lattice_draft_params(bpd_draft_params(model, params, bpd, bpd.init_params(jax.random.key(0))))
  for drafter, dp in ((JacobiDrafter(window=3), None), (WithLookup(JacobiDrafter(window=3)), None),
                      (LatticeDrafter(bpd, top_t=4), lattice_params)):
    with pytest.raises(InputError, match="(JacobiDrafter|WithLookup|LatticeDrafter) is greedy only"):
      gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, temperature=1.0, drafter=drafter, draft_params=dp)
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=drafter, draft_params=dp)


def test_drafters_without_their_draft_params_say_what_builds_them(tiny):
  model, params = tiny
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  small, _ = make_tiny(1)
  cases = [(BPDDrafter(bpd), "bpd_draft_params"), (WithLookup(BPDDrafter(bpd)), "bpd_draft_params"),
           (DraftModelDrafter(small, 2), "load_draft"), (EagleDrafter(EagleDraft(model.cfg, 1), 2), "load_eagle"),
           (OptTreeDrafter(LMTreeSource(small), nodes=4, depth=2, width=2, branch=2), "load_draft"),
           (LatticeDrafter(bpd, "none", top_t=4), "lattice_draft_params")]
  for drafter, hint in cases:
    with pytest.raises(InputError, match=f"{type(drafter).__name__} needs draft_params .*{hint}"):
      gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=drafter)
  # A draft model without params of its own (a fake) still runs without them.
  gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=DraftModelDrafter(BigramLM.random(256), 2))


def test_mismatched_rescorers_acceptors_and_branching_are_input_errors(tiny):
  model, params = tiny
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, d_hidden=8))
  dp = bpd_draft_params(model, params, bpd, bpd.init_params(jax.random.key(0)))
  ngram, tables, _ = build_ngram([[1, 2, 3, 1, 2]], 2, vocab_size=100)
  with pytest.raises(InputError, match="counted over 100 token ids and the target has 256"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4,
                 drafter=LatticeDrafter(bpd, "ngram", top_t=4, ngram=ngram),
                 draft_params=lattice_draft_params(dp, weight=0.5, ngram=tables))
  with pytest.raises(InputError, match="needs the reference continuation"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, drafter=LatticeDrafter(bpd, "oracle", top_t=4),
                 draft_params=lattice_draft_params(dp))
  with pytest.raises(InputError, match="verifies chains"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, acceptor=TopKAcceptance(2), draft_params=dp,
                 drafter=OptTreeDrafter(HeadsTreeSource(bpd), nodes=4, depth=2, width=2, branch=2))
  with pytest.raises(InputError, match="branch=300 candidates per node is more than the target's vocabulary"):
    gen.generate(model, params, [[1, 2, 3]], max_new_tokens=4, draft_params=dp,
                 drafter=OptTreeDrafter(HeadsTreeSource(bpd), nodes=4, depth=2, width=2, branch=300))


# --- Prompt token ids ----------------------------------------------------------------------------------------------


def test_prompt_ids_outside_the_vocabulary_are_refused():
  with pytest.raises(InputError, match=r"Prompt 1 has token id 40 at position 1, outside .* \[0, 32\)"):
    gen.generate(LM, None, [[1, 2, 3], [4, 40]], max_new_tokens=3)
  with pytest.raises(InputError, match="Prompt 0 has token id -3 at position 0"):
    gen.generate(LM, None, [[-3, 1]], max_new_tokens=3)
  with pytest.raises(InputError, match="token id -1"):  # negative ids are refused even where the vocabulary is unknown
    gen.prepare([[1, -1]], 3, 64, 0, 0)
  with pytest.raises(InputError, match=r"token id 32 at position 1, outside .* \[0, 32\)"):  # the first id past it
    gen.generate(LM, None, [[31, 32]], max_new_tokens=3)
  # The last id of the vocabulary is fine.
  assert gen.generate(LM, None, [[31]], max_new_tokens=3).tokens == [LM.greedy(31, 3)]


# --- Cache and output buffer ---------------------------------------------------------------------------------------


def _decode(fn, capacity, max_new=32, out_len=32, drafter=NoDraft()):
  prompt = np.arange(1, 17, dtype=np.int32)[None] % 32
  return fn(LM, None, jnp.asarray(prompt), jnp.asarray([16]), jnp.asarray([max_new]), jnp.asarray([-1]),
            jax.random.key(0), SamplingParams.make(0.0), None, drafter=drafter, acceptor=GreedyAcceptance(),
            out_len=out_len, capacity=capacity)


def test_decode_refuses_a_cache_too_small_for_the_request():
  # P + out_len + N + 1 = 16 + 32 + 1; a smaller cache used to be overwritten in place (clamped writes).
  with pytest.raises(InputError, match=r"KV cache of 24 slots .* capacity >= 49"):
    _decode(decode_jit, 24)
  chain = OracleChain(LM, 3)
  with pytest.raises(InputError, match="capacity >= 52"):
    _decode(decode_jit, 51, drafter=chain)
  out = _decode(decode_jit, 52, drafter=chain)
  assert np.asarray(out.tokens_BxO[0]).tolist() == LM.greedy(16, 32)


def test_decode_refuses_or_cuts_more_new_tokens_than_the_output_buffer():
  with pytest.raises(InputError, match="row 0 asks for 40 new tokens, more than the output buffer of out_len=32"):
    _decode(decode, 128, max_new=40)  # concrete values: checked
  out = _decode(decode_jit, 128, max_new=40, drafter=OracleChain(LM, 3))  # traced: cut to out_len
  assert int(out.lengths_B[0]) == 32
  assert np.asarray(out.tokens_BxO[0]).tolist() == LM.greedy(16, 32)


def test_too_long_error_names_the_row_and_its_own_numbers():
  with pytest.raises(InputError, match=r"Prompt 1 \(3 tokens\) plus 200 new tokens needs 203 cache slots, more than "
                                       r"the cache length 150"):
    gen.prepare([[1] * 100, [2] * 3], [1, 200], 150, 0, 0)
  with pytest.raises(InputError, match="A prompt of 100 tokens plus 60 new tokens needs 160"):
    gen.prepare([[1] * 100], 60, 150, 0, 0)


def test_a_request_that_exactly_fills_the_cache_length_is_served(tiny):
  """`max_len` bounds a row's prompt plus new tokens inclusively: a row that needs exactly `max_len` slots is served
  (a mutation audit found refusing it passed every test), one that needs one more is refused."""
  gen.prepare([[1] * 100, [2] * 3], [1, 147], 150, 0, 0)
  with pytest.raises(InputError, match="Prompt 1 \\(3 tokens\\) plus 148 new tokens needs 151 cache slots"):
    gen.prepare([[1] * 100, [2] * 3], [1, 148], 150, 0, 0)
  model, params = tiny
  assert len(gen.generate(model, params, [[5, 6, 7]], max_new_tokens=5, max_len=8).tokens[0]) == 5
  with pytest.raises(InputError, match="needs 9 cache slots"):
    gen.generate(model, params, [[5, 6, 7]], max_new_tokens=6, max_len=8)


def test_the_last_value_each_limit_allows_is_served(tiny):
  """Each bound admits its last value and refuses the next (a mutation audit found refusing the last one passed every
  test): top_k up to the vocabulary, max_len up to the context length; prompts pad to the next power of two (a power
  of two is its own bucket); and a request whose prompt bucket and output buffer fill whole rounds of the cache still
  gets the slot past them that the loop needs."""
  model, params = tiny
  v, ctx = model.vocab_size, model.cfg.max_seq_len
  assert len(gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, temperature=1.0, top_k=v).tokens[0]) == 4
  with pytest.raises(InputError, match=f"top_k={v + 1} is more than the model's vocabulary"):
    gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, temperature=1.0, top_k=v + 1)
  assert len(gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, max_len=ctx).tokens[0]) == 4
  with pytest.raises(InputError, match=f"max_len={ctx + 1} is more than the model's context length"):
    gen.generate(model, params, [[5, 6, 7]], max_new_tokens=4, max_len=ctx + 1)
  assert [gen.bucket(n) for n in (1, 16, 17, 32, 33, 64, 65)] == [16, 16, 32, 32, 64, 64, 128]
  # 32 prompt slots + 96 output slots = 128, one CAPACITY_ROUND.
  assert len(gen.generate(model, params, [list(range(1, 21))], max_new_tokens=96).tokens[0]) == 96


# --- Counters ------------------------------------------------------------------------------------------------------


_FORWARDS = [0]


@dataclasses.dataclass(frozen=True)
class CountingLM(LlamaLM):
  """A LLaMA that counts its forwards as the compiled program runs them (a host callback per forward)."""

  def forward(self, params, tokens, positions, cache, mask, **kw):
    jax.debug.callback(lambda: _FORWARDS.__setitem__(0, _FORWARDS[0] + 1))
    return super().forward(params, tokens, positions, cache, mask, **kw)


def test_tree_drafter_calls_are_the_forwards_that_ran(tiny):
  model, params = tiny
  _, draft_params = make_tiny(1)
  depth = 6
  for threshold in (0.0, 100.0):  # 100 > any E[A] gain: growth stops after depth 2 every step
    _FORWARDS[0] = 0
    drafter = OptTreeDrafter(LMTreeSource(CountingLM(model.cfg)), nodes=8, depth=depth, width=2, branch=2,
                             threshold=threshold)
    res = gen.generate(model, params, [[1, 2, 3, 4]], max_new_tokens=20, drafter=drafter, draft_params=draft_params)
    jax.effects_barrier()
    ran = _FORWARDS[0] - 1  # the draft's prefill is not a step's call
    assert res.drafter_calls == ran
    assert int(res.drafter_stats["draft_forwards"]) == ran
    assert ran == (depth if threshold == 0 else 2) * res.target_calls


def test_eagle_tree_drafter_calls_follow_early_stops(tiny):
  model, params = tiny
  draft = EagleDraft(model.cfg, 1)
  draft_params = draft.init_params(jax.random.key(5), params)
  drafter = OptTreeDrafter(EagleTreeSource(draft, 2), nodes=8, depth=4, width=2, branch=2, threshold=100.0)
  res = gen.generate(model, params, [[1, 2, 3, 4], [7, 8]], max_new_tokens=10, drafter=drafter,
                     draft_params=draft_params)
  assert res.drafter_calls == 2 * res.target_calls  # one expansion and the update, not depth = 4


def test_accept_hist_counts_only_steps_of_active_rows():
  res = gen.generate(LM, None, [[9], [2]], max_new_tokens=[25, 5], drafter=OracleChain(LM, 3, wrong=(2,)))
  assert res.active_calls[0] > res.active_calls[1]  # row 1 idles for some steps
  np.testing.assert_array_equal(res.accept_hist.sum(axis=1), res.active_calls)
  assert not res.accept_hist[:, 0].any()  # an active row commits at least one token


def test_accept_hist_bins_whole_accepted_blocks_and_step_tokens_count_the_kept_ones():
  """The histogram measures the drafter: a last block cut by max_new_tokens or EOS is binned whole, and step_tokens
  (τ's numerator) counts what the output kept. Without a cut the two agree."""
  ends = LM.greedy(9, 40)
  for kw, cut in ((dict(max_new_tokens=[13, 9]), False), (dict(max_new_tokens=[7, 10]), True),
                  (dict(max_new_tokens=[30, 30], eos_ids=[ends[12]]), True)):
    res = gen.generate(LM, None, [[9], [2]], drafter=OracleChain(LM, 3), **kw)
    accepted = (res.accept_hist * np.arange(res.accept_hist.shape[1])).sum(axis=1)
    assert (accepted >= np.asarray(res.step_tokens)).all()
    assert (accepted > np.asarray(res.step_tokens)).any() == cut, kw
    assert (res.accept_hist[:, 4] > 0).all()  # the oracle's full blocks of 4


# --- Seeds ---------------------------------------------------------------------------------------------------------


def test_every_64_bit_seed_draws_its_own_samples():
  """`jax.random.key` keeps only a seed's low 32 bits (without 64-bit mode), so seeds 0 and 2**32, or -1 and
  2**32 - 1, drew the same samples. Seeds below 2**32 still give `jax.random.key(seed)`'s samples."""
  from jaxspec.decoding.sampling import seed_key

  def draw(seed):
    return gen.generate(LM, None, [[1, 2]] * 4, max_new_tokens=12, temperature=1.0, seed=seed).tokens

  seeds = [0, 2 ** 32, 2 ** 32 - 1, -1, 2 ** 62, -2 ** 62, 2 ** 63 - 1, -2 ** 63]
  drawn = [draw(s) for s in seeds]
  assert len({str(d) for d in drawn}) == len(seeds)
  assert draw(2 ** 32) == drawn[1]  # and each is reproducible
  for s in [0, 7, 2 ** 31 + 5, 2 ** 32 - 1]:
    assert np.array_equal(jax.random.key_data(seed_key(s)), jax.random.key_data(jax.random.key(s)))
  for s, words in [(2 ** 32, [1, 0]), (2 ** 32 + 9, [1, 9]), (-1, [2 ** 32 - 1] * 2), (-2 ** 63, [2 ** 31, 0])]:
    assert jax.random.key_data(seed_key(s)).tolist() == words  # 64-bit mode's key of the seed: one key per seed
  for bad, message in [(2 ** 63, r"seed 9223372036854775808 is out of range: use a whole number from -2\*\*63"),
                       (-2 ** 63 - 1, "out of range"), (1.5, "a seed must be a whole number, got 1.5")]:
    with pytest.raises(InputError, match=message):
      seed_key(bad)
    with pytest.raises(InputError, match="seed must be"):  # `generate` checks the same range first
      gen.generate(LM, None, [[1, 2]], max_new_tokens=4, temperature=1.0, seed=bad)


def test_with_another_key_implementation_every_64_bit_seed_still_has_its_own_key():
  """Key implementations other than threefry (here rbg) fold a seed's high word into the key of its low word: seeds
  0 and 2**32, or -1 and 2**32 - 1, get different keys, and a seed below 2**32 still gets `jax.random.key(seed)`."""
  from jaxspec.decoding.sampling import seed_key

  with jax.default_prng_impl("rbg"):
    seeds = [0, 2 ** 32, 2 ** 32 - 1, -1, 2 ** 62, -2 ** 62, 2 ** 63 - 1, -2 ** 63]
    keys = [seed_key(s) for s in seeds]
    assert {str(jax.random.key_impl(k)) for k in keys} == {"rbg"}
    assert len({str(jax.random.key_data(k).tolist()) for k in keys}) == len(seeds)
    for s in [0, 7, 2 ** 31 + 5, 2 ** 32 - 1]:
      assert np.array_equal(jax.random.key_data(seed_key(s)), jax.random.key_data(jax.random.key(s)))
