"""onepass: lossless speculative decoding. Draft several tokens, score them in one forward
pass of the target model, accept exactly what the target's own distribution allows."""

from onepass.config import SpeculativeConfig
from onepass.errors import ModelLoadError, OnepassError
from onepass.llm import LLM
from onepass.outputs import CompletionOutput, RequestOutput, SpecDecodeStats
from onepass.sampling import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "ModelLoadError",
    "OnepassError",
    "RequestOutput",
    "SamplingParams",
    "SpecDecodeStats",
    "SpeculativeConfig",
]
