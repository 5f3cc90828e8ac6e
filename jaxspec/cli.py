"""`jaxspec` on the command line. Thin: every command is a library call; user errors end with one message."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

from jaxspec.errors import InputError, JaxspecError, OutOfMemory, Terminated


def _whole_number(ok, rule: str):
  """An argparse type: a whole number for which `ok` holds, else an error that states `rule`."""
  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not ok(v):
      raise argparse.ArgumentTypeError(f"{rule}, got {v}")
    return v
  return parse


_positive_int = _whole_number(lambda v: v >= 1, "must be >= 1")
_top_k = _whole_number(lambda v: v >= 0, "must be >= 0 (0: no top-k filter)")
# bench adds the batch index to the seed, and random keys take 64-bit integers
_seed = _whole_number(lambda v: -2 ** 62 < v < 2 ** 62, "must be greater than -2**62 and less than 2**62")


def _temperature(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
  if not (math.isfinite(v) and v >= 0):
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: greedy), got {text}")
  if v > 1e6:  # sampling is already uniform there; far above, T overflowed float32 with numpy warnings
    raise argparse.ArgumentTypeError(f"must be at most 1e6 (at that temperature sampling is already uniform over "
                                     f"the tokens top-k / top-p keep), got {text}")
  return v


def _folder(text: str) -> str:
  """A results folder: an empty name would write into (and clear old reports from) the current folder."""
  if not text.strip():
    raise argparse.ArgumentTypeError("must name a folder (use . for the current one)")
  return text


def _top_p(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
  if not 0.0 < v <= 1.0:  # NaN fails this too
    raise argparse.ArgumentTypeError(f"must be in (0, 1] (1: no top-p filter), got {text}")
  return v


def _check_fits(args, model, n_prompt: int) -> None:
  """The checks `generate()` makes on its settings, worded with `jaxspec generate`'s flags (the library's messages
  name its Python parameters: top_k, max_len, max_new_tokens)."""
  from jaxspec.decoding.protocol import decoder_prompt_len
  from jaxspec.models.llama import rope_context

  cfg = getattr(model, "cfg", None)
  vocab, context = getattr(cfg, "vocab_size", None), getattr(cfg, "max_seq_len", None)
  hard = bool(context) and getattr(model, "context_is_limit", False)  # the cache cannot be longer than this
  if args.temperature > 0 and vocab and args.top_k > vocab:
    raise InputError(f"--top-k {args.top_k} is more than the model's vocabulary ({vocab} tokens): use 0 (no filter) "
                     "or fewer.")
  if args.max_len and hard and args.max_len > context:
    raise InputError(f"--max-len {args.max_len} is more than the model's context length ({context} tokens): use at "
                     f"most {context}, or leave it out.")
  max_len = args.max_len or context
  dec = decoder_prompt_len(model)  # an encoder-decoder's cache holds its decoder's tokens only
  slots = dec or n_prompt
  need = slots + args.max_new_tokens
  if max_len and need > max_len:
    fixes = [] if dec else ["shorten " + ("the prompt file" if getattr(args, "prompt_file", None) else "--prompt")]
    if slots < max_len:  # new tokens fewer than max_len - slots would fit; a prompt this long fits no answer
      fixes.append(f"lower --max-new-tokens (to {max_len - slots} or fewer)")
    if not (hard and max_len >= context):
      fixes.append("raise --max-len" + (f" (up to the model's context length, {context})" if hard else ""))
    elif getattr(args, "context", None) is not None:
      fixes.append(f"load the model with a longer --context than {args.context} where its file allows one (leave "
                   "the option out for the file's own context)")
    elif rope_context(getattr(cfg, "rope_scaling", ())) == context:
      fixes.append(f"load the model with a longer --context (past LongRoPE's original {context} tokens its long "
                   "factors apply)")
    fix = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])}{',' * (len(fixes) > 2)} or {fixes[-1]}"
    what = "The decoder's start token" if dec else f"A prompt of {n_prompt} tokens"
    raise InputError(f"{what} plus {args.max_new_tokens} new tokens needs {need} cache slots, more than the cache "
                     f"length {max_len}: {fix}.")


def _note_greedy_filters(args) -> None:
  """Says so where --top-k or --top-p is given at temperature 0: they filter sampling, and greedy decoding ignores
  them (they are still checked)."""
  given = [f for f, on in (("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0)) if on]
  if given and args.temperature == 0:
    one = len(given) == 1
    print(f"jaxspec: {' and '.join(given)} {'filters' if one else 'filter'} sampling only: at --temperature 0 (the "
          f"default) decoding is greedy and ignores {'it' if one else 'them'}.", file=sys.stderr)


def _mesh(args):
  """The `--mesh` of a command as a `jax.sharding.Mesh` (None without one); checked before any model is loaded."""
  from jaxspec import sharding
  return sharding.make_mesh(args.mesh) if args.mesh is not None else None


def _model_options(parser) -> None:
  """The target's dtype and layer layout, for `generate` and `bench`."""
  from jaxspec.loading import DTYPES

  parser.add_argument("--dtype", default="float32", choices=DTYPES,
                      help="parameter and activation dtype (default float32: fastest on CPU, and bfloat16 can break "
                           "the methods' token identity with greedy decoding at near-ties)")
  parser.add_argument("--param-dtype", default=None, choices=DTYPES,
                      help="hold the weights in this dtype and compute in --dtype (default: --dtype); bfloat16 weights "
                           "with float32 compute kept greedy outputs identical (on CPU no faster, and larger)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="stack the layers under lax.scan: faster compiles (TPU, deep models), slower steps on CPU")
  parser.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "default"),
                      help="float32 matrix products on GPU and TPU: highest (the default) computes them in float32; "
                           "high and default (JAX's own: bfloat16 passes on TPU, TensorFloat-32 on recent GPUs) are "
                           "faster and can break the methods' token identity with greedy decoding at near-ties. "
                           "No effect on CPU")
  parser.add_argument("--context", type=_positive_int, default=None,
                      help="the model's context in tokens (prompt and output), at most what its file declares "
                           "(default: that, bounded where jaxspec computes the model exactly only within less, "
                           "which is logged). Past a LongRoPE model's original context (Phi-3 128k, Phi-3.5, "
                           "Phi-4-mini) its long factors apply at every position, as in llama.cpp")


def _read_prompt_file(path: str) -> str:
  """The text of --prompt-file (UTF-8; `-` reads standard input), without the newlines that end it, as the shell's
  `$(cat FILE)` drops them: an editor's final newline is not part of the prompt."""
  name = "standard input" if path == "-" else path
  if path == "-" and sys.stdin is None:  # Python's sys.stdin when the program started with it closed (`<&-`)
    raise InputError("--prompt-file - reads standard input, which is closed: pipe the text in, or pass a file or "
                     "--prompt.")
  try:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    # utf-8-sig: a byte-order mark is not text; Windows line ends read as "\n", as in the bench's prompt files
    return data.decode("utf-8-sig").replace("\r\n", "\n").rstrip("\n")
  except FileNotFoundError:
    raise InputError(f"No prompt file at {path}: pass a text file with --prompt-file, or the text with "
                     "--prompt.") from None
  except IsADirectoryError:
    raise InputError(f"--prompt-file {path} is a folder: pass a text file.") from None
  except UnicodeDecodeError as e:
    raise InputError(f"--prompt-file {name} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
  except OSError as e:
    raise InputError(f"Cannot read --prompt-file {path}: {e.strerror}.") from None


def _cmd_generate(args) -> int:
  from jaxspec.bench.methods import BenchContext, Unavailable, parse_method
  from jaxspec.loading import load_model

  if args.prompt_file is not None:
    args.prompt = _read_prompt_file(args.prompt_file)
  if not args.prompt.strip():
    where = "standard input" if args.prompt_file == "-" else f"the file {args.prompt_file}"
    raise InputError("The prompt is empty: pass some text with --prompt" + (f" ({where} holds none)."
                                                                              if args.prompt_file else "."))
  if "," in args.method:
    raise InputError(f"--method {args.method!r} names several methods: generate runs one (a comma list is for "
                     "`jaxspec bench --methods`).")
  label, name, opts = parse_method(args.method)
  _note_greedy_filters(args)
  mesh = _mesh(args)
  model, params, tok = load_model(args.model, dtype=args.dtype, scan_layers=args.scan_layers,
                                  param_dtype=args.param_dtype, matmul_precision=args.matmul_precision, mesh=mesh,
                                  context=args.context)
  text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
  # A chat template writes the special tokens itself; plain text gets the tokenizer's own (e.g. Llama 3's BOS).
  ids = tok.encode(text, add_bos=False if args.chat else None)
  if not ids:
    raise InputError("The prompt's text encodes to no tokens with this model's tokenizer (none of its characters is "
                     "in the vocabulary, and the tokenizer adds no start token): write the prompt in characters the "
                     "model knows.")
  _check_fits(args, model, len(ids))
  if args.cache_buckets and not getattr(model, "bounds_attention", False):
    raise InputError("--cache-buckets bounds a decoder-only (LLaMA-family) model's attention by its filled cache; "
                     "this model's decoder does not take it (it would run as without it): leave the option out.")
  ctx = BenchContext(model, params, tok, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, max_len=args.max_len, mesh=mesh, buckets=args.cache_buckets,
                     t5x_src=args.t5x_src, say=lambda message: print(f"jaxspec: {message}", file=sys.stderr))
  from jaxspec.bench.methods import build
  try:
    run = build(ctx, name, opts)  # by every process of a multi-host run, or by none
  except Unavailable as e:
    raise InputError(f"Method {label!r} cannot run here: {str(e).rstrip('.')}.") from None
  res = run([ids], args.max_new_tokens, args.seed)
  eos = ctx.eos_ids
  out = res.tokens[0]
  shown = out[:-1] if out and out[-1] in eos else out
  print(tok.decode(shown), flush=True)
  n = len(out)
  if args.temperature > 0:  # the method's name alone reads as greedy decoding ("greedy" is plain sampling here)
    label = ("sampling" if name == "greedy" else label) + f", temperature {args.temperature:g}" + (
        f", top-k {args.top_k}" if args.top_k else "") + (f", top-p {args.top_p:g}" if args.top_p < 1 else "")
  # τ counts the steps after the first token; an answer that ended there has none.
  tau = f"tau {res.tau:.2f} tokens per target call" if res.target_calls else "no verify step (one token)"
  print(f"[{label}: {n} tokens in {res.run_s:.2f} s: {n / res.run_s:.1f} tok/s, {tau}; compile {res.compile_s:.1f} s; "
        f"prompt {len(ids)} tokens]", file=sys.stderr)
  if not shown and not args.chat and getattr(tok, "chat_template", None):
    print("jaxspec: the model ended its answer at once (its first token was end-of-sequence). This model has a chat "
          "template: instruct models answer prompts wrapped in it, so try again with --chat.", file=sys.stderr)
  return 0


def _cmd_bench(args) -> int:
  from jaxspec.bench import METHODS, BenchConfig, run_bench
  from jaxspec.bench.report import summary_lines

  if args.list_methods:
    from jaxspec.bench.methods import option_help
    print("Methods, and their options (written method:key=value:key=value, e.g. bpd:k=4:gate=0.8):")
    for name, spec in METHODS.items():
      print(f"{name:<12} {spec.description}")
      for key in spec.options:
        print(f"{'':<14}{key}=  {option_help(name, key)}")
    return 0
  methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods is not None else None
  if methods == ():
    raise InputError("--methods names no method: give comma-separated names (jaxspec bench --list-methods).")
  named = methods is not None  # methods the user named must all run; of all methods, those that can
  if methods is None:
    methods = tuple(METHODS)  # everything; what cannot run here is reported as unavailable
  categories = (tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories is not None
                else None)
  if categories == ():
    raise InputError("--categories names no category: give comma-separated category names.")
  _note_greedy_filters(args)
  cfg = BenchConfig(prompts=args.prompts, methods=methods, limit=args.limit,
                    categories=categories,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, out=args.out, t5x_src=args.t5x_src,
                    model=args.model, quick=args.quick, mesh=args.mesh, fresh=args.fresh, dtype=args.dtype,
                    scan_layers=args.scan_layers, param_dtype=args.param_dtype,
                    matmul_precision=args.matmul_precision, context=args.context)
  res = run_bench(cfg, require_all=named)  # on Ctrl-C it says itself how many method runs it kept
  print("\n".join(summary_lines(res)))
  from jaxspec import files
  print(f"[results in {args.out}/: results.json, report.md, *.png]" if files.primary() else
        f"[results written by process 0 in its {args.out}/]", file=sys.stderr)
  return 0


def _cmd_train(args) -> int:
  try:
    from training.tasks import main_train
  except ImportError as e:
    raise InputError(f"The training package is not importable ({e}); install jaxspec from a source checkout "
                     "(pip install -e .).") from None
  main_train(args.config, args.overrides, check_only=args.check)
  return 0


MESH_HELP = ("shard over a device mesh, e.g. data=2,model=4 (batch over data; heads, mlp, vocab over model; -1 takes "
             "the devices left over); the sizes must multiply to the number of devices")


def _versions() -> str:
  """jaxspec's version and those of the libraries its results depend on (read from the installed packages' metadata,
  without importing JAX)."""
  from importlib.metadata import PackageNotFoundError, version

  from jaxspec import __version__

  parts = []
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    try:
      parts.append(f"{name} {version(name)}")
    except PackageNotFoundError:
      parts.append(f"{name} not installed")
  return f"jaxspec {__version__} ({', '.join(parts)})"


class _VersionAction(argparse.Action):
  """`--version`: the versions are read when asked for, not on every start."""

  def __init__(self, option_strings, dest, **kwargs):
    super().__init__(option_strings, dest, nargs=0, help="print jaxspec's version and its JAX libraries' and exit")

  def __call__(self, parser, namespace, values, option_string=None):
    print(_versions())
    parser.exit()


_TOP_K_HELP = "sample from the K most probable tokens only (0: no filter, the default); with --temperature > 0"
_TOP_P_HELP = "sample from the smallest set of tokens whose probability reaches P (1: no filter, the default); with " \
    "--temperature > 0"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxspec", description="Fast, lossless decoding of autoregressive models in JAX.")
  p.add_argument("--version", action=_VersionAction)
  sub = p.add_subparsers(dest="command", required=True)
  # Every command: join a multi-host run (jax.distributed; Cloud TPU VM slices are detected automatically).
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first: run the same command on every host of a slice")
  common.add_argument("--join-timeout", type=_positive_int, default=300, metavar="SECONDS",
                      help="with --distributed: how long to wait for every process to join (default 300, JAX's)")
  g = sub.add_parser("generate", help="generate text from a prompt", parents=[common])
  given = g.add_mutually_exclusive_group(required=True)
  given.add_argument("--prompt", help="the input text")
  given.add_argument("--prompt-file", metavar="PATH",
                     help="read the input text from a UTF-8 file (- reads stdin); the newlines that end it are dropped")
  g.add_argument("--model", default=None,
                 help="a .gguf file or Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
  g.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default 128")
  g.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
  g.add_argument("--top-k", type=_top_k, default=0, help=_TOP_K_HELP)
  g.add_argument("--top-p", type=_top_p, default=1.0, help=_TOP_P_HELP)
  g.add_argument("--seed", type=_seed, default=0)
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
  g.add_argument("--max-len", type=_positive_int, default=None,
                 help="upper limit on prompt + new tokens (default: the model's context length; the cache is sized "
                      "from the request)")
  _model_options(g)
  g.add_argument("--method", default="greedy",
                 help="decoding method, as in `jaxspec bench --list-methods` (e.g. bpd, bpd:k=4). The lossless ones "
                      "give greedy decoding's tokens at --temperature 0 (in float32, see --dtype) and sample from the "
                      "same distribution above it; not so bpd:approx=K, which accepts any of the target's top K "
                      "tokens, and cllm, which decodes its own distilled model, whose output may differ from the base "
                      "model's")
  g.add_argument("--mesh", default=None, help=MESH_HELP)
  g.add_argument("--t5x-src", default=None, help="a T5X source checkout, for --method t5x-greedy")
  g.add_argument("--cache-buckets", action="store_true",
                 help="bound attention in the loop by cache buckets (512, 1024, ... slots): one compiled forward per "
                      "bucket, same output; for long generations on accelerators (on this CPU it does not pay); "
                      "decoder-only (LLaMA-family) models")
  g.set_defaults(func=_cmd_generate)

  b = sub.add_parser("bench", help="tau, speedup and exactness of decoding methods on Spec-Bench-format prompts",
                     parents=[common])
  b.add_argument("--prompts", default=None,
                 help="JSONL with question_id, category, turns (default: jaxspec's own quick prompt set; the "
                      "Spec-Bench dev prompts are ../shared/data/spec_bench_dev.jsonl, beside a development checkout)")
  b.add_argument("--methods", default=None,
                 help="comma-separated method names, options after colons (bpd:k=4); default: all")
  b.add_argument("--list-methods", action="store_true", help="print the methods and their options, and exit")
  b.add_argument("--limit", type=_positive_int, default=None, help="prompts per category")
  b.add_argument("--categories", default=None, help="comma-separated categories to keep")
  b.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default 128 (32 with --quick)")
  b.add_argument("--batch-size", type=_positive_int, default=None,
                 help="prompts decoded together (default 1; 16 with --quick)")
  b.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
  b.add_argument("--top-k", type=_top_k, default=0, help=_TOP_K_HELP)
  b.add_argument("--top-p", type=_top_p, default=1.0, help=_TOP_P_HELP)
  b.add_argument("--seed", type=_seed, default=0)
  b.add_argument("--out", type=_folder, default="bench_out",
                 help="folder for results.json, report.md and plots (default: bench_out)")
  b.add_argument("--t5x-src", default=None, help="a T5X source checkout, for the t5x-greedy baseline")
  b.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
  _model_options(b)
  b.add_argument("--quick", action="store_true",
                 help="one prompt per category, 32 new tokens, batches of 16 (one batch for the quick set), no "
                      "warm-up run (a few minutes); a --limit, --max-new-tokens or --batch-size given still applies")
  b.add_argument("--mesh", default=None, help=MESH_HELP + " (baselines other than jaxspec's own loop run unsharded)")
  b.add_argument("--fresh", action="store_true",
                 help="start over: discard the method runs a killed run kept in --out, or a finished run's results, "
                      "whatever their settings; by default a run of the same work goes on from them, and one of other "
                      "work is refused")
  b.set_defaults(func=_cmd_bench)

  t = sub.add_parser("train", help="train from a config file (BPD heads, ...); resumes from its checkpoints",
                     parents=[common])
  t.add_argument("config", help="a YAML or TOML file, e.g. configs/bpd_smollm2.yaml")
  t.add_argument("overrides", nargs="*", default=[],  # (a default: argparse called it required without one)
                 help="key=value overrides, dotted for sections (optim.lr=3e-4); mesh=data=2,model=4 trains sharded")
  t.add_argument("--check", action="store_true",
                 help="check the config and its overrides (keys, types, ranges, the folders it reads and writes) as a "
                      "run does before any work, print the settings it would use, and exit without training")
  t.set_defaults(func=_cmd_train)
  return p


def _show_sharding_choices() -> None:
  """The sharding's fallbacks (a dimension a mesh axis cannot divide is replicated, e.g. SmolLM2's 9 heads on
  model=4) are INFO records of `jaxspec.sharding`: a command line prints them, once each, since they change what a
  mesh buys."""
  log = logging.getLogger("jaxspec.sharding")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jaxspec: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # `train` configures the root logger too: each record would print twice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """`build_parser().parse_args`, except that `train`'s key=value overrides may also follow its options: argparse
  ends the overrides at the first option, so `train cfg --distributed a=1` would leave `a=1` unrecognized."""
  parser = build_parser()
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    # `jaxspec --distributed train ...`: argparse calls the option unknown, or takes its value for the command. Said
    # when a command named later takes the option (a command's name may also be an option's value: --prompt train).
    option = argv[0].split("=", 1)[0]
    subs = _subparsers(parser)
    command = next((a for a in argv[1:] if a in subs and option in subs[a]._option_string_actions), None)
    if command:
      parser.error(f"{option} goes after the command's name: jaxspec {command} {argv[0]} ... (jaxspec {command} "
                   "--help lists its options).")
  # `--mesh -1,4` (README: "2,4", and "-1 takes the devices left over"): argparse takes a value that starts with "-"
  # and is no plain negative number for an option, and said "--mesh: expected one argument".
  for i in range(len(argv) - 2, -1, -1):
    if argv[i] == "--mesh" and re.match(r"-\d", argv[i + 1]):
      argv[i:i + 2] = [f"--mesh={argv[i + 1]}"]
  # generate's required --prompt / --prompt-file is checked after the unknown arguments: `--promt x` was told that
  # --prompt is required, not that --promt is not an option.
  # (Each such command's usage line is written first, so that it still shows the group as required.)
  required = {}
  for sub in _subparsers(parser).values():
    groups = [g for g in sub._mutually_exclusive_groups if g.required]
    if groups and sub.usage is None:
      sub.usage = sub.format_usage().removeprefix("usage: ").rstrip("\n").replace("%", "%%")
    for group in groups:
      group.required = False
    required[sub] = groups
  args, extra = parser.parse_known_args(argv)
  sub = _subparsers(parser).get(getattr(args, "command", None))
  if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
    args.overrides = [*args.overrides, *extra]
  elif extra:  # said by the command's own parser, whose usage line shows the options it takes
    (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(sub, extra)}")
  for group in required.get(sub, ()):
    if all(getattr(args, a.dest) is None for a in group._group_actions):
      names = " ".join(a.option_strings[0] for a in group._group_actions)
      sub.error(f"one of the arguments {names} is required")
  # `--model=~/m` (and `--out=~/o`): the shell expands a leading ~ of a word, not one after `--model=`, and the path
  # was taken as a folder named ~ (bench wrote its results into ./~/o). Expanded as the shell would, as train's
  # config paths are.
  for dest in ("model", "prompts", "prompt_file", "out", "t5x_src"):
    value = getattr(args, dest, None)
    if isinstance(value, str) and value.startswith("~"):
      setattr(args, dest, os.path.expanduser(value))
  return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  return dict(subs[0].choices) if subs else {}


def _did_you_mean(sub: argparse.ArgumentParser | None, extra: list[str]) -> str:
  """What to add to "unrecognized arguments": ` (--promt: did you mean --prompt?)` for each option in `extra` close
  to one `sub` takes."""
  import difflib

  if sub is None:
    return ""
  options = [o for o in sub._option_string_actions if o.startswith("--")]
  pairs = [(e.split("=", 1)[0], difflib.get_close_matches(e.split("=", 1)[0], options, n=1, cutoff=0.75))
           for e in extra if e.startswith("--")]
  said = [f"{given}: did you mean {close[0]}?" for given, close in pairs if close]
  if sub.prog.endswith(" train"):  # options that are config keys there: `--mesh -1,4` is `mesh=-1,4`
    said += ["--mesh: train takes it as the config key, mesh=VALUE" for e in extra if e.split("=", 1)[0] == "--mesh"]
  return f" ({' '.join(said)})" if said else ""


def _redeliver_swallowed_interrupts() -> None:
  """A Ctrl-C that lands inside a callback Python calls on its own (JAX's garbage-collection callback) is reported as
  an "Exception ignored in ..." traceback and lost: the command went on as if never interrupted. Such a report is
  turned back into an interrupt of the main thread, which then stops as any Ctrl-C does. It is sent from another
  thread a moment later: raised inside the hook, it would be swallowed the same way."""
  from jaxspec.errors import filter_unraisable, interrupt_again

  def redeliver(report) -> bool:
    if not isinstance(report.exc_value, KeyboardInterrupt):
      return False
    interrupt_again(report.exc_value)  # the same signal again
    return True

  filter_unraisable("redeliver-interrupts", redeliver)


def main(argv: list[str] | None = None) -> int:
  global _SIGNAL_TAKEN
  args, _SIGNAL_TAKEN = None, None  # (a signal an earlier call took, in a process that calls main more than once)
  try:
    _redeliver_swallowed_interrupts()
    from jaxspec import xla_defaults
    xla_defaults.apply_cpu_defaults()  # before anything starts JAX's CPU backend (jaxspec/xla_defaults.py)
    args = parse_args(argv)
    _show_sharding_choices()
    if args.distributed:
      _join_processes(args.join_timeout)
    code = args.func(args)
    if _SIGNAL_TAKEN is not None:
      # The program's handler took SIGINT or SIGTERM, but the work ended as if it had not: the exception was raised
      # inside library code that swallowed it, or its delivery again after an import was still due. (Seen once in a
      # test run under load: Ctrl-C half a second in, and the command printed its answer and exited 0.)
      return _interrupted(args)
    return code
  except JaxspecError as e:
    if _SIGNAL_TAKEN is not None:  # an error the interrupt caused where it landed (a file read cut short, say)
      return _interrupted(args)
    if isinstance(e, OutOfMemory) and getattr(args, "command", None) in _MEMORY_ADVICE:
      e = e.with_advice(_MEMORY_ADVICE[args.command])  # the command's flags, not the library's parameters
    print(f"jaxspec: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    return _interrupted(args, terminated=isinstance(e, Terminated))


def _join_processes(timeout_s: int) -> None:
  """`--distributed`: `jax.distributed.initialize()`, watched from a thread. JAX's wait for the other processes runs
  in C++ with the interpreter's signal handlers unable to run, so Ctrl-C and SIGTERM did nothing, and after its timeout
  JAX ended the process with a fatal log and a C++ stack trace. The thread reads the signals the interpreter records
  (`signal.set_wakeup_fd`) and ends the process with the usual message and exit code; past `timeout_s` it ends it with
  an error that says what was waited for (JAX's own timeout is set a minute later)."""
  import os
  import select
  import signal
  import threading
  import time

  from jaxspec.sharding import initialize_distributed

  n, address = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_COORDINATOR_ADDRESS")
  what = f"{n} processes at {address}" if n and address else "the other processes of the run"
  print(f"jaxspec: joining {what} (waiting up to {timeout_s} s, --join-timeout)", file=sys.stderr, flush=True)
  wake_r, wake_w = os.pipe()
  stop_r, stop_w = os.pipe()
  os.set_blocking(wake_w, False)
  try:
    previous = signal.set_wakeup_fd(wake_w)
  except ValueError:  # not the main thread (a caller's): JAX's wait is left as it is
    previous = None

  def watch():
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
      ready, _, _ = select.select([wake_r, stop_r], [], [], left)
      if stop_r in ready:
        return
      taken = [s for s in (os.read(wake_r, 64) if wake_r in ready else b"") if s in (signal.SIGINT, signal.SIGTERM)]
      if taken:  # the message and exit code of any interrupted command, at once
        _exit_now(_interrupted(None, terminated=taken[0] == signal.SIGTERM))
    print(f"jaxspec: error: not every process joined within {timeout_s} s (waiting for {what}): start the same "
          "command on every process of the run (each with its own JAX_PROCESS_ID, 0 to N-1, where they are set), or "
          "wait longer with --join-timeout.", file=sys.stderr)
    _exit_now(2)

  watcher = threading.Thread(target=watch, name="jaxspec-join", daemon=True)
  if previous is not None:
    watcher.start()
  try:
    initialize_distributed(timeout_s=timeout_s + 60)
  finally:
    os.write(stop_w, b"x")
    if previous is not None:
      watcher.join()
      signal.set_wakeup_fd(previous)
    for fd in (wake_r, wake_w, stop_r, stop_w):
      os.close(fd)


def _interrupted(args, terminated: bool | None = None) -> int:
  """Says the command was stopped and returns its exit code (130 for SIGINT, 143 for SIGTERM); `terminated`: by
  SIGTERM (None: by the signal the program's handler took)."""
  if terminated is None:
    import signal
    terminated = _SIGNAL_TAKEN == signal.SIGTERM
  print("jaxspec: terminated (SIGTERM)" if terminated else "jaxspec: interrupted", file=sys.stderr)
  global _EXIT_AT_ONCE
  # --distributed keeps the normal shutdown, whose jax.distributed barrier lets every host of the run leave together
  _EXIT_AT_ONCE = not getattr(args, "distributed", False)
  return 143 if terminated else 130


_EXIT_AT_ONCE = False  # set by `main` when it was interrupted
_SIGNAL_TAKEN: int | None = None  # the signal `_raise_outside_imports` took during `main`

# What to make smaller when a decode does not fit the devices' memory, in each command's flags.
_MEMORY_ADVICE = {
    "generate": "shorten the prompt (an encoder-decoder's encoder input grows its memory with its square), lower "
                "--max-new-tokens or a method's draft size, run in --dtype bfloat16, or shard over more devices "
                "(--mesh).",
    "bench": "lower --batch-size or --max-new-tokens (or a method's draft size), pass shorter prompts (--prompts), "
             "run in --dtype bfloat16, or shard over more devices (--mesh).",
    "train": "make the config's decoding or batches smaller: data.gen_batch_size or data.max_new_tokens (bpd, "
             "draft, eagle, rescore: the target's answers are decoded in batches), collect.batch_size, "
             "monitor.prompts or monitor.max_new_tokens (cllm), train.exact_match_examples (seq2seq), or "
             "train.batch_size; pass shorter prompts, set model.dtype=bfloat16 (not seq2seq), or shard over more "
             "devices (mesh=, for the bpd, draft and eagle tasks).",
}


def _raise_outside_imports(signum, frame) -> None:
  """SIGTERM's and SIGINT's handler. Raised inside an import (JAX's and numpy's take a second), the exception left a
  half-initialized module that failed later with a traceback, exit 1 (numpy turns an interrupt inside its import into
  an ImportError): the signal is then delivered again a moment later, after the import."""
  import signal
  global _SIGNAL_TAKEN
  _SIGNAL_TAKEN = signum
  error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
  f = frame
  while f is not None:
    if f.f_code.co_filename.startswith("<frozen importlib"):
      from jaxspec.errors import interrupt_again
      interrupt_again(error, after_s=0.05)
      return
    f = f.f_back
  raise error


def run() -> None:
  """The `jaxspec` program (`main` is the same without ending the process, for callers and tests)."""
  import signal
  if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # (one a caller set, or SIG_IGN, is left alone)
    signal.signal(signal.SIGTERM, _raise_outside_imports)
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's own: KeyboardInterrupt at once
    signal.signal(signal.SIGINT, _raise_outside_imports)
  _log_warnings_as_program_lines()
  code = main()
  if code in (130, 143) and _EXIT_AT_ONCE:
    _exit_now(code)
  sys.exit(code)


def _log_warnings_as_program_lines() -> None:
  """Warnings the program's modules log (a draft with another tokenizer, tensors a loader skips, a trainer's last
  checkpoint) print as `jaxspec: ...` lines, as its errors do. Without a handler of its own the first absl log call
  (orbax logs one on import) installs Python's default one, which printed them as `WARNING:training.trainer:...`."""
  root = logging.getLogger()
  if not root.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jaxspec: %(message)s"))
    root.addHandler(handler)


def _exit_now(code: int) -> None:
  """Ends the process at once, after flushing output and logs. A Ctrl-C that lands while XLA compiles or runs leaves
  XLA's threads working, and the interpreter's normal shutdown then crashed under them (a segmentation fault, exit
  code 139, after the message). Everything jaxspec writes is already whole on disk at any instant (temporary names,
  then renames; checkpoints waited for by the code the interrupt passed through), so nothing is lost by skipping it.
  The program does this after an interrupt (`run`), except with --distributed, where the normal shutdown's barrier
  lets the hosts of a run leave together."""
  import logging
  import os

  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  logging.shutdown()
  os._exit(code)


if __name__ == "__main__":
  run()
