"""The T5-family encoder-decoder behind the decoding boundary: the cached decoder equals a full recomputation, every
method (BPD, draft models, Jacobi, draft trees, lookup) is token-identical to greedy on it, speculative sampling
on it samples the target's distribution, and BPD training reads its decoder states at the right rows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding import generate as gen
from jaxspec.decoding.accept import SampleAcceptance
from jaxspec.decoding.bpd import BPDDrafter, bpd_draft_params
from jaxspec.decoding.jacobi import JacobiDrafter
from jaxspec.decoding.lookup import LookupDrafter
from jaxspec.decoding.opt_tree import HeadsTreeSource, LMTreeSource, OptTreeDrafter
from jaxspec.decoding.sampling import SamplingParams, Warp
from jaxspec.decoding.speculative import DraftModelDrafter, vocab_check
from jaxspec.errors import InputError
from jaxspec.models.bpd import BPDConfig, BPDModel
from jaxspec.models.t5 import T5LM, relative_bucket, tiny_t5_config
from tests import test_speculative as spec_tests
from tests.conftest import make_tiny

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12] * 13]  # encoder inputs of different lengths
NEW = 20


def make_t5(seed: int = 0, scale: float = 6.0, **overrides):
  """A tiny random T5 whose output head is scaled up, so greedy choices are not near-ties."""
  model = T5LM(tiny_t5_config(**overrides))
  params = dict(model.init_params(jax.random.key(seed)))
  params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * scale}
  return model, params


@pytest.fixture(scope="module")
def t5():
  return make_t5(0)


@pytest.fixture(scope="module")
def t5_draft():
  return make_t5(1, n_enc_layers=1, n_dec_layers=1)


@pytest.fixture(scope="module")
def greedy_ref(t5):
  model, params = t5
  return gen.generate(model, params, PROMPTS, max_new_tokens=NEW).tokens


def test_relative_buckets_follow_t5():
  """Exact buckets near the query, log-spaced ones further, the far ones shared; bidirectional tables give keys
  after the query the upper half; causal tables send later keys to bucket 0."""
  rel = jnp.asarray([0, -1, -3, -4, -7, -8, -31, -32, -1000, 1, 5, 1000])
  causal = relative_bucket(rel, False, 8, 32).tolist()
  assert causal[:4] == [0, 1, 3, 4] and causal[-3:] == [0, 0, 0]
  assert causal[4] <= causal[5] <= causal[6] <= causal[7] == causal[8] == 7
  bi = relative_bucket(rel, True, 8, 32).tolist()
  assert bi[:2] == [0, 1] and bi[9] == 4 + 1 and bi[-1] == 7 and bi[8] == 3



@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_output_table_gives_the_model_s_logits(tied):
  """`output_table` (what BPD heads, subset heads and tree drafts score with) gives the model's own logits,
  hidden @ table.T; a tied head includes the original T5's d_model^-1/2 scaling of the hidden state."""
  model = T5LM(tiny_t5_config(tie_embeddings=tied))
  params = model.init_params(jax.random.key(0))
  hidden = jax.random.normal(jax.random.key(1), (1, 3, model.cfg.d_model))
  table = model.output_table(params)
  assert table.shape == (model.vocab_size, model.cfg.d_model)
  np.testing.assert_allclose(model.logits(params, hidden), hidden @ table.T, rtol=1e-5, atol=1e-5)

def test_cached_greedy_equals_full_recomputation(t5, greedy_ref):
  """The loop's cached decoder (encoder once, one token per step) against re-running the whole decoder on the
  growing output every step, for a ragged batch."""
  model, params = t5
  step = jax.jit(model.teacher_forced)  # one shape: the decoder input is padded (causal, so the padding is unseen)
  for prompt, got in zip(PROMPTS, greedy_ref):
    src = jnp.asarray([prompt + [0] * (16 - len(prompt))])
    dec = np.zeros((1, NEW + 1), np.int32)
    dec[0, 0] = model.cfg.decoder_start_id
    for j in range(NEW):
      logits, _ = step(params, src, jnp.asarray([len(prompt)]), jnp.asarray(dec))
      dec[0, j + 1] = int(jnp.argmax(logits[0, j]))
    assert got == dec[0, 1:].tolist()
  assert len({tuple(t) for t in greedy_ref}) == len(PROMPTS)


def test_the_decoder_cache_is_sized_by_the_decoder_not_the_encoder_input(t5, t5_draft):
  """The decoder's self-attention cache holds the start token and the output: an encoder input longer than
  max_seq_len (512 here) decodes, with a cache of the same size as a short one's. It was sized as if the source were
  in it: 7x the cost per step for long sources, and sources past max_seq_len refused."""
  model, params = t5
  long_src = ([7, 8, 9, 10, 11, 12] * 110)[:640]
  assert len(long_src) > model.cfg.max_seq_len
  *_, cap_long = gen.prepare([long_src], 8, 512, 4, 0, decoder_prompt_len=model.decoder_prompt_len)
  *_, cap_short = gen.prepare([[3, 4]], 8, 512, 4, 0, decoder_prompt_len=model.decoder_prompt_len)
  assert cap_long == cap_short < len(long_src)
  res = gen.generate(model, params, [long_src, [3, 4]], max_new_tokens=8)
  src = jnp.asarray([long_src])
  dec = np.zeros((1, 9), np.int32)
  dec[0, 0] = model.cfg.decoder_start_id
  for j in range(8):
    logits, _ = model.teacher_forced(params, src, jnp.asarray([len(long_src)]), jnp.asarray(dec))
    dec[0, j + 1] = int(jnp.argmax(logits[0, j]))
  assert res.tokens[0] == dec[0, 1:].tolist()
  # The decoder's tokens are what max_len bounds.
  with pytest.raises(InputError, match=r"The decoder's start token plus 600 new tokens needs 601 cache slots, more "
                                       r"than the cache length 512: lower max_new_tokens, or raise max_len\.$"):
    gen.generate(model, params, [[3, 4]], max_new_tokens=600)


@pytest.mark.slow  # five more programs; the default run checks each method on short sources (above)
def test_methods_decode_an_encoder_input_longer_than_the_cache(t5, t5_draft):
  """Drafters on a source past max_seq_len: lookup still copies from the source (its context buffer holds the
  source and the output), a T5 draft has its decoder-sized cache too, and a decoder-only draft of the same vocabulary
  prefills on the whole source (its own cache holds it)."""
  model, params = t5
  long_src = ([7, 8, 9, 10, 11, 12] * 110)[:640]
  res = gen.generate(model, params, [long_src, [3, 4]], max_new_tokens=8)
  for name in ("lookup", "spec-draft", "tree-draft"):
    drafter, dp = methods(t5, t5_draft)[name]
    assert gen.generate(model, params, [long_src, [3, 4]], max_new_tokens=8, drafter=drafter,
                        draft_params=dp).tokens == res.tokens, name
  llama, llama_params = make_tiny(1, vocab_size=model.vocab_size)
  for drafter in (DraftModelDrafter(llama, 3),
                  OptTreeDrafter(LMTreeSource(llama), nodes=8, depth=3, width=2, branch=3)):
    assert gen.generate(model, params, [long_src, [3, 4]], max_new_tokens=8, drafter=drafter,
                        draft_params=llama_params).tokens == res.tokens


def random_heads(model, k: int, seed: int = 1):
  bpd = BPDModel(BPDConfig(num_heads=k, d_model=model.cfg.d_model, d_hidden=16))
  p = bpd.init_params(jax.random.key(seed))
  p["heads"]["w_out"] = jax.random.normal(jax.random.key(seed + 1), p["heads"]["w_out"].shape) * 0.5
  return bpd, p


def methods(t5, t5_draft):
  model, params = t5
  draft, draft_params = t5_draft
  bpd, hp = random_heads(model, 3)
  heads = bpd_draft_params(model, params, bpd, hp)
  return {
      "bpd": (BPDDrafter(bpd), heads),
      "spec-self": (DraftModelDrafter(model, 4), params),  # the target as its own draft: every draft accepted
      "spec-draft": (DraftModelDrafter(draft, 3), draft_params),
      "jacobi": (JacobiDrafter(window=4), None),
      "lookup": (LookupDrafter(num_nodes=4), None),
      "tree-heads": (OptTreeDrafter(HeadsTreeSource(bpd), nodes=8, depth=3, width=2, branch=3), heads),
      "tree-draft": (OptTreeDrafter(LMTreeSource(draft), nodes=8, depth=3, width=2, branch=3), draft_params),
      # The target as its own tree draft: its top path is accepted whole, so compaction runs on every step.
      "tree-self": (OptTreeDrafter(LMTreeSource(model), nodes=8, depth=3, width=2, branch=3), params),
  }


# The random draft's chain and tree (never accepted) are slow: spec-self and tree-self run the same drafters on a T5
# draft, and tests/test_t5_numbers.py runs both with a separate (trained, accepted) T5 draft.
@pytest.mark.parametrize("name", ["bpd", "spec-self", pytest.param("spec-draft", marks=pytest.mark.slow), "jacobi",
                                  "lookup", "tree-heads", pytest.param("tree-draft", marks=pytest.mark.slow),
                                  "tree-self"])
def test_methods_are_token_identical_to_greedy(t5, t5_draft, greedy_ref, name):
  model, params = t5
  drafter, dp = methods(t5, t5_draft)[name]
  res = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, drafter=drafter, draft_params=dp)
  assert res.tokens == greedy_ref
  if name == "spec-self":
    assert res.tau > 4.0  # 4 drafts + the bonus token per call, but for the last, cut steps
  if name == "tree-self":
    assert res.tau > 3.0  # a path of 3 + the bonus token per call, but for the last, cut steps


def test_draft_with_another_vocabulary_is_rejected(t5):
  other, _ = make_t5(2, vocab_size=200)
  with pytest.raises(InputError, match="vocabular"):
    vocab_check(t5[0], other)


def test_eos_ends_rows_independently(t5, greedy_ref):
  """An EOS that one row emits early ends that row only; drafts do not change where."""
  model, params = t5
  eos = greedy_ref[0][3]
  want = [row[:row.index(eos) + 1] if eos in row else row for row in greedy_ref]
  bpd, hp = random_heads(model, 3)
  for drafter, dp in [(None, None), (BPDDrafter(bpd), bpd_draft_params(model, params, bpd, hp))]:
    got = gen.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_ids=[eos], drafter=drafter, draft_params=dp)
    assert got.tokens == want


# ---- exact sampling on the encoder-decoder ---------------------------------------------------------------------

V, N_NEW, SRC = 8, 3, [3, 1, 4, 1, 5]


def small_t5(seed: int):
  return make_t5(seed, scale=1.5, vocab_size=V, n_enc_layers=1, n_dec_layers=1)


def test_speculative_sampling_on_t5_samples_the_target():
  """10^5 speculative samples (a different tiny T5 drafting) against the target's exact distribution over all V^3
  continuations of one source, by χ²; the same harness fails a broken rule (tests/test_speculative.py)."""
  (model, params), (draft, draft_params) = small_t5(0), small_t5(1)
  conts = np.asarray(list(itertools.product(range(V), repeat=N_NEW)), np.int32)
  n = len(conts)
  dec_in = np.concatenate([np.zeros((n, 1), np.int32), conts[:, :-1]], axis=1)
  logits, _ = jax.jit(model.teacher_forced)(params, jnp.asarray(np.tile(SRC, (n, 1))), jnp.full((n,), len(SRC)),
                                            jnp.asarray(dec_in))
  warp, sp = Warp(), SamplingParams.make(1.0, 1.0)
  probs_NxKxV = np.asarray(warp.probs(logits, sp), np.float64)
  probs = np.prod(np.take_along_axis(probs_NxKxV, conts[:, :, None], axis=-1)[..., 0], axis=-1)
  probs /= probs.sum()
  assert probs.max() < 0.2  # spread out: a test with power
  old = spec_tests.PROMPT
  spec_tests.PROMPT = SRC
  try:
    counts = spec_tests.drafter_sample_counts((model, params), DraftModelDrafter(draft, 2, warp, greedy=False),
                                              draft_params, 1.0, 1.0, SampleAcceptance(warp))
  finally:
    spec_tests.PROMPT = old
  assert spec_tests.chi2_pvalue(counts, probs) > 1e-3


# ---- BPD training data on the encoder-decoder ------------------------------------------------------------------

def test_bpd_training_reads_decoder_states_at_the_right_rows(t5, greedy_ref):
  """For source + greedy output sequences, row t of the states the head trainer sees must predict token t + 1:
  the target's own argmax there is the next output token, for every row from the end of the source on."""
  from training import datasets
  from training.bpd import final_hidden_states, head_examples

  model, params = t5
  seqs = datasets.Sequences([np.asarray(p + g, np.int32) for p, g in zip(PROMPTS, greedy_ref)],
                            np.asarray([len(p) for p in PROMPTS]))
  hidden = final_hidden_states(model, params, seqs, batch_size=2, progress=False)
  for toks, h, p in zip(seqs.tokens, hidden, seqs.prompt_lens):
    assert h.shape == (len(toks), model.cfg.d_model)
    pred = np.asarray(jnp.argmax(model.logits(params, jnp.asarray(h[p - 1:-1])[None])[0], -1))
    np.testing.assert_array_equal(pred, toks[p:])
  ex = head_examples(seqs, hidden, 2, None)
  assert len(ex) == sum(len(t) - p - 1 for t, p in zip(seqs.tokens, seqs.prompt_lens))


# BPD and the draft model are slow-marked for time (run before resolving); drafters on a mesh run by default in
# tests/test_sharding.py.
@pytest.mark.parametrize("name", ["greedy", pytest.param("bpd", marks=pytest.mark.slow),
                                  pytest.param("spec-draft", marks=pytest.mark.slow),
                                  pytest.param("spec-self", marks=pytest.mark.slow)])
def test_sharded_decoding_equals_one_device(t5, t5_draft, greedy_ref, name):
  """On a data=2 x model=4 mesh (the cross-attention cache split like the self-attention cache) greedy, BPD and a
  draft model give the 1-device tokens. The small random draft is almost never right, so the target drafting for
  itself (every draft accepted) covers the draft cache's rollback after accepted drafts on the mesh."""
  model, params = t5
  drafter, dp = methods(t5, t5_draft).get(name, (None, None))
  res = gen.generate(model, params, PROMPTS + [[1, 2]], max_new_tokens=NEW, drafter=drafter, draft_params=dp,
                     mesh="data=2,model=4")
  assert res.tokens[:3] == greedy_ref, name
  if name == "spec-self":
    assert res.tau > 4.0


def test_decoder_cache_is_updated_in_place(t5):
  from tests.test_model import cache_buffer_copies
  model, params = t5
  src = jnp.asarray([p + [0] * (13 - len(p)) for p in PROMPTS], jnp.int32)
  lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
  _, _, cache = model.start(params, src, lengths, model.init_cache(3, 64, source_len=13))
  cache = cache.advance(jnp.full((3,), 5, jnp.int32))
  assert cache_buffer_copies(model, params, cache) == []


def test_draft_tree_nodes_get_their_paths_probabilities():
  """A T5 draft tree grown depth by depth keeps several nodes per depth in slots past the committed ones, so a node's
  slot is not its position; the decoder's relative bias must read the positions. The tree's E[A] (the sum of its
  nodes' path probabilities) must then equal the one plain chain forwards over each node's path give. With the slot
  index as position, nodes of depth >= 3 got other probabilities (logits off by up to ~0.5)."""
  import types

  from jaxspec.decoding.protocol import PrefillInfo

  model, params = make_t5(0)  # peaked enough that the best 12 nodes reach depth 3 and 4
  drafter = OptTreeDrafter(LMTreeSource(model), nodes=12, depth=4, width=3, branch=3)
  src, first, cap = [5, 6, 7, 8, 9, 10, 11], 17, 48
  info = PrefillInfo(jnp.asarray([src], jnp.int32), jnp.asarray([len(src)], jnp.int32), jnp.zeros((1, 1)),
                     jnp.zeros((1, model.vocab_size)), jnp.asarray([first], jnp.int32), capacity=cap)
  loop = types.SimpleNamespace(pending_B=jnp.asarray([first], jnp.int32), sp=SamplingParams.make(0.0),
                               active_B=jnp.asarray([True]))
  # (jitted: op by op, the tree's growth compiled each small operation on its own, most of this test's time)
  draft, state = jax.jit(lambda p: drafter.propose(p, drafter.init(p, info), loop))(params)
  tokens, parents, depth = (np.asarray(x[0]) for x in (draft.tokens_BxN, draft.parent_BxN, draft.depth_BxN))
  assert (depth >= 3).sum() >= 2  # nodes whose ancestors sit in slots other than their positions

  def path(i):
    out = []
    while i >= 0:
      out.append(int(tokens[i]))
      i = int(parents[i])
    return out[::-1]

  cache = model.init_cache(1, cap, source_len=len(src))
  _, _, cache = model.start(params, jnp.asarray([src]), jnp.asarray([len(src)]), cache)
  # Each node's path as one plain chain, padded to one length (a causal chain's logits do not see what follows),
  # so one compiled forward serves every node.
  chains = [[model.cfg.decoder_start_id, first] + path(i) for i in range(len(tokens))]
  width = max(map(len, chains))
  chain_forward = jax.jit(lambda chain_1xW: jax.nn.log_softmax(model.forward(
      params, chain_1xW, jnp.arange(width)[None], cache, jnp.tril(jnp.ones((1, width, width), bool)))[0][0]))
  want = 0.0
  for chain in chains:
    n = len(chain)
    logp = np.asarray(chain_forward(jnp.asarray([chain + [0] * (width - n)])))
    want += float(np.exp(sum(logp[j, chain[j + 1]] for j in range(1, n - 1))))
  got = float(np.asarray(state.expected_accept_DxN)[-1, -1])
  assert got == pytest.approx(want, rel=1e-4)


def test_decoder_only_training_on_a_t5_is_refused_before_the_data(t5, tmp_path):
  """BPD's joint objective and the EAGLE draft train decoder-only targets: on a T5 each says so, and what to train
  instead, before the data (the longest part) is built."""
  import dataclasses

  from training.bpd import BPDTrainConfig, train_bpd
  from training.config import ConfigError
  from training.eagle import EagleTrainConfig, train_eagle

  model, params = t5
  bpd = BPDTrainConfig()
  joint = dataclasses.replace(bpd, out=str(tmp_path / "heads"),
                              data=dataclasses.replace(bpd.data, dataset_dir=str(tmp_path / "data")),
                              train=dataclasses.replace(bpd.train, objective="joint", targets="tokens",
                                                        checkpoint_dir=str(tmp_path / "ckpt")))
  with pytest.raises(ConfigError, match="train.objective=joint trains decoder-only models; use train.objective=heads"):
    train_bpd(joint, model=model, params=params, tokenizer=None, progress=False)
  eagle = EagleTrainConfig()
  eagle = dataclasses.replace(eagle, out=str(tmp_path / "eagle"),
                              data=dataclasses.replace(eagle.data, dataset_dir=str(tmp_path / "data")),
                              train=dataclasses.replace(eagle.train, checkpoint_dir=str(tmp_path / "ckpt")))
  with pytest.raises(ConfigError, match=r"is a T5LM\. For an encoder-decoder \(T5\) target, train BPD heads") as e:
    train_eagle(eagle, model=model, params=params, tokenizer=None, progress=False)
  assert "scan_layers" not in str(e.value)
  assert not (tmp_path / "data").exists() and not (tmp_path / "ckpt").exists()


def test_the_rescorer_on_a_t5_asks_for_a_t5_draft(t5, tmp_path, monkeypatch):
  """The neural rescorer's LM for a T5 target is a smaller T5 (task seq2seq): `task: draft` refuses T5 targets, so the
  advice names the task that trains one."""
  from jaxspec.models.bpd import save_bpd
  from training import rescore
  from training.config import ConfigError
  from training.rescore import RescoreConfig, TuneSection, train_rescore

  model, params = t5
  monkeypatch.setattr(rescore, "build_sequences", lambda *a, **k: pytest.fail("built the data first"))
  bpd = BPDModel(BPDConfig(num_heads=3, d_model=model.cfg.d_model, d_hidden=8))
  save_bpd(tmp_path / "heads", bpd, bpd.init_params(jax.random.key(0)))
  cfg = RescoreConfig(out=str(tmp_path / "rescore"), heads=str(tmp_path / "heads"),
                      tune=TuneSection(k=3, neural_draft=str(tmp_path / "no_draft")))
  with pytest.raises(ConfigError, match=r"Set tune.neural_draft to a smaller T5 trained on the same task \(task: "
                                        r"seq2seq\), or to layerskip, or tune.neural=false"):
    train_rescore(cfg, model=model, params=params, tokenizer=None, progress=False)
