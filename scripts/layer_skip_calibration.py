"""Run layer_skip's calibration afresh (not from the cache) and print what it measured: for each
skip set, the draft's agreement with the target and its step cost, and the best expected
speedup over chain lengths.

    .venv/bin/python scripts/layer_skip_calibration.py [--model default]
"""

from __future__ import annotations

import argparse
import time

from onepass import LLM
from onepass.drafters.layer_skip import MAX_CHAIN, Options, calibrate, expected_speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    llm = LLM(args.model)
    cost = llm.cost_model()
    start = time.perf_counter()
    result = calibrate(llm.backend, llm.tokenizer, cost, Options())
    seconds = time.perf_counter() - start
    total = llm.model_config.num_layers
    print(
        f"calibration: {seconds:.1f} s; chosen: {len(result.layers)} of {total} layers, "
        f"chain {result.chain}, expected {result.speedup:.2f}x plain decoding\n"
    )
    print("| layers skipped | last one dropped | agreement | step cost | best expected speedup |")
    print("|---:|---:|---:|---:|---:|")
    for tried in result.tried:
        a, c = tried["agreement"], tried["step_cost"]
        best = max(expected_speedup(a, c, g, cost) for g in range(1, MAX_CHAIN + 1))
        n = len(tried["skipped"])
        print(f"| {n} | {tried['dropped']} | {a:.2f} | {c:.2f} | {best:.2f}x |")


if __name__ == "__main__":
    main()
