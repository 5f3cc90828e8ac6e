"""Bench methods built by name with options (`bpd:k=2:gate=0.8`, `spec:stop=0.6`, `opt-tree:lookup=1`, ...): each
option reaches the drafter or acceptance rule that the decode loop runs, and the lossless ones still give greedy
decoding's tokens. On a tiny LLaMA whose output depends on its context, with BPD heads and a draft model saved to a
temporary folder the way `jaxspec train` writes them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.bench import methods as methods_mod
from jaxspec.bench.methods import METHODS, BenchContext, parse_method
from jaxspec.decoding.bpd import BPDDrafter, TopKAcceptance
from jaxspec.decoding.generate import generate
from jaxspec.decoding.eagle import EagleDrafter
from jaxspec.decoding.jacobi import JacobiDrafter
from jaxspec.decoding.lattice import LatticeDrafter, NgramHeadsTreeSource
from jaxspec.decoding.lookup import WithLookup
from jaxspec.decoding.opt_tree import HeadsTreeSource, OptTreeDrafter
from jaxspec.decoding.speculative import DraftModelDrafter
from jaxspec.errors import InputError
from jaxspec.models.bpd import save_bpd
from jaxspec.models.draft import save_draft
from jaxspec.models.eagle import EagleDraft, save_eagle
from jaxspec.models.ngram import build_ngram, save_ngram
from tests.test_bpd import random_heads

# Prompts whose greedy continuations repeat some of their own tokens (so prompt-lookup copies are verified) and
# otherwise vary.
PROMPTS = [[1, 2, 3], [9, 30, 200, 41, 77], [100, 5, 17, 4]]
NEW = 24


class Tokenizer:
  eos_id = None
  pad_id = 0
  chat_template = None


@pytest.fixture(scope="module")
def target(tiny):
  """The `tiny` LLaMA, whose next token depends on the context."""
  return tiny


@pytest.fixture(scope="module")
def parts(target, tmp_path_factory):
  """Folders for `heads=` (3 random BPD heads), `draft=` (the target's own layers, saved as draft training saves
  a draft: every greedy draft token is right, and its flat distributions make adaptive drafts stop early), an EAGLE
  draft (random) and a rescorer (`rescore=`: a 3-gram LM counted on the target's own greedy outputs, with tuned
  settings recorded as `jaxspec train` records them)."""
  root = tmp_path_factory.mktemp("parts")
  bpd, p = random_heads(target, 3)
  save_bpd(root / "heads", bpd, p)
  save_draft(root / "draft", *target, dtype="float32")
  model, params = target
  eagle = EagleDraft(model.cfg, 1)
  save_eagle(root / "eagle", eagle, eagle.init_params(jax.random.key(3), params, None, init="random"), dtype="float32")
  seqs = generate(model, params, [[i, i + 1] for i in range(1, 60, 3)], max_new_tokens=NEW).tokens
  lm, tables, _ = build_ngram(seqs, 3, model.vocab_size)
  save_ngram(root / "rescore", lm, tables, meta={"tuned": {"k": 3, "top_t": 4, "beams": 2, "width": 8,
                                                           "ngram_weight": 0.5, "neural_lm": "default",
                                                           "neural_weight": 0.4}})
  return root


@pytest.fixture(scope="module")
def greedy(target):
  model, params = target
  return generate(model, params, PROMPTS, max_new_tokens=NEW).tokens


def spy_generate(monkeypatch, module=methods_mod) -> list[dict]:
  """The keyword arguments of every `generate` call made through `module`, as a list that fills as they come."""
  seen = []

  def spy(*args, **kwargs):
    seen.append(kwargs)
    return generate(*args, **kwargs)

  monkeypatch.setattr(module, "generate", spy)
  return seen


def build_and_run(target, parts, text, monkeypatch):
  """Builds the method `text` (`{p}` is the parts folder) through the bench's method table and decodes PROMPTS;
  returns the runner, its result, and the keyword arguments it handed to `generate`."""
  model, params = target
  seen = spy_generate(monkeypatch)
  _, name, opts = parse_method(text.format(p=parts))
  run = METHODS[name].build(BenchContext(model, params, Tokenizer()), opts)
  res = run(PROMPTS, NEW, 0)
  (kwargs,) = seen
  return run, res, kwargs


def _bpd(drafter, k, gate=0.0):
  assert type(drafter) is BPDDrafter and drafter.bpd.num_heads == k and drafter.gate == gate


def _spec(drafter, stop=0.0, gate=0.0, lookup=0):
  assert type(drafter) is DraftModelDrafter and drafter.gamma == 4 and drafter.greedy
  assert (drafter.stop, drafter.gate, drafter.lookup) == (stop, gate, lookup)


def _tree(drafter, gate=0.0):
  assert type(drafter) is OptTreeDrafter and isinstance(drafter.source, HeadsTreeSource)
  assert (drafter.nodes, drafter.depth, drafter.gate) == (8, 3, gate)


def _jacobi(drafter, window):
  assert type(drafter) is JacobiDrafter and drafter.window == window


def _lookup(drafter, min_match, graft=True):
  assert type(drafter) is WithLookup and drafter.min_match == min_match and drafter.graft is graft
  return drafter.inner


# (method, check of the drafter the loop ran, whether the stats show verified prompt-lookup copies)
CASES = [
    ("bpd:heads={p}/heads:k=2:gate=0.8", lambda d: _bpd(d, 2, gate=0.8), False),
    ("bpd:heads={p}/heads:k=2:lookup=2", lambda d: _bpd(_lookup(d, 2), 2), True),
    ("spec:draft={p}/draft:lookup=1", lambda d: _spec(d, lookup=1), True),
    ("opt-tree:heads={p}/heads:nodes=8:depth=3:lookup=1", lambda d: _tree(_lookup(d, 1)), True),
    ("opt-tree:heads={p}/heads:nodes=8:depth=3:lookup=1:graft=0", lambda d: _tree(_lookup(d, 1, graft=False)), True),
    ("jacobi:n=4:lookup=2", lambda d: _jacobi(_lookup(d, 2), 4), True),
]


@pytest.mark.parametrize("text,check,copies", CASES, ids=[c[0].replace("{p}/", "") for c in CASES])
def test_method_options_reach_the_drafter_and_keep_greedy_output(target, parts, greedy, monkeypatch, text, check,
                                                                   copies):
  run, res, kwargs = build_and_run(target, parts, text, monkeypatch)
  check(kwargs["drafter"])
  assert kwargs["acceptor"] is None  # the loop's default: greedy acceptance at temperature 0
  assert getattr(run, "lossless", True)
  assert res.tokens == greedy
  if copies:
    assert int(res.drafter_stats["copied_steps"]) > 0  # the lookup option did verify copies
  else:
    assert "copied_steps" not in res.drafter_stats


# The bench's other lossless methods, each run through its runner: (method, check of the drafter the loop ran).
RUNNERS = [
    ("layerskip:layers=1", lambda d: type(d) is DraftModelDrafter and d.gamma == 4 and d.greedy),
    ("eagle:draft={p}/eagle:gamma=3", lambda d: type(d) is EagleDrafter and d.gamma == 3 and d.greedy),
    ("bpd-ngram:heads={p}/heads:rescore={p}/rescore",  # the rescorer's tuned k, t, beams, width and weight
     lambda d: type(d) is LatticeDrafter and (d.rescorer, d.bpd.num_heads, d.top_t, d.beams, d.width) == (
         "ngram", 3, 4, 2, 8)),
    ("bpd-ngram:heads={p}/heads:rescore={p}/rescore:beams=3:width=27:t=3",
     lambda d: (d.top_t, d.beams, d.width) == (3, 3, 27)),
    ("bpd-neural:heads={p}/heads:rescore={p}/rescore:draft={p}/draft",
     lambda d: type(d) is LatticeDrafter and d.rescorer == "neural" and d.lm.gamma == 3),
    ("opt-tree:heads={p}/heads:rescore={p}/rescore:nodes=8:depth=3",  # the exact tree over the rescored lattice
     lambda d: type(d) is OptTreeDrafter and type(d.source) is NgramHeadsTreeSource and d.source.top_t == 4
     and (d.nodes, d.depth, d.width, d.branch, d.source.width) == (8, 3, 8, 8, 8)),
    # its E[A] is the heads' probability of the chosen paths, so a gate can price it
    ("opt-tree:heads={p}/heads:rescore={p}/rescore:nodes=8:depth=3:gate=0.5",
     lambda d: type(d.source) is NgramHeadsTreeSource and d.gate == 0.5),
]


@pytest.mark.parametrize("text,check", RUNNERS, ids=[c[0].replace("{p}/", "") for c in RUNNERS])
def test_each_methods_runner_decodes_greedy_output(target, parts, greedy, monkeypatch, text, check):
  """The runners the method table builds for these names decode (not only build) and give greedy decoding's
  tokens, with the options and the rescorer's recorded settings reaching the drafter."""
  run, res, kwargs = build_and_run(target, parts, text, monkeypatch)
  assert check(kwargs["drafter"]), kwargs["drafter"]
  assert kwargs["acceptor"] is None and getattr(run, "lossless", True)
  assert res.tokens == greedy


def test_tree_rescoring_options_say_what_they_need(target, parts):
  """rescore= applies to the heads' trees (another drafter has its own LM); t= and weight= only with it; the
  rescored tree is greedy only. Each is one clear error when the method is built."""
  from jaxspec.bench.methods import Unavailable
  model, params = target
  ctx = BenchContext(model, params, Tokenizer())
  for text, message in ((f"opt-tree:drafter=layerskip:rescore={parts}/rescore", "drafter=layerskip drafts with its"),
                        (f"opt-tree:heads={parts}/heads:weight=0.5", "give rescore=default")):
    _, name, opts = parse_method(text)
    with pytest.raises(InputError, match=message):
      METHODS[name].build(ctx, opts)
  _, name, opts = parse_method(f"opt-tree:heads={parts}/heads:rescore={parts}/rescore")
  with pytest.raises(Unavailable, match="greedy only"):
    METHODS[name].build(BenchContext(model, params, Tokenizer(), temperature=1.0), opts)
  # Without heads=, the heads the rescorer was tuned with (as bpd-ngram takes them), not the shipped ones, which
  # read another model's hidden states.
  import json
  import shutil
  tuned = parts / "rescore_tuned_heads"
  shutil.copytree(parts / "rescore", tuned, dirs_exist_ok=True)
  cfg = json.loads((tuned / "config.json").read_text())
  cfg["tuned"]["heads"] = str(parts / "heads")
  (tuned / "config.json").write_text(json.dumps(cfg))
  for text in (f"opt-tree:rescore={tuned}:nodes=4:depth=2", f"bpd-ngram:rescore={tuned}"):
    _, name, opts = parse_method(text)
    METHODS[name].build(ctx, opts)
  from jaxspec.bench.methods import DEFAULT_RESCORE, same_method_key
  assert same_method_key("bpd-ngram", {"rescore": "default"}) == same_method_key(
      "bpd-ngram", {"rescore": str(DEFAULT_RESCORE)})



def test_tree_rescoring_takes_its_options_over_the_tuned_settings(target, parts):
  """opt-tree:rescore= takes the rescorer's tuned t and weight, t= and weight= in their place; either without
  rescore= is refused (it was ignored), as weight= is."""
  from jaxspec.bench.methods import _tree_source
  ctx = BenchContext(*target, Tokenizer())
  opts = {"heads": str(parts / "heads"), "rescore": str(parts / "rescore")}
  make, dp, _, _ = _tree_source(ctx, opts)
  assert (make(8).top_t, float(dp["weight"])) == (4, 0.5)  # the fixture's tuned top_t and ngram_weight
  make, dp, _, _ = _tree_source(ctx, {**opts, "t": "3", "weight": "0.25"})
  assert (make(8).top_t, float(dp["weight"])) == (3, 0.25)
  for key, value in (("t", "3"), ("weight", "0.25")):
    with pytest.raises(InputError, match="give rescore=default"):
      _tree_source(ctx, {"heads": str(parts / "heads"), key: value})


@pytest.mark.parametrize("method,tuned", [("bpd-ngram", 0.5), ("bpd-neural", 0.4)])
def test_lattice_rescorers_take_the_tuned_weight_or_the_given_one(target, parts, monkeypatch, method, tuned):
  """bpd-ngram and bpd-neural interpolate with the rescorer's tuned weight (the fixture records 0.5 and 0.4), or
  weight= in its place (an audit's mutant that ignored the tuned n-gram weight passed every test)."""
  extra = ":draft={p}/draft" if method == "bpd-neural" else ""
  for opt, want in (("", tuned), (":weight=0.25", 0.25)):
    _, _, kwargs = build_and_run(target, parts, f"{method}:heads={{p}}/heads:rescore={{p}}/rescore{extra}{opt}",
                                 monkeypatch)
    assert float(kwargs["draft_params"]["weight"]) == pytest.approx(want)


def test_the_lattice_oracle_runner_drafts_the_greedy_output(target, parts, greedy, monkeypatch):
  """bpd-oracle over the whole vocabulary finds every greedy token in its lattice: each step accepts all k drafts
  (until a row's last tokens), and the output is greedy decoding's."""
  model, params = target
  seen = spy_generate(monkeypatch)
  _, name, opts = parse_method(f"bpd-oracle:heads={parts}/heads:k=3:t={model.vocab_size}")
  run = METHODS[name].build(BenchContext(model, params, Tokenizer()), opts)
  res = run(PROMPTS, NEW, 0)
  assert res.tokens == greedy
  assert type(seen[-1]["drafter"]) is LatticeDrafter and seen[-1]["drafter"].rescorer == "oracle"
  hist = np.asarray(res.accept_hist).sum(axis=0)
  assert hist[4] >= 3 * (NEW // 4 - 1) and hist[1:4].sum() <= 3 * 3  # full blocks but for a row's last step


def test_spec_stop_reaches_the_draft_and_ends_drafts_early(target, parts, greedy, monkeypatch):
  """stop=0.6 on a draft whose top probabilities are far below 0.6: each draft ends after its first token, so the
  draft runs fewer forwards than without it, and no step accepts more than one drafted token; the output is still
  greedy decoding's."""
  _, full, kwargs = build_and_run(target, parts, "spec:draft={p}/draft", monkeypatch)
  _spec(kwargs["drafter"])
  _, stopped, kwargs = build_and_run(target, parts, "spec:draft={p}/draft:stop=0.6", monkeypatch)
  _spec(kwargs["drafter"], stop=0.6)
  assert full.tokens == stopped.tokens == greedy
  assert int(stopped.drafter_stats["draft_forwards"]) < int(full.drafter_stats["draft_forwards"])
  assert stopped.accept_hist[:, 3:].sum() == 0 < full.accept_hist[:, 3:].sum()


def test_bpd_approx_builds_stern_top_k_acceptance(target, parts, monkeypatch):
  """approx=K runs Stern's top-K rule, and the method is marked not lossless (the report then does not count its
  differences from greedy as mismatches)."""
  run, res, kwargs = build_and_run(target, parts, "bpd:heads={p}/heads:k=2:approx=3", monkeypatch)
  _bpd(kwargs["drafter"], 2)
  assert kwargs["acceptor"] == TopKAcceptance(top_k=3) and run.lossless is False
  assert res.accept_hist[:, 2:].sum() > 0


@pytest.fixture
def peers(monkeypatch):
  """Stands in for the other processes of a multi-host run in `BenchContext.ready`'s gather: `peers.states` are
  theirs (0 built so far, 1 unavailable, 2 failed), `peers.calls` what this process contributed."""

  class Peers:
    states: list[int] = [0]
    calls: list[int] = []

  def each_process(value):
    Peers.calls.append(int(value))
    return np.array([int(value), *Peers.states])

  monkeypatch.setattr(methods_mod.sharding, "each_process", each_process)
  return Peers


@pytest.fixture(scope="module")
def host_parts(target, tmp_path_factory):
  """Files whose methods work on the target's arrays while they are built: BPD heads over a vocabulary subset (their
  output table is gathered from the target's), a draft and a feature-level draft that take the target's embedding."""
  from jaxspec.models.bpd import BPDConfig, BPDModel
  from jaxspec.models.eagle import save_eagle
  from tests.test_eagle import random_draft

  model, params = target
  root = tmp_path_factory.mktemp("host_parts")
  ids = np.arange(0, model.cfg.vocab_size, 3)
  bpd = BPDModel(BPDConfig(num_heads=3, d_model=model.cfg.d_model, d_hidden=16, vocab_subset=len(ids)))
  save_bpd(root / "heads", bpd, bpd.init_params(jax.random.key(1), ids))
  save_draft(root / "draft", *target, dtype="float32")
  save_eagle(root / "eagle", *random_draft(model, params), dtype="float32")
  return root


DEVICE_WORK = ["jaxspec.decoding.generate.generate", "jaxspec.bench.cost.forward_cost", "jaxspec.bench.cost.eagle_cost",
               "jaxspec.decoding.bpd.bpd_draft_params", "jaxspec.models.bpd.output_projection",
               "jaxspec.models.draft.embed_fingerprint", "jaxspec.models.eagle.EagleDraft.vocab_params",
               "jaxspec.models.subset.subset_head", "jaxspec.models.lora.check_base"]


@pytest.mark.parametrize("name,opts", [
    ("bpd", {"heads": "heads"}),
    ("opt-tree", {"nodes": "auto", "heads": "heads"}),
    ("opt-tree", {"drafter": "draft", "draft": "draft", "nodes": "auto"}),
    ("spec", {"draft": "draft"}),
    ("eagle", {"draft": "eagle"}),
    ("opt-tree", {"drafter": "eagle", "draft": "eagle"}),
    ("opt-tree", {"drafter": "eagle", "draft": "eagle", "nodes": "auto"}),
])
def test_a_method_another_process_cannot_build_is_unavailable_before_any_device_work(target, host_parts, peers,
                                                                                     monkeypatch, name, opts):
  """Builds that work on the target's arrays (an output table gathered from the target's, a fingerprint of its
  embedding, a calibration that measures costs) do it with every process when the arrays are split over hosts. With
  a process that lacks the method's files (state 1) this one must stop before any of that work, and say which
  process it was; with a process that failed (state 2) it stops with an error."""
  model, params = target
  opts = {k: str(host_parts / v) if k in ("heads", "draft") else v for k, v in opts.items()}
  for path in DEVICE_WORK:
    def must_not_run(*args, _path=path, **kwargs):
      raise AssertionError(f"{_path} ran before the processes agreed")
    monkeypatch.setattr(path, must_not_run)
  ctx = BenchContext(model, params, Tokenizer())
  peers.states = [1]
  with pytest.raises(methods_mod.Unavailable, match="process 1 of this multi-host run cannot run it"):
    methods_mod.build(ctx, name, opts)
  peers.states = [2]
  with pytest.raises(methods_mod.InputError, match="process 1 of this multi-host run failed"):
    methods_mod.build(ctx, name, opts)
  assert peers.calls == [0, 0]  # one agreement per build, from this process: built so far
  monkeypatch.undo()  # and with every process able to, the same build runs (calibrations are tested elsewhere)
  if opts.get("nodes") != "auto":
    assert callable(methods_mod.build(ctx, name, opts))


def test_every_build_meets_the_other_processes_once(target, parts, peers):
  """A build that runs nothing on the devices agrees when it ends; one that fails agrees with its failure (so the
  others are not left waiting) and raises its own error."""
  model, params = target
  ctx = BenchContext(model, params, Tokenizer())
  methods_mod.build(ctx, "bpd", {"heads": str(parts / "heads")})
  with pytest.raises(methods_mod.Unavailable, match="no BPD heads"):
    methods_mod.build(ctx, "bpd", {"heads": str(parts / "missing")})
  with pytest.raises(methods_mod.Unavailable, match=r"distilled draft.*spec:draft=FOLDER"):  # said "no BPD heads"
    methods_mod.build(ctx, "bpd", {"heads": str(parts / "draft")})
  with pytest.raises(methods_mod.InputError, match="is not one of"):
    methods_mod.build(ctx, "opt-tree", {"drafter": "nothing"})
  peers.states = [2]  # a process that cannot run it meets one that failed: it stops too
  with pytest.raises(methods_mod.InputError, match="process 1 of this multi-host run failed"):
    methods_mod.build(ctx, "bpd", {"heads": str(parts / "missing")})
  assert peers.calls == [0, 1, 1, 2, 1]


def test_costs_for_a_budget_or_a_gate_are_measured_at_the_runs_batch(target, host_parts, parts, monkeypatch):
  """`nodes=auto` and `gate=auto` price verify and draft forwards at the rows the run decodes together: on an
  accelerator a forward's cost depends on batch x nodes, so costs taken at one row would pick trees too large."""
  model, params = target
  batches = []

  def fixed(model, params, sizes, **kw):
    batches.append(kw.get("batch", 1))
    return {n: 1 + 0.05 * (n - 1) for n in sizes}

  monkeypatch.setattr("jaxspec.bench.cost.forward_cost", fixed)
  from tests.test_bench import ByteTokenizer  # the calibration decodes the quick prompts

  said = []
  ctx = BenchContext(model, params, ByteTokenizer(), batch_size=3, say=said.append)
  run = methods_mod.build(ctx, "opt-tree", {"drafter": "draft", "draft": str(host_parts / "draft"), "nodes": "auto",
                                            "gate": "auto"})
  assert batches == [3, 3]  # the target's verify costs (t(1) among them, which the gate reads), the draft's
  # Minutes of measuring on a CPU are announced first, so that a run is not taken for hung (found by an audit).
  assert len(said) == 1 and said[0].startswith("opt-tree:nodes=auto: measuring") and "minutes on a CPU" in said[0]
  # The gate prices the chosen tree from the budget's own measurement: t(n + 1) / t(1) - 1 = 0.05 n with these costs.
  n = int(re.search(r"budget from cost: nodes=(\d+)", run.note).group(1))
  assert f"gate from cost: t({n + 1})/t(1) - 1 = {0.05 * n:.2f}" in run.note, run.note
  # A gate alone measures t(N + 1) and t(1) itself, and says so.
  said.clear()
  fresh = BenchContext(model, params, ByteTokenizer(), batch_size=3, say=said.append)
  methods_mod.build(fresh, "opt-tree", {"heads": str(parts / "heads"), "nodes": "8", "depth": "3", "gate": "auto"})
  assert batches == [3, 3, 3] and said == ["gate=auto: measuring the verify cost t(9)/t(1)"]
  # The heads' tree rescored by an n-gram LM prices its budget and gate from the heads' probabilities alike.
  run = methods_mod.build(ctx, "opt-tree", {"heads": str(parts / "heads"), "rescore": str(parts / "rescore"),
                                            "nodes": "auto", "gate": "auto"})
  assert "budget from cost: nodes=" in run.note and "gate from cost" in run.note, run.note
  # Its calibration is kept per rescorer setting: another weight calibrates again, the same one does not.
  measured = len(batches)
  for weight, more in (("0.2", 1), ("0.2", 0)):
    methods_mod.build(ctx, "opt-tree", {"heads": str(parts / "heads"), "rescore": str(parts / "rescore"),
                                        "nodes": "auto", "weight": weight})
    assert len(batches) == measured + more
    measured = len(batches)
  # A feature-level draft's forwards are priced too (they were taken as free: the deepest tree always won).
  drafts = []
  monkeypatch.setattr("jaxspec.bench.cost.eagle_cost",
                      lambda draft, dp, sizes, **kw: drafts.append(kw["batch"]) or {n: 0.5 for n in sizes})
  methods_mod.build(ctx, "opt-tree", {"drafter": "eagle", "draft": str(host_parts / "eagle"), "nodes": "auto"})
  assert drafts == [3]


def test_a_resumed_run_takes_the_budget_and_gate_its_killed_run_measured(target, host_parts, monkeypatch):
  """`nodes=auto` and `gate=auto` are measured on the machine as it is: a bench resumed on a busier machine measured
  anew and merged runs of a 16-node tree with runs of a 32-node one under the second's name (found by an audit). The
  build reports what it measured (`run.measured`), and given it back (`ctx.measured`) it measures nothing."""
  from tests.test_bench import ByteTokenizer  # the calibration decodes the quick prompts

  model, params = target
  monkeypatch.setattr("jaxspec.bench.cost.forward_cost",
                      lambda model, params, sizes, **kw: {n: 1 + 0.05 * (n - 1) for n in sizes})
  opts = {"drafter": "draft", "draft": str(host_parts / "draft"), "nodes": "auto", "gate": "auto"}
  first = methods_mod.build(BenchContext(model, params, ByteTokenizer()), "opt-tree", opts)
  assert set(first.measured) == {"nodes", "depth", "nodes_note", "gate", "gate_note"}
  n, d, g = first.measured["nodes"], first.measured["depth"], first.measured["gate"]

  def measures(*args, **kwargs):
    raise AssertionError("measured again")
  monkeypatch.setattr("jaxspec.bench.cost.forward_cost", measures)
  monkeypatch.setattr("jaxspec.decoding.generate.generate", measures)
  earlier = dict(first.measured, nodes=n + 3, gate=g + 0.5)  # as a busier machine's run might have chosen
  again = methods_mod.build(BenchContext(model, params, ByteTokenizer(), measured=earlier), "opt-tree", opts)
  assert again.measured == earlier and f"nodes={n + 3} depth={min(d, n + 3)}" in again.note
  assert f"gate={g + 0.5:.2f}" in again.note and "measured by the process this run resumes" in again.note
  # Something unreadable there is measured again, not trusted.
  monkeypatch.undo()
  monkeypatch.setattr("jaxspec.bench.cost.forward_cost",
                      lambda model, params, sizes, **kw: {n: 1 + 0.05 * (n - 1) for n in sizes})
  for bad in ({"nodes": "x", "gate": None}, dict(first.measured, nodes=0, gate=float("inf"))):
    fresh = methods_mod.build(BenchContext(model, params, ByteTokenizer(), measured=bad), "opt-tree", opts)
    assert fresh.measured == first.measured and "resumes" not in fresh.note


def test_sampling_runs_calibrate_trees_at_their_temperature_and_refuse_argmax_rules(target, parts, monkeypatch):
  """A static tree's prior is calibrated at the run's sampling settings: calibrated at temperature 0, a sampling
  tree's children below the first all got probability ~0 (the prior log(1e-6) = -13.8), so the tree was a chain, and
  the first child's log-probability could come out above 0. BPD's approx=K takes the target's argmax, so at a
  temperature it is unavailable rather than greedy output labelled as sampled."""
  from tests.test_bench import ByteTokenizer  # the calibration decodes the quick prompts

  model, params = target
  seen = spy_generate(monkeypatch)
  ctx = BenchContext(model, params, ByteTokenizer(), temperature=1.0)
  run = methods_mod.build(ctx, "opt-tree", {"heads": str(parts / "heads"), "nodes": "8", "depth": "3",
                                            "shape": "static"})
  run(PROMPTS, 6, 0)
  prior = np.asarray(seen[-1]["draft_params"]["tree_prior_DxC"])
  assert prior.shape[0] == 3 and (prior <= 0).all()
  assert (prior[:, :4] > np.log(1e-3)).all()  # random heads at temperature 1: every rank keeps real mass
  with pytest.raises(methods_mod.Unavailable, match=r"approximate acceptance \(approx=K\).*greedy only"):
    methods_mod.build(ctx, "bpd", {"heads": str(parts / "heads"), "approx": "3"})
  # nodes=auto's calibration tree samples with the run's warp too (its E[A] picks the budget).
  import jaxspec.decoding.generate as gen_mod
  calibrations = spy_generate(monkeypatch, gen_mod)
  monkeypatch.setattr("jaxspec.bench.cost.forward_cost",
                      lambda model, params, sizes, **kw: {n: float(n) for n in sizes})
  sampled = BenchContext(model, params, ByteTokenizer(), temperature=0.7, top_k=5, top_p=0.9)
  methods_mod.build(sampled, "opt-tree", {"heads": str(parts / "heads"), "nodes": "auto"})
  (kw,) = calibrations
  assert (kw["drafter"].warp.top_k, kw["drafter"].warp.use_top_p) == (5, True)
  assert (kw["temperature"], kw["top_k"], kw["top_p"]) == (0.7, 5, 0.9)


def test_a_distilled_draft_runs_in_the_targets_dtypes(target, parts):
  """A draft folder is loaded in the target's dtypes, as a draft given as a model file is: it held float32 layers and a
  float32 copy of a bfloat16 target's embedding (113 MB for the default model) while the docs said it kept the
  dtype it was saved in (found by an audit)."""
  import dataclasses

  from jaxspec.models.llama import LlamaLM
  model, params = target
  for dtype, param_dtype in (("bfloat16", "bfloat16"), ("float32", "bfloat16"), ("float32", "float32")):
    cfg = dataclasses.replace(model.cfg, dtype=dtype, param_dtype=param_dtype)
    cast = jax.tree.map(lambda x: x.astype(param_dtype), params)
    ctx = BenchContext(LlamaLM(cfg), cast, Tokenizer())
    draft, dp = methods_mod._draft_model(ctx, parts / "draft")
    assert (jnp.dtype(draft.cfg.dtype), jnp.dtype(draft.cfg.param_dtype)) == (dtype, param_dtype)
    assert {x.dtype for x in jax.tree.leaves(dp)} == {jnp.dtype(param_dtype)}
    assert dp["embed"]["embedding"] is cast["embed"]["embedding"]  # the target's own array, not a copy


def test_the_defaults_the_method_help_states_are_the_ones_built(target, parts, monkeypatch):
  """`jaxspec bench --list-methods` states each option's default: a method built without the option runs with it."""
  from jaxspec.decoding.lookup import LookupDrafter

  model, params = target
  bpd, p = random_heads(target, 8)
  save_bpd(parts / "heads8", bpd, p)
  seen = []
  monkeypatch.setattr(methods_mod, "generate", lambda *args, **kwargs: seen.append(kwargs))

  def drafter(text):
    _, name, opts = parse_method(text.format(p=parts))
    METHODS[name].build(BenchContext(model, params, Tokenizer()), opts)(PROMPTS, 4, 0)
    return name, seen[-1]["drafter"]

  cases = [("lookup", {"n": "num_nodes", "ngram": "max_ngram", "gate": "gate"}),
           ("jacobi", {"n": "window"}),
           ("spec:draft={p}/draft", {"gamma": "gamma", "stop": "stop", "gate": "gate"}),
           ("bpd:heads={p}/heads8:k=8", {"gate": "gate"}),
           ("opt-tree:heads={p}/heads8", {"nodes": "nodes", "depth": "depth", "threshold": "threshold",
                                          "gate": "gate"}),
           ("opt-tree:drafter=draft:draft={p}/draft", {"width": "width", "branch": "branch"})]
  for text, attributes in cases:
    name, d = drafter(text)
    for key, attribute in attributes.items():
      default = re.search(r"default:? (\d+)", methods_mod.option_help(name, key)).group(1)
      assert getattr(d, attribute) == int(default), (name, key)
  # From heads the tree is the exact one by default: width and branch as the help says, equal to nodes.
  _, d = drafter("opt-tree:heads={p}/heads8")
  assert "BPD heads: nodes" in methods_mod.option_help("opt-tree", "width") and d.width == d.branch == d.nodes == 16
  assert type(drafter("lookup")[1]) is LookupDrafter  # no copies unless lookup= is given
  name, d = drafter("bpd:heads={p}/heads:lookup=2")
  assert "default 1" in methods_mod.option_help(name, "graft") and d.graft is True


def test_the_defaults_two_labels_are_compared_with_are_the_stated_ones():
  """`same_method_key` fills in `_FIXED_DEFAULTS` (so `spec` and `spec:gamma=4` are one run): each entry is the
  default `--list-methods` states, which the test above checks against what a build runs."""
  from pathlib import Path

  fixed = [(name, key, value) for name, opts in methods_mod._FIXED_DEFAULTS.items() for key, value in opts.items()]
  fixed += [("opt-tree", key, value) for opts in methods_mod._TREE_DRAFTER_DEFAULTS.values()
            for key, value in opts.items()]
  assert len(fixed) > 30
  for name, key, value in fixed:
    assert key in METHODS[name].options, (name, key)
    shown = f"jaxspec/assets/{Path(value).name}" if isinstance(value, Path) else value
    assert isinstance(value, Path) == (key in methods_mod._PATH_OPTIONS), (name, key)
    stated = methods_mod.option_help(name, key)
    assert re.search(rf"(default:? {re.escape(shown)}\b|\b{re.escape(shown)} \(default\b)", stated), (name, key, stated)
  # a default stated for every option these methods have, where the default does not depend on a folder or model
  key = methods_mod.same_method_key
  assert key("lookup", {}) == key("lookup", {"n": "8", "ngram": "03", "gate": "0"})
  assert key("lookup", {}) != key("lookup", {"n": "9"})
  assert key("opt-tree", {"drafter": "draft"}) == key("opt-tree", {"drafter": "draft", "vocab": "auto"})
  assert key("opt-tree", {"drafter": "draft"}) != key("opt-tree", {"drafter": "draft", "vocab": "full"})
  assert key("opt-tree", {"lookup": "2"}) != key("opt-tree", {"lookup": "2", "graft": "0"})
  assert key("bpd", {}) != key("bpd", {"k": "4"})  # k's default is the number of heads the folder holds


def test_a_static_tree_calibrates_on_a_model_of_a_short_context(parts, monkeypatch):
  """`shape=static` (and `nodes=auto`) calibrate on the project's own prompts with 48 new tokens: on a model of a
  short context (40 tokens) the build was refused with "Prompt 3 (397 tokens) plus 48 new tokens needs 445 cache
  slots", about prompts the user never gave (found by a randomized differential test). The calibration prompts now
  keep their last tokens and the new ones fit; the output is greedy decoding's."""
  from tests.conftest import make_tiny
  from tests.test_bench import ByteTokenizer

  model, params = make_tiny(embed_scale=3.0, max_seq_len=40)  # the `tiny` target's weights, a shorter context
  seen = []

  def spy(model, params, prompts, **kwargs):
    seen.append(max(len(p) for p in prompts) + kwargs["max_new_tokens"])
    return generate(model, params, prompts, **kwargs)

  monkeypatch.setattr("jaxspec.decoding.generate.generate", spy)  # (the opt-tree build imports it where it runs)
  run = methods_mod.build(BenchContext(model, params, ByteTokenizer()), "opt-tree",
                          {"heads": str(parts / "heads"), "shape": "static", "nodes": "6", "depth": "3"})
  assert len(seen) == 1 and seen[0] <= 40  # the calibration, within the context
  assert run(PROMPTS, NEW, 0).tokens == generate(model, params, PROMPTS, max_new_tokens=NEW).tokens


def test_an_oracle_lattice_wider_than_the_heads_vocabulary_is_refused_at_build(target, parts, monkeypatch):
  """bpd-oracle's t= above the heads' vocabulary was refused only when the runner ran, after its untimed greedy
  pass (found by a randomized differential test): now when the method is built, with the same message."""
  model, params = target
  seen = spy_generate(monkeypatch)
  _, name, opts = parse_method(f"bpd-oracle:heads={parts}/heads:k=3:t={model.vocab_size + 1}")
  with pytest.raises(InputError, match=f"t={model.vocab_size + 1} candidates per column .* give t={model.vocab_size}"):
    METHODS[name].build(BenchContext(model, params, Tokenizer()), opts)
  assert seen == []
