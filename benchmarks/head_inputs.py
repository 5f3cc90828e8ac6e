"""Do BPD heads predict the target better when they also read intermediate layers' hidden states?

The shipped heads read the target's final hidden state h_t (and the embedding of x_{t+1}). The final state is shaped
for the next token; earlier layers may keep more of what the tokens after it need (EAGLE-3's argument for its drafts).
This script trains two sets of heads on the same data, split and seed and prints their held-out top-1 accuracy per
head and the chain τ proxy: heads on [h_t; e(x_{t+1})] as shipped, and heads that also read the RMS-normalised
outputs of the layers given by `--layers`, so the input grows and everything else stays the same (the residual is
still h_t, and the shared output projection is the target's, over the data's tokens).

  python benchmarks/head_inputs.py --data runs/bpd_smollm2/data --layers 14,22 --steps 1500

`--data` is a self-distillation folder (`training.datasets.self_distill`; the BPD config's `greedy_dataset_dir`).
Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from script_args import int_list, positive_int, run, whole_number


WARMUP = 100  # steps of linear warm-up before the cosine decay


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data", default="runs/bpd_smollm2/data", help="self-distillation folder")
  ap.add_argument("--layers", type=int_list(0), default="14,22",
                  help="0-based decoder layers whose outputs the second heads read")
  ap.add_argument("--steps", type=int, default=1500, help="training steps per variant (at least 101: 100 warm up)")
  ap.add_argument("--heads", type=positive_int, default=4, help="heads per set (head i never depends on the others)")
  ap.add_argument("--seq-len", type=whole_number(3), default=272, help="sequences are cut to this many tokens")
  ap.add_argument("--eval-every", type=positive_int, default=500)
  args = ap.parse_args(argv)
  if args.steps <= WARMUP:
    ap.error(f"--steps must be more than the {WARMUP} warm-up steps, got {args.steps}")

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from jaxspec.decoding.generate import bucket
  from jaxspec.loading import load_model
  from jaxspec.models.llama import Llama
  from training import datasets
  from jaxspec.errors import InputError
  from training.bpd import head_examples

  layers = args.layers
  k = args.heads
  seqs = datasets.load_sequences(args.data)  # a wrong folder is said before the model loads
  seqs = datasets.Sequences([np.asarray(t[:args.seq_len]) for t in seqs.tokens], seqs.prompt_lens)
  train_seqs, eval_seqs = seqs.split(0.05, seed=0)
  for what, part in (("training", train_seqs), ("held-out", eval_seqs)):
    # head 1 of position t learns x_{t+2}, and positions start at the prompt's last token
    if not any(len(t) >= max(int(plen) - 1, 0) + 3 for t, plen in zip(part.tokens, part.prompt_lens)):
      raise InputError(f"No {what} position to train or score a head on: every {what} sequence ends inside its "
                       f"prompt at --seq-len {args.seq_len} (prompts of up to {max(map(int, seqs.prompt_lens))} "
                       "tokens): raise --seq-len.")
  model, params, _ = load_model(None)
  d = model.cfg.d_model
  if max(layers) >= model.cfg.n_layers:
    raise InputError(f"--layers {','.join(map(str, layers))}: the model's decoder layers are 0 to "
                     f"{model.cfg.n_layers - 1}.")
  names = {f"layers_{i}" for i in layers}

  @jax.jit
  def features(params, tokens_BxL):
    b, l = tokens_BxL.shape
    cache = jax.lax.optimization_barrier(model.init_cache(b, l))
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    (h, _), st = Llama(model.cfg).apply(
        {"params": params}, tokens_BxL, pos, cache, jnp.tril(jnp.ones((l, l), bool)),
        capture_intermediates=lambda m, method: m.name in names and method == "__call__", mutable=["intermediates"])
    mids = [st["intermediates"][f"layers_{i}"]["__call__"][0][0] for i in layers]
    return jnp.concatenate([h] + mids, -1).astype(jnp.float16)

  t0 = time.time()
  order = sorted(range(len(seqs)), key=lambda i: len(seqs.tokens[i]))
  feats: list = [None] * len(seqs)
  for s in range(0, len(order), 8):
    idx = order[s:s + 8]
    arr = np.zeros((len(idx), bucket(max(len(seqs.tokens[i]) for i in idx), 32)), np.int32)
    for r, i in enumerate(idx):
      arr[r, :len(seqs.tokens[i])] = seqs.tokens[i]
    out = np.asarray(features(params, jnp.asarray(arr)))
    for r, i in enumerate(idx):
      feats[i] = out[r, :len(seqs.tokens[i])]
  print(json.dumps({"features_s": round(time.time() - t0, 1), "layers": layers}), flush=True)

  by_key = {np.asarray(t).tobytes(): f for t, f in zip(seqs.tokens, feats)}
  vocab = np.unique(np.concatenate(seqs.tokens)).astype(np.int32)
  tr, ev = (head_examples(s, [by_key[np.asarray(t).tobytes()] for t in s.tokens], k, vocab)
            for s in (train_seqs, eval_seqs))
  proj = jnp.asarray(np.asarray(model.output_table(params))[vocab].T, jnp.float32)
  emb = jnp.asarray(model.input_table(params), jnp.float32)
  print(json.dumps({"train_positions": len(tr), "eval_positions": len(ev)}), flush=True)

  class Heads(nn.Module):
    blocks: int  # D-wide feature blocks read: 1 = the final state only

    @nn.compact
    def __call__(self, f, e):
      h = f[..., :d]
      x = jnp.concatenate([h, e] + [nn.RMSNorm(name=f"norm{j}")(f[..., d * j:d * (j + 1)])
                                    for j in range(1, self.blocks)], -1)
      w_in = self.param("w_in", nn.initializers.lecun_normal(batch_axis=(0,)), (k, x.shape[-1], d))
      b_in = self.param("b_in", nn.initializers.zeros, (k, d))
      w_out = self.param("w_out", nn.initializers.zeros, (k, d, d))
      return h[:, None] + jnp.einsum("nkf,kfd->nkd", nn.silu(jnp.einsum("nd,kdf->nkf", x, w_in) + b_in), w_out)

  def run(blocks: int) -> None:
    heads = Heads(blocks)
    width = d * blocks
    p = heads.init(jax.random.key(0), jnp.zeros((1, width)), jnp.zeros((1, d)))
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, WARMUP, args.steps), weight_decay=0.0))
    state = opt.init(p)

    def loss_fn(p, batch):
      logits = jnp.einsum("nkd,dm->nkm", heads.apply(p, batch["hidden"][:, :width], emb[batch["next"]]), proj)
      tg = batch["targets"]
      valid = tg >= 0
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(tg, 0))
      loss = (jnp.where(valid, ce, 0).sum(0) / jnp.maximum(valid.sum(0), 1)).sum()
      return loss, (jnp.argmax(logits, -1) == tg) & valid

    @jax.jit
    def step(p, state, batch):
      (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
      upd, state = opt.update(g, state, p)
      return optax.apply_updates(p, upd), state, loss

    right_fn = jax.jit(lambda p, batch: loss_fn(p, batch)[1])

    def evaluate(p):
      right = np.concatenate([np.asarray(right_fn(p, ev.batch(np.arange(s, min(s + 1024, len(ev))))))
                              for s in range(0, len(ev), 1024)])
      acc = right.sum(0) / np.maximum((ev.targets_NxK >= 0).sum(0), 1)
      return [round(float(a), 4) for a in acc], round(float(1 + np.cumprod(right, 1).sum(1).mean()), 4)

    rng = np.random.default_rng(1)
    t0 = time.time()
    for i in range(1, args.steps + 1):
      p, state, loss = step(p, state, tr.batch(rng.integers(0, len(tr), 256)))
      if i % args.eval_every == 0 or i == args.steps:
        acc, tau = evaluate(p)
        print(json.dumps({"inputs": ["final"] + [f"layer{j}" for j in layers][:blocks - 1], "step": i,
                          "train_loss": round(float(loss), 3), "eval_acc": acc, "tau_proxy": tau,
                          "s": round(time.time() - t0)}), flush=True)

  run(1)
  run(1 + len(layers))
  return 0


if __name__ == "__main__":
  raise SystemExit(run(main, __file__))
