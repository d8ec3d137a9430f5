"""Benchmark harness following Spec-Bench (Xia et al. 2024, "Unlocking Efficiency in Large
Language Model Inference: A Comprehensive Survey of Speculative Decoding").

Prompts come in Spec-Bench's JSONL format (`question_id`, `category`, `turns`). After a short
warm-up of every runner, each prompt is decoded by plain decoding ("vanilla") and then by each
method, one after the other in the same process, so that all methods of a prompt see the same
machine state. With repeats, the whole round of methods is repeated, each round starting from
what the drafters had learned before the prompt, and each (prompt, method) keeps its median
run. The speedup of a method is the geometric mean, over prompts, of its tokens/s divided by
vanilla's tokens/s on the same prompt.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from onepass.bench.questions import BenchError, Question, load_questions, select
from onepass.bench.runners import (
    HF_PROMPT_LOOKUP_TOKENS,
    Encoder,
    Message,
    OnepassRunner,
    Runner,
    Sampling,
    Turn,
    check_peers,
    check_variant,
    encoder,
    hf_runners,
    llamacpp_runner,
    resolve_methods,
)
from onepass.errors import OnepassError
from onepass.models.loading import DEFAULT_WEIGHTS
from onepass.outputs import SpecDecodeStats

WARMUP_TOKENS = 8
# Not one of the questions: drafters that learn across requests would otherwise time the first
# question after having seen its prompt and the start of its answer.
WARMUP_PROMPT = "Write one sentence about the sea."

# -- interleaved runs ---------------------------------------------------------------------------


@dataclass
class Conversation:
    """A runner's answers to one question (one turn, or every turn with multi-turn)."""

    prompt_tokens: int
    turns: list[Turn]

    @property
    def token_ids(self) -> list[list[int]]:
        return [t.token_ids for t in self.turns]

    @property
    def new_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.turns)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def prefill_seconds(self) -> float | None:
        """Seconds to each turn's first token, summed; None if the runner does not report it."""
        if any(t.prefill_seconds is None for t in self.turns):
            return None
        return sum(t.prefill_seconds for t in self.turns)

    @property
    def drafting_share(self) -> float | None:
        """Of the seconds after each turn's first token, the share the drafter took (proposing
        and observing); None if the runner does not report it."""
        prefill = self.prefill_seconds
        if prefill is None or any(t.drafting_seconds is None for t in self.turns):
            return None
        seconds = self.seconds - prefill
        drafting = sum(t.drafting_seconds for t in self.turns)
        return drafting / seconds if seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after each turn's first / seconds after it: the decoding loop without the
        prompt's prefill. None if the runner does not report its prefill time."""
        prefill = self.prefill_seconds
        if prefill is None:
            return None
        seconds = self.seconds - prefill
        tokens = self.new_tokens - sum(1 for t in self.turns if t.token_ids)
        return tokens / seconds if seconds > 0 and tokens > 0 else None

    @property
    def stats(self) -> SpecDecodeStats | None:
        if any(t.stats is None for t in self.turns):
            return None
        total = SpecDecodeStats()
        for t in self.turns:
            total.merge(t.stats)
        return total


def converse(
    runner: Runner, question: Question, encode: Encoder, max_tokens: int, multi_turn: bool
) -> Conversation:
    """Answer the first turn, or every turn feeding the runner's own answers back."""
    messages: list[Message] = []
    turns: list[Turn] = []
    prompt_tokens = 0
    for text in question.turns if multi_turn else question.turns[:1]:
        messages.append({"role": "user", "content": text})
        try:
            ids = encode(messages)
            prompt_tokens = prompt_tokens or len(ids)
            turn = runner.run(ids, max_tokens)
        except (OnepassError, ValueError) as e:
            raise BenchError(f"question {question.question_id} ({runner.name}): {e}") from None
        turns.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return Conversation(prompt_tokens, turns)


@dataclass
class Record:
    """One (question, method) result: the median of its repeats by tokens/s."""

    question_id: int | str
    category: str
    method: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    prefill_seconds: float | None
    """Of `seconds`, the time to the first token (None for runners that do not report it)."""
    tokens_per_s: float
    speedup: float | None
    """tokens/s over vanilla's tokens/s on the same question (None if either is 0)."""
    decode_speedup: float | None
    """The same ratio without the prompt's prefill (decode_tokens_per_s; None for runners that
    do not report their prefill time)."""
    mean_acceptance_length: float | None
    free_verification_speedup: float | None
    """The speedup this method's acceptance allows if each of its forwards cost one plain
    decoding step and drafting took no time (free_verification_speedup; None for peers)."""
    identical_to_vanilla: bool | None
    """Greedy only: the same token ids as vanilla in every turn (None when sampling)."""
    drafting_share: float | None = None
    """Of the decoding seconds (prefill excluded), the share the drafter took."""
    num_drafts: int | None = None
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None
    accepted_per_pos: list[int] | None = None
    turns: int = 1
    repeat_seconds: list[float] = field(default_factory=list)


def median_run(runs: Sequence[Conversation]) -> Conversation:
    """The run with the median tokens/s (for an even count, the slower of the middle two)."""
    ranked = sorted(runs, key=lambda c: c.tokens_per_s)
    return ranked[(len(ranked) - 1) // 2]


def make_record(
    question: Question,
    method: str,
    runs: Sequence[Conversation],
    vanilla: Conversation,
    greedy: bool,
) -> Record:
    run = median_run(runs)
    stats = run.stats
    rates_ok = run.tokens_per_s > 0 and vanilla.tokens_per_s > 0
    decode, decode_vanilla = run.decode_tokens_per_s, vanilla.decode_tokens_per_s
    return Record(
        question_id=question.question_id,
        category=question.category,
        method=method,
        prompt_tokens=run.prompt_tokens,
        new_tokens=run.new_tokens,
        seconds=run.seconds,
        prefill_seconds=run.prefill_seconds,
        tokens_per_s=run.tokens_per_s,
        speedup=run.tokens_per_s / vanilla.tokens_per_s if rates_ok else None,
        decode_speedup=decode / decode_vanilla if decode and decode_vanilla else None,
        mean_acceptance_length=stats.mean_acceptance_length if stats else None,
        free_verification_speedup=free_verification_speedup(run, vanilla),
        identical_to_vanilla=run.token_ids == vanilla.token_ids if greedy else None,
        drafting_share=run.drafting_share,
        num_drafts=stats.num_drafts if stats else None,
        num_draft_tokens=stats.num_draft_tokens if stats else None,
        num_accepted_tokens=stats.num_accepted_tokens if stats else None,
        accepted_per_pos=list(stats.accepted_per_pos) if stats else None,
        turns=len(run.turns),
        repeat_seconds=[r.seconds for r in runs],
    )


def free_verification_speedup(run: Conversation, vanilla: Conversation) -> float | None:
    """The run's tokens/s over vanilla's if each of its forwards took one plain decoding step
    (vanilla's seconds per forward after its prefill) and drafting took no time: what its
    acceptance allows. The gap to the measured speedup is what verification and drafting cost;
    a ceiling below a target means that reaching it takes more acceptance, not cheaper steps."""
    stats, plain, prefill = run.stats, vanilla.stats, vanilla.prefill_seconds
    if stats is None or plain is None or prefill is None or not plain.num_drafts:
        return None
    per_forward = (vanilla.seconds - prefill) / plain.num_drafts
    seconds = prefill + per_forward * stats.num_drafts
    return run.new_tokens / seconds / vanilla.tokens_per_s if vanilla.tokens_per_s > 0 else None


def run_questions(
    questions: Sequence[Question],
    runners: Sequence[Runner],
    encode: Encoder,
    *,
    max_tokens: int,
    repeats: int = 1,
    multi_turn: bool = False,
    greedy: bool = True,
    on_run: Callable[[Question | None, str], None] | None = None,
) -> list[Record]:
    """Warm every runner up, then for each question run all runners back to back (the first
    runner is the baseline), `repeats` rounds; one record per (question, runner)."""
    if not questions or not runners:
        raise BenchError("nothing to run: no questions or no methods")
    warm = [{"role": "user", "content": WARMUP_PROMPT}]
    for runner in runners:  # first calls pay for allocation, drafter set-up, cost curves
        try:
            runner.run(encode(warm), min(WARMUP_TOKENS, max_tokens))
        except (OnepassError, ValueError) as e:
            raise BenchError(f"warm-up ({runner.name}): {e}") from None
        if on_run:
            on_run(None, runner.name)
    records: list[Record] = []
    for question in questions:
        runs: dict[str, list[Conversation]] = {r.name: [] for r in runners}
        # Drafters learn across requests (recycling's memory, auto's estimates): every repeat
        # starts from what they knew before this prompt, so a repeat is not timed drafting
        # from the previous repeat's answer (that made a second run of auto ~25% faster).
        states = [runner.checkpoint() for runner in runners] if repeats > 1 else []
        for repeat in range(repeats):
            if repeat:
                for runner, state in zip(runners, states, strict=True):
                    runner.rewind(state)
            for runner in runners:
                runs[runner.name].append(converse(runner, question, encode, max_tokens, multi_turn))
                if on_run:
                    on_run(question, runner.name)
        vanilla = median_run(runs[runners[0].name])
        records += [make_record(question, m, r, vanilla, greedy) for m, r in runs.items()]
    return records


# -- summary ------------------------------------------------------------------------------------


def geometric_mean(values: Sequence[float]) -> float:
    if not values or any(v <= 0 for v in values):
        raise ValueError("the geometric mean needs at least one value, all positive")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def group_summary(records: Sequence[Record]) -> dict[str, Any]:
    """speedup (and decode_speedup, prefill excluded, and free_verification_speedup):
    geometric mean of per-question ratios;
    tokens_per_s: total new tokens / total seconds; acceptance: vLLM's pooled counts
    (1 + accepted / drafts; accepted_per_pos[d] / drafts)."""
    ratios = [r.speedup for r in records if r.speedup is not None]
    decode_ratios = [r.decode_speedup for r in records if r.decode_speedup is not None]
    ceilings = [
        r.free_verification_speedup for r in records if r.free_verification_speedup is not None
    ]
    seconds = sum(r.seconds for r in records)
    counted = [r for r in records if r.num_drafts]
    drafts = sum(r.num_drafts for r in counted)
    per_pos: list[int] = []
    for r in counted:
        for d, count in enumerate(r.accepted_per_pos or []):
            per_pos.extend([0] * (d + 1 - len(per_pos)))
            per_pos[d] += count
    checked = [r.identical_to_vanilla for r in records if r.identical_to_vanilla is not None]
    shares = [r.drafting_share for r in records if r.drafting_share is not None]
    return {
        "speedup": geometric_mean(ratios) if ratios else None,
        "decode_speedup": geometric_mean(decode_ratios) if decode_ratios else None,
        "free_verification_speedup": geometric_mean(ceilings) if ceilings else None,
        "tokens_per_s": sum(r.new_tokens for r in records) / seconds if seconds > 0 else 0.0,
        "mean_acceptance_length": (
            1 + sum(r.num_accepted_tokens for r in counted) / drafts if drafts else None
        ),
        "acceptance_per_position": [c / drafts for c in per_pos] if drafts else [],
        "identical_fraction": sum(checked) / len(checked) if checked else None,
        "drafting_share": sum(shares) / len(shares) if shares else None,
        "num_questions": len(records),
    }


def summarize(records: Sequence[Record]) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {"overall": {...}, category: {...}}} in the order methods and categories first
    appear."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for method in dict.fromkeys(r.method for r in records):
        mine = [r for r in records if r.method == method]
        summary[method] = {"overall": group_summary(mine)}
        for category in dict.fromkeys(r.category for r in mine):
            summary[method][category] = group_summary([r for r in mine if r.category == category])
    return summary


# -- environment --------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    import torch

    return {
        "onepass": _version("onepass"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- the whole benchmark ------------------------------------------------------------------------


@dataclass
class BenchSettings:
    dataset: str | None = None
    """Spec-Bench JSONL file; None = the prompt set shipped with onepass."""
    categories: list[str] | None = None
    """Categories to run (None = all)."""
    limit_per_category: int | None = None
    methods: list[str] | None = None
    """Speculative methods besides vanilla (None = every registered method that loads)."""
    variants: dict[str, Any] = field(default_factory=dict)
    """More methods, each a name and its own speculative config (run after `methods`)."""
    peers: list[str] = field(default_factory=list)
    """Other implementations on the same prompts: "hf" (adds hf, hf_pld), "llamacpp"."""
    sampling: Sampling = field(default_factory=Sampling)
    repeats: int = 1
    """Rounds per question; each (question, method) keeps its median run."""
    multi_turn: bool = False
    """Answer every turn, feeding the model's own answers back (else the first turn only)."""
    chat_template: bool = True
    """Use the tokenizer's chat template when it has one."""

    def __post_init__(self) -> None:
        for name in ("repeats", "limit_per_category"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BenchError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.sampling.max_tokens < 1:
            raise BenchError(f"max-tokens must be at least 1, got {self.sampling.max_tokens}")


def prepare(settings: BenchSettings) -> tuple[list[Question], list[str], list[str]]:
    """Check every input before any model is loaded: (questions, methods, skipped methods)."""
    from onepass.sampling import SamplingParams

    s = settings.sampling
    SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    questions = select(
        load_questions(settings.dataset), settings.categories, settings.limit_per_category
    )
    methods, skipped = resolve_methods(settings.methods)
    for name, config in settings.variants.items():
        check_variant(name, config, methods)
        methods.append(name)
    check_peers(settings.peers)
    return questions, methods, skipped


def run_benchmark(
    settings: BenchSettings,
    model: str = "default",
    *,
    dtype: str = "float32",
    device: str | None = None,
    max_model_len: int | None = None,
    weights: str = DEFAULT_WEIGHTS,
    kv_cache_dtype: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; return the JSON-ready results (env, model, settings, records,
    summary)."""
    import torch
    from tqdm import tqdm

    from onepass.llm import LLM
    from onepass.models import cpu_kernels

    questions, methods, skipped = prepare(settings)
    llm = LLM(
        model,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        weights=weights,
        kv_cache_dtype=kv_cache_dtype,
    )
    sampling = settings.sampling
    runners: list[Runner] = [
        OnepassRunner(llm, m, sampling, settings.variants.get(m)) for m in methods
    ]
    if "hf" in settings.peers:
        runners += hf_runners(llm, model, sampling, getattr(torch, dtype))
    if "llamacpp" in settings.peers:
        runners.append(llamacpp_runner(llm, model, sampling))
    use_chat = settings.chat_template and bool(getattr(llm.tokenizer, "chat_template", None))
    total = len(runners) * (1 + len(questions) * settings.repeats)
    with tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar:

        def on_run(question: Question | None, name: str) -> None:
            where = "warm-up" if question is None else f"q{question.question_id}"
            bar.set_postfix_str(f"{where} {name}")
            bar.update()

        records = run_questions(
            questions,
            runners,
            encoder(llm, use_chat),
            max_tokens=sampling.max_tokens,
            repeats=settings.repeats,
            multi_turn=settings.multi_turn,
            greedy=sampling.temperature == 0,
            on_run=on_run,
        )
    return {
        "env": environment(llm.device),
        "model": llm.model_name,
        "settings": {
            **asdict(settings),
            "model": model,
            "dtype": dtype,
            "weights": weights,
            "kv_cache_dtype": str(llm.backend.kv_dtype).removeprefix("torch."),
            "cpu_kernels": cpu_kernels.selected_isa(),
            "max_model_len": llm.max_model_len,
            "methods": [r.name for r in runners],
            "skipped_methods": skipped,
            "chat_template": use_chat,
            "categories": list(dict.fromkeys(q.category for q in questions)),
            "num_questions": len(questions),
            "warmup_tokens": min(WARMUP_TOKENS, sampling.max_tokens),
            "hf_prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS,
        },
        "records": [asdict(r) for r in records],
        "summary": summarize(records),
    }
