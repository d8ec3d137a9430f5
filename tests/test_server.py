"""`onepass serve`: the OpenAI API on a live uvicorn server on loopback, checked with the
official client against LLM.chat / LLM.generate, every error status and body, and the
robustness paths (client disconnect, timeout, full queue, shutdown, a failing model) with a
tiny model whose steps can be slowed down, held or broken."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from openai import OpenAI

from onepass import SamplingParams
from onepass.config import SpeculativeConfig
from onepass.server.app import ServerOptions, create_app, uvicorn_server

MESSAGES = [{"role": "user", "content": "Name three colours."}]


# -- a live server ---------------------------------------------------------------------------


class LiveServer:
    """create_app + uvicorn in a thread, on a free loopback port."""

    def __init__(self, llm: Any, **options: Any) -> None:
        if isinstance(options.get("speculative_config"), dict):
            options["speculative_config"] = SpeculativeConfig.parse(options["speculative_config"])
        self.app = create_app(llm, ServerOptions(**options))
        self.scheduler = self.app.state.scheduler
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn_server(self.app, "127.0.0.1", 0, log_level="warning")
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def client(self, api_key: str = "unused") -> OpenAI:
        # max_retries=0: a 429 or 5xx must reach the test, not be retried away
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in self.http.get("/metrics").text.splitlines():
            m = re.fullmatch(rf"{re.escape(name)}\{{([^}}]*)\}} (\S+)", line)
            if m and (not want or want in m.group(1)):
                return float(m.group(2))
        return 0.0

    def wait_for(self, condition: Callable[[], bool], seconds: float = 15) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.01)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not stop"


@contextmanager
def live_server(llm: Any, **options: Any) -> Iterator[LiveServer]:
    server = LiveServer(llm, **options)
    try:
        yield server
    finally:
        server.close()


class SteppedLLM:
    """The tiny LLM with a hook before every step (to slow it down, hold it or break it);
    counts the steps taken and the requests closed before they finished."""

    def __init__(self, llm: Any, before_step: Callable[[], None]) -> None:
        self._llm = llm
        self.before_step = before_step
        self.steps = 0
        self.closed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        request = self._llm.request(*args, **kwargs)
        close = request.close

        def counted_close() -> None:
            self.closed += not request.finished
            close()

        request.close = counted_close
        return request

    def step(self, requests: Any) -> Any:
        self.before_step()
        self.steps += 1
        return self._llm.step(requests)


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """`data:` payloads of an SSE stream (JSON, or the string "[DONE]")."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def server(tiny_llm):
    # the default method is ngram, so that "absent" and null (plain) differ
    with live_server(
        tiny_llm, speculative_config={"method": "ngram"}, max_body_bytes=64 * 1024
    ) as s:
        yield s


# -- the API, through the official client ----------------------------------------------------


def test_models_health_page(server, tiny_llm):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [tiny_llm.model_name]
    assert models.data[0].model_extra["max_model_len"] == tiny_llm.max_model_len
    assert server.http.get("/health").json() == {"status": "ok"}
    page = server.http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert server.http.get("/static/app.js").status_code == 200


def test_chat_equals_llm_chat(server, tiny_llm):
    want = tiny_llm.chat(MESSAGES, greedy(12))[0]
    r = server.client().chat.completions.create(
        model=tiny_llm.model_name, messages=MESSAGES, temperature=0, max_tokens=12
    )
    choice = r.choices[0]
    assert choice.message.content == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    stats = r.model_extra["onepass"]
    assert stats["method"] == "ngram" and stats["lossless"] is True
    assert stats["completion_tokens"] == r.usage.completion_tokens
    assert stats["mean_acceptance_length"] >= 1.0
    assert len(choice.model_extra["token_sources"]) == r.usage.completion_tokens


def test_chat_stream_with_usage(server, tiny_llm):
    want = tiny_llm.chat(MESSAGES, greedy(20))[0].outputs[0]
    chunks = list(
        server.client().chat.completions.create(
            model=tiny_llm.model_name,
            messages=MESSAGES,
            temperature=0,
            max_completion_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content) == want.text
    for c in content:  # the page's colours cover exactly the delta's text
        runs = c.choices[0].model_extra["text_sources"]
        assert "".join(text for text, _ in runs) == c.choices[0].delta.content
    sources = [
        s for c in chunks if c.choices for s in c.choices[0].model_extra.get("token_sources", [])
    ]
    assert sources == want.token_sources
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == [want.finish_reason]
    assert finish[0].model_extra["onepass"]["completion_tokens"] == len(want.token_ids)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(want.token_ids)


def test_completions_equal_llm_generate(server, tiny_llm):
    client = server.client()
    prompts = ["Once upon a time", "The capital of France is"]
    want = [o.outputs[0] for o in tiny_llm.generate(prompts, greedy(10))]
    r = client.completions.create(
        model=tiny_llm.model_name, prompt=prompts, temperature=0, max_tokens=10
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    streamed = client.completions.create(
        model=tiny_llm.model_name, prompt=prompts[0], temperature=0, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want[0].text
    ids = tiny_llm.tokenizer(prompts[1])["input_ids"]
    by_ids = client.completions.create(
        model=tiny_llm.model_name, prompt=ids, temperature=0, max_tokens=10
    )
    assert by_ids.choices[0].text == want[1].text


def test_n_and_seed_reproduce_llm_chat(server, tiny_llm):
    params = SamplingParams(n=2, seed=7, temperature=1.0, max_tokens=8)
    want = [c.text for c in tiny_llm.chat(MESSAGES, params)[0].outputs]
    client = server.client()

    def ask(seed: int, stream: bool = False) -> list[str]:
        kw = dict(model=tiny_llm.model_name, messages=MESSAGES, n=2, seed=seed, max_tokens=8)
        if not stream:
            return [c.message.content for c in client.chat.completions.create(**kw).choices]
        texts = ["", ""]
        for chunk in client.chat.completions.create(**kw, temperature=1.0, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        return texts

    assert ask(7) == want
    assert ask(7) == want  # the same seed, the same completions
    assert ask(7, stream=True) == want
    assert ask(8) != want


def test_stop_string(server, tiny_llm):
    text = tiny_llm.chat(MESSAGES, greedy(16))[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = tiny_llm.chat(MESSAGES, greedy(16, stop=[stop]))[0].outputs[0]
    assert want.finish_reason == "stop" and want.text == text[: text.index(stop)]
    r = server.client().chat.completions.create(
        model=tiny_llm.model_name, messages=MESSAGES, temperature=0, max_tokens=16, stop=[stop]
    )
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop


@pytest.mark.parametrize(
    ("extra", "method"),
    [
        ({}, "ngram"),
        ({"speculative_config": None}, "vanilla"),
        ({"speculative_config": {"method": "suffix"}}, "suffix"),
    ],
)
def test_per_request_speculative_config(server, tiny_llm, extra, method):
    want = tiny_llm.chat(MESSAGES, greedy(12))[0].outputs[0].text
    r = server.client().chat.completions.create(
        model=tiny_llm.model_name, messages=MESSAGES, temperature=0, max_tokens=12, extra_body=extra
    )
    assert r.model_extra["onepass"]["method"] == method
    assert r.choices[0].message.content == want  # lossless, whatever the method


# -- errors ----------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
OK = {"messages": MESSAGES, "max_tokens": 4}


def with_(**changes: Any) -> dict[str, Any]:
    return {**OK, **changes}


ERRORS = [
    # malformed JSON and wrong types: 422
    (CHAT, b'{"messages": [', 422, None),
    (CHAT, b"[1, 2]", 422, None),
    (CHAT, {"messages": "hi"}, 422, "messages"),
    (CHAT, with_(temperature="hot"), 422, "temperature"),
    (CHAT, with_(max_tokens=1.5), 422, "max_tokens"),
    (CHAT, with_(stream="yes"), 422, "stream"),
    (CHAT, with_(messages=[{"role": "user", "content": 5}]), 422, "messages[0].content"),
    (TEXT, {"max_tokens": 4}, 422, "prompt"),
    # bad values: 400
    (CHAT, with_(temperature=-1), 400, "temperature"),
    (CHAT, with_(top_p=0), 400, "top_p"),
    (CHAT, with_(n=0), 400, "n"),
    (CHAT, with_(seed=2**70), 400, "seed"),
    (CHAT, with_(max_tokens=0), 400, "max_tokens"),
    (CHAT, with_(max_tokens=10**9), 400, None),  # prompt + max_tokens over the context window
    (CHAT, with_(presence_penalty=3), 400, "presence_penalty"),
    (CHAT, with_(stop=[""]), 400, "stop"),
    (
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    (CHAT, with_(messages=[]), 400, "messages"),
    (CHAT, with_(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    (CHAT, with_(messages=[{"role": "user", "content": ""}]), 400, None),
    (CHAT, with_(messages=[{"role": "user", "content": "many words " * 400}]), 400, None),
    (CHAT, with_(max_tokens=5, max_completion_tokens=6), 400, "max_completion_tokens"),
    (CHAT, with_(speculative_config={"method": "nope"}), 400, None),
    (CHAT, with_(speculative_config={"method": "ngram", "prompt_lookup_max": -1}), 400, None),
    (CHAT, with_(stream_options={"include_usage": True}), 400, "stream_options"),
    (TEXT, {"prompt": []}, 400, "prompt"),
    (TEXT, {"prompt": [10**7]}, 400, None),
    (TEXT, {"prompt": ""}, 400, None),
    # options onepass does not support: 400, by name
    (CHAT, with_(logprobs=True), 400, "logprobs"),
    (CHAT, with_(top_logprobs=2), 400, "top_logprobs"),
    (CHAT, with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (CHAT, with_(tool_choice="auto"), 400, "tool_choice"),
    (CHAT, with_(response_format={"type": "json_object"}), 400, "response_format"),
    (CHAT, with_(logit_bias={"5": 1}), 400, "logit_bias"),
    (CHAT, with_(frobnicate=1), 400, "frobnicate"),
    (CHAT, with_(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, None),
    (TEXT, {"prompt": "hi", "echo": True}, 400, "echo"),
    (TEXT, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (TEXT, {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    (TEXT, {"prompt": "hi", "logprobs": 0}, 400, "logprobs"),
    (TEXT, {"prompt": "hi", "best_of": True}, 400, "best_of"),
    # unknown model
    (CHAT, with_(model="gpt-4"), 404, "model"),
]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    return error["message"]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERRORS)
def test_errors(server, path, body, status, param):
    if isinstance(body, bytes):
        r = server.http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.http.post(path, json=body)
    message = assert_error(r, status, param)
    if param and status == 400:
        assert param.split("[")[0] in message


def test_neutral_values_of_unsupported_options_pass(server):
    r = server.http.post(
        CHAT, json=with_(logprobs=False, tools=[], response_format={"type": "text"}, user="u1")
    )
    assert r.status_code == 200, r.text


def test_routes_and_body_size(server):
    assert_error(server.http.get("/v1/nope"), 404)
    assert_error(server.http.delete("/v1/models"), 405)
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_error(server.http.post(CHAT, json=big), 413)
    chunked = iter([b'{"messages": [{"role": "user", "content": "', b"x" * 100_000, b'"}]}'])
    assert_error(server.http.post(CHAT, content=chunked), 413)  # no Content-Length
    assert server.http.post(CHAT, json=OK).status_code == 200  # still serving


def test_api_key(tiny_llm):
    with live_server(tiny_llm, api_key="sekret") as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = s.http.post(CHAT, json=OK, headers=headers)
            assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
        assert_error(s.http.get("/v1/models"), 401)
        r = s.client("sekret").chat.completions.create(
            messages=MESSAGES, model=tiny_llm.model_name, max_tokens=3
        )
        assert r.choices[0].message.content
        assert s.http.get("/health").status_code == 200  # health, metrics and the page stay open
        assert s.http.get("/metrics").status_code == 200


def test_serve_command_refuses_bad_options_before_loading(capsys):
    from onepass.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    missing = "/nonexistent/model.gguf"  # never reached: each mistake is reported first
    for argv, words in [
        (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
        (["--max-queue", "0"], "--max-queue"),
        (["--request-timeout", "-1"], "--request-timeout"),
        (["--method", "nope"], "unknown speculative method"),
    ]:
        assert main(["serve", "--model", missing, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("onepass: error: ") and words in err and err.count("\n") == 1
    busy.close()


# -- robustness ------------------------------------------------------------------------------


def test_client_disconnect_cancels_the_request(tiny_llm):
    slow = SteppedLLM(tiny_llm, lambda: time.sleep(0.02))
    with live_server(slow) as s:
        body = with_(max_tokens=200, ignore_eos=True, stream=True)
        with s.http.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            seen = 0
            for event in sse_events(r.iter_lines()):
                seen += event != "[DONE]"
                if seen == 4:
                    break  # leave mid-stream: the connection closes
        s.wait_for(lambda: s.metric("onepass:requests_total", status="cancelled") == 1)
        assert slow.closed == 1 and slow.steps < 100  # stopped early, the stream closed
        # a non-streaming request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            s.http.post(CHAT, json=with_(max_tokens=200, ignore_eos=True), timeout=0.5)
        s.wait_for(lambda: s.metric("onepass:requests_total", status="cancelled") == 2)
        assert slow.closed == 2 and slow.steps < 200
        # the model is free again
        assert s.http.post(CHAT, json=OK).status_code == 200
        assert s.metric("vllm:num_requests_running") == 0
        assert s.metric("onepass:requests_total", status="finished") == 1


def test_timeout(tiny_llm):
    slow = SteppedLLM(tiny_llm, lambda: time.sleep(0.05))
    with live_server(slow, request_timeout=0.5) as s:
        start = time.monotonic()
        assert_error(s.http.post(CHAT, json=with_(max_tokens=100, ignore_eos=True)), 504)
        assert time.monotonic() - start < 3
        with s.http.stream(
            "POST", CHAT, json=with_(max_tokens=100, ignore_eos=True, stream=True)
        ) as r:
            events = list(sse_events(r.iter_lines()))
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        s.wait_for(lambda: s.metric("onepass:requests_total", status="timeout") == 2)
        assert s.http.post(CHAT, json=with_(max_tokens=2)).status_code == 200


def test_full_queue_is_429_then_both_queued_requests_finish(tiny_llm):
    gate = threading.Event()
    held = SteppedLLM(tiny_llm, lambda: gate.wait(20))
    with live_server(held, max_queue=1, max_batch=1) as s:
        streams = []
        with s.http.stream("POST", CHAT, json=with_(stream=True)) as a:
            s.wait_for(lambda: s.scheduler.counts() == (0, 1))  # a holds the model
            with s.http.stream("POST", CHAT, json=with_(stream=True)) as b:
                s.wait_for(lambda: s.scheduler.counts() == (1, 1))  # b waits
                r = s.http.post(CHAT, json=OK)
                assert_error(r, 429)
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert int(r.headers["retry-after"]) >= 1
                gate.set()
                for stream in (a, b):
                    streams.append(list(sse_events(stream.iter_lines())))
        for events in streams:
            assert events[-1] == "[DONE]"
            assert all("error" not in e for e in events[:-1])
        assert s.metric("onepass:requests_total", status="rejected") == 1
        assert s.metric("onepass:requests_total", status="finished") == 2


def test_shutdown_answers_503(tiny_llm):
    gate = threading.Event()
    held = SteppedLLM(tiny_llm, lambda: gate.wait(0.05))  # slow, until the scheduler stops
    with live_server(held, max_batch=1) as s:
        with s.http.stream(
            "POST", CHAT, json=with_(max_tokens=200, ignore_eos=True, stream=True)
        ) as a:
            s.wait_for(lambda: s.scheduler.counts() == (0, 1))
            queued: list[httpx.Response] = []
            waiter = threading.Thread(target=lambda: queued.append(s.http.post(CHAT, json=OK)))
            waiter.start()
            s.wait_for(lambda: s.scheduler.counts() == (1, 1))
            s.scheduler.stop()  # what Ctrl-C does first
            events = list(sse_events(a.iter_lines()))
            waiter.join(10)
        assert events[-2]["error"]["code"] == 503 and events[-1] == "[DONE]"
        assert_error(queued[0], 503)
        assert_error(s.http.post(CHAT, json=OK), 503)
        assert s.http.get("/health").status_code == 503
        assert s.metric("onepass:requests_total", status="shutdown") == 2


def test_a_failing_model_is_a_500_without_details(tiny_llm):
    failures = [RuntimeError("boom: secret detail")]

    def maybe_fail() -> None:
        if failures:
            raise failures.pop()

    with live_server(SteppedLLM(tiny_llm, maybe_fail)) as s:
        message = assert_error(s.http.post(CHAT, json=OK), 500)
        assert "boom" not in message
        assert s.http.post(CHAT, json=OK).status_code == 200  # the next request is served
        assert s.metric("onepass:requests_total", status="error") == 1


def test_the_model_is_built_in_a_thread_that_has_ended():
    """build_off_thread: the result (or the error) of a build run in a thread of its own,
    which is over once it returns (its OpenMP team gone with it)."""
    from onepass.server.scheduler import build_off_thread

    builders: list[threading.Thread] = []

    def build() -> int:
        builders.append(threading.current_thread())
        return 42

    assert build_off_thread(build) == 42
    assert builders[0] is not threading.current_thread()
    assert not builders[0].is_alive()

    def fail() -> int:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        build_off_thread(fail)
