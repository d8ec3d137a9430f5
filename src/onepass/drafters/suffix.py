"""Suffix (retrieval) drafting: REST (He et al. 2023, "REST: Retrieval-Based Speculative
Decoding"), SuffixDecoding (Oliaro et al. 2024; vLLM's / Arctic Inference's `suffix` method),
SAMD (suffix-automaton drafting) and Alipay's trie-based Lookahead. No model, no weights: find
where the current context occurred before, count what followed it, and propose a TREE of the
most frequent continuations.

Data structures, and why:
* The request's tokens (prompt + output): token -> positions of the token that followed each
  earlier occurrence, oldest first. An emitted token costs one dict append (no rebuild); the
  occurrences of the last n tokens are those of the last n - 1 whose preceding token also
  matches, so every suffix length is found by narrowing one list. Unlike a suffix automaton
  (one end position per state: SAMD drafts a single chain) it lists every earlier occurrence,
  which the frequency tree needs.
* The optional corpus is static and may be large: REST's datastore, a suffix array, here over
  the *reversed* token stream sorted on its first max_match tokens. The reversed current suffix
  is then a prefix query; narrowing the range one token at a time (binary searches) yields the
  occurrences of every suffix length in one O(max_match log N) pass.
* The history (history_tokens > 0; SuffixDecoding's global tree, which pays on repeated,
  agent-like traffic): the prompts and answers of earlier requests, the oldest dropped first
  past history_tokens, indexed as the corpus is, re-indexed whole as a request ends (a few ms).
  It is what the drafter learns across requests, shared by its forks (drafters/base.py); a
  request joins it only once it has ended (finish), so none drafts from another's partial
  answer.

Match rule:
1. n* = the longest n in [min_match, max_match] such that the last n tokens occurred earlier
   (with a token after them) in the request, the history or the corpus; none -> Draft.empty().
2. Occurrences are gathered level by level from n = n* down: at each level the request's new
   ones (most recent first), then the history's, then the corpus's; at most max_occurrences in
   all. One found at level n weighs backoff ** (n* - n), times corpus_weight if from the
   history or the corpus. Going down a level happens only while fewer than min_occurrences are
   gathered, so a long but rare match is backed by shorter, more frequent ones and still
   dominates them.

Tree rule:
3. The continuations (up to D = min(budget, max_depth) tokens after each occurrence) are
   counted, weighted, into a trie. One reaching the end of the request's text repeats the text
   since the occurrence (the loop it is in; what a new lookup would propose once accepted); one
   reaching the end of a corpus document (or of an earlier request) stops there. A node's
   conditional probability is its weight over its siblings' total (a continuation cut short is
   no evidence either way); its score is the product along its path.
4. Best-first selection: repeatedly take the highest-scoring frontier node (ties: shallower,
   then the most recent occurrence) until the budget (num_speculative_tokens, else max_nodes =
   12: forward cost is nearly flat up to ~12 rows) is used or the score falls below
   min_probability. Scores never grow along a path, so parents come before children and
   siblings appear in decreasing frequency.
5. Each node carries an evidence class (evidence_class: match length x share of its siblings'
   weight), by which the adaptive drafter learns how often such nodes are accepted.
"""

from __future__ import annotations

import heapq
import json
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.models.base import ModelOutput
from onepass.tree import Tree

SEP = -1  # corpus document boundary: never matched, ends continuations
PAD = -2  # past the end of the reversed corpus (sorts before every token)
# Default history size (Options.history_tokens): some 30-60 recent chats, re-indexed in ~3 ms
# as a request ends, ~1 MB. On the default model (scripts/suffix_history.py, greedy, 64 tokens)
# it lifts a repeated prompt's mean acceptance length from 1.44 to 12.6 (suffix) and from 2.89
# to 12.0 (auto), and leaves fresh prompts alone (1.70 -> 1.74 suffix, 1.92 -> 1.91 auto).
HISTORY_TOKENS = 16384


@dataclass
class Options:
    max_match: int = 12
    """Longest suffix of the context looked up (tokens)."""
    min_match: int = 1
    """Shortest suffix worth drafting from."""
    min_occurrences: int = 4
    """Back off to shorter suffixes while fewer occurrences than this are gathered."""
    max_occurrences: int = 32
    """Most occurrences whose continuations are counted (most recent first)."""
    backoff: float = 0.25
    """Weight factor per token of match length an occurrence has less than the longest match."""
    max_nodes: int = 12
    """Draft tree size when the config gives no num_speculative_tokens."""
    min_probability: float = 0.05
    """Nodes whose estimated probability of being reached is lower are not proposed."""
    corpus: str | None = None
    """Optional .txt (one document) or .jsonl (string fields "text" and/or "turns") file."""
    corpus_weight: float = 0.5
    """Weight of a corpus or history occurrence relative to one in the request's own text."""
    history_tokens: int = HISTORY_TOKENS
    """Tokens of earlier requests (prompt + answer each, the oldest requests dropped first) kept
    to draft from, as SuffixDecoding's global tree; 0: none."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_match <= self.max_match <= 64:
            raise ValueError("need 1 <= min_match <= max_match <= 64")
        if not 1 <= self.min_occurrences <= self.max_occurrences:
            raise ValueError("need 1 <= min_occurrences <= max_occurrences")
        if not 1 <= self.max_nodes <= 64:
            raise ValueError("max_nodes must be in 1..64")
        if not 0 < self.backoff <= 1 or not 0 < self.corpus_weight <= 1:
            raise ValueError("backoff and corpus_weight must be in (0, 1]")
        if not 0 <= self.min_probability < 1:
            raise ValueError("min_probability must be in [0, 1)")
        if not isinstance(self.history_tokens, int) or not 0 <= self.history_tokens <= 1 << 24:
            raise ValueError(f"history_tokens must be an integer in 0..{1 << 24}")
        if self.corpus is not None:
            path = Path(self.corpus)
            if path.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"corpus must be a .txt or .jsonl file, got {self.corpus!r}")
            if not path.is_file():
                raise ValueError(f"corpus file not found: {self.corpus}")


class RequestIndex:
    """token -> positions following its earlier occurrences, grown as tokens are emitted."""

    def __init__(self, max_match: int) -> None:
        self.max_match = max_match
        self.tokens: list[int] = []
        self.positions: dict[int, list[int]] = {}

    def sync(self, tokens: Sequence[int]) -> None:
        """Catch up with `tokens`, which only grows within a request (else rebuild)."""
        old = len(self.tokens)
        if len(tokens) < old or (old and tokens[old - 1] != self.tokens[-1]):
            self.__init__(self.max_match)
            old = 0
        self.extend(tokens[old:])

    def extend(self, new: Sequence[int]) -> None:
        """Append and index the tokens that follow."""
        old = len(self.tokens)
        self.tokens.extend(new)
        toks, positions = self.tokens, self.positions
        for end in range(max(old, 1), len(toks)):  # toks[end - 1], followed by end
            positions.setdefault(toks[end - 1], []).append(end)

    def continuation(self, p: int, depth: int) -> list[int]:
        """`depth` tokens from position p, periodic past the end (see rule 3)."""
        toks, period = self.tokens, len(self.tokens) - p
        if period >= depth:
            return toks[p : p + depth]
        return [toks[p + i % period] for i in range(depth)]

    def levels(self, max_n: int) -> list[list[int]]:
        """levels[n - 1]: positions after earlier occurrences of the last n tokens, for n = 1..
        the longest suffix found (the list stops at the first miss: shorter always match)."""
        toks, out = self.tokens, []
        last = len(toks)
        found = self.positions.get(toks[-1]) if toks else None
        for n in range(1, min(max_n, last - 1) + 1):
            if n > 1:  # narrow to the occurrences whose n-th token back matches too
                want = toks[last - n]
                found = [p for p in found if p >= n and toks[p - n] == want]
            if not found:
                break
            out.append(found)
        return out


def sort_words(rev: np.ndarray, n: int, max_match: int) -> list[np.ndarray]:
    """The first max_match tokens of each of rev's first n suffixes, packed into as few uint64
    words as the ids allow, most significant first: sorting the words sorts the suffixes on
    those tokens (PAD < SEP < every token) in a few passes instead of one per token (5-10x
    faster: the history is re-indexed as every request ends)."""
    shifted = (rev - PAD).astype(np.uint64)  # PAD 0, SEP 1, token t at t + 2
    bits = max(int(shifted.max()).bit_length(), 1)
    per_word = 64 // bits
    words = []
    for first in range(0, max_match, per_word):
        word = np.zeros(n, dtype=np.uint64)
        for j in range(first, min(first + per_word, max_match)):
            word = (word << np.uint64(bits)) | shifted[j : j + n]
        words.append(word)
    return words


class CorpusIndex:
    """Suffix array over the reversed corpus, sorted on its first max_match tokens."""

    def __init__(self, documents: Sequence[Sequence[int]], max_match: int) -> None:
        stream = [t for doc in documents if doc for t in (*doc, SEP)]
        self.tokens = np.array(stream, dtype=np.int64)
        n = len(stream)
        self.rev = np.concatenate([self.tokens[::-1], np.full(max_match, PAD, dtype=np.int64)])
        words = sort_words(self.rev, n, max_match)
        order = np.lexsort(words[::-1])
        # Keep suffixes of the reversed stream whose match would be followed by a token of the
        # same document (rev[r - 1] is that token): others can never yield a continuation.
        before = np.concatenate([[SEP], self.rev[: n - 1]])
        self.sa = order[(self.rev[order] != SEP) & (before[order] != SEP)]

    def levels(self, suffix_reversed: Sequence[int]) -> list[tuple[int, int]]:
        """levels[n - 1]: the range of `sa` matching the last n tokens, for n = 1.. the longest."""
        lo, hi, out = 0, len(self.sa), []
        for j, t in enumerate(suffix_reversed):
            key = partial(self._token_at, j)
            lo, hi = (
                bisect_left(self.sa, t, lo, hi, key=key),
                bisect_right(self.sa, t, lo, hi, key=key),
            )
            if lo == hi:
                break
            out.append((lo, hi))
        return out

    def _token_at(self, j: int, r: int) -> int:
        return int(self.rev[r + j])

    def continuation(self, r: int, depth: int) -> list[int]:
        start = len(self.tokens) - int(r)  # the match ends at original index N - 1 - r
        cont = self.tokens[start : start + depth].tolist()
        return cont[: cont.index(SEP)] if SEP in cont else cont


class History:
    """Earlier requests' prompts and answers, at most max_tokens of them (the oldest requests
    dropped first), indexed like the corpus: SuffixDecoding's global tree. Learned state: a
    drafter's forks share it, and a request joins it only once it has ended (finish), so no
    request drafts from another's partial answer."""

    def __init__(self, max_tokens: int, max_match: int) -> None:
        self.max_tokens = max_tokens
        self.max_match = max_match
        self.documents: deque[list[int]] = deque()
        self.size = 0  # tokens in documents
        self.index: CorpusIndex | None = None  # None while empty

    def add(self, tokens: Sequence[int]) -> None:
        """Keep a finished request's tokens (the last max_tokens of them) and re-index."""
        document = list(tokens[-self.max_tokens :])
        if not document:
            return
        self.documents.append(document)
        self.size += len(document)
        while self.size > self.max_tokens:
            self.size -= len(self.documents.popleft())
        # A fresh index replaces the old one whole: a sort of the bounded history, once per
        # request (ms), while proposals, every step, stay binary searches.
        self.index = CorpusIndex(self.documents, self.max_match)


def read_corpus(path: str) -> list[str]:
    """The documents of a .txt (the whole file) or .jsonl ("text" and "turns" fields) corpus."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read corpus {path}: {e}") from None
    if path.endswith(".txt"):
        return [text]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"corpus {path} line {number} is not valid JSON") from None
        if isinstance(record, dict):
            turns = record.get("turns")
            docs += [record["text"]] if isinstance(record.get("text"), str) else []
            docs += [t for t in turns if isinstance(t, str)] if isinstance(turns, list) else []
    if not docs:
        raise ValueError(f"corpus {path} has no string 'text' or 'turns' fields")
    return docs


def evidence_class(match_length: int, share: float) -> int:
    """How strongly a node is backed, in 0..11: the longest suffix matched (1, 2-3, 4-7, 8+
    tokens) x the node's share of its siblings' weight (< 1/2, < 9/10, more). Long matches
    with one dominant continuation are copies in progress; short ones are guesses."""
    length = 0 if match_length <= 1 else 1 if match_length <= 3 else 2 if match_length <= 7 else 3
    return 3 * length + (0 if share < 0.5 else 1 if share < 0.9 else 2)


def best_nodes(
    continuations: Iterable[tuple[Sequence[int], float]],
    budget: int,
    min_probability: float,
    match_length: int = 1,
) -> Draft:
    """The `budget` highest-scoring nodes of the trie the weighted continuations count (rules
    3-4 of the module docstring), best-first, classed by evidence (see evidence_class).

    The trie is never built whole: a node's children are counted only when the node is taken,
    so a step costs the few nodes proposed rather than every token of every occurrence (most
    of which score below min_probability), and identical continuations (a copy in progress
    finds the same one many times) are counted once, with their weights summed."""
    weights: dict[tuple[int, ...], float] = {}
    for continuation, weight in continuations:
        key = tuple(continuation)
        weights[key] = weights.get(key, 0.0) + weight
    paths = list(weights.items())  # first occurrence first: ties go to the most recent
    # (-score, depth, first path through the node, token, paths through it, score, share,
    # index of the parent in the draft): a min-heap; the first three entries are unique.
    frontier: list[tuple[float, int, int, int, list[int], float, float, int]] = []

    def push(members: list[int], depth: int, score: float, out_index: int) -> None:
        groups: dict[int, list[int]] = {}
        sums: dict[int, float] = {}
        total = 0.0  # a path cut short at this node is no evidence either way
        for i in members:
            path, weight = paths[i]
            if len(path) > depth:
                t = path[depth]
                group = groups.get(t)
                if group is None:
                    groups[t], sums[t] = [i], weight
                else:
                    group.append(i)
                    sums[t] += weight
                total += weight
        for t, group in groups.items():
            s = score * sums[t] / total
            if s >= min_probability:
                share = sums[t] / total
                heapq.heappush(frontier, (-s, depth + 1, group[0], t, group, s, share, out_index))

    push(list(range(len(paths))), 0, 1.0, -1)
    tokens: list[int] = []
    parents: list[int] = []
    classes: list[int] = []
    while frontier and len(tokens) < budget:
        _, depth, _, token, members, score, share, parent = heapq.heappop(frontier)
        tokens.append(token)
        parents.append(parent)
        classes.append(evidence_class(match_length, share))
        push(members, depth, score, len(tokens) - 1)
    return Draft(tokens, Tree(tuple(parents)), classes=classes)


class SuffixDrafter(Drafter):
    def __init__(
        self,
        options: Options,
        budget: int,
        corpus: CorpusIndex | None,
        history: History | None = None,
    ) -> None:
        self.options = options
        self.budget = budget
        # Shared with every fork: the static corpus, and the history of ended requests (a new
        # one if none is given and options.history_tokens asks for one).
        self.corpus = corpus
        if history is None and options.history_tokens:
            history = History(options.history_tokens, options.max_match)
        self.history = history
        # This request's own: its tokens, indexed.
        self.index = RequestIndex(options.max_match)

    def fork(self) -> SuffixDrafter:
        return SuffixDrafter(self.options, self.budget, self.corpus, self.history)

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.index = RequestIndex(self.options.max_match)
        self.index.sync(prompt_ids)

    def propose(self, state: DecodeState) -> Draft:
        budget = min(self.budget, state.max_draft_tokens)
        depth = min(budget, state.max_depth)
        if depth <= 0:
            return Draft.empty()
        self.index.sync(state.tokens)
        stores = self.stores()
        request, found = self.matches(stores)
        longest = max([len(request), *map(len, found)])
        continuations = self.occurrences(request, stores, found, depth)
        return best_nodes(continuations, budget, self.options.min_probability, longest)

    def stores(self) -> list[CorpusIndex]:
        """What is searched besides the request: the history (recent traffic), the corpus."""
        history = self.history.index if self.history is not None else None
        return [store for store in (history, self.corpus) if store is not None]

    def matches(
        self, stores: Sequence[CorpusIndex]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Occurrences of each suffix length of the context: in the request, in each store."""
        o, toks = self.options, self.index.tokens
        request = self.index.levels(o.max_match)
        suffix_reversed = toks[: -o.max_match - 1 : -1]
        return request, [store.levels(suffix_reversed) for store in stores]

    def occurrences(
        self,
        request: list[list[int]],
        stores: Sequence[CorpusIndex],
        found: list[list[tuple[int, int]]],
        depth: int,
    ) -> Iterator[tuple[list[int], float]]:
        """(continuation, weight) of the gathered occurrences (rules 1-2 of the docstring)."""
        o = self.options
        longest = max([len(request), *map(len, found)])
        seen: set[tuple[int, int]] = set()  # (store index, -1 = the request; position)
        for n in range(longest, o.min_match - 1, -1):
            weight = o.backoff ** (longest - n)
            # Enough candidates to fill the cap even if all the seen ones reappear.
            want = o.max_occurrences + len(seen)
            mine = request[n - 1] if n <= len(request) else []
            level = [(-1, p) for p in islice(reversed(mine), want)]
            for s, (store, ranges) in enumerate(zip(stores, found, strict=True)):
                if n <= len(ranges):
                    lo, hi = ranges[n - 1]
                    level += [(s, r) for r in store.sa[lo : min(hi, lo + want)].tolist()]
            for key in level:
                if len(seen) >= o.max_occurrences:
                    return
                if key not in seen:
                    seen.add(key)
                    s, p = key
                    if s < 0:
                        yield self.index.continuation(p, depth), weight
                    else:
                        yield stores[s].continuation(p, depth), weight * o.corpus_weight
            if len(seen) >= o.min_occurrences:
                return

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        self.index.extend(verdict.tokens)  # now, so that finish() sees the last step's tokens

    def finish(self) -> None:
        if self.history is not None:
            self.history.add(self.index.tokens)
        self.index = RequestIndex(self.options.max_match)  # a second finish adds nothing


def build(options: Options, context: Any) -> SuffixDrafter:
    corpus = None
    if options.corpus is not None:
        if context.tokenizer is None:
            raise ValueError("the suffix corpus needs a tokenizer to be tokenized")
        docs = [
            context.tokenizer.encode(d, add_special_tokens=False)
            for d in read_corpus(options.corpus)
        ]
        corpus = CorpusIndex(docs, options.max_match)
    return SuffixDrafter(options, context.num_speculative_tokens or options.max_nodes, corpus)
