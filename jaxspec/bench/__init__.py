"""The Spec-Bench-style harness: τ, speedup and exactness of every method on the same prompts, in one run."""

from jaxspec.bench.methods import METHODS, BenchContext, MethodSpec, Unavailable, register
from jaxspec.bench.prompts import QUICK_PROMPTS, SPEC_BENCH_DEV, Prompt, load_prompts
from jaxspec.bench.runner import BenchConfig, run_bench

__all__ = ["METHODS", "QUICK_PROMPTS", "SPEC_BENCH_DEV", "BenchConfig", "BenchContext", "MethodSpec", "Prompt",
           "Unavailable", "load_prompts", "register", "run_bench"]
