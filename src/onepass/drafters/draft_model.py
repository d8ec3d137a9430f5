"""Speculative decoding with a small draft model (Leviathan et al. 2023, arXiv 2211.17192; Chen
et al. 2023, arXiv 2302.01318; vLLM's `draft_model` method, keys `model` and
`num_speculative_tokens`).

A smaller model that shares the target's tokenizer proposes a chain autoregressively, one
token per draft forward, from its own KV cache. Under greedy decoding it proposes its argmax;
under sampling it draws each token from its own distribution, warped as the target's is
(temperature, min-p, top-k, top-p) with the request's random generator, and passes that
distribution as `draft_probs`, so that rejection sampling keeps exactly the target's
distribution. Drafting stops early where the next token would not pay for itself: where the
draft's estimate that its chain is accepted that far (the product of its chosen tokens'
probabilities) times a target step is less than a draft forward plus the rows the token adds
to the target's forward (the measured cost curve), as transformers' dynamic speculation does
with a fixed threshold; and where the draft is unsure of a token (its probability below
`min_confidence`, as llama.cpp's --draft-p-min).

With `width` > 1 the draft is a tree: each token of the chain comes with width - 1 siblings
from the same distribution (greedy: the draft's next best tokens; sampling: further independent
draws), leaves that the verifier tries where the chain's token is rejected (the recursive
multi-draft rule, verify/multi_draft.py). They cost rows of the target's forward, no draft
forward.

The draft cache always holds a prefix of the request's tokens: after the verdict it is cut
back to the accepted tokens it has already seen, and the next proposal first feeds it the
tokens it has not (the bonus token, and the last draft token if the whole chain was accepted).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.errors import ModelLoadError
from onepass.models.base import ModelOutput
from onepass.sampling import warp
from onepass.tree import Tree

if TYPE_CHECKING:
    from onepass.models.llama import NativeDecoder
    from onepass.models.loading import LoadedModel

VOCAB_SIZE_SLACK = 128  # llama.cpp's rule: vocabularies may differ by padding rows only
CHECKED_TOKENS = 1000  # token texts compared between the two tokenizers


@dataclass
class Options:
    model: str = "default"
    """The draft model: "default", a .gguf file or a Hugging Face directory."""
    min_confidence: float = 0.0
    """Stop the chain after a token the draft gave less than this probability (0: never)."""
    width: int = 1
    """Candidates per level: the chain's token and width - 1 siblings (1: a chain)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {self.min_confidence}")
        if not isinstance(self.width, int) or not 1 <= self.width <= 16:
            raise ValueError(f"width must be an integer in 1..16, got {self.width!r}")


def check_vocabularies(target: Any, draft: Any, draft_name: str) -> None:
    """The draft must speak the target's tokens (llama.cpp's rule): vocabulary sizes within
    VOCAB_SIZE_SLACK, the same text for the first CHECKED_TOKENS ids, the same EOS."""
    sizes = len(target), len(draft)
    problem = None
    if abs(sizes[0] - sizes[1]) > VOCAB_SIZE_SLACK:
        problem = f"{sizes[1]} tokens against the target's {sizes[0]}"
    elif target.eos_token_id != draft.eos_token_id:
        problem = f"EOS {draft.eos_token_id} against the target's {target.eos_token_id}"
    else:
        ids = list(range(min(*sizes, CHECKED_TOKENS)))
        pairs = zip(
            target.convert_ids_to_tokens(ids), draft.convert_ids_to_tokens(ids), strict=True
        )
        for i, (ours, theirs) in enumerate(pairs):
            if ours != theirs:
                problem = f"token {i} is {theirs!r}, the target's is {ours!r}"
                break
    if problem:
        raise ModelLoadError(
            f"the draft model {draft_name!r} does not use the target's tokenizer ({problem})"
        )


class DraftModelDrafter(Drafter):
    def __init__(
        self,
        decoder: NativeDecoder,
        max_tokens: int,
        *,
        min_confidence: float = 0.0,
        width: int = 1,
        cost: Callable[..., float] | None = None,
    ) -> None:
        """decoder: the draft model (its own KV cache); max_tokens: the chain's longest;
        min_confidence and width: as in Options; cost: the target's cost curve t(rows,
        context) (None: chains stop only at max_tokens and min_confidence)."""
        self.min_confidence = min_confidence
        self.width = width
        self.cost = cost
        self.forward_time = 0.0  # seconds per draft forward (decaying)
        # The draft model: its weights are shared with every fork's decoder, its KV cache is
        # this request's own.
        self.decoder = decoder
        self.max_tokens = max_tokens
        self.written = 0  # draft cache rows holding request tokens the verdict has confirmed
        self.fed_drafts: list[int] = []  # this step's draft tokens in the draft cache

    def fork(self) -> DraftModelDrafter:
        # A full-length cache: the request's length is not known yet, and the cache's rows are
        # allocated untouched (torch.empty), so the rows it never writes cost no memory.
        fork = DraftModelDrafter(
            self.decoder.fork(),
            self.max_tokens,
            min_confidence=self.min_confidence,
            width=self.width,
            cost=self.cost,
        )
        fork.forward_time = self.forward_time
        return fork

    def start(self, prompt_ids: Sequence[int]) -> None:
        # All but the last prompt token: the first proposal feeds it with the first output.
        if len(prompt_ids) > 1:
            device = self.decoder.device
            self.decoder.prefill(torch.tensor(list(prompt_ids[:-1]), device=device))
        else:
            self.decoder.truncate(0)
        self.written = len(prompt_ids) - 1
        self.fed_drafts = []

    def propose(self, state: DecodeState) -> Draft:
        rows = state.max_draft_tokens
        depth = min(self.max_tokens, rows, state.max_depth)
        if depth <= 0:
            return Draft.empty()
        decoder = self.decoder
        pending = state.tokens[self.written :]  # the tokens the draft cache has not seen
        chain: list[int] = []
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[torch.Tensor] = []
        chain_node = -1  # the node of the chain's latest token (-1: the root)
        reach = 1.0  # the draft's estimate that the target accepts its chain this far
        while len(chain) < depth and len(tokens) < rows:
            logits = self._forward(decoder, pending)  # [vocab] after the last of them
            token, dist, confidence = self._choose(logits, state)
            # The chain's token first: the verifier tries a node's children in order, and only
            # the chain's token has children.
            level = [token, *self._siblings(logits, dist, token, state)]
            level = level[: rows - len(tokens)]
            parents += [chain_node] * len(level)
            chain_node = len(tokens)
            tokens += level
            if dist is not None:
                probs += [dist] * len(level)
            chain.append(token)
            reach *= confidence
            if confidence < self.min_confidence or not self._pays(reach, len(tokens), state):
                break
            pending = [token]
        self.fed_drafts = chain[:-1]
        draft_probs = torch.stack(probs) if probs else None
        return Draft(tokens, Tree(tuple(parents)), draft_probs)

    def _siblings(
        self, logits: torch.Tensor, dist: torch.Tensor | None, token: int, state: DecodeState
    ) -> list[int]:
        """width - 1 alternatives to the chain's token: the draft's next best tokens (greedy),
        or further draws from its distribution, independent of the first (sampling: the
        multi-draft rule is exact for independently drawn siblings, repeats included)."""
        extra = self.width - 1
        if extra <= 0:
            return []
        if dist is None:
            best = torch.topk(logits, extra + 1).indices.tolist()
            return [t for t in best if t != token][:extra]
        generator = state.rng.generator if state.rng is not None else None
        return torch.multinomial(dist, extra, replacement=True, generator=generator).tolist()

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        # The draft cache holds the request's tokens up to the root, then the draft tokens this
        # drafter fed (all of its chain but the last). Those stay that the emitted tokens
        # confirm, whoever drafted the verified tree (alone, or merged by auto), but not the
        # next root (the last emitted token): the next proposal feeds it, for its logits.
        fed_drafts = self.fed_drafts
        committed = self.decoder.cache_len - len(fed_drafts)
        keep = 0
        for fed, emitted in zip(fed_drafts, verdict.tokens[:-1], strict=False):
            if fed != emitted:
                break
            keep += 1
        self.written = committed + keep
        self.decoder.truncate(self.written)
        self.fed_drafts = []

    def _pays(self, reach: float, rows: int, state: DecodeState) -> bool:
        """Whether drafting another level is worth its price: the tokens it can add (at most
        `reach`, each worth a target step) against a draft forward and the rows it adds to
        the target's forward, which holds the root and `rows` draft rows so far."""
        if self.cost is None:
            return True
        context = len(state.tokens)
        added = self.cost(1 + rows + self.width, context) - self.cost(1 + rows, context)
        return reach * self.cost(1, context) > self.forward_time + added

    def _forward(self, decoder: NativeDecoder, ids: list[int]) -> torch.Tensor:
        began = time.perf_counter()
        start = decoder.cache_len
        device = decoder.device
        positions = torch.arange(start, start + len(ids), device=device)
        out = decoder.forward(torch.tensor(ids, device=device), positions, None)
        decoder.commit(list(range(len(ids))))
        logits = out.logits[-1]
        seconds = time.perf_counter() - began
        decay = 0.9 if self.forward_time else 0.0
        self.forward_time = decay * self.forward_time + (1 - decay) * seconds
        return logits

    @staticmethod
    def _choose(logits: torch.Tensor, state: DecodeState) -> tuple[int, torch.Tensor | None, float]:
        """(token, the distribution it was drawn from or None when greedy, its probability)."""
        params = state.params
        if params is None or params.greedy:
            token = int(torch.argmax(logits))
            confidence = float(torch.softmax(logits.float(), -1)[token])
            return token, None, confidence
        dist = warp(logits[None], params)[0]  # [vocab]
        generator = state.rng.generator if state.rng is not None else None
        token = int(torch.multinomial(dist, 1, generator=generator))
        return token, dist, float(dist[token])


@functools.lru_cache(maxsize=2)
def _load(model: str, cache_dir: Path | None) -> LoadedModel:
    """Draft models recently loaded: several speculative configs can name the same one."""
    from onepass.models.loading import load_model

    return load_model(model, cache_dir)


def build(options: Options, context) -> DraftModelDrafter:
    from onepass.models.llama import NativeDecoder

    target = context.backend
    loaded = _load(options.model, context.cache_dir)
    if context.tokenizer is not None:
        check_vocabularies(context.tokenizer, loaded.tokenizer, options.model)
    decoder = NativeDecoder(
        loaded.config,
        loaded.weights,
        max_len=target.max_len,
        dtype=target.dtype,
        device=target.device,
    )
    cost = context.cost_curve()
    return DraftModelDrafter(
        decoder,
        context.num_speculative_tokens or 4,
        min_confidence=options.min_confidence,
        width=options.width,
        cost=cost,
    )
