"""What `onepass bench` runs: onepass methods and peers (transformers, llama.cpp), each behind
one small Runner protocol, and the checks of their names."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from onepass.bench.questions import BenchError
from onepass.outputs import SpecDecodeStats

if TYPE_CHECKING:
    from onepass.llm import DrafterSnapshot

VANILLA = "vanilla"
PEERS: dict[str, tuple[str, ...]] = {"hf": ("hf", "hf_pld"), "llamacpp": ("llamacpp",)}
"""--peers name -> the methods it adds (other implementations, run on the same prompts)."""
HF_PROMPT_LOOKUP_TOKENS = 10

Message = dict[str, str]
Encoder = Callable[[list[Message]], list[int]]
"""Turns a conversation (user turns and the model's answers so far) into prompt token ids."""


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


def check_variant(name: str, config: Any, methods: Sequence[str]) -> None:
    """Raise a BenchError unless `config` is a valid speculative config and `name` is new."""
    from onepass.config import ConfigError, SpeculativeConfig
    from onepass.drafters import METHODS

    if name in methods or name in METHODS or name == VANILLA:
        raise BenchError(f"variant name {name!r} is taken: name it apart from the methods")
    try:
        SpeculativeConfig.parse(config)
    except (ConfigError, ValueError, TypeError) as e:
        raise BenchError(f"variant {name!r}: {e}") from None


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
    prefill_seconds: float | None = None
    """Time to the first token (the prompt's prefill); None when the runner does not report it."""
    drafting_seconds: float | None = None
    """Of `seconds`, the drafter's proposing and observing; None when not reported (peers)."""


class Runner(Protocol):
    name: str

    def run(self, prompt_ids: list[int], max_tokens: int) -> Turn: ...

    def checkpoint(self) -> Any:
        """What the runner has learned from earlier prompts (None: nothing)."""

    def rewind(self, state: Any) -> None:
        """Forget what it learned since checkpoint() returned `state`."""


class Stateless:
    """A runner that learns nothing across prompts: repeats need no rewinding."""

    def checkpoint(self) -> None:
        return None

    def rewind(self, state: None) -> None:
        pass


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

    def __init__(
        self, llm: Any, name: str, sampling: Sampling, spec: dict[str, Any] | None = None
    ) -> None:
        from onepass.sampling import SamplingParams

        self.llm, self.name = llm, name
        self.spec = spec or (None if name == VANILLA else {"method": name})
        self.params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
        )

    def checkpoint(self) -> DrafterSnapshot | None:
        return self.llm.snapshot_drafter(self.spec)

    def rewind(self, state: DrafterSnapshot | None) -> None:
        self.llm.restore_drafter(state)

    def run(self, prompt_ids: list[int], max_tokens: int) -> Turn:
        params = replace(self.params, max_tokens=max_tokens)
        out = self.llm.generate(
            {"prompt_token_ids": prompt_ids}, params, speculative_config=self.spec
        )[0]
        completion = out.outputs[0]
        metrics = out.metrics
        return Turn(
            completion.token_ids,
            completion.text,
            metrics.total_seconds,
            metrics.spec,
            metrics.prefill_seconds,
            metrics.drafting_seconds,
        )


class HFRunner(Stateless):
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


class LlamaCppRunner(Stateless):
    """llama.cpp (llama-cpp-python) on the GGUF file itself: another backend and arithmetic,
    so its outputs are compared with vanilla but not expected to be identical."""

    name = "llamacpp"

    def __init__(self, gguf: Path, n_ctx: int, sampling: Sampling) -> None:
        import torch
        from llama_cpp import Llama

        # The same thread count as onepass (llama-cpp-python's default is half the cores).
        threads = torch.get_num_threads()
        self.model = Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            seed=sampling.seed or 0,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
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
