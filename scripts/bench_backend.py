"""Backend benchmark: plain greedy decoding in onepass's native backend vs transformers'
`model.generate` on the same weights and prompts, and the backend's cost curve t(k).

    .venv/bin/python scripts/bench_backend.py [--model default] [--max-tokens 128] [--repeats 3]

Both sides generate exactly --max-tokens tokens (EOS ignored), prefill included, interleaved
per prompt after a warm-up, in one process. Prints a Markdown table and a JSON line. The CPU
kernels are those of this machine's best ISA; ONEPASS_CPU_ISA=avx2 (or avx512, neon, none)
measures another build.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from onepass import LLM, SamplingParams
from onepass.bench.questions import load_questions
from onepass.bench.runners import hf_model
from onepass.cost import measure
from onepass.models.loading import DEFAULT_WEIGHTS, WEIGHTS


def time_onepass(llm: LLM, ids: list[int], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
    assert len(out.outputs[0].token_ids) == max_tokens
    return max_tokens / out.metrics.total_seconds


def time_hf(model: torch.nn.Module, ids: list[int], max_tokens: int) -> float:
    inputs = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
        )
    seconds = time.perf_counter() - start
    assert out.shape[1] - len(ids) == max_tokens
    return max_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, choices=WEIGHTS)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    llm = LLM(args.model, max_model_len=4096, weights=args.weights)
    hf = hf_model(args.model, llm.cache_dir, torch.float32, llm.device)
    prompts = {}
    for q in load_questions(None):  # one prompt per category of the built-in set
        prompts.setdefault(
            q.category, llm.chat_token_ids([{"role": "user", "content": q.turns[0]}])
        )
    warm = next(iter(prompts.values()))
    time_onepass(llm, warm, 8)
    time_hf(hf, warm, 8)

    rows, ratios = [], []
    for category, ids in prompts.items():
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(time_onepass(llm, ids, args.max_tokens))
            theirs.append(time_hf(hf, ids, args.max_tokens))
        o, t = statistics.median(ours), statistics.median(theirs)
        ratios.append(o / t)
        rows.append((category, len(ids), o, t, o / t))

    print(f"onepass's CPU kernels: {llm.backend.isa or 'none (TorchScript layer stack)'}\n")
    print("| prompt | prompt tokens | onepass tok/s | transformers tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for category, n, o, t, r in rows:
        print(f"| {category} | {n} | {o:.1f} | {t:.1f} | {r:.2f}x |")
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"\ngeometric mean speedup over transformers generate: {geomean:.2f}x")

    curve = measure(llm.backend, sizes=tuple(range(1, 33)), context=300, reps=7)
    print("\n| k | ms | t(k)/t(1) |\n|---:|---:|---:|")
    for k, s in zip(curve.sizes, curve.seconds, strict=True):
        print(f"| {k} | {s * 1000:.1f} | {s / curve.seconds[0]:.2f} |")
    record = {"isa": llm.backend.isa, "rows": rows, "geomean": geomean}
    print(json.dumps({**record, "cost_curve": curve.as_dict()}))


if __name__ == "__main__":
    main()
