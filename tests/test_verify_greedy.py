"""Table tests for the greedy verifier (design.md §2, test 1): exact-match acceptance of the
longest draft path that follows the target's argmax, plus one bonus or recovered token.

Logits are built directly with the argmax planted where each case wants it; every other logit
is random noise below it, so a verifier reading the wrong row would pick a different token.
"""

from __future__ import annotations

import pytest
import torch

from onepass.draft import Draft, Verdict
from onepass.sampling import LogitsProcessor, RequestRandomness, SamplingParams
from onepass.tree import Tree
from onepass.verify import verify
from onepass.verify.greedy import verify_greedy

VOCAB = 16


def planted_logits(argmaxes: list[int], seed: int = 0) -> torch.Tensor:
    """[len(argmaxes), VOCAB] random logits whose row r has its maximum at argmaxes[r]."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(argmaxes), VOCAB, generator=gen)  # [rows, vocab]
    logits[torch.arange(len(argmaxes)), argmaxes] = logits.max() + 1.0
    return logits


def assert_well_formed(draft: Draft, verdict: Verdict) -> None:
    """A verdict is a root-to-node path of the tree plus exactly one extra token."""
    assert len(verdict.tokens) == len(verdict.path) + 1
    for depth, node in enumerate(verdict.path):
        assert draft.tree.parents[node] == (verdict.path[depth - 1] if depth else -1)
    assert verdict.tokens[:-1] == [draft.tokens[i] for i in verdict.path]


# (tokens, parents, argmax of each row (root, node 0, ...), expected path, expected tokens)
CASES = {
    "perfect_chain_gets_bonus": ([3, 4, 5], (-1, 0, 1), [3, 4, 5, 6], [0, 1, 2], [3, 4, 5, 6]),
    "early_mismatch": ([3, 4, 5], (-1, 0, 1), [3, 9, 5, 6], [0], [3, 9]),
    "first_token_wrong": ([3, 4, 5], (-1, 0, 1), [7, 4, 5, 6], [], [7]),
    "empty_draft": ([], (), [8], [], [8]),
    # siblings 1, 2, 3 under the root; the target wants 2 (node 1, a leaf) -> bonus from row 2
    "match_on_second_sibling": ([1, 2, 3], (-1, -1, -1), [2, 1, 11, 3], [1], [2, 11]),
    # root -> {0: 1, 1: 2}; 0 -> {2: 5}; 1 -> {3: 6}; 3 -> {4: 7}: the deeper branch via node 1
    "deeper_branch_chosen": (
        [1, 2, 5, 6, 7],
        (-1, -1, 0, 1, 3),
        [2, 5, 6, 4, 7, 9],
        [1, 3, 4],
        [2, 6, 7, 9],
    ),
    # root -> {0: 1, 1: 2}; node 0 -> {2: 3, 3: 4}; the target wants 5 after 1: no child matches
    "no_sibling_matches_at_depth_2": ([1, 2, 3, 4], (-1, -1, 0, 0), [1, 5, 2, 3, 4], [0], [1, 5]),
    "no_sibling_matches_at_root": ([1, 2, 3], (-1, -1, -1), [0, 1, 2, 3], [], [0]),
    # the rejected branch's rows would extend it, but they must be ignored
    "rejected_branch_rows_ignored": ([1, 2, 6], (-1, -1, 1), [1, 12, 6, 13], [0], [1, 12]),
    # a chain accepted to its end inside a tree, whose last node is a leaf -> bonus
    "bonus_after_tree_leaf": (
        [4, 5, 6, 7],
        (-1, 0, 0, 2),
        [4, 6, 0, 7, 15],
        [0, 2, 3],
        [4, 6, 7, 15],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_table(case: str) -> None:
    tokens, parents, argmaxes, want_path, want_tokens = CASES[case]
    draft = Draft(tokens, Tree(parents))
    verdict = verify_greedy(draft, planted_logits(argmaxes))
    assert_well_formed(draft, verdict)
    assert verdict.path == want_path
    assert verdict.tokens == want_tokens


@pytest.mark.parametrize("case", CASES)
def test_dispatch_sends_greedy_requests_to_exact_match(case: str) -> None:
    # The central dispatcher must pick exact match for temperature 0 whatever the draft carries.
    tokens, parents, argmaxes, want_path, want_tokens = CASES[case]
    draft_probs = torch.full((len(tokens), VOCAB), 1.0 / VOCAB)  # [n, vocab]
    params = SamplingParams(temperature=0)
    processor = LogitsProcessor(params, [0], VOCAB, [], torch.device("cpu"))
    for probs in (None, draft_probs):
        draft = Draft(tokens, Tree(parents), probs)
        verdict = verify(draft, planted_logits(argmaxes), processor, RequestRandomness(0))
        assert (verdict.path, verdict.tokens) == (want_path, want_tokens)


def test_greedy_reproduces_plain_greedy_on_a_toy_model() -> None:
    # A toy deterministic "model": the logits after token t depend on t only. Speculating with
    # any tree must emit exactly what plain greedy decoding emits.
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(VOCAB, VOCAB, generator=gen)  # [prev token, vocab]
    plain = [5]
    for _ in range(12):
        plain.append(int(table[plain[-1]].argmax()))
    trees = [Tree.chain(4), Tree((-1, -1, 0, 0, 1, 2)), Tree((-1, -1, -1, 2, 3, 3))]
    for tree in trees:
        out, step = [5], 0
        while len(out) < len(plain):
            # a drafter that is right on odd steps and wrong on even ones, per node
            right = step % 2 == 1
            tokens: list[int] = []
            for i, p in enumerate(tree.parents):
                prev = out[-1] if p < 0 else tokens[p]
                best = int(table[prev].argmax())
                tokens.append(best if right or i % 2 else (best + 1) % VOCAB)
            draft = Draft(tokens, tree)
            rows = [out[-1], *tokens]  # row 0 = root, row i + 1 = node i
            verdict = verify_greedy(draft, table[rows])
            assert_well_formed(draft, verdict)
            out += verdict.tokens
            step += 1
        assert out[: len(plain)] == plain
