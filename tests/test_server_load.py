"""A bounded load test of `onepass serve` on loopback: 16 concurrent clients, 192 requests
(fixed count, time limit), streaming and not, three methods; no request lost, duplicated or
mixed up, every greedy output the single-request output. And a burst against a small queue:
the bound holds, the rest get 429 with Retry-After."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from test_server import SteppedLLM, greedy, live_server, sse_events

CLIENTS = 16
PER_CLIENT = 12
MAX_TOKENS = 6
TIME_LIMIT = 60.0  # seconds for the whole load; each client stops when it passes
# Completions whose prompts end in different words: the tiny random model's next tokens depend
# mostly on the last one, so these outputs differ (chat prompts all end the same way).
WORDS = (  # noqa: SIM905
    "apple river stone cloud violin tiger lamp orbit maple candle harbor pixel falcon quartz "
    "meadow copper"
).split()
PROMPTS = [f"Item {i}: {word}" for i, word in enumerate(WORDS)]
METHODS = [None, {"method": "ngram"}, {"method": "suffix"}]


def ask(http: httpx.Client, prompt: str, method: Any, stream: bool) -> tuple[int, str, str]:
    """(status, response id, text) of one completion request."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "speculative_config": method,
        "stream": stream,
    }
    if not stream:
        r = http.post("/v1/completions", json=body)
        data = r.json()
        if r.status_code != 200:
            return r.status_code, "", data["error"]["message"]
        return 200, data["id"], data["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, "", r.read().decode()
        ids, text = set(), ""
        for event in sse_events(r.iter_lines()):
            if event == "[DONE]":
                break
            assert "error" not in event, event
            ids.add(event["id"])
            text += "".join(c["text"] for c in event["choices"])
        assert len(ids) == 1  # every chunk of a stream carries its response's id
        return 200, ids.pop(), text


def test_load_16_clients(tiny_llm):
    outputs = tiny_llm.generate(PROMPTS, greedy(MAX_TOKENS))
    expected = {p: o.outputs[0].text for p, o in zip(PROMPTS, outputs, strict=True)}
    assert len(set(expected.values())) == len(PROMPTS)  # else a mix-up could go unseen
    with live_server(tiny_llm, max_queue=CLIENTS) as s:
        deadline = time.monotonic() + TIME_LIMIT

        def client(c: int) -> list[tuple[str, int, str, str]]:
            results = []
            with httpx.Client(base_url=s.url, timeout=60) as http:
                for k in range(PER_CLIENT):
                    if time.monotonic() > deadline:
                        break
                    prompt = PROMPTS[(c * 5 + k) % len(PROMPTS)]
                    method = METHODS[(c + k) % len(METHODS)]
                    results.append((prompt, *ask(http, prompt, method, stream=(c + k) % 2 == 0)))
            return results

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
        assert len(results) == CLIENTS * PER_CLIENT, "time limit passed before the last request"
        assert [status for _, status, _, _ in results] == [200] * len(results)
        assert len({rid for _, _, rid, _ in results}) == len(results)  # no duplicate
        for prompt, _, _, text in results:
            assert text == expected[prompt]  # no mix-up, and exactly the single-request output
        assert s.metric("onepass:requests_total", status="finished") == len(results)
        assert s.metric("vllm:num_requests_waiting") == 0
        tokens = {p: len(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outputs, strict=True)}
        assert s.metric("vllm:generation_tokens_total") == sum(tokens[p] for p, *_ in results)


def test_burst_against_a_small_queue(tiny_llm):
    slow = SteppedLLM(tiny_llm, lambda: time.sleep(0.01))
    burst = 10
    with live_server(slow, max_queue=2) as s:
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], s.scheduler.counts()[0])
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        start = threading.Barrier(burst)

        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=s.url, timeout=60) as http:
                start.wait()
                return http.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": 20},
                )

        try:
            with ThreadPoolExecutor(burst) as pool:
                responses = list(pool.map(one, range(burst)))
        finally:
            done.set()
            watcher.join()
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        assert peak[0] <= 2  # the queue bound held
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        rejected = statuses.count(429)
        assert s.metric("onepass:requests_total", status="rejected") == rejected
        assert s.metric("onepass:requests_total", status="finished") == burst - rejected
