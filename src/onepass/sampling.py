"""Sampling parameters (vLLM / OpenAI names and defaults) and the logits -> probabilities
pipeline shared by plain decoding, the verifiers and the drafters.

Order of operations, as vLLM's V1 sampler: penalties (repetition, presence, frequency) and
min_tokens on raw logits; then temperature, min_p, top_k, top_p. `temperature == 0` (or below
1e-5) is greedy: the argmax of the penalised logits. Under sampling, speculative decoding
promises exactly the distribution this module produces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onepass.errors import InputError
from onepass.validation import OptionTypeError, check_values

GREEDY_EPSILON = 1e-5
"""Temperatures below this are greedy decoding (as vLLM): dividing logits by them overflows."""
SEED_RANGE = (-(2**63), 2**64)
"""Seeds accepted (torch's generator takes this range)."""
MAX_N = 128


@dataclass(frozen=True)
class SamplingParams:
    """Immutable: derive a changed copy with `params.replace(max_tokens=...)`, which validates
    again. Every value is checked when the object is built: types, ranges, finiteness."""

    n: int = 1
    """Number of completions per prompt (at most 128)."""
    temperature: float = 1.0
    """0 (or below 1e-5) means greedy decoding."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Seed of this request's random generator; None draws one."""
    max_tokens: int | None = 16
    """Most tokens to generate; None = until the context window is full. Prompt + max_tokens
    must fit in the context window (max_model_len)."""
    min_tokens: int = 0
    """EOS, stop_token_ids and stop strings are held back until this many tokens are
    generated (as vLLM)."""
    stop: str | list[str] | None = None
    """Strings that end generation; not included in the output unless asked."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation, besides EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (divides positive logits)."""
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens that occur in the output."""
    frequency_penalty: float = 0.0
    """Subtracted from the logits of tokens once per occurrence in the output."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    """Not supported: must stay None."""
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        try:
            values = check_values(SamplingParams, values)
        except OptionTypeError as e:
            raise InputError(str(e)) from None
        for name in ("stop", "stop_token_ids"):  # lists become tuples: immutable
            if isinstance(values[name], list):
                values[name] = tuple(values[name])
        for name, value in values.items():
            object.__setattr__(self, name, value)

        def bad(name: str, rule: str) -> InputError:
            return InputError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer in 1..{MAX_N}")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "-1, 0 (both disable) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1 or None")
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise bad("min_tokens", "in [0, max_tokens]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise bad("seed", "an integer in [-2**63, 2**64), or None")
        if self.logprobs is not None:
            raise InputError("logprobs are not supported yet")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(stops):
            raise bad("stop", "a non-empty string or a list of them")
        object.__setattr__(self, "stop_strings", stops)
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise bad("stop_token_ids", "a list of token ids")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied, validated like a new object."""
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


class LogitsProcessor:
    """Per-request state for penalties and min_tokens, plus the warping to probabilities.

    Rows of a speculative forward extend the committed sequence by different draft tokens, so
    `process` takes, for each row, the draft tokens that precede its prediction.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.num_generated = 0
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids |= set(eos_token_ids)
        self.blocked_until_min = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.output_counts = torch.zeros(vocab_size, device=device)  # [vocab]
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [vocab]
        if params.has_penalties:
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
            self.in_prompt[ids[ids < vocab_size]] = True

    def observe(self, tokens: Sequence[int]) -> None:
        """Record emitted tokens."""
        self.num_generated += len(tokens)
        if self.params.has_penalties:
            for t in tokens:
                self.output_counts[t] += 1

    def process(self, logits: Tensor, row_drafts: Sequence[Sequence[int]] | None = None) -> Tensor:
        """logits: [rows, vocab]; row_drafts[r] = draft tokens between the committed output and
        row r's prediction (None = no row extends it). Returns penalised logits [rows, vocab]."""
        p = self.params
        rows = logits.shape[0]
        depths = [len(d) for d in row_drafts] if row_drafts is not None else [0] * rows
        if p.min_tokens and self.num_generated < p.min_tokens and self.blocked_until_min.numel():
            logits = logits.clone()
            for r in range(rows):
                if self.num_generated + depths[r] < p.min_tokens:
                    logits[r, self.blocked_until_min] = float("-inf")
        if not p.has_penalties:
            return logits
        counts = self.output_counts.expand(rows, -1).clone()  # [rows, vocab]
        if row_drafts is not None:
            for r, draft in enumerate(row_drafts):
                for t in draft:
                    counts[r, t] += 1
        logits = logits.clone()
        if p.repetition_penalty != 1.0:
            seen = self.in_prompt | (counts > 0)
            penalised = torch.where(
                logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty
            )
            logits = torch.where(seen, penalised, logits)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    def probs(self, logits: Tensor) -> Tensor:
        """Penalised logits [rows, vocab] -> sampling distribution [rows, vocab]."""
        return warp(logits, self.params)


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """temperature, min_p, top_k, top_p -> probabilities [rows, vocab] (sampling only)."""
    logits = logits.float() / params.temperature
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        total = sorted_probs.sum(-1, keepdim=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        drop_sorted = before >= params.top_p * total
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from probs: [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator))


class RequestRandomness:
    """A request's randomness, all derived from its seed.

    `choose(probs, index)` samples the token at output index `index` by an exponential race,
    argmax(probs / E) with E ~ Exp(1) drawn from a counter-based generator (Philox) keyed by
    the seed, with the index in the counter's high word so that streams never overlap: exactly a
    draw from probs, independent across indices, and the same draw whichever drafter is used
    and however many tokens a step accepts. So with deterministic drafts, speculative sampling
    emits the very tokens plain sampling emits for the same seed. `generator` serves the
    rejection-sampling verifiers.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, probs: Tensor, index: int) -> int:
        """probs: [vocab] -> one token id for output position `index`."""
        bits = np.random.Philox(key=self.seed % 2**128, counter=index << 128)
        noise = np.random.Generator(bits).standard_exponential(probs.shape[-1], dtype=np.float32)
        return int(torch.argmax(probs.float().cpu() / torch.from_numpy(noise)))
