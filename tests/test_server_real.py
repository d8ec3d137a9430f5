"""`onepass serve` over the real default model: the official client's answers (chat and
completions, streamed or not) under `auto` are plain decoding's, token for token."""

from __future__ import annotations

import pytest
from test_server import greedy, live_server

pytestmark = pytest.mark.real_model

CODE_EDIT = [
    {
        "role": "user",
        "content": "Rewrite this Python function so that it uses a list comprehension:\n\n"
        "def squares(xs):\n    out = []\n    for x in xs:\n        if x % 2 == 0:\n"
        "            out.append(x * x)\n    return out",
    }
]


def test_real_model_answers_equal_plain_decoding(llm):
    want = llm.chat(CODE_EDIT, greedy(48))[0].outputs[0]  # plain decoding
    completion = llm.generate("def fibonacci(n):", greedy(24))[0].outputs[0]
    with live_server(llm, speculative_config={"method": "auto"}) as s:
        client = s.client()
        r = client.chat.completions.create(
            model=llm.model_name, messages=CODE_EDIT, temperature=0, max_tokens=48
        )
        assert r.choices[0].message.content == want.text
        stats = r.model_extra["onepass"]
        assert stats["method"] == "auto" and stats["num_drafts"] > 0
        assert stats["mean_acceptance_length"] >= 1.0
        chunks = client.chat.completions.create(
            model=llm.model_name, messages=CODE_EDIT, temperature=0, max_tokens=48, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        r = client.completions.create(
            model=llm.model_name, prompt="def fibonacci(n):", temperature=0, max_tokens=24
        )
        assert r.choices[0].text == completion.text
