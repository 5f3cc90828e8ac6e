"""Blockwise parallel decoding: the drafter on the loop, exactness, head training, configs, the shipped heads."""

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.decoding.accept import GreedyAcceptance
from jaxspec.decoding.bpd import BPDDrafter, TopKAcceptance, bpd_draft_params
from jaxspec.decoding.generate import generate
from jaxspec.errors import InputError, ModelLoadError
from jaxspec.loading.hf import load_hf
from jaxspec.models.bpd import BPDConfig, BPDModel, load_bpd, save_bpd
from tests.conftest import assert_gates_mix, make_tiny
from tests.fakes import BigramLM
from tests.test_model import cache_copies
from training import bpd as bpd_training
from training import datasets
from training.bpd import BPDTrainConfig, load_bpd_config, train_bpd
from training.config import ConfigError

TINY_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class OracleHeads(BPDDrafter):
  """BPD whose heads are perfect: head i names the bigram model's greedy token i steps after the pending one."""

  lm: BigramLM = None

  def head_logits(self, draft_params, hidden_BxD, pending_B):
    nxt = jnp.argmax(jnp.asarray(self.lm.table), axis=-1)
    out, x = [], pending_B
    for _ in range(self.num_nodes):
      x = nxt[x]
      out.append(jax.nn.one_hot(x, self.lm.vocab_size))
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_oracle_heads_accept_k_plus_one_per_step(k):
  lm = BigramLM.random(19, seed=k)
  drafter = OracleHeads(BPDModel(BPDConfig(num_heads=k, d_model=19, use_next_token=False)), lm=lm)
  new = 1 + 3 * (k + 1)
  res = generate(lm, None, [[3], [5, 6]], max_new_tokens=new, drafter=drafter, draft_params={"bpd": {}})
  assert res.tokens == [lm.greedy(3, new), lm.greedy(6, new)]
  assert res.active_calls == [3, 3] and res.tau == k + 1
  assert res.accept_hist[:, k + 1].tolist() == [3, 3]


@dataclasses.dataclass(frozen=True)
class EveryOtherStep(OracleHeads):
  """Oracle heads that ask for verification on even steps only: odd steps must be one-token greedy steps."""

  def propose(self, draft_params, dstate, loop):
    draft, dstate = super().propose(draft_params, dstate, loop)
    b = loop.pending_B.shape[0]
    return draft.replace(verify_B=jnp.full((b,), loop.step % 2 == 0)), dstate


def test_gated_steps_verify_only_the_pending_token():
  k, lm = 3, BigramLM.random(19, seed=4)
  drafter = EveryOtherStep(BPDModel(BPDConfig(num_heads=k, d_model=19, use_next_token=False)), lm=lm)
  new = 1 + 3 * (k + 1) + 3  # 3 verified steps of k + 1 and 3 gated steps of 1
  res = generate(lm, None, [[3], [5, 6]], max_new_tokens=new, drafter=drafter, draft_params={"bpd": {}})
  assert res.tokens == [lm.greedy(3, new), lm.greedy(6, new)]
  assert res.accept_hist[:, k + 1].tolist() == [3, 3] and res.accept_hist[:, 1].tolist() == [3, 3]


# With buckets the gate's conditional holds more (the bucket switch in both branches); the setting without them runs
# with -m slow (the gated loop without buckets is checked for trees, copies and draft models in the default run).
@pytest.mark.parametrize("bucket", [pytest.param(None, marks=pytest.mark.slow), 16])
def test_gated_bpd_equals_greedy_on_tiny_model(tiny, monkeypatch, bucket):
  """Gates between the steps' scores (the expected accepted tokens, 0 to k): some steps verify the heads' block, the
  others are one-token steps, so a row takes more calls than ungated and fewer than never verifying; the tokens are
  greedy decoding's in every setting. Rows run alone, since in a batch one row asking to verify verifies all. Also
  with cache buckets (from 16 slots): the gate's conditional then holds the bucket switch in both branches."""
  from jaxspec.decoding import generate as gen

  model, params = tiny
  bpd, p = random_heads(tiny, 4)
  dp = bpd_draft_params(model, params, bpd, p)
  prompts = [[1, 2, 3], [7] * 9, [100, 5]]
  greedy = generate(model, params, prompts, max_new_tokens=40)
  if bucket:
    monkeypatch.setattr(gen, "BUCKET_SMALLEST", bucket)
  calls = {}
  # These random heads are flat (scores about 0.01 to 0.03) yet their first token is often right; 4.0 = k: no step's
  # score reaches it. (Calls here: 84 ungated, 85 / 115 / 116 at 0.01 / 0.015 / 0.02, 117 never verifying; each gate
  # compiles its own loop, so only 0.015 runs between the ends: 0.01 and 0.02 mixed the same way.)
  for g in (0.0, 0.015, 4.0):
    runs = [generate(model, params, [prompt], max_new_tokens=40, drafter=BPDDrafter(bpd, gate=g), draft_params=dp,
                     buckets=bucket is not None) for prompt in prompts]
    assert [r.tokens[0] for r in runs] == greedy.tokens, g
    calls[g] = sum(r.target_calls for r in runs)
  print("target calls by gate:", calls)
  assert calls[4.0] == 3 * 39  # one-token steps only
  assert_gates_mix(calls)


def test_gated_loop_does_not_copy_the_cache(tiny):
  """The gate's lax.cond runs forwards that return their new keys and values; the cache is written after it. When
  the branches wrote the cache themselves, XLA copied every cache buffer in and out of them on every step."""
  from jaxspec.decoding import generate as gen

  model, params = tiny
  bpd, p = random_heads(tiny, 4)
  before = set(gen._PROGRAMS)
  generate(model, params, [[1, 2, 3]], max_new_tokens=12, drafter=BPDDrafter(bpd, gate=0.3),
           draft_params=bpd_draft_params(model, params, bpd, p))
  (key,) = set(gen._PROGRAMS) - before
  k, h = model.cfg.n_kv_heads, model.cfg.head_dim
  # Buffers of 10+ slots (the caches), not the T-slot blocks of new entries.
  hlo, cache_shape = gen._PROGRAMS[key][0].as_text(), rf"f32\[1,{k},({h},\d\d+|\d\d+,{h})\]"
  assert re.search(cache_shape, hlo), "the program no longer shows the cache buffers: update the shape"
  copies = cache_copies(hlo, cache_shape)
  loop_copies = [c for c in copies if not c[0].startswith("main")]  # the entry makes the zero-filled caches once
  assert loop_copies == [], loop_copies[:3]


@dataclasses.dataclass(frozen=True)
class NoGaps(GreedyAcceptance):
  """An acceptance rule that does not declare it can skip unproposed (-1) tokens."""

  handles_unproposed = False


def test_gated_draft_needs_a_rule_that_skips_unproposed_tokens(tiny):
  model, params = tiny
  bpd, p = random_heads(tiny, 2)
  with pytest.raises(ValueError, match="unproposed"):
    generate(model, params, [[1, 2]], max_new_tokens=8, drafter=BPDDrafter(bpd, gate=0.5), acceptor=NoGaps(),
             draft_params=bpd_draft_params(model, params, bpd, p))


def random_heads(tiny, k, use_next_token=True, seed=1):
  model, params = tiny
  bpd = BPDModel(BPDConfig(num_heads=k, d_model=model.cfg.d_model, d_hidden=16, use_next_token=use_next_token))
  p = bpd.init_params(jax.random.key(seed))
  # Nonzero output weights, so the heads make real (mostly wrong) guesses instead of repeating the base prediction.
  p["heads"]["w_out"] = jax.random.normal(jax.random.key(seed + 1), p["heads"]["w_out"].shape) * 0.5
  return bpd, p


@pytest.mark.parametrize("k,use_next", [(2, True), (5, False)])
def test_bpd_equals_greedy_on_tiny_model(tiny, k, use_next):
  model, params = tiny
  bpd, p = random_heads(tiny, k, use_next)
  prompts = [[1, 2, 3], [7] * 9, [100, 5]]
  greedy = generate(model, params, prompts, max_new_tokens=40)
  res = generate(model, params, prompts, max_new_tokens=40, drafter=BPDDrafter(bpd),
                 draft_params=bpd_draft_params(model, params, bpd, p))
  assert res.tokens == greedy.tokens
  assert res.accept_hist[:, 2:].sum() > 0  # some drafted tokens were accepted (τ 1.29 and 1.65 here)


def test_heads_read_the_pending_tokens_embedding(tiny):
  """With `use_next_token` each row's heads read h_t and the embedding of that row's pending token (the target's choice
  at t + 1): their logits are the heads' states for that embedding through the target's output table. (A mutation
  audit found heads fed another token's embedding passed every test: the trained heads' targets follow from h_t.)"""
  model, params = tiny
  bpd, p = random_heads(tiny, 3)
  drafter = BPDDrafter(bpd)
  dp = bpd_draft_params(model, params, bpd, p)
  hidden = jax.random.normal(jax.random.key(0), (2, model.cfg.d_model))
  pending = jnp.asarray([5, 200], jnp.int32)
  got = np.asarray(drafter.head_logits(dp, hidden, pending))
  want = bpd.head_states(p, hidden, model.input_table(params)[pending]) @ model.output_table(params).T
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, drafter.head_logits(dp, hidden, pending[::-1]), atol=1e-3)


def test_approximate_acceptance_keeps_target_top_k_tokens(tiny):
  model, params = tiny
  bpd, p = random_heads(tiny, 3)
  dp = bpd_draft_params(model, params, bpd, p)
  exact = generate(model, params, [[4, 8, 15]], max_new_tokens=30, drafter=BPDDrafter(bpd), draft_params=dp)
  approx = generate(model, params, [[4, 8, 15]], max_new_tokens=30, drafter=BPDDrafter(bpd), draft_params=dp,
                    acceptor=TopKAcceptance(top_k=TINY_VOCAB))
  # With k = the whole vocabulary every drafted token is accepted: k + 1 tokens per call.
  # The prefill gives the first of the 30 tokens; every step after it accepts all 3 drafts and adds the target's own.
  assert list(approx.step_tokens) == [29] and list(approx.active_calls) == [-(-29 // 4)]
  assert approx.accept_hist[0].tolist() == [0, 0, 0, 0, -(-29 // 4)]
  assert approx.tau > exact.tau
  assert not TopKAcceptance.lossless


class ByteTokenizer:
  chat_template = None
  eos_id = None
  pad_id = 0

  def encode(self, text, add_bos=None):
    return [1 + ord(c) % (TINY_VOCAB - 1) for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return " ".join(map(str, ids))


def tiny_train_config(tmp_path, write_prompts=True, **train):
  """A BPD run of the tiny target in `tmp_path`, with its prompt file (written there unless `write_prompts=False`,
  for processes that share a folder another wrote it to)."""
  prompts = tmp_path / "prompts.jsonl"
  words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
  if write_prompts:
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"{w} {i} {w[::-1]}"]})
                                 for i, w in enumerate(words * 4)) + "\n")
  base = BPDTrainConfig()
  return dataclasses.replace(
      base, out=str(tmp_path / "heads"),
      heads=dataclasses.replace(base.heads, num_heads=3, d_hidden=32),
      data=dataclasses.replace(base.data, prompts=str(prompts), max_new_tokens=48, dataset_dir=str(tmp_path / "data"),
                               eval_fraction=0.1),
      optim=dataclasses.replace(base.optim, lr=3e-3, total_steps=train.get("steps", 150), warmup_steps=10),
      train=dataclasses.replace(base.train, batch_size=128, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=50,
                                eval_every=50, log_every=10, **train))


def test_head_training_lowers_loss_and_speeds_up_decoding(tmp_path):
  # A target whose next token is a varied function of the current one: fresh heads (which start as the base's
  # next-token head) get none of the later tokens right, trained ones most, on held-out prompts too.
  model, params = make_tiny(embed_scale=1.5, attend=False)
  cfg = tiny_train_config(tmp_path, steps=150)
  summary = train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  metrics = [json.loads(l) for l in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  train_loss = [m["loss"] for m in metrics if "loss" in m]
  assert train_loss[-1] < 0.5 * train_loss[0]
  # The exported heads name their target: loading them for another model is refused.
  load_bpd(cfg.out, target_params=params)
  with pytest.raises(ModelLoadError, match="trained for another model"):
    load_bpd(cfg.out, target_params=make_tiny(3)[1])
  before, after = summary["init_eval"], summary["final_eval"]  # the same held-out prompts, before and after
  assert set(before) == set(after) and before["step"] == 0 and after["step"] == 150
  for h in (1, 2, 3):
    assert before[f"eval/acc_h{h}"] < 0.1 and after[f"eval/acc_h{h}"] > 0.6, (before, after)
  assert after["eval/loss"] < 0.5 * before["eval/loss"]
  bpd, p = load_bpd(tmp_path / "heads")
  assert bpd.num_heads == 3 and bpd.cfg.vocab_subset > 0
  prompts = [ByteTokenizer().encode("kilo 99 olik"), ByteTokenizer().encode("alpha 3 ahpla")]
  greedy = generate(model, params, prompts, max_new_tokens=48)
  res = generate(model, params, prompts, max_new_tokens=48, drafter=BPDDrafter(bpd),
                 draft_params=bpd_draft_params(model, params, bpd, p))
  assert all(len(set(t)) > 10 for t in greedy.tokens)  # varied text, not one token repeated
  assert res.tokens == greedy.tokens
  assert res.tau > 2.0, res.tau  # fresh heads: 1.0
  # Fewer heads from the same file: the first heads, still exact.
  bpd2, p2 = load_bpd(tmp_path / "heads", num_heads=2)
  res2 = generate(model, params, prompts, max_new_tokens=48, drafter=BPDDrafter(bpd2),
                  draft_params=bpd_draft_params(model, params, bpd2, p2))
  assert bpd2.num_heads == 2 and res2.tokens == greedy.tokens
  assert 1 < res2.tau < res.tau  # the two heads kept still get drafts accepted, fewer than three heads


def test_teacher_targets_are_the_targets_own_predictions(tmp_path):
  """With train.targets=teacher each head learns the target's distribution at the position that predicted its token:
  on greedy data the teacher's top-1 there is that token, for every head and every valid example (so the rows line
  up), and the heads trained on it decode exactly and get drafts accepted."""
  model, params = make_tiny(embed_scale=1.5, attend=False)  # learnable: fresh heads agree with none of it
  cfg = tiny_train_config(tmp_path, steps=100, targets="teacher")
  summary = train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  seqs = datasets.load_sequences(tmp_path / "data")
  hidden = bpd_training.final_hidden_states(model, params, seqs, progress=False)
  ex = bpd_training.head_examples(seqs, hidden, 3, None, teacher=True)
  batch = ex.batch(np.arange(len(ex)))
  assert batch["teacher_hidden"].shape == (len(ex), 3, model.cfg.d_model)
  top1 = np.asarray(jnp.argmax(model.logits(params, jnp.asarray(batch["teacher_hidden"])), -1))
  valid = batch["targets"] >= 0
  assert valid.sum() > 1000 and (~valid).any()
  np.testing.assert_array_equal(top1[valid], batch["targets"][valid])
  final = summary["final_eval"]
  assert summary["init_eval"]["eval/agree_h1"] < 0.1 and summary["init_eval"]["eval/tau_teacher"] < 1.1
  assert final["eval/agree_h1"] > 0.3 and final["eval/tau_teacher"] > 1.3  # 0.40 and 1.53 when written
  assert abs(final["eval/agree_h1"] - final["eval/acc_h1"]) < 0.02  # greedy data: the token is the teacher's top-1
  bpd, p = load_bpd(tmp_path / "heads")
  prompts = [ByteTokenizer().encode("kilo 99 olik"), ByteTokenizer().encode("alpha 3 ahpla")]
  greedy = generate(model, params, prompts, max_new_tokens=48)
  res = generate(model, params, prompts, max_new_tokens=48, drafter=BPDDrafter(bpd),
                 draft_params=bpd_draft_params(model, params, bpd, p))
  assert res.tokens == greedy.tokens and res.tau > 1.2, res.tau  # 1.40 when written; fresh heads 1.0
  joint = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="joint"))
  with pytest.raises(ConfigError, match="train.targets=teacher"):
    train_bpd(joint, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)


def test_the_heads_vocabulary_comes_from_the_training_sequences_only(tmp_path):
  """Held-out text must not choose what the heads can name (found by a review: the subset was built from every
  sequence, held-out ones included). Each prompt carries a byte no other has, so the held-out prompts' bytes are
  left out of the exported subset; held-out targets outside it count as misses."""
  model, params = make_tiny(embed_scale=1.5, attend=False)
  words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
  (tmp_path / "prompts.jsonl").write_text("\n".join(
      json.dumps({"question_id": i, "category": "c", "turns": [f"{w} {i} {chr(128 + i)}"]})
      for i, w in enumerate(words * 4)) + "\n")
  cfg = tiny_train_config(tmp_path, write_prompts=False, steps=10)
  train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  train, held = datasets.load_sequences(cfg.data.dataset_dir).split(cfg.data.eval_fraction, seed=cfg.train.seed)
  seen = set(np.concatenate(train.tokens).tolist())
  assert set(np.concatenate(held.tokens).tolist()) - seen  # the held-out prompts' own bytes
  _, heads = load_bpd(cfg.out)
  assert set(np.asarray(heads["vocab_ids"]).tolist()) == seen


def test_training_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch):
  """The resumed run goes on from the checkpoint and reuses the target's hidden states cached by the first run."""
  model, params = tiny
  train_bpd(tiny_train_config(tmp_path, steps=50), model=model, params=params, tokenizer=ByteTokenizer(),
            progress=False)
  with np.load(tmp_path / "ckpt" / bpd_training.FEATURES_FILE) as z:
    cached = z["feats"]
  train, ev = datasets.load_sequences(tmp_path / "data").split(0.1, seed=0)  # the run's split: train rows first
  both = datasets.Sequences(train.tokens + ev.tokens, np.concatenate([train.prompt_lens, ev.prompt_lens]))
  fresh = bpd_training.final_hidden_states(model, params, both, progress=False)
  assert cached.shape[0] == len(both)
  for c, h in zip(cached, fresh):  # each sequence's states, to float16 precision, and zeros after its end
    np.testing.assert_allclose(c[:len(h)], h, atol=2e-3, rtol=2e-3)
    assert not c[len(h):].any()

  def recompute(*args, **kwargs):
    raise AssertionError("the resumed run recomputed the hidden states")

  monkeypatch.setattr(bpd_training, "final_hidden_states", recompute)
  summary = train_bpd(tiny_train_config(tmp_path, steps=100), model=model, params=params, tokenizer=ByteTokenizer(),
                      progress=False)
  steps = [json.loads(l)["step"] for l in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(steps) and steps[-1] == 100 and steps.count(10) == 1  # went on from 50, not from 0
  assert summary["final_eval"]


def test_joint_objective_trains_base_and_heads(tiny, tmp_path):
  model, params = tiny
  base = tiny_train_config(tmp_path, steps=30)
  cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, objective="joint", batch_size=4, seq_len=64))
  summary = train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert "eval/base_loss" in summary["final_eval"]
  metrics = [json.loads(l) for l in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  train_loss = [m["loss"] for m in metrics if "loss" in m]
  assert train_loss[-1] < train_loss[0]
  # The base was trained, not only the heads: the exported base is the tiny model with other weights.
  _, trained = load_hf(str(tmp_path / "heads" / "base"))
  before, after = jax.tree.leaves(params), jax.tree.leaves(trained)
  assert [x.shape for x in before] == [x.shape for x in after]
  assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(before, after))
  # The heads go with the tuned base, and say so on the base they started from.
  load_bpd(cfg.out, target_params=trained)
  with pytest.raises(ModelLoadError, match=r"heads in .* were trained for a target whose embedding has fingerprint "
                     r".*They were trained jointly with a fine-tuned base: they go with the base their run exported, "
                     r".*heads/base"):
    load_bpd(cfg.out, target_params=params)
  # The caller's params were not donated to the train step (the session fixture is used by later tests).
  assert all(not leaf.is_deleted() for leaf in before)


def test_joint_loss_ignores_what_lies_past_each_sequence(tiny):
  """The base gets no target after a sequence's last token and the heads none past it: whatever fills the padding,
  the joint loss and its metrics are the same (before, the base learned to emit the pad id after every answer)."""
  from training.draft import padded

  model, params = tiny
  bpd = BPDModel(BPDConfig(num_heads=3, d_model=model.cfg.d_model, use_next_token=True))
  trainable = {"base": params, "bpd": bpd.init_params(jax.random.key(0), None)}
  seqs = datasets.Sequences([np.arange(5, 12, dtype=np.int32), np.arange(20, 36, dtype=np.int32)],
                            np.array([2, 3], np.int32))
  tok, mask, _ = padded(seqs, 24, False)
  lengths = np.array([7, 16], np.int32)
  assert mask[0].tolist() == [0] + [1] * 5 + [0] * 18  # from the last prompt token to the second-to-last token
  loss_fn = jax.jit(bpd_training.joint_loss(model, bpd, 2.0))
  junk = np.where(np.arange(24)[None] < lengths[:, None], tok, 99)
  got = [loss_fn(trainable, {}, {"tokens": t, "mask": mask, "lengths": lengths}, None) for t in (tok, junk)]
  np.testing.assert_allclose(got[0][0], got[1][0], rtol=1e-6)
  for name in got[0][1]:
    np.testing.assert_allclose(got[0][1][name], got[1][1][name], rtol=1e-6, err_msg=name)
  # The joint loss (base + heads) is measured wherever the base is: its weight is the base's positions.
  assert int(got[0][1]["count/loss"]) == int(mask.sum()) == int(got[0][1]["count/base_loss"])


def test_subset_targets_mark_tokens_outside_the_heads_vocabulary_apart_from_padding():
  """-2 (a miss, no loss) for a real token the heads cannot name; -1 for padding."""
  vocab = np.array([3, 7, 9], np.int32)
  targets = np.array([[-1, 3, 4], [9, 10, 7]])
  want = [[-1, 0, -2], [2, -2, 1]]
  np.testing.assert_array_equal(bpd_training.subset_targets(np, vocab, targets), want)
  np.testing.assert_array_equal(bpd_training.subset_targets(jnp, jnp.asarray(vocab), jnp.asarray(targets)), want)


# Joint fine-tuning is an option that is not shipped: the default run keeps test_joint_objective_trains_base_and_heads.
@pytest.mark.slow
def test_joint_run_starts_from_trained_heads_and_scales_the_base_rate(tiny, tmp_path):
  """heads.init: the joint run starts from trained heads (their first num_heads), so its first steps already
  predict; base_lr_scale=0 leaves the base as it was while the heads go on training; heads that do not fit the
  config are a ConfigError naming what differs."""
  model, params = tiny
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  first = tiny_train_config(tmp_path / "a", steps=100)
  first = dataclasses.replace(first, data=dataclasses.replace(first.data, limit=8))  # a smaller vocabulary
  train_bpd(first, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  trained_dir = tmp_path / "a" / "heads"
  base = tiny_train_config(tmp_path / "b", steps=10)
  cfg = dataclasses.replace(
      base, heads=dataclasses.replace(base.heads, num_heads=2, init=str(trained_dir)),
      train=dataclasses.replace(base.train, objective="joint", batch_size=4, seq_len=64, base_lr_scale=0.0,
                                log_every=1))
  train_bpd(cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  metrics = [json.loads(l) for l in (tmp_path / "b" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  # Fresh heads start near 1/vocab; targets the heads cannot name (tokens of the new data) count as misses.
  assert metrics[0]["step"] == 1 and metrics[0]["acc_h1"] > 0.2
  # The frozen-base objective from the same heads, on data with tokens the heads never saw: the targets are mapped
  # to the heads' own vocabulary rows (the data's would misalign them), so it also starts where the heads were.
  data_vocab = np.unique(np.concatenate(datasets.load_sequences(tmp_path / "b" / "data").tokens))
  assert len(data_vocab) > len(np.asarray(load_bpd(trained_dir)[1]["vocab_ids"]))
  heads_cfg = dataclasses.replace(cfg, out=str(tmp_path / "c" / "heads"), train=dataclasses.replace(
      base.train, steps=5, log_every=1, checkpoint_dir=str(tmp_path / "c" / "ckpt")))
  train_bpd(heads_cfg, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  metrics = [json.loads(l) for l in (tmp_path / "c" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
  assert metrics[0]["step"] == 1 and metrics[0]["acc_h1"] > 0.2
  with pytest.raises(ConfigError, match="objective=joint only"):
    train_bpd(dataclasses.replace(heads_cfg, train=dataclasses.replace(heads_cfg.train, base_lr_scale=0.5)),
              model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  _, kept = load_hf(str(tmp_path / "b" / "heads" / "base"))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  start, p0 = load_bpd(trained_dir, num_heads=2)
  bpd, p1 = load_bpd(tmp_path / "b" / "heads")
  assert bpd.num_heads == 2
  np.testing.assert_array_equal(p0["vocab_ids"], p1["vocab_ids"])
  assert not np.allclose(p0["heads"]["w_in"], p1["heads"]["w_in"])
  wrong = dataclasses.replace(cfg, heads=dataclasses.replace(cfg.heads, d_hidden=16),
                              data=dataclasses.replace(cfg.data, dataset_dir=str(tmp_path / "d" / "data")),
                              train=dataclasses.replace(cfg.train, checkpoint_dir=str(tmp_path / "d" / "ckpt")))
  with pytest.raises(ConfigError, match="d_hidden=32"):
    train_bpd(wrong, model=model, params=params, tokenizer=ByteTokenizer(), progress=False)
  assert not (tmp_path / "d" / "data").exists()  # refused before the data is built, not after


def test_config_errors_name_the_key(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("task: bpd\nheads:\n  num_head: 4\n")
  with pytest.raises(ConfigError, match="heads.num_head"):
    load_bpd_config(path)
  path.write_text("task: bpd\ntrain:\n  steps: many\n")
  with pytest.raises(ConfigError, match="train.steps"):
    load_bpd_config(path)
  path.write_text("task: bpd\n")
  with pytest.raises(ConfigError, match="train.objective"):
    load_bpd_config(path, ["train.objective=both"])
  assert load_bpd_config(path, ["heads.num_heads=6"]).heads.num_heads == 6


def test_heads_compute_the_residual_layer_over_h_then_the_next_tokens_embedding():
  """Head i is h + W_out,i silu(W_in,i [h; e] + b_in,i), h first in W_in's rows (the layout of the shipped heads'
  files): checked against numpy with random weights. (A mutation audit found the heads reading [e; h] passed every
  test: training and decoding agree with each other either way, and the shipped heads still got some drafts
  accepted.)"""
  k, d, f = 3, 4, 5
  bpd = BPDModel(BPDConfig(num_heads=k, d_model=d, d_hidden=f))
  keys = jax.random.split(jax.random.key(0), 5)
  p = {"heads": {"w_in": jax.random.normal(keys[0], (k, 2 * d, f)), "b_in": jax.random.normal(keys[1], (k, f)),
                 "w_out": jax.random.normal(keys[2], (k, f, d))}}
  h, e = np.asarray(jax.random.normal(keys[3], (2, d))), np.asarray(jax.random.normal(keys[4], (2, d)))
  w_in, b_in, w_out = (np.asarray(p["heads"][n], np.float64) for n in ("w_in", "b_in", "w_out"))
  pre = np.einsum("nd,kdf->nkf", np.concatenate([h, e], axis=-1), w_in) + b_in
  want = h[:, None] + np.einsum("nkf,kfd->nkd", pre / (1 + np.exp(-pre)), w_out)
  np.testing.assert_allclose(bpd.head_states(p, jnp.asarray(h), jnp.asarray(e)), want, rtol=1e-4, atol=1e-4)


def test_bpd_config_takes_1_to_max_heads_heads():
  from jaxspec.models.bpd import MAX_HEADS

  assert BPDConfig(num_heads=MAX_HEADS, d_model=8).num_heads == MAX_HEADS == 16  # `bpd:k=16` is a valid method
  for k in (0, MAX_HEADS + 1):
    with pytest.raises(ValueError, match=f"num_heads must be in 1..{MAX_HEADS}, got {k}"):
      BPDConfig(num_heads=k, d_model=8)


def test_heads_over_a_vocabulary_subset_need_that_many_ids():
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=8, d_hidden=4, vocab_subset=3))
  assert bpd.init_params(jax.random.key(0), [4, 1, 7])["vocab_ids"].tolist() == [4, 1, 7]
  for ids in (None, [4, 1], [4, 1, 7, 9]):
    with pytest.raises(ValueError, match="vocab_subset=3 needs that many vocab_ids"):
      bpd.init_params(jax.random.key(0), ids)


def test_corrupt_or_missing_heads_are_clear_errors(tmp_path, tiny):
  with pytest.raises(ModelLoadError, match="does not hold BPD heads"):
    load_bpd(tmp_path)
  bpd, p = random_heads(tiny, 2)
  save_bpd(tmp_path, bpd, p)
  raw = (tmp_path / "heads.safetensors").read_bytes()
  (tmp_path / "heads.safetensors").write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ModelLoadError, match="unreadable"):
    load_bpd(tmp_path)
  # A config cut down by hand: a default taken for a missing field would misread the weights, so it is refused.
  save_bpd(tmp_path, bpd, p)
  assert load_bpd(tmp_path, num_heads=2)[0].num_heads == 2  # all of them
  for n in (0, 3):
    with pytest.raises(ModelLoadError, match=f"Asked for {n} heads; .* has 2: ask for 1 to 2"):
      load_bpd(tmp_path, num_heads=n)
  for n in ("2", 1.5, True):
    with pytest.raises(ModelLoadError, match=r"num_heads must be a whole number \(1 to 2 for .*\) or None for all"):
      load_bpd(tmp_path, num_heads=n)
  for n in (np.int64(1), jnp.int32(1), np.asarray(1), jnp.asarray(1)):  # any integer a caller holds (a JAX one too)
    bpd_n, heads_n = load_bpd(tmp_path, num_heads=n)
    assert type(bpd_n.cfg.num_heads) is int and bpd_n.num_heads == 1 and heads_n["heads"]["w_in"].shape[0] == 1
  for n in (np.bool_(True), jnp.asarray(True)):
    with pytest.raises(ModelLoadError, match="num_heads must be a whole number"):
      load_bpd(tmp_path, num_heads=n)
  config = json.loads((tmp_path / "config.json").read_text())
  del config["bpd"]["vocab_subset"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ModelLoadError, match="unreadable .*the config's 'bpd' section lacks vocab_subset"):
    load_bpd(tmp_path)


def test_shipped_heads_equal_greedy_on_default_model(default_model, default_greedy):
  from jaxspec.bench.methods import DEFAULT_BPD_HEADS

  model, params, tok = default_model
  prompts, greedy = default_greedy
  bpd, p = load_bpd(DEFAULT_BPD_HEADS, num_heads=4)
  assert bpd.cfg.d_model == model.cfg.d_model
  res = generate(model, params, prompts, max_new_tokens=40, eos_ids=[tok.eos_id], drafter=BPDDrafter(bpd),
                 draft_params=bpd_draft_params(model, params, bpd, p))
  assert res.tokens == greedy.tokens
  assert res.target_calls < greedy.target_calls  # the trained heads do get tokens accepted


@pytest.mark.slow  # one more compile of the default model; the gate's logic is covered on the tiny model
def test_shipped_heads_with_a_gate_equal_greedy_on_default_model(default_model, default_greedy):
  from jaxspec.bench.methods import DEFAULT_BPD_HEADS

  model, params, tok = default_model
  prompts, greedy = default_greedy
  bpd, p = load_bpd(DEFAULT_BPD_HEADS, num_heads=4)
  gated = generate(model, params, prompts, max_new_tokens=40, eos_ids=[tok.eos_id],
                   drafter=BPDDrafter(bpd, gate=0.8), draft_params=bpd_draft_params(model, params, bpd, p))
  assert gated.tokens == greedy.tokens
  assert gated.target_calls < greedy.target_calls  # the gate lets confident drafts through


def test_sampled_self_distillation_is_reproducible_and_splits_by_prompt(tmp_path, caplog):
  from jaxspec.models.llama import LlamaLM, tiny_config
  from training import datasets

  model = LlamaLM(tiny_config(vocab_size=TINY_VOCAB))  # spread-out next-token distributions: samples differ
  params = model.init_params(jax.random.key(0))
  texts = ["alpha 1", "bravo 22", "charlie 333", "delta 4444"]
  build = lambda out, **kw: datasets.self_distill(model, params, ByteTokenizer(), texts, out, max_new_tokens=12,
                                                  batch_size=5, shard_size=6, progress=False, **kw)
  seqs = build(tmp_path / "s", samples=3, temperature=1.0)
  assert len(seqs) == 12
  prompts = [tuple(t[:p]) for t, p in zip(seqs.tokens, seqs.prompt_lens)]
  assert sorted(set(prompts)) == sorted(tuple(ByteTokenizer().encode(x)) for x in texts)
  assert all(prompts.count(p) == 3 for p in set(prompts))
  assert len({tuple(t) for t in seqs.tokens}) > 4  # several different continuations of a prompt
  # A killed run redoes only its missing shard, and writes the same sequences (seeded by shard and batch).
  (tmp_path / "s" / "shard_00001.npz").unlink()
  with caplog.at_level("WARNING", logger="training.datasets"):
    again = build(tmp_path / "s", samples=3, temperature=1.0)
  assert [t.tolist() for t in again.tokens] == [t.tolist() for t in seqs.tokens]
  assert f"continuing the answers in {tmp_path / 's'}: 6 of 12 are there from an earlier run" in caplog.text
  # The batch size seeds the sampling: a killed folder goes on only at its own, and a finished one is read at any.
  other_batch = lambda: datasets.self_distill(model, params, ByteTokenizer(), texts, tmp_path / "s", max_new_tokens=12,
                                              batch_size=4, shard_size=6, progress=False, samples=3, temperature=1.0)
  assert [t.tolist() for t in other_batch().tokens] == [t.tolist() for t in seqs.tokens]
  (tmp_path / "s" / "shard_00001.npz").unlink()
  with pytest.raises(InputError, match=r"holds sampled answers drawn 5 prompts per batch \(data.gen_batch_size\), "
                                       r"which seeds the sampling: continue them with data.gen_batch_size=5"):
    other_batch()
  assert [t.tolist() for t in build(tmp_path / "s", samples=3, temperature=1.0).tokens] == [
      t.tolist() for t in seqs.tokens]
  for shard in (tmp_path / "s").glob("shard_*.npz"):  # no answer kept (e.g. out of memory in the first shard)
    shard.unlink()
  assert len(other_batch()) == 12 and json.loads((tmp_path / "s" / "meta.json").read_text())["batch_size"] == 4
  # Every sample of a prompt is on the same side of the split.
  train, ev = seqs.split(0.25)
  ev_prompts = {tuple(t[:p]) for t, p in zip(ev.tokens, ev.prompt_lens)}
  assert len(ev) == 3 and len(ev_prompts) == 1
  assert not ev_prompts & {tuple(t[:p]) for t, p in zip(train.tokens, train.prompt_lens)}
  # Another seed draws other answers to the same prompts, in a folder of its own.
  other = build(tmp_path / "s1", samples=3, temperature=1.0, seed=1)
  assert [tuple(t[:p]) for t, p in zip(other.tokens, other.prompt_lens)] == prompts
  assert sum(a.tolist() != b.tolist() for a, b in zip(other.tokens, seqs.tokens)) >= 6
  with pytest.raises(InputError, match="other settings"):
    build(tmp_path / "s", samples=3, temperature=1.0, seed=1)
  with pytest.raises(InputError, match="greedy answers"):
    build(tmp_path / "g", seed=1)
  with pytest.raises(InputError, match="temperature > 0"):
    build(tmp_path / "g", samples=2)
  with pytest.raises(InputError, match="other settings"):
    build(tmp_path / "s", samples=2, temperature=1.0)


def test_extra_dataset_dirs_add_finished_folders_only(tmp_path):
  from jaxspec.errors import InputError
  from jaxspec.models.llama import LlamaLM, tiny_config
  from training.bpd import DataSection

  model = LlamaLM(tiny_config(vocab_size=TINY_VOCAB))
  params = model.init_params(jax.random.key(0))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n"
                             for i, t in enumerate(["alpha 1", "bravo 22", "charlie 333"], 1)))
  data = lambda d, **kw: BPDTrainConfig(data=DataSection(prompts=str(prompts), max_new_tokens=8, gen_batch_size=2,
                                                         dataset_dir=str(tmp_path / d), samples=2, temperature=1.0,
                                                         **kw))
  tok = ByteTokenizer()
  build = lambda cfg: bpd_training.build_sequences(cfg, model, params, tok, progress=False)
  more = build(data("s1", seed=1))
  base = build(data("s0"))
  both = build(data("s0", extra_dataset_dirs=(str(tmp_path / "s1"),)))
  assert [t.tolist() for t in both.tokens] == [t.tolist() for t in base.tokens + more.tokens]
  assert list(both.prompt_lens) == list(base.prompt_lens) + list(more.prompt_lens)
  # Both answers of every prompt in each folder, and the folders' answers are not the same draws.
  assert len(both) == 12 and [t.tolist() for t in base.tokens] != [t.tolist() for t in more.tokens]
  # A folder a killed run left unfinished (its one shard holds 6 of the 8 answers its meta promises), or one that was
  # never built, is an error that says what to do.
  meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
  (tmp_path / "s1" / "meta.json").write_text(json.dumps({**meta, "num_prompts": 4}))
  with pytest.raises(InputError, match="stopped early"):
    build(data("s0", extra_dataset_dirs=(str(tmp_path / "s1"),)))
  with pytest.raises(InputError, match="not a self-distillation dataset"):
    build(data("s0", extra_dataset_dirs=(str(tmp_path / "nowhere"),)))


def test_more_prompts_add_their_greedy_continuations(tmp_path):
  from jaxspec.models.llama import LlamaLM, tiny_config
  from training.bpd import DataSection
  from training.config import ConfigError

  model = LlamaLM(tiny_config(vocab_size=TINY_VOCAB))
  params = model.init_params(jax.random.key(0))

  def prompt_file(name, texts):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n"
                            for i, t in enumerate(texts, 1)))
    return str(path)

  first = prompt_file("a.jsonl", ["alpha 1", "bravo 22"])
  more = prompt_file("b.jsonl", ["charlie 333", "delta 4444", "echo 5"])
  tok = ByteTokenizer()
  build = lambda **kw: bpd_training.build_sequences(
      BPDTrainConfig(data=DataSection(prompts=first, max_new_tokens=8, gen_batch_size=2, **kw)), model, params,
      tok, progress=False)
  base = build(dataset_dir=str(tmp_path / "a"))
  both = build(dataset_dir=str(tmp_path / "a"), more_prompts=more, more_dataset_dir=str(tmp_path / "b"),
               more_max_new_tokens=5)
  # The first file's sequences, then one greedy continuation of each added prompt, of the added length.
  assert [t.tolist() for t in both.tokens[:2]] == [t.tolist() for t in base.tokens]
  added = {tuple(t[:p].tolist()) for t, p in zip(both.tokens[2:], both.prompt_lens[2:])}
  assert added == {tuple(tok.encode(x)) for x in ["charlie 333", "delta 4444", "echo 5"]}
  assert max(len(t) - p for t, p in zip(both.tokens[2:], both.prompt_lens[2:])) == 5
  # data.limit takes the first prompts of each set: a smoke test of a two-set config stays small (the added set was
  # read whole before, 1300 prompts for configs/bpd_more_smollm2.yaml).
  small = build(dataset_dir=str(tmp_path / "c"), limit=1, more_prompts=more, more_dataset_dir=str(tmp_path / "d"),
                more_max_new_tokens=5)
  assert len(small.tokens) == 2 and tuple(small.tokens[1][:small.prompt_lens[1]].tolist()) == tuple(
      tok.encode("charlie 333"))
  # A prompt file with nowhere to write its answers fails when the config loads, before any generation.
  with pytest.raises(ConfigError, match="more_dataset_dir"):
    load_bpd_config(Path(__file__).parent.parent / "configs" / "bpd_smollm2.yaml", [f"data.more_prompts={more}"])


# ---- Sampling with BPD drafts ------------------------------------------------------------------------------------


# The gate reads the heads' scores after the first sampled token, so it splits the generations by that token. With
# these random heads a gate of 1.02 verifies the first step for about 85 % of the probability mass (29.5 % of the
# generations take their tokens in one call, against 34.9 % ungated) and 1.04 for about 6 % (2.0 %): between them
# both branches carry most of the mass in one of the runs (1.2 would verify none, and test nothing).
# Gate 0 (plain `bpd` sampling, the method users run) stays in the default run; 1.02 runs with -m slow.
@pytest.mark.parametrize("gate", [0.0, pytest.param(1.02, marks=pytest.mark.slow), 1.04])
def test_bpd_sampling_is_exact(gate):
  """`bpd` at temperature 1: the heads' argmax chain is a point-mass draft, verified by recursive rejection; 10^5
  generations follow the target's distribution (χ²). With a gate, each generation runs alone (vmapped), so both
  the verified and the one-token branch run, and fewer generations take all their tokens in one call."""
  from jaxspec.decoding.accept import SampleAcceptance
  from jaxspec.decoding.sampling import SamplingParams, Warp
  from tests.test_speculative import (assert_gate_skips_some_drafts, chi2_pvalue, drafter_sample_counts,
                                      exact_distribution, per_row_sample_counts, small_lm, stat_continuation_logits)

  target = small_lm(0)
  model, params = target
  bpd, p = random_heads(target, 2, seed=3)
  dp = bpd_draft_params(model, params, bpd, p)
  probs = exact_distribution(stat_continuation_logits(target), Warp(), SamplingParams.make(1.0))
  if gate:
    counts, calls = per_row_sample_counts(target, BPDDrafter(bpd, gate=gate), dp, SampleAcceptance())
  else:
    counts = drafter_sample_counts(target, BPDDrafter(bpd), dp, 1.0, 1.0, SampleAcceptance())
  pvalue = chi2_pvalue(counts, probs)
  print(f"bpd gate={gate}: p = {pvalue:.3g}")
  assert pvalue > 1e-3
  if gate:
    assert_gate_skips_some_drafts(target, BPDDrafter(bpd), dp, SampleAcceptance(), calls,
                                  at_most=0.9 if gate < 1.03 else 0.8)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
  """A config whose keys have drifted from the dataclasses fails here, not in a user's run."""
  from training.tasks import load_task_config

  cfg, _ = load_task_config(str(Path(__file__).parent.parent / "configs" / name))
  assert dataclasses.is_dataclass(cfg)


# ---- Stern's approximate acceptance below the whole vocabulary ---------------------------------------------------


def ranked_logits(ranked, vocab=10):
  """Logits `[B, T, V]` whose position (b, t) ranks the tokens `ranked[b][t]` first, second, ... (the others after
  them, in token order): distinct values, so every top-k set is unambiguous."""
  out = np.zeros((len(ranked), len(ranked[0]), vocab), np.float32)
  for b, row in enumerate(ranked):
    for t, order in enumerate(row):
      rest = [x for x in range(vocab) if x not in order]
      for rank, x in enumerate(list(order) + rest):
        out[b, t, x] = 10.0 - rank
  return jnp.asarray(out)


def test_top_k_acceptance_keeps_a_token_iff_it_is_in_the_target_top_k():
  """k=3 on hand-made logits: a drafted token is kept while it is within the target's top 3 at its position, the
  first one ranked 4th or lower ends the prefix, and the target's argmax there follows it."""
  from jaxspec.decoding.bpd import chain_draft
  from jaxspec.decoding.sampling import SamplingParams

  # Each position ranks (first, second, third, fourth); block index t holds the target's choice after t drafts.
  ranked = [[(1, 2, 3, 4), (5, 6, 7, 8), (2, 4, 6, 8), (9, 0, 1, 3), (7, 5, 3, 1)]] * 4  # the same in every row
  drafts = [[3, 6, 2, 1],  # ranks 3, 2, 1, 3: all kept, then the bonus token 7
            [2, 7, 8, 9],  # ranks 2, 3, then 4th: two kept, then the target's argmax 2 at block index 2
            [4, 5, 2, 9],  # the first is ranked 4th: none kept, the target's argmax 1 (then ranks 1, 1, 1)
            [1, 5, 0, 3]]  # ranks 1, 1, 5th, 4th: two kept, then 2
  acc = TopKAcceptance(top_k=3).accept(None, chain_draft(jnp.asarray(drafts, jnp.int32)), ranked_logits(ranked),
                                       SamplingParams.make(), is_chain=True)
  want = [[3, 6, 2, 1, 7], [2, 7, 2], [1], [1, 5, 2]]
  n = np.asarray(acc.n_commit_B).tolist()
  assert n == [len(w) for w in want]
  assert [np.asarray(acc.emitted_BxT[b, :n[b]]).tolist() for b in range(4)] == want
  assert np.asarray(acc.path_BxT).tolist() == [list(range(5))] * 4 and acc.is_prefix
  # The same drafts under k=2 and k=4: the 3rd-ranked tokens now end the prefix, the 4th-ranked ones are now kept.
  k2 = TopKAcceptance(top_k=2).accept(None, chain_draft(jnp.asarray(drafts, jnp.int32)), ranked_logits(ranked),
                                      SamplingParams.make(), is_chain=True)
  assert np.asarray(k2.n_commit_B).tolist() == [1, 2, 1, 3]
  k4 = TopKAcceptance(top_k=4).accept(None, chain_draft(jnp.asarray(drafts, jnp.int32)), ranked_logits(ranked),
                                      SamplingParams.make(), is_chain=True)
  assert np.asarray(k4.n_commit_B).tolist() == [5, 5, 5, 3]


def test_top_k_beyond_the_vocabulary_is_a_clear_error():
  from jaxspec.decoding.bpd import chain_draft
  from jaxspec.decoding.sampling import SamplingParams
  with pytest.raises(InputError, match="top 11 tokens: the model has 10; use a smaller k"):
    TopKAcceptance(top_k=11).accept(None, chain_draft(jnp.zeros((1, 2), jnp.int32)), ranked_logits([[(1,)] * 3]),
                                    SamplingParams.make(), is_chain=True)


def test_top_1_acceptance_is_greedy_acceptance():
  """k=1 keeps exactly the tokens greedy acceptance keeps, on random logits and drafts that follow the argmax for a
  random number of tokens and then leave it."""
  from jaxspec.decoding.bpd import chain_draft
  from jaxspec.decoding.sampling import SamplingParams

  rng = np.random.default_rng(0)
  b, n, v = 16, 5, 12
  logits = jnp.asarray(rng.normal(size=(b, n + 1, v)).astype(np.float32))
  target = np.asarray(jnp.argmax(logits, -1))
  drafts = target[:, :n].copy()
  cut = rng.integers(0, n + 1, size=b)  # row r follows the argmax for cut[r] tokens
  for r in range(b):
    if cut[r] < n:
      drafts[r, cut[r]] = (drafts[r, cut[r]] + 1 + rng.integers(0, v - 1)) % v  # any other token
  draft = chain_draft(jnp.asarray(drafts, jnp.int32))
  top1 = TopKAcceptance(top_k=1).accept(None, draft, logits, SamplingParams.make(), is_chain=True)
  exact = GreedyAcceptance().accept(None, draft, logits, SamplingParams.make(), is_chain=True)
  n1, ne = np.asarray(top1.n_commit_B), np.asarray(exact.n_commit_B)
  assert n1.tolist() == ne.tolist() == (cut + 1).tolist()
  for r in range(b):
    assert np.asarray(top1.emitted_BxT[r, :n1[r]]).tolist() == np.asarray(exact.emitted_BxT[r, :ne[r]]).tolist()


def test_top_1_acceptance_decodes_greedily_on_tiny_model(tiny):
  """Stern's rule with k=1 is exact acceptance: BPD with it gives greedy decoding's tokens in the same steps."""
  model, params = tiny
  bpd, p = random_heads(tiny, 3)
  dp = bpd_draft_params(model, params, bpd, p)
  prompts = [[4, 8, 15], [16, 23, 42, 7]]
  exact = generate(model, params, prompts, max_new_tokens=30, drafter=BPDDrafter(bpd), draft_params=dp)
  top1 = generate(model, params, prompts, max_new_tokens=30, drafter=BPDDrafter(bpd), draft_params=dp,
                  acceptor=TopKAcceptance(top_k=1))
  assert top1.tokens == exact.tokens == generate(model, params, prompts, max_new_tokens=30).tokens
  assert top1.accept_hist.tolist() == exact.accept_hist.tolist() and top1.active_calls == exact.active_calls
  assert exact.accept_hist[:, 2:].sum() > 0  # some drafts are accepted, and some are not (below)
  assert exact.tau < 4


def test_head_metrics_average_each_head_over_its_own_targets():
  """Per head: the cross-entropy and top-1 accuracy are means over the examples that have a target for that head
  (-1: none); the loss is the heads' sum; tau_proxy is 1 + the mean run of right heads from the first. With a
  teacher the cross-entropy is against the teacher's softmax (temperature 1) and agreement is with its top-1.
  Checked against the same figures worked out in numpy."""
  probs = np.array([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]],
                    [[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]],
                    [[0.1, 0.1, 0.8], [0.5, 0.25, 0.25]],
                    [[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]],
                    [[0.2, 0.2, 0.6], [0.2, 0.7, 0.1]]])
  # Row 4: head 1 wrong, head 2 right (a broken run); -2: a token outside the heads' vocabulary (a miss, no loss).
  targets = np.array([[0, 1], [2, -1], [2, 2], [1, 0], [-2, 1]])
  teacher_probs = np.array([[[0.2, 0.7, 0.1], [0.1, 0.6, 0.3]],
                            [[0.1, 0.6, 0.3], [0.9, 0.05, 0.05]],
                            [[0.05, 0.15, 0.8], [0.3, 0.6, 0.1]],
                            [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]],
                            [[0.3, 0.3, 0.4], [0.1, 0.8, 0.1]]])
  valid = targets >= 0
  guess = probs.argmax(-1)
  right = (guess == targets) & valid
  ce = -np.log(np.take_along_axis(probs, np.maximum(targets, 0)[..., None], -1)[..., 0])
  soft_ce = -(teacher_probs * np.log(probs)).sum(-1)
  agree = (guess == teacher_probs.argmax(-1)) & valid
  runs = lambda ok: np.array([next((i for i, x in enumerate(row) if not x), len(row)) for row in ok])
  for teacher in (None, teacher_probs):
    loss, m = bpd_training.head_metrics(jnp.asarray(np.log(probs), jnp.float32), jnp.asarray(targets),
                                        None if teacher is None else jnp.asarray(np.log(teacher), jnp.float32))
    per_example = ce if teacher is None else soft_ce
    want_h = [per_example[valid[:, h], h].mean() for h in range(2)]
    np.testing.assert_allclose([m["loss_h1"], m["loss_h2"]], want_h, rtol=1e-5)
    np.testing.assert_allclose(loss, sum(want_h), rtol=1e-5)
    scored = targets != -1
    np.testing.assert_allclose([m["acc_h1"], m["acc_h2"]], [right[scored[:, h], h].mean() for h in range(2)],
                               rtol=1e-6)
    np.testing.assert_allclose(m["tau_proxy"], 1 + runs(right).mean(), rtol=1e-6)
    if teacher is not None:
      np.testing.assert_allclose([m["agree_h1"], m["agree_h2"]], [agree[valid[:, h], h].mean() for h in range(2)],
                                 rtol=1e-6)
      np.testing.assert_allclose(m["tau_teacher"], 1 + runs(agree).mean(), rtol=1e-6)


def test_a_batch_without_a_valid_target_measures_no_loss():
  """Held-out targets all outside the heads' vocabulary subset (-2: misses, no loss) or padding: the loss is 0 for
  want of terms, and its count must be 0 too, so an evaluation leaves `eval/loss` out rather than report 0 (seen
  with a random model: `eval/loss 0.0` read as perfect). The accuracies still count the misses."""
  logits = jnp.zeros((3, 2, 5), jnp.float32)
  for targets, loss_count in (([[-2, -2], [-2, -1], [-1, -1]], 0), ([[-2, 4], [-2, -1], [-1, -1]], 3)):
    loss, m = bpd_training.head_metrics(logits, jnp.asarray(targets))
    assert int(m["count/loss"]) == loss_count and int(m["count/acc_h1"]) == 2 and float(m["acc_h1"]) == 0.0
  assert float(loss) == pytest.approx(np.log(5))


def test_head_examples_start_at_the_last_prompt_token_and_line_up_their_targets():
  """An example per position t from the last prompt token on (from 0 with loss_on_prompt) while head 1 has a target:
  it reads h_t and x_{t+1}, head i targets x_{t+1+i} (-1 past the end); with a teacher, head i's row is the state that
  predicted its target, h_{t+i}. States are numbered by their row here, so rows can be read off."""
  seqs = datasets.Sequences([np.array([10, 11, 12, 13, 14, 15], np.int32), np.array([20, 21, 22, 23], np.int32)],
                            np.array([2, 1], np.int32))
  hidden = [np.arange(6, dtype=np.float32)[:, None], 6 + np.arange(4, dtype=np.float32)[:, None]]  # row numbers
  ex = bpd_training.head_examples(seqs, hidden, 2, None, teacher=True)
  # sequence 1: t = 1, 2, 3 (t + 2 <= 5); sequence 2 (rows 6..9): t = 0, 1
  np.testing.assert_array_equal(ex.index_N, [1, 2, 3, 6, 7])
  np.testing.assert_array_equal(ex.next_N, [12, 13, 14, 21, 22])
  np.testing.assert_array_equal(ex.targets_NxK, [[13, 14], [14, 15], [15, -1], [22, 23], [23, -1]])
  batch = ex.batch(np.arange(len(ex)))
  np.testing.assert_array_equal(batch["hidden"][:, 0], [1, 2, 3, 6, 7])
  np.testing.assert_array_equal(batch["teacher_hidden"][..., 0], [[2, 3], [3, 4], [4, 5], [7, 8], [8, 9]])
  on_prompt = bpd_training.head_examples(seqs, hidden, 2, None, loss_on_prompt=True)
  np.testing.assert_array_equal(on_prompt.index_N, [0, 1, 2, 3, 6, 7])
  np.testing.assert_array_equal(on_prompt.targets_NxK[0], [12, 13])


def test_the_joint_objective_gives_the_heads_the_examples_of_the_heads_objective():
  """On the untouched base, the joint loss's head figures are the heads objective's on the same sequences (its
  examples from `head_examples`, over the target's hidden states from `final_hidden_states`): each head reads h_t and
  x_{t+1} and targets x_{t+1+i}, from the last prompt token on. That includes tau_proxy, a mean over those examples:
  the padding and prompt positions of the joint batch are no examples (they used to count as chains of length 0)."""
  from jaxspec.models.bpd import output_projection
  from training.draft import padded

  model, params = make_tiny()  # its greedy answers mostly repeat a token, which fresh heads get right
  bpd = BPDModel(BPDConfig(num_heads=2, d_model=model.cfg.d_model, use_next_token=True))
  heads = {"heads": bpd.init_params(jax.random.key(0), None)["heads"]}
  prompts = [[5, 6], [20, 21, 22]]
  answers = generate(model, params, prompts, max_new_tokens=10).tokens
  seqs = datasets.Sequences([np.asarray(p + a, np.int32) for p, a in zip(prompts, answers)],
                            np.array([2, 3], np.int32))
  tok, mask, _ = padded(seqs, 24, False)
  batch = {"tokens": tok, "mask": mask, "lengths": np.array([len(t) for t in seqs.tokens], np.int32)}
  _, joint = jax.jit(bpd_training.joint_loss(model, bpd, 1.0))({"base": params, "bpd": heads}, {}, batch, None)
  hidden = bpd_training.final_hidden_states(model, params, seqs, progress=False)
  ex = bpd_training.head_examples(seqs, hidden, 2, None)
  frozen = {"proj_DxM": output_projection(model, params, heads), "embed_VxD": model.input_table(params)}
  _, alone = jax.jit(bpd_training.heads_loss(bpd))(heads, frozen, ex.batch(np.arange(len(ex))), None)
  assert set(alone) <= set(joint) and 0 < float(alone["acc_h1"]) < 1 and float(alone["tau_proxy"]) > 1
  for name in set(alone) - {"count/loss"}:  # (the joint loss adds the base's: it counts the base's positions)
    np.testing.assert_allclose(joint[name], alone[name], rtol=1e-4, atol=1e-5, err_msg=name)
