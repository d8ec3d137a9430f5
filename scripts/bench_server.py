"""Throughput of `onepass serve` under concurrent clients (issue 22's benchmark).

For each method and concurrency, starts `onepass serve` afresh on a free loopback port, sends
the same streamed chat requests (greedy) from that many client threads at once, and reports
requests/s, output tokens/s and the p50 / p99 time to the first token. Concurrency 1 is
serving one request at a time.

The prompts are distinct: the built-in set's first turns, then its second turns (70 in all). A
repeated prompt would be drafted whole from the suffix history of the earlier request's answer
(SuffixDecoding's cross-request cache), which pays on agent-like traffic but would flatter a
throughput measure.

    .venv/bin/python scripts/bench_server.py --methods none,auto --concurrency 1,4,8,16
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from onepass.bench.questions import answer_lengths, distinct_prompts, load_questions
from onepass.bench.run import WARMUP_PROMPT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(method: str, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "onepass.cli", "serve", "--port", str(port)]
    command += ["--method", method, "--max-queue", "256", "--log-level", "warning", *extra]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"onepass serve --method {method} did not start")


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, output tokens) of one streamed chat request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or time.perf_counter() - start, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(url: str, prompts: list[str], concurrency: int, lengths: list[int]) -> dict:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        jobs = zip(prompts, lengths, strict=True)
        results = list(pool.map(lambda job: one_request(url, model, *job), jobs))
    seconds = time.perf_counter() - start
    ttft = [r[0] for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "seconds": seconds,
        "requests_per_s": len(prompts) / seconds,
        "tokens_per_s": sum(r[1] for r in results) / seconds,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": percentile(ttft, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,auto", help="--method values of the server")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency")
    parser.add_argument(
        "--max-tokens", default="64", help="each answer's max_tokens: N, or LO-HI (seeded)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("serve_args", nargs="*", help="more `onepass serve` flags, after --")
    args = parser.parse_args()
    questions = load_questions()
    distinct = distinct_prompts(questions)
    if not 1 <= args.requests <= len(distinct):
        parser.error(f"--requests must be in 1..{len(distinct)} (the distinct prompts)")
    prompts = distinct[: args.requests]
    lengths = answer_lengths(args.max_tokens, len(prompts))
    results = []
    print("| method | concurrency | requests/s | tokens/s | TTFT p50 s | TTFT p99 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for c in (int(x) for x in args.concurrency.split(",")):
            # A fresh server per row: drafters that learn across requests (recycling, auto)
            # would otherwise draft the later rows' answers from memory of the earlier ones.
            port = free_port()
            server = start_server(method, port, args.serve_args)
            url = f"http://127.0.0.1:{port}"
            try:
                run(url, [WARMUP_PROMPT], 1, [8])  # warm-up (and auto's cost curve)
                row = {"method": method, **run(url, prompts, c, lengths)}
            finally:
                server.terminate()
                server.wait(60)
            results.append(row)
            print(
                f"| {method} | {c} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} "
                f"| {row['ttft_p50']:.2f} | {row['ttft_p99']:.2f} |",
                flush=True,
            )
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
