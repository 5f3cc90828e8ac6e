"""The draft -> verify -> accept -> commit loop and its parts."""

from jaxspec.decoding.accept import GreedyAcceptance, SampleAcceptance
from jaxspec.decoding.generate import GenerationResult  # the function: jaxspec.generate (a module of this name)
from jaxspec.decoding.loop import DecodeOutput, LoopState, NoDraft, Stats, decode, decode_jit
from jaxspec.decoding.protocol import Acceptance, Draft, Drafter, LanguageModel, PrefillInfo, Verified
from jaxspec.decoding.sampling import SamplingParams, Warp

__all__ = ["Acceptance", "DecodeOutput", "Draft", "Drafter", "GenerationResult", "GreedyAcceptance",
           "LanguageModel", "LoopState", "NoDraft", "PrefillInfo", "SampleAcceptance", "SamplingParams", "Stats",
           "Verified", "Warp", "decode", "decode_jit"]
