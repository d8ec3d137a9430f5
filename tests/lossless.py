"""Shared checks of the losslessness contract (design.md §2) on the real model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onepass import SamplingParams

NEAR_TIE = 1e-3  # plain decoding's top-2 logit gap under which a divergence is tolerated

# Prompts of different kinds, as chat turns.
PROMPTS = {
    "chat": "What are three good habits for staying healthy? Answer briefly.",
    "code_edit": (
        "Add type hints and a docstring to this function, and keep everything else the same:\n\n"
        "def merge(a, b):\n    out = {}\n    for k in a:\n        out[k] = a[k]\n"
        "    for k in b:\n        if k in out:\n            out[k] = out[k] + b[k]\n"
        "        else:\n            out[k] = b[k]\n    return out\n"
    ),
    "long_document": (
        "Read the notice and answer the question.\n\nNotice: The Riverside Library will close "
        "for renovation from 3 March to 28 April. During the closure, books can be returned at "
        "the Market Street branch, which extends its opening hours to 8 pm on weekdays. The "
        "children's reading club moves to the community hall on Elm Road, every Saturday at 10 "
        "am. Members can still borrow e-books and audiobooks online with their library card. "
        "Late fees are waived for items due during the closure. The renovated library will "
        "reopen with a new study room, a café and twelve more public computers.\n\n"
        "Question: Where do the children's reading club meetings take place during the closure, "
        "and when? Quote the notice."
    ),
    "math": "A train travels 120 km in 1.5 hours. What is its average speed in km/h? Show the "
    "steps.",
}


@dataclass
class Comparison:
    identical: bool
    near_tie: bool
    first_difference: int | None


def compare_greedy(llm, prompt_ids: list[int], spec: dict, max_tokens: int) -> Comparison:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    plain = llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0].token_ids
    fast = llm.generate({"prompt_token_ids": prompt_ids}, params, speculative_config=spec)
    fast = fast[0].outputs[0].token_ids
    if plain == fast:
        return Comparison(True, False, None)
    i = next(
        (j for j, (a, b) in enumerate(zip(plain, fast, strict=False)) if a != b),
        min(len(plain), len(fast)),
    )
    return Comparison(False, top2_gap(llm, prompt_ids + plain[:i]) < NEAR_TIE, i)


def top2_gap(llm, ids: list[int]) -> float:
    """Plain decoding's gap between its two best logits after `ids`."""
    logits = llm.backend.prefill(torch.tensor(ids)).logits[0]
    top = logits.topk(2).values
    return float(top[0] - top[1])
