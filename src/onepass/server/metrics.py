"""Server counters and their Prometheus text exposition (format 0.0.4).

The speculative counters carry vLLM's names and definitions (vllm/v1/spec_decode/metrics.py),
so that dashboards built for vLLM read them: drafts (verification steps), draft tokens
scored, draft tokens accepted, and accepted tokens per draft position. The queue and token
gauges use vLLM's names where vLLM has one (num_requests_waiting / running,
generation_tokens_total, prompt_tokens_total); the rest are onepass's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from onepass.outputs import SpecDecodeStats

RATE_WINDOW_SECONDS = 10.0
"""The tokens/s gauge averages over this many seconds."""


class ServerMetrics:
    """Updated by the scheduler thread, read by /metrics: every access holds the lock."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by status
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.spec = SpecDecodeStats()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the rate gauge

    def request_done(self, status: str) -> None:
        """status: finished, cancelled, timeout, error, rejected or shutdown."""
        with self._lock:
            self.requests[status] += 1

    def prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def step(self, tokens: int, spec_now: SpecDecodeStats, spec_seen: SpecDecodeStats) -> None:
        """A stream step emitted `tokens`; its request's speculative counts went from
        spec_seen to spec_now (spec_seen is brought up to date)."""
        delta = SpecDecodeStats(
            num_drafts=spec_now.num_drafts - spec_seen.num_drafts,
            num_draft_tokens=spec_now.num_draft_tokens - spec_seen.num_draft_tokens,
            num_accepted_tokens=spec_now.num_accepted_tokens - spec_seen.num_accepted_tokens,
            accepted_per_pos=[
                n - (spec_seen.accepted_per_pos[d] if d < len(spec_seen.accepted_per_pos) else 0)
                for d, n in enumerate(spec_now.accepted_per_pos)
            ],
        )
        spec_seen.merge(delta)
        now = time.monotonic()
        with self._lock:
            self.generation_tokens += tokens
            self.spec.merge(delta)
            self._recent.append((now, tokens))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_SECONDS

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_SECONDS:
            self._recent.popleft()

    def render(self, waiting: int, running: int) -> str:
        """The Prometheus text format."""
        rate = self.tokens_per_second()
        with self._lock:
            spec = self.spec
            per_pos = [(f'position="{d}"', n) for d, n in enumerate(spec.accepted_per_pos)]
            families = [
                ("vllm:num_requests_waiting", "gauge", "Requests waiting in the queue.",
                 [("", waiting)]),
                ("vllm:num_requests_running", "gauge", "Requests being generated.",
                 [("", running)]),
                ("onepass:requests_total", "counter",
                 "Requests that ended, by status (finished, cancelled: client left, timeout, "
                 "error, rejected: queue full, shutdown).",
                 [(f'status="{s}"', n) for s, n in sorted(self.requests.items())]),
                ("vllm:prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                 [("", self.prompt_tokens)]),
                ("vllm:generation_tokens_total", "counter", "Tokens generated.",
                 [("", self.generation_tokens)]),
                ("onepass:generation_tokens_per_second", "gauge",
                 f"Tokens generated per second over the last {RATE_WINDOW_SECONDS:g} s.",
                 [("", rate)]),
                ("vllm:spec_decode_num_drafts_total", "counter",
                 "Verification steps (target forwards after the prefill).",
                 [("", spec.num_drafts)]),
                ("vllm:spec_decode_num_draft_tokens_total", "counter", "Draft tokens scored.",
                 [("", spec.num_draft_tokens)]),
                ("vllm:spec_decode_num_accepted_tokens_total", "counter",
                 "Draft tokens accepted and emitted.", [("", spec.num_accepted_tokens)]),
                ("vllm:spec_decode_num_accepted_tokens_per_pos_total", "counter",
                 "Steps whose accepted draft reached this position (0: the first draft token).",
                 per_pos),
            ]  # fmt: skip
        model = f'model_name="{_escape(self.model_name)}"'
        lines = []
        for name, kind, help_, samples in families:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            for labels, value in samples:
                names = ",".join(filter(None, (model, labels)))
                lines.append(f"{name}{{{names}}} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
