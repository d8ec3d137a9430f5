"""Request outputs (vLLM's shapes) and speculative decoding statistics (vLLM's definitions)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    """Counts over the verification steps of a request (every target forward after prefill).

    mean_acceptance_length = 1 + num_accepted_tokens / num_drafts: tokens emitted per target
    forward, bonus token included, so plain decoding is exactly 1.0. Only emitted tokens count:
    when a stop condition ends the output inside a step, the tokens after it were not accepted.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    """accepted_per_pos[d]: steps whose accepted path reached depth d + 1."""

    def observe(self, num_draft_tokens: int, accepted: int) -> None:
        """One verification step: `num_draft_tokens` scored, `accepted` of them emitted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < accepted:
            self.accepted_per_pos.extend([0] * (accepted - len(self.accepted_per_pos)))
        for d in range(accepted):
            self.accepted_per_pos[d] += 1

    def merge(self, other: SpecDecodeStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for d, count in enumerate(other.accepted_per_pos):
            if d < len(self.accepted_per_pos):
                self.accepted_per_pos[d] += count
            else:
                self.accepted_per_pos.append(count)

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        """vLLM's per-position acceptance rate: accepted_per_pos[d] / num_drafts."""
        return [c / self.num_drafts for c in self.accepted_per_pos] if self.num_drafts else []

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (bonus tokens excluded)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_pos": list(self.accepted_per_pos),
            "mean_acceptance_length": self.mean_acceptance_length,
            "draft_acceptance_rate": self.draft_acceptance_rate,
        }


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    """Time to the first token."""
    total_seconds: float = 0.0
    method: str = "vanilla"
    lossless: bool = True
    """False only under an explicit lossy opt-in (typical acceptance)."""
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    drafting_seconds: float = 0.0
    """Of total_seconds, the time the drafter took to propose and to observe verdicts."""


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop" (EOS, a stop token or string), "length" (max_tokens or context full), or None."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended generation; None for EOS or length."""
    cumulative_logprob: float | None = None
    token_sources: list[str] | None = None
    """Per token, how it was produced: "target" (the target's own next token) or the name of
    the drafter whose draft the target accepted ("ngram", "suffix", ...)."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
