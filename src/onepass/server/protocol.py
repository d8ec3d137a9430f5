"""The OpenAI API as onepass serves it: request bodies (pydantic), their translation into
SamplingParams and prompts, and the response and error shapes.

Types are checked strictly (a string where a number belongs is a 422, as is malformed JSON);
values are checked by SamplingParams and SpeculativeConfig (a 400 with their one-line
message). OpenAI options that onepass cannot honour are declared here only to be refused by
name (400) when set to anything but their neutral value; unknown keys are refused too, so that
no option is ever silently ignored.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from onepass.config import SpeculativeConfig
from onepass.outputs import SpecDecodeStats
from onepass.sampling import SamplingParams

# -- errors ------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {message, type, param, code}}` with the
    HTTP status as `code` (as vLLM and llama.cpp do)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# -- requests ----------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: no "1" for 1, no 1.5 for an int, no 1 for a bool; forbid: unknown keys are refused
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool | None = None


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None


# OpenAI options onepass does not implement, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "echo": (None, False),
    "best_of": (None, 1),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None,),
    "service_tier": (None, "auto", "default"),
}


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # typed: completions' logprobs=0 asks for logprobs, chat's logprobs=false does not
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


class _SamplingBody(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted for compatibility: an end-user id, which changes nothing in the output."""
    speculative_config: dict[str, Any] | str | None = None
    """onepass extension: this request's speculative config (vLLM keys); null = plain
    decoding; absent = the server's default."""

    # Declared only to be refused by name (see _NEUTRAL); Any so that any type reaches the check.
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    best_of: Any = None

    def check_supported(self) -> None:
        for name in type(self).model_fields:
            if name in _NEUTRAL and not _neutral(getattr(self, name), _NEUTRAL[name]):
                raise ApiError(400, f"'{name}' is not supported by onepass", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "stream_options is only allowed with stream=true", param="stream_options"
            )

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """SamplingParams for this body (validated there: InputError on a bad value), with
        `max_tokens` as the endpoint's default."""
        given = {
            name: getattr(self, name)
            for name in (
                "n",
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "seed",
                "stop",
                "stop_token_ids",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "min_tokens",
                "ignore_eos",
                "include_stop_str_in_output",
                "skip_special_tokens",
            )
            if getattr(self, name) is not None
        }
        return SamplingParams(max_tokens=max_tokens, **given)

    def speculative(self, default: SpeculativeConfig | None) -> SpeculativeConfig | None:
        """This request's speculative config (ConfigError on a bad one)."""
        if "speculative_config" not in self.model_fields_set:
            return default
        return SpeculativeConfig.parse(self.speculative_config)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Any = None
    suffix: Any = None

    def prompts(self) -> list[str | dict[str, list[int]]]:
        """The prompts in LLM.generate's forms: strings or {"prompt_token_ids": [...]}."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        if isinstance(p[0], int):
            return [{"prompt_token_ids": list(p)}]
        return [q if isinstance(q, str) else {"prompt_token_ids": list(q)} for q in p]


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def max_new_tokens(self) -> int | None:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ApiError(
                400,
                f"max_tokens ({a}) and max_completion_tokens ({b}) disagree: give one",
                param="max_completion_tokens",
            )
        return b if b is not None else a  # None: until the context window is full, as vLLM

    def chat_messages(self) -> list[dict[str, str]]:
        """Plain {"role", "content"} messages for the chat template (text parts joined)."""
        if not self.messages:
            raise ApiError(400, "messages is empty", param="messages")
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in _ROLES:
                raise ApiError(
                    400,
                    f"messages[{i}].role {m.role!r} is not supported "
                    f"(use one of {', '.join(_ROLES)})",
                    param=f"messages[{i}].role",
                )
            out.append({"role": _ROLES[m.role], "content": _text(m.content, i)})
        return out


def _text(content: str | list[TextPart] | None, i: int) -> str:
    if content is None:
        raise ApiError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                param=f"messages[{i}].content",
            )
    return "\n".join(part.text for part in content if part.text is not None)


# -- responses ---------------------------------------------------------------------------------


@dataclass
class ChoiceStats:
    """What one generated choice cost and how speculation went (the `onepass` extension)."""

    method: str
    lossless: bool
    completion_tokens: int
    prefill_seconds: float
    seconds: float
    spec: SpecDecodeStats

    @staticmethod
    def merge(stats: list[ChoiceStats]) -> ChoiceStats:
        spec = SpecDecodeStats()
        for s in stats:
            spec.merge(s.spec)
        return ChoiceStats(
            method=stats[0].method,
            lossless=all(s.lossless for s in stats),
            completion_tokens=sum(s.completion_tokens for s in stats),
            prefill_seconds=sum(s.prefill_seconds for s in stats),
            seconds=sum(s.seconds for s in stats),
            spec=spec,
        )

    def as_dict(self) -> dict[str, Any]:
        rate = self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        return {
            "method": self.method,
            "lossless": self.lossless,
            **self.spec.as_dict(),
            "completion_tokens": self.completion_tokens,
            "prefill_seconds": round(self.prefill_seconds, 6),
            "seconds": round(self.seconds, 6),
            "tokens_per_second": round(rate, 3),
        }


def new_id(kind: Literal["chatcmpl", "cmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Reply:
    """Header fields shared by a response and all its chunks."""

    id: str
    object: str
    created: int
    model: str

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **extra}


def model_card(name: str, created: int, max_model_len: int, spec: Any) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "onepass",
        "max_model_len": max_model_len,
        "speculative_config": spec.as_dict() if spec is not None else None,
    }


def param_name(loc: tuple[Any, ...]) -> str:
    """A validation error's location as the option's name: ("body", "messages", 0, "role") ->
    "messages[0].role" (the union members pydantic names, like "list[str]", are left out)."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[a-z_]+", str(p)) and p not in _TYPE_TAGS:
            out += f".{p}" if out else str(p)
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
