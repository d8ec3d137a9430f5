"""Benchmark harness following Spec-Bench (Xia et al. 2024, "Unlocking Efficiency in Large
Language Model Inference: A Comprehensive Survey of Speculative Decoding").

Prompts come in Spec-Bench's JSONL format (`question_id`, `category`, `turns`). After a short
warm-up of every runner, each prompt is decoded by plain decoding ("vanilla") and then by each
method, one after the other in the same process, so that all methods of a prompt see the same
machine state. With repeats, the whole round of methods is repeated and each (prompt, method)
keeps its median run. The speedup of a method is the geometric mean, over prompts, of its
tokens/s divided by vanilla's tokens/s on the same prompt.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Protocol

from onepass.errors import OnepassError
from onepass.outputs import SpecDecodeStats

VANILLA = "vanilla"
PEERS: dict[str, tuple[str, ...]] = {"hf": ("hf", "hf_pld"), "llamacpp": ("llamacpp",)}
"""--peers name -> the methods it adds (other implementations, run on the same prompts)."""
HF_PROMPT_LOOKUP_TOKENS = 10
WARMUP_TOKENS = 8

Message = dict[str, str]
Encoder = Callable[[list[Message]], list[int]]
"""Turns a conversation (user turns and the model's answers so far) into prompt token ids."""


class BenchError(OnepassError):
    """A bad benchmark input (dataset, category, method, peer) or a failed run."""


# -- dataset ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read a Spec-Bench JSONL file; None reads the small prompt set shipped with onepass."""
    if path is None:
        source = resources.files("onepass") / "data" / "prompts.jsonl"
        return _parse_lines(source.read_text(encoding="utf-8").splitlines(), "built-in prompts")
    file = Path(path).expanduser()
    if not file.is_file():
        raise BenchError(f"dataset {str(file)!r} not found (expected a Spec-Bench .jsonl file)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read dataset {file} ({e})") from None
    return _parse_lines(text.splitlines(), str(file))


def _parse_lines(lines: Iterable[str], source: str) -> list[Question]:
    questions, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question = _parse_question(line, f"{source}, line {number}")
        if question.question_id in seen:
            raise BenchError(
                f"{source}, line {number}: duplicate question_id {question.question_id}"
            )
        seen.add(question.question_id)
        questions.append(question)
    if not questions:
        raise BenchError(f"{source} holds no questions")
    return questions


def _parse_question(line: str, where: str) -> Question:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise BenchError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise BenchError(f"{where}: expected a JSON object")
    missing = [key for key in ("question_id", "category", "turns") if key not in item]
    if missing:
        raise BenchError(f"{where}: missing key(s) {', '.join(missing)}")
    qid, category, turns = item["question_id"], item["category"], item["turns"]
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise BenchError(f"{where}: question_id must be an integer or a string")
    if not isinstance(category, str) or not category:
        raise BenchError(f"{where}: category must be a non-empty string")
    if not isinstance(turns, list) or not turns:
        raise BenchError(f"{where}: turns must be a non-empty list of strings")
    if not all(isinstance(t, str) and t.strip() for t in turns):
        raise BenchError(f"{where}: every turn must be a non-empty string")
    return Question(qid, category, tuple(turns))


def select(
    questions: Sequence[Question], categories: Sequence[str] | None, limit: int | None
) -> list[Question]:
    """Keep the given categories (all if None) and at most `limit` questions of each, in file
    order."""
    available = list(dict.fromkeys(q.category for q in questions))
    unknown = [c for c in categories or () if c not in available]
    if unknown:
        raise BenchError(
            f"unknown category {unknown[0]!r}; the dataset has: {', '.join(available)}"
        )
    wanted = set(categories or available)
    taken: dict[str, int] = {}
    chosen = []
    for q in questions:
        if q.category in wanted and (limit is None or taken.get(q.category, 0) < limit):
            taken[q.category] = taken.get(q.category, 0) + 1
            chosen.append(q)
    return chosen


# -- methods ------------------------------------------------------------------------------------


def check_method(name: str) -> None:
    """Raise a BenchError unless `name` is vanilla or an importable speculative method."""
    from onepass.config import SpeculativeConfig
    from onepass.drafters import METHODS

    if name == VANILLA:
        return
    peer = next((p for p, names in PEERS.items() if name in names), None)
    if peer:
        raise BenchError(f"{name!r} is a peer, not a method: use --peers {peer}")
    if name not in METHODS:
        valid = ", ".join([VANILLA, *METHODS])
        raise BenchError(f"unknown method {name!r}; valid: {valid}")
    try:
        SpeculativeConfig.parse({"method": name})
    except (ImportError, SyntaxError) as e:  # a registered drafter whose module is unfinished
        raise BenchError(f"method {name!r} cannot be loaded ({e})") from None


def resolve_methods(names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Vanilla first, then the given methods in order (default: every registered method that
    loads). Returns (methods, skipped default methods)."""
    from onepass.drafters import METHODS

    if names is not None:
        for name in names:
            check_method(name)
        return list(dict.fromkeys([VANILLA, *names])), []
    methods, skipped = [VANILLA], []
    for name in METHODS:
        try:
            check_method(name)
            methods.append(name)
        except BenchError:
            skipped.append(name)
    return methods, skipped


def check_peers(peers: Sequence[str]) -> None:
    from importlib.util import find_spec

    for peer in peers:
        if peer not in PEERS:
            raise BenchError(f"unknown peer {peer!r}; valid: {', '.join(PEERS)}")
    if "llamacpp" in peers and find_spec("llama_cpp") is None:
        raise BenchError(
            "--peers llamacpp needs llama-cpp-python, which is not installed "
            "(pip install llama-cpp-python); the hf peer does not need it"
        )


# -- runners ------------------------------------------------------------------------------------


@dataclass
class Turn:
    """One generation: the new tokens, their text and the wall time of decoding them."""

    token_ids: list[int]
    text: str
    seconds: float
    stats: SpecDecodeStats | None = None
    """Speculative decoding counts; None when the runner does not report them (peers)."""


class Runner(Protocol):
    name: str

    def run(self, prompt_ids: list[int], max_tokens: int) -> Turn: ...


@dataclass
class Sampling:
    """The sampling settings every runner uses (vLLM names; temperature 0 = greedy)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class OnepassRunner:
    """onepass's LLM with one speculative config (None = plain decoding). Time is the engine's
    own measure (prefill + decoding, after tokenization)."""

    def __init__(self, llm: Any, name: str, sampling: Sampling) -> None:
        from onepass.sampling import SamplingParams

        self.llm, self.name = llm, name
        self.spec = None if name == VANILLA else {"method": name}
        self.params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
        )

    def run(self, prompt_ids: list[int], max_tokens: int) -> Turn:
        params = replace(self.params, max_tokens=max_tokens)
        out = self.llm.generate(
            {"prompt_token_ids": prompt_ids}, params, speculative_config=self.spec
        )[0]
        completion = out.outputs[0]
        return Turn(
            completion.token_ids, completion.text, out.metrics.total_seconds, out.metrics.spec
        )


class HFRunner:
    """transformers' `generate` on the same weights: plain decoding, or its prompt lookup."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, config: Any, seed: int | None = None
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config, self.seed = config, seed

    def run(self, prompt_ids: list[int], max_tokens: int) -> Turn:
        import torch

        ids = torch.tensor([prompt_ids], device=self.model.device)
        if self.config.do_sample and self.seed is not None:
            torch.manual_seed(self.seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=self.config,
                max_new_tokens=max_tokens,
            )
        seconds = time.perf_counter() - start
        new = out[0, len(prompt_ids) :].tolist()
        return Turn(new, self.tokenizer.decode(new, skip_special_tokens=True), seconds)


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the GGUF file itself: another backend and arithmetic,
    so its outputs are compared with vanilla but not expected to be identical."""

    name = "llamacpp"

    def __init__(self, gguf: Path, n_ctx: int, sampling: Sampling) -> None:
        from llama_cpp import Llama

        self.model = Llama(
            model_path=str(gguf), n_ctx=n_ctx, seed=sampling.seed or 0, verbose=False
        )
        self.sampling = sampling

    def run(self, prompt_ids: list[int], max_tokens: int) -> Turn:
        s, eos = self.sampling, self.model.token_eos()
        tokens: list[int] = []
        start = time.perf_counter()
        sampled = self.model.generate(
            prompt_ids, temp=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=0.0, reset=True
        )
        for token in sampled:
            tokens.append(int(token))
            if token == eos or len(tokens) >= max_tokens:
                break
        seconds = time.perf_counter() - start
        return Turn(tokens, self.model.detokenize(tokens).decode("utf-8", "replace"), seconds)


def hf_model(model: str, cache_dir: Path | None, dtype: Any, device: Any) -> Any:
    """A transformers model holding onepass's weights for `model`."""
    from onepass.models.hf import transformers_model
    from onepass.models.loading import load_model

    loaded = load_model(model, cache_dir)
    return transformers_model(loaded.config, loaded.weights).to(dtype=dtype, device=device)


def hf_runners(llm: Any, model: str, sampling: Sampling, dtype: Any) -> list[Runner]:
    from transformers import GenerationConfig

    hf = hf_model(model, llm.cache_dir, dtype, llm.device)
    eos = llm.eos_token_ids or None
    common: dict[str, Any] = {"eos_token_id": eos, "pad_token_id": eos[0] if eos else None}
    if sampling.temperature > 0:
        # top_k=0 disables it, as in onepass (transformers' default would be 50).
        common |= {"do_sample": True, "temperature": sampling.temperature}
        common |= {"top_p": sampling.top_p, "top_k": max(sampling.top_k, 0)}
    else:
        common |= {"do_sample": False}
    plain = GenerationConfig(**common)
    lookup = GenerationConfig(**common, prompt_lookup_num_tokens=HF_PROMPT_LOOKUP_TOKENS)
    return [
        HFRunner(hf, llm.tokenizer, "hf", plain, sampling.seed),
        HFRunner(hf, llm.tokenizer, "hf_pld", lookup, sampling.seed),
    ]


def llamacpp_runner(llm: Any, model: str, sampling: Sampling) -> Runner:
    from onepass.models.loading import DEFAULT_MODEL, default_model_path

    path = default_model_path() if model == DEFAULT_MODEL else Path(model).expanduser()
    if path.suffix != ".gguf":
        raise BenchError("the llamacpp peer needs a .gguf model (or 'default')")
    return LlamaCppRunner(path, llm.max_model_len, sampling)


def encoder(llm: Any, use_chat_template: bool) -> Encoder:
    """Chat models get their chat template (as LLM.chat); others get the turns and answers
    joined by blank lines (as LLM.generate on that text)."""
    if use_chat_template:
        return llm.chat_token_ids

    def encode(messages: list[Message]) -> list[int]:
        text = "\n\n".join(m["content"] for m in messages)
        return list(llm.tokenizer(text, add_special_tokens=True)["input_ids"])

    return encode


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
    tokens_per_s: float
    speedup: float | None
    """tokens/s over vanilla's tokens/s on the same question (None if either is 0)."""
    mean_acceptance_length: float | None
    identical_to_vanilla: bool | None
    """Greedy only: the same token ids as vanilla in every turn (None when sampling)."""
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
    return Record(
        question_id=question.question_id,
        category=question.category,
        method=method,
        prompt_tokens=run.prompt_tokens,
        new_tokens=run.new_tokens,
        seconds=run.seconds,
        tokens_per_s=run.tokens_per_s,
        speedup=run.tokens_per_s / vanilla.tokens_per_s if rates_ok else None,
        mean_acceptance_length=stats.mean_acceptance_length if stats else None,
        identical_to_vanilla=run.token_ids == vanilla.token_ids if greedy else None,
        num_drafts=stats.num_drafts if stats else None,
        num_draft_tokens=stats.num_draft_tokens if stats else None,
        num_accepted_tokens=stats.num_accepted_tokens if stats else None,
        accepted_per_pos=list(stats.accepted_per_pos) if stats else None,
        turns=len(run.turns),
        repeat_seconds=[r.seconds for r in runs],
    )


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
    warm = [{"role": "user", "content": questions[0].turns[0]}]
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
        for _ in range(repeats):
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
    """speedup: geometric mean of per-question ratios; tokens_per_s: total new tokens / total
    seconds; acceptance: vLLM's pooled counts (1 + accepted / drafts; accepted_per_pos[d] /
    drafts)."""
    ratios = [r.speedup for r in records if r.speedup is not None]
    seconds = sum(r.seconds for r in records)
    counted = [r for r in records if r.num_drafts]
    drafts = sum(r.num_drafts for r in counted)
    per_pos: list[int] = []
    for r in counted:
        for d, count in enumerate(r.accepted_per_pos or []):
            per_pos.extend([0] * (d + 1 - len(per_pos)))
            per_pos[d] += count
    checked = [r.identical_to_vanilla for r in records if r.identical_to_vanilla is not None]
    return {
        "speedup": geometric_mean(ratios) if ratios else None,
        "tokens_per_s": sum(r.new_tokens for r in records) / seconds if seconds > 0 else 0.0,
        "mean_acceptance_length": (
            1 + sum(r.num_accepted_tokens for r in counted) / drafts if drafts else None
        ),
        "acceptance_per_position": [c / drafts for c in per_pos] if drafts else [],
        "identical_fraction": sum(checked) / len(checked) if checked else None,
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
    check_peers(settings.peers)
    return questions, methods, skipped


def run_benchmark(
    settings: BenchSettings,
    model: str = "default",
    *,
    dtype: str = "float32",
    device: str | None = None,
    max_model_len: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; return the JSON-ready results (env, model, settings, records,
    summary)."""
    import torch
    from tqdm import tqdm

    from onepass.llm import LLM

    questions, methods, skipped = prepare(settings)
    llm = LLM(model, dtype=dtype, device=device, max_model_len=max_model_len)
    sampling = settings.sampling
    runners: list[Runner] = [OnepassRunner(llm, m, sampling) for m in methods]
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
