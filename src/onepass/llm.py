"""The facade users hold: `LLM(model, speculative_config=...)` with vLLM's generate / chat,
plus a streaming iterator. It loads the target and its tokenizer, builds drafters, turns
prompts into token ids (chat prompts through the tokenizer's chat template) and token ids into
text, and applies stop conditions."""

from __future__ import annotations

import copy
import gc
import json
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onepass.config import SpeculativeConfig
from onepass.cost import CostModel, LiveCost, cached_cost_model
from onepass.draft import BatchShare
from onepass.drafters import DraftContext, Drafter, build_drafter
from onepass.engine import NoDrafter
from onepass.errors import BusyError, InputError
from onepass.models.base import Rows
from onepass.models.llama import NativeDecoder
from onepass.models.loading import (
    DEFAULT_WEIGHTS,
    KV_CACHE_DTYPES,
    default_cache_dir,
    load_model,
)
from onepass.outputs import RequestOutput
from onepass.request import Request
from onepass.sampling import RequestRandomness, SamplingParams

Prompt = str | dict[str, Any]  # a string, or {"prompt_token_ids": [...]} as in vLLM
Message = dict[str, str]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_DRAFTERS = 8  # speculative configs whose drafters (and what they learned) are kept
FORK_SPARE_ROWS = 64  # a step's draft rows past max_tokens, in a request's own KV cache
PREFILL_ROWS_PER_STEP = 256  # prompt rows a shared forward takes besides the decoding rows
MAX_BATCH = 16  # completions generate() and chat() run side by side


@dataclass(frozen=True)
class DrafterSnapshot:
    """LLM.snapshot_drafter's copy of one speculative config's drafter (None: not built yet)."""

    key: str
    drafter: Drafter | None


class LLM:
    """One model, one request at a time: concurrent calls from several threads wait their turn;
    a second request started in the thread whose stream is still being iterated is refused
    (BusyError) instead of sharing its KV cache."""

    def __init__(
        self,
        model: str = "default",
        *,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        max_model_len: int | None = None,
        cache_dir: str | Path | None = None,
        weights: str = DEFAULT_WEIGHTS,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """model: "default" (SmolLM2-135M-Instruct, embedded), a .gguf file or a local Hugging
        Face model directory. speculative_config: vLLM-style dict or JSON; None = plain
        decoding. max_model_len: context window (prompt + output) to allocate the KV cache for.
        weights: "stored" (a GGUF's quantized blocks — Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
        Q5_K, Q6_K — and half-precision tensors, or a Hugging Face directory's bf16 / fp16
        matrices, kept in memory as stored and widened by the CPU kernels: the same logits bit
        for bit as "float32", less memory, faster steps; other formats and devices without the
        CPU kernels are dequantized), "float32" (dequantized at load: the reference) or "int8"
        (as "stored", with Q4_0 / Q4_1 / Q8_0 weights multiplied by 8-bit activations in
        integer dot products, as llama.cpp does: faster multi-row steps, logits close to but not
        equal to "float32"; speculative decoding stays exact against plain decoding in it).
        kv_cache_dtype: "auto" (float16 with weights="int8", else the model's dtype),
        "float32" or "float16" (half the bytes per cached token, each key and value rounded
        once; needs the CPU kernels; speculation stays exact against plain decoding in it)."""
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InputError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                f"{kv_cache_dtype!r}"
            )
        self.speculative_config = SpeculativeConfig.parse(speculative_config)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        loaded = load_model(model, self.cache_dir, weights)
        self.model_name = loaded.name
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = self._context_window(max_model_len, loaded.config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backend = NativeDecoder(
            loaded.config,
            loaded.weights,
            max_len=self.max_model_len,
            dtype=_DTYPES[dtype],
            device=self.device,
            int8=weights == "int8",
            kv_dtype=None if kv_cache_dtype == "auto" else _DTYPES[kv_cache_dtype],
        )
        self.eos_token_ids = self._eos_token_ids()
        # Drafters by config, least recently used first: a server sees many configs, and a
        # drafter can hold a whole draft model.
        self._drafters: OrderedDict[str, Drafter] = OrderedDict()
        self._model_key = loaded.fingerprint  # content and config: not the path
        self._cost_model: CostModel | None = None
        self._live_cost: LiveCost | None = None  # the curve as the forwards rescale it
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread running the current request
        # The model's and tokenizer's Python objects live as long as the LLM: frozen, the
        # cyclic collector's full passes skip them, which otherwise stopped decoding for many
        # steps' time now and then. Unfrozen first, so that the objects of LLMs dropped since
        # the last freeze are collected, not kept.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    # -- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | None = None,
        *,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (no chat template). speculative_config overrides the LLM's
        for these requests."""
        prompt_list = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        if not prompt_list:
            raise InputError("no prompt given")
        encoded = [self._encode(p) for p in prompt_list]  # every prompt checked before any runs
        prompts = [
            (ids, p if isinstance(p, str) else None)
            for ids, p in zip(encoded, prompt_list, strict=True)
        ]
        return self._run_all(prompts, sampling_params, speculative_config)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | None = None,
        *,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or several,
        through the tokenizer's chat template."""
        single = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InputError("messages must be a non-empty list of {role, content} messages")
        encoded = [self.chat_token_ids(c) for c in conversations]
        return self._run_all([(ids, None) for ids in encoded], sampling_params, speculative_config)

    def stream(
        self,
        prompt: Prompt | Sequence[Message],
        sampling_params: SamplingParams | None = None,
        *,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield RequestOutputs whose CompletionOutput holds only the new text and token ids of
        each step; the last one has finish_reason set and the full metrics. A list of chat
        messages goes through the chat template."""
        ids, text = self._prompt_ids(prompt)
        params = self._params(sampling_params)
        if params.n != 1:
            raise ValueError("stream() produces one completion: use n=1")
        yield from self._stream(ids, text, params, self._spec(speculative_config))

    def request(
        self,
        prompt: Prompt | Sequence[Message],
        sampling_params: SamplingParams | None = None,
        *,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
    ) -> Request:
        """A request to advance with step(), side by side with others (continuous batching):
        it has its own KV cache (a fork of the model's, sized for its prompt and max_tokens)
        and its own drafter state, so its output is exactly what stream() would produce for it
        alone. Its outputs are deltas, as stream()'s."""
        ids, text = self._prompt_ids(prompt)
        params = self._params(sampling_params)
        if params.n != 1:
            raise InputError("a request produces one completion: use n=1")
        self._check_length(ids, params)
        spec = self._spec(speculative_config)
        with self._exclusive():  # building a drafter may measure the cost curve
            drafter = self._drafter(spec).fork()
        backend = self.backend.fork(self._request_len(ids, params))
        return self._new_request(backend, ids, text, params, spec, drafter, None, delta=True)

    def step(self, requests: Sequence[Request]) -> list[RequestOutput | None]:
        """One forward shared by every unfinished request: each gets its next rows scored (a
        prompt chunk, or its root and draft), verified and committed. Returns each request's
        output of the step (None: nothing to show yet, or it had finished). With several
        requests, auto prices its draft rows against the whole forward's tokens per second, so
        drafts shrink as the batch grows."""
        live = [r for r in requests if not r.finished]
        if not live:
            return [None] * len(requests)
        with self._exclusive():
            plan = self._plan(live)
            outs = self._forward([(r.backend, rows) for r, rows in plan])
            results = {id(r): r.advance(out) for (r, _), out in zip(plan, outs, strict=True)}
        return [results.get(id(r)) for r in requests]

    def _plan(self, live: list[Request]) -> list[tuple[Request, Rows]]:
        """The rows of each request in the next shared forward: prompt chunks (up to
        PREFILL_ROWS_PER_STEP rows a step; the first one always), then every decoding request's
        root and draft, each drafted knowing the rest of the forward (BatchShare)."""
        plan: list[tuple[Request, Rows]] = []
        prefill_rows = 0
        for r in (r for r in live if r.prefilling):
            if plan and prefill_rows >= PREFILL_ROWS_PER_STEP:
                break
            rows = r.next_rows()
            plan.append((r, rows))
            prefill_rows += rows.ids.shape[0]
        decoding = [r for r in live if not r.prefilling]
        # A request still prefilling counts as a root: it decodes in a step or two, and a
        # draft row added to a prompt step delays it as much as any other.
        share_rows = share_tokens = len(decoding) + len(plan)
        prompt_rows = prefill_rows - len(plan)
        alone = len(plan) + len(decoding) == 1
        for r in decoding:  # the others' roots are counted; their drafts as they are made
            share = None
            if not alone:
                share = BatchShare(share_rows - 1, share_tokens - 1, prompt_rows)
            rows = r.next_rows(share)
            drafted = rows.ids.shape[0] - 1
            share_rows += drafted
            share_tokens += min(drafted, r.decoding.accepted_per_step)
            plan.append((r, rows))
        return plan

    def cost_model(self) -> CostModel:
        """The backend's measured cost curve t(k) (cached per model and machine)."""
        if self._cost_model is None:
            with self._exclusive():  # measuring clobbers the KV cache
                self._cost_model = self._measured_cost_model()
        return self._cost_model

    def _measured_cost_model(self) -> CostModel:
        if self._cost_model is None:
            self._cost_model = cached_cost_model(self.backend, self._model_key, self.cache_dir)
        return self._cost_model

    def _live_cost_model(self) -> LiveCost:
        """The curve drafters price rows with: measured once, rescaled by every forward."""
        if self._live_cost is None:
            self._live_cost = LiveCost(self._measured_cost_model())
        return self._live_cost

    def _forward(self, pairs: list[tuple[Any, Rows]]) -> list[Any]:
        """Score these (decoder, rows): one request on the LLM's own decoder, or forks in one
        shared forward. Its time rescales the live curve (once a drafter has asked for it) at
        its rows and mean committed context, if every row computed its logits as the curve's
        forwards do: a prompt chunk's rows skip the LM head, and such forwards had taught the
        curve that rows past its largest size cost far less than they do."""
        started = time.perf_counter()
        if len(pairs) == 1 and pairs[0][0] is self.backend:
            outs = [self.backend.run(pairs[0][1])]
        else:
            outs = self.backend.run_batch(pairs)
        if self._live_cost is not None and all(r.logits == "all" for _, r in pairs):
            seconds = time.perf_counter() - started
            rows = sum(r.ids.shape[0] for _, r in pairs)
            context = sum(d.cache_len * r.ids.shape[0] for d, r in pairs) // rows
            self._live_cost.observe(rows, context, seconds)
        return outs

    def snapshot_drafter(
        self, speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    ) -> DrafterSnapshot | None:
        """A copy of the drafter this config uses, as it stands: what it has learned from earlier
        requests (recycling's memory, auto's estimates) included. None for plain decoding.
        restore_drafter(snapshot) puts it back, e.g. to time the same prompt twice without the
        second run drafting from what the first one saw."""
        spec = self._spec(speculative_config)
        if spec is None:
            return None
        key = self._drafter_key(spec)
        with self._exclusive():
            drafter = self._drafters.get(key)
            return DrafterSnapshot(key, None if drafter is None else self._copy(drafter))

    def restore_drafter(self, snapshot: DrafterSnapshot | None) -> None:
        """Make the drafter what it was at snapshot_drafter (a snapshot can be restored again)."""
        if snapshot is None:
            return
        with self._exclusive():
            if snapshot.drafter is None:  # not built then: the next request builds a fresh one
                self._drafters.pop(snapshot.key, None)
            else:
                self._drafters[snapshot.key] = self._copy(snapshot.drafter)

    def chat_token_ids(self, messages: Sequence[Message]) -> list[int]:
        """The conversation through the chat template, checked to fit the context window."""
        return self._check_ids(self.chat_template_ids(messages))

    def chat_template_ids(self, messages: Sequence[Message]) -> list[int]:
        """The conversation through the chat template, whatever its length."""
        if isinstance(messages, (str, dict)) or not messages:
            raise InputError("messages must be a non-empty list of {role, content} messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f'message {i} needs "role" and "content"')
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    raise InputError(
                        f"message {i}: {key} must be a string, got {type(m[key]).__name__}"
                    )
        if not any(m["content"] for m in messages):
            raise InputError("the prompt is empty (every message's content is empty)")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"{self.model_name} has no chat template; use generate()")
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _context_window(max_model_len: int | None, config: Any) -> int:
        limit = config.max_position_embeddings
        if max_model_len is None:
            return min(limit, 8192)
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool):
            raise InputError(f"max_model_len must be an integer, got {max_model_len!r}")
        if not 2 <= max_model_len <= limit:
            raise InputError(
                f"max_model_len must be in 2..{limit} (the model's context length), "
                f"got {max_model_len}"
            )
        return max_model_len

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model for one request (see the class docstring)."""
        me = threading.get_ident()
        if self._owner == me:
            raise BusyError(
                "this LLM is already running a request in this thread (a stream still being "
                "iterated?): finish or close() it before starting another"
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        return sorted(ids)

    @staticmethod
    def _drafter_key(spec: SpeculativeConfig) -> str:
        return json.dumps(spec.as_dict(), sort_keys=True, default=str)

    def _copy(self, drafter: Drafter) -> Drafter:
        """A deep copy of a drafter's own state; the model, tokenizer and LLM stay shared."""
        shared = (self, self.backend, self.tokenizer)
        return copy.deepcopy(drafter, {id(o): o for o in shared})

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"sampling_params must be a SamplingParams, got {params!r}")
        return params

    def _spec(self, override: Any) -> SpeculativeConfig | None:
        return (
            SpeculativeConfig.parse(override) if override is not None else self.speculative_config
        )

    def _prompt_ids(self, prompt: Prompt | Sequence[Message]) -> tuple[list[int], str | None]:
        """Token ids and text of a prompt, or of chat messages through the chat template."""
        if isinstance(prompt, (str, dict)):
            return self._encode(prompt), prompt if isinstance(prompt, str) else None
        return self.chat_token_ids(prompt), None

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            if not isinstance(ids, (list, tuple)):
                raise InputError('a dict prompt needs "prompt_token_ids": a list of token ids')
            return self._check_ids(list(ids))
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string or a dict, got {type(prompt).__name__}")
        if not prompt:
            raise InputError("the prompt is empty")
        return self._check_ids(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise InputError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InputError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InputError(
                f"the prompt has {len(ids)} tokens; the context window is {self.max_model_len} "
                "(raise max_model_len or shorten the prompt)"
            )
        return ids

    def _drafter(self, spec: SpeculativeConfig | None) -> Drafter:
        if spec is None:
            return NoDrafter()
        key = self._drafter_key(spec)
        if key in self._drafters:
            self._drafters.move_to_end(key)
        else:
            while len(self._drafters) >= MAX_DRAFTERS:
                self._drafters.popitem(last=False)
            context = DraftContext(
                backend=self.backend,
                vocab_size=self.model_config.vocab_size,
                num_speculative_tokens=spec.num_speculative_tokens,
                tokenizer=self.tokenizer,
                cost_model=self._live_cost_model,  # the request holds the model
                cache_dir=self.cache_dir,
                model_name=self.model_name,
                model_key=self._model_key,
            )
            self._drafters[key] = build_drafter(spec.method, spec.method_options, context)
        return self._drafters[key]

    def _run_all(
        self,
        prompts: Sequence[tuple[list[int], str | None]],
        params: SamplingParams | None,
        spec_override: Any,
    ) -> list[RequestOutput]:
        """Complete every prompt, n choices each. One completion runs alone on the model's own
        KV cache; several run side by side (up to MAX_BATCH at a time), each forward shared."""
        params = self._params(params)
        spec = self._spec(spec_override)
        for ids, _ in prompts:
            self._check_length(ids, params)
        seeds = [self._seed(params) for _ in prompts]
        choices = [(p, index) for p in range(len(prompts)) for index in range(params.n)]

        def rng(p: int, index: int) -> RequestRandomness:
            seed = seeds[p]
            return RequestRandomness(hash((seed, index)) & (2**63 - 1) if index else seed)

        finals: dict[tuple[int, int], RequestOutput] = {}
        if len(choices) == 1:
            ids, text = prompts[0]
            *_, finals[(0, 0)] = self._stream(ids, text, params, spec, rng(0, 0), delta=False)
        else:
            waiting = deque(choices)
            running: list[tuple[tuple[int, int], Request]] = []
            while waiting or running:
                while waiting and len(running) < MAX_BATCH:
                    p, index = key = waiting.popleft()
                    ids, text = prompts[p]
                    with self._exclusive():  # building a drafter may measure the cost curve
                        drafter = self._drafter(spec).fork()
                    backend = self.backend.fork(self._request_len(ids, params))
                    request = self._new_request(
                        backend, ids, text, params, spec, drafter, rng(p, index), delta=False
                    )
                    running.append((key, request))
                outs = self.step([request for _, request in running])
                for (key, request), out in zip(running, outs, strict=True):
                    if request.finished:
                        finals[key] = out
                running = [(key, r) for key, r in running if not r.finished]
        results = []
        for p, (ids, text) in enumerate(prompts):
            outputs, metrics = [], None
            for index in range(params.n):
                final = finals[(p, index)]
                completion = final.outputs[0]
                completion.index = index
                outputs.append(completion)
                if metrics is None:
                    metrics = final.metrics
                else:
                    metrics.spec.merge(final.metrics.spec)
                    metrics.total_seconds += final.metrics.total_seconds
            results.append(RequestOutput(final.request_id, text, ids, outputs, True, metrics))
        return results

    def _request_len(self, ids: list[int], params: SamplingParams) -> int:
        """KV cache rows for a request run beside others: its prompt, its max_tokens and a
        step's draft rows past them."""
        needed = len(ids) + (params.max_tokens or self.max_model_len) + FORK_SPARE_ROWS
        return min(self.max_model_len, needed)

    @staticmethod
    def _seed(params: SamplingParams) -> int:
        return params.seed if params.seed is not None else random.randrange(2**63)

    def _stream(
        self,
        ids: list[int],
        text: str | None,
        params: SamplingParams,
        spec: SpeculativeConfig | None,
        rng: RequestRandomness | None = None,
        delta: bool = True,
    ) -> Iterator[RequestOutput]:
        self._check_length(ids, params)
        with self._exclusive():
            yield from self._decode(ids, text, params, spec, rng, delta)

    def _check_length(self, ids: list[int], params: SamplingParams) -> None:
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise InputError(
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                f"together they exceed the context window of {self.max_model_len} tokens "
                "(lower max_tokens, shorten the prompt or raise max_model_len)"
            )

    def _new_request(
        self,
        backend: NativeDecoder,
        ids: list[int],
        text: str | None,
        params: SamplingParams,
        spec: SpeculativeConfig | None,
        drafter: Drafter,
        rng: RequestRandomness | None,
        delta: bool,
    ) -> Request:
        return Request(
            backend,
            self.tokenizer,
            self.eos_token_ids,
            self.model_config.vocab_size,
            ids,
            text,
            params,
            spec.method if spec else None,
            spec.lossless if spec else True,
            spec.typical if spec else None,
            drafter,
            rng or RequestRandomness(self._seed(params)),
            delta,
        )

    def _decode(
        self,
        ids: list[int],
        text: str | None,
        params: SamplingParams,
        spec: SpeculativeConfig | None,
        rng: RequestRandomness | None,
        delta: bool,
    ) -> Iterator[RequestOutput]:
        # The request's own drafter (its learned state is the config's, shared); built before
        # the clock: may measure the cost curve, once.
        drafter = self._drafter(spec).fork()
        request = self._new_request(self.backend, ids, text, params, spec, drafter, rng, delta)
        try:
            while not request.finished:
                out = request.advance(self._forward([(self.backend, request.next_rows())])[0])
                if out is not None:
                    yield out
        finally:
            request.close()
