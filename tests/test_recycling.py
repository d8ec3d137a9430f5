"""Token Recycling drafter: adjacency-matrix updates, template expansion, pruning, caps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass.config import ConfigError, SpeculativeConfig
from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters import DraftContext, build_drafter
from onepass.drafters.recycling import (
    DEFAULT_TREE,
    RANK_CLASSES,
    Options,
    PairTable,
    RecyclingDrafter,
    Template,
)
from onepass.models.base import ModelOutput
from onepass.tree import Tree

VOCAB = 12


def drafter(tree=None, max_nodes: int | None = None, **options) -> RecyclingDrafter:
    return RecyclingDrafter(Options(top_k=3, tree=tree, **options), VOCAB, max_nodes)


def state(tokens, max_draft_tokens: int = 64, max_depth: int = 64) -> DecodeState:
    return DecodeState(list(tokens), 1, max_draft_tokens, max_depth)


def fill(d: RecyclingDrafter, rows: dict[int, list[int]]) -> None:
    for token, row in rows.items():
        d.memory.matrix[token] = row
        d.memory.filled[token] = True


def logits_ranking(*rankings: list[int]) -> torch.Tensor:
    """[len(rankings), VOCAB] logits whose descending order starts with each given ranking."""
    out = torch.zeros(len(rankings), VOCAB)
    for r, ranking in enumerate(rankings):
        for place, token in enumerate(ranking):
            out[r, token] = 10.0 - place
    return out


def step(
    d: RecyclingDrafter,
    root: int,
    draft: Draft,
    path: list[int],
    logits: torch.Tensor,
    before: int = -1,
):
    """Pretend the engine proposed `draft` after `before`, `root` and the target returned
    `logits`; the drafter learns from it, as it does at the next proposal."""
    d.root, d.before_root = root, before
    d.observe(draft, Verdict(path, [0] * (len(path) + 1)), ModelOutput(logits))
    d._learn()


def test_update_stores_each_row_tokens_topk():
    d = drafter()
    draft = Draft([5, 6, 7], Tree((-1, 0, -1)))
    logits = logits_ranking([1, 2, 3], [4, 5, 6], [7, 8, 9], [9, 10, 11])
    step(d, 4, draft, [0, 1], logits)
    assert d.memory.matrix[4].tolist() == [1, 2, 3]  # root row
    assert d.memory.matrix[5].tolist() == [4, 5, 6]  # accepted nodes
    assert d.memory.matrix[6].tolist() == [7, 8, 9]
    assert d.memory.matrix[7].tolist() == [9, 10, 11]  # rejected node: recycled too
    assert d.memory.filled.tolist() == [i in (4, 5, 6, 7) for i in range(VOCAB)]


def test_update_ignores_aux_rows_and_later_rows_overwrite():
    d = drafter()
    step(d, 4, Draft.chain([5]), [0], logits_ranking([1, 2, 3], [3, 2, 1]))
    # Next forward: token 4 again (accepted), plus an aux row that must not be read as a node.
    logits = logits_ranking([8, 9, 10], [11, 0, 1], [2, 2, 2])
    step(d, 5, Draft.chain([4]), [0], logits)
    assert d.memory.matrix[5].tolist() == [8, 9, 10]
    assert d.memory.matrix[4].tolist() == [11, 0, 1]


def test_rejected_rows_are_recycled():
    d = drafter()
    step(d, 4, Draft.chain([5]), [0], logits_ranking([1, 2, 3], [3, 2, 1]))
    # Tokens 4 (known) and 6 (new) are rejected siblings: both rows are updated.
    step(d, 5, Draft([4, 6], Tree((-1, -1))), [], logits_ranking([8, 9, 10], [11, 0, 1], [7, 8, 9]))
    assert d.memory.matrix[5].tolist() == [8, 9, 10]
    assert d.memory.matrix[4].tolist() == [11, 0, 1]
    assert d.memory.matrix[6].tolist() == [7, 8, 9]


def test_repeated_token_keeps_the_most_trusted_row():
    d = drafter()
    # Token 3 is the root, an accepted node (1) and a rejected node (2); token 5 is a rejected
    # node (0) and an accepted one (3). The accepted path's deepest row wins, then the root.
    draft = Draft([5, 3, 3, 5], Tree((-1, -1, 1, 2)))
    logits = logits_ranking([0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6])
    step(d, 3, draft, [1, 2, 3], logits)
    assert d.memory.matrix[3].tolist() == [3, 4, 5]  # row of node 2 (deepest accepted 3)
    assert d.memory.matrix[5].tolist() == [4, 5, 6]  # row of node 3 (accepted), not node 0
    step(d, 3, Draft([7, 3], Tree((-1, -1))), [0], logits_ranking([6, 7, 8], [1, 1, 1], [9, 8, 7]))
    assert d.memory.matrix[3].tolist() == [6, 7, 8]  # the root beats a rejected node
    # Two rejected rows of one unknown token: the later row wins.
    step(d, 3, Draft([9, 9], Tree((-1, -1))), [], logits_ranking([6, 7, 8], [0, 1, 2], [2, 1, 0]))
    assert d.memory.matrix[9].tolist() == [2, 1, 0]


def test_expansion_follows_the_template_breadth_first():
    d = drafter(tree=[[0], [1], [0, 0], [0, 1], [1, 2], [0, 0, 0]])
    fill(d, {1: [2, 3, 4], 2: [5, 6, 7], 3: [8, 9, 10], 5: [11, 0, 1]})
    draft = d.propose(state([0, 1]))
    # Nodes: [0]=2, [1]=3, [0,0]=5, [0,1]=6, [1,2]=10, [0,0,0]=11.
    assert draft.tokens == [2, 3, 5, 6, 10, 11]
    assert draft.tree.parents == (-1, -1, 0, 0, 1, 2)
    assert draft.draft_probs is None


def test_unknown_rows_are_pruned_with_their_subtrees():
    d = drafter(tree=[[0], [1], [0, 0], [1, 0], [1, 0, 0], [0, 0, 0]])
    fill(d, {1: [2, 3, 4], 3: [7, 8, 9]})  # rows of 2 and 7 unknown
    draft = d.propose(state([1]))
    assert draft.tokens == [2, 3, 7]
    assert draft.tree.parents == (-1, -1, 1)
    assert len(d.propose(state([0]))) == 0  # unknown root: no draft at all


def test_node_cap_takes_the_first_nodes_breadth_first():
    d = drafter(tree=[[0], [1], [0, 0], [0, 0, 0]], max_nodes=3)
    fill(d, {1: [2, 3, 4], 2: [5, 6, 7], 5: [8, 9, 10]})
    draft = d.propose(state([1]))
    assert draft.tokens == [2, 3, 5]
    assert draft.tree.parents == (-1, -1, 0)


def test_max_depth_and_max_draft_tokens():
    d = drafter(tree=[[0], [1], [0, 0], [0, 0, 0]])
    fill(d, {1: [2, 3, 4], 2: [5, 6, 7], 5: [8, 9, 10]})
    assert d.propose(state([1], max_depth=1)).tokens == [2, 3]
    assert d.propose(state([1], max_depth=2)).tokens == [2, 3, 5]
    assert d.propose(state([1], max_draft_tokens=2)).tokens == [2, 3]
    assert len(d.propose(state([1], max_depth=0))) == 0
    assert len(d.propose(state([1], max_draft_tokens=0))) == 0


def test_pruned_nodes_leave_room_for_later_ones():
    d = drafter(tree=[[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]], max_nodes=3)
    fill(d, {1: [2, 3, 4], 3: [7, 8, 9]})  # row of 2 unknown: [0, 0] and [0, 1] are pruned
    draft = d.propose(state([1]))
    assert draft.tokens == [2, 3, 7]
    assert draft.tree.parents == (-1, -1, 1)


def test_default_template_and_custom_parsing():
    template = Template(DEFAULT_TREE)
    assert len(template) == len(DEFAULT_TREE)
    assert template.parents[0] == -1
    custom = Template([[1, 0], [0], [1]])  # any order; parents must exist
    assert custom.parents == [-1, -1, 1]
    assert custom.ranks == [0, 1, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"top_k": 2, "tree": [[0], [2]]},
        {"tree": []},
        {"tree": [[0, 0]]},  # parent path missing
        {"tree": [[-1]]},
        {"persist": "yes"},
        {"pair_context": 1},
    ],
)
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        Options(**kwargs)


def test_config_routes_options():
    spec = SpeculativeConfig.parse({"method": "recycling", "tree": [[0], [0, 0]], "persist": False})
    assert spec.method_options == Options(tree=[[0], [0, 0]], persist=False)
    with pytest.raises(ConfigError):
        SpeculativeConfig.parse({"method": "recycling", "top_k": 1, "tree": [[1]]})
    context = DraftContext(backend=None, vocab_size=VOCAB, num_speculative_tokens=1)
    built = build_drafter("recycling", spec.method_options, context)
    fill(built, {1: list(range(2, 10)), 2: list(range(8))})
    assert built.propose(state([1])).tokens == [2]  # capped by num_speculative_tokens


@pytest.mark.parametrize("persist", [True, False])
def test_matrix_persistence_across_requests(persist):
    d = drafter(tree=[[0]], persist=persist)
    d.start([0, 1])
    assert len(d.propose(state([0, 1]))) == 0
    step(d, 1, Draft.empty(), [], logits_ranking([2, 3, 4]), before=0)  # matrix and pair
    assert d.propose(state([0, 1])).tokens == [2]
    assert d.propose(state([0, 1])).classes == [RANK_CLASSES]
    d.start([0, 1])  # a new request: both memories kept, or both forgotten
    assert d.propose(state([0, 1])).tokens == ([2] if persist else [])


def test_observe_before_any_proposal_is_harmless():
    d = drafter()
    d.observe(Draft.empty(), Verdict([], [3]), ModelOutput(logits_ranking([1, 2, 3])))
    d._learn()
    assert not d.memory.filled.any()


def test_only_the_latest_forward_is_learned_from_when_proposals_pause():
    """auto may skip proposing: the steps in between are not learned from, the latest is, and
    the root follows the emitted tokens all along."""
    d = drafter()
    d.start([0, 1])
    d.propose(state([0, 1]))
    d.observe(Draft.empty(), Verdict([], [3]), ModelOutput(logits_ranking([5, 6, 7])))
    d.observe(Draft.empty(), Verdict([], [4]), ModelOutput(logits_ranking([8, 9, 10])))
    assert (d.root, d.before_root) == (4, 3)
    assert not d.memory.filled.any()  # nothing read yet
    d.propose(state([0, 1, 3, 4]))
    assert d.memory.filled.tolist() == [i == 3 for i in range(VOCAB)]  # the latest root's row
    assert d.memory.matrix[3].tolist()[:3] == [8, 9, 10]


def test_rows_are_also_stored_under_their_two_token_context():
    d = drafter()
    draft = Draft([5, 6, 7], Tree((-1, 0, -1)))
    logits = logits_ranking([1, 2, 3], [4, 5, 6], [7, 8, 9], [9, 10, 11])
    step(d, 4, draft, [0], logits, before=2)
    assert d.memory.pairs.get(2, 4).tolist() == [1, 2, 3]  # root row: token before the root, root
    assert d.memory.pairs.get(4, 5).tolist() == [4, 5, 6]  # node rows: parent token, node token
    assert d.memory.pairs.get(5, 6).tolist() == [7, 8, 9]
    assert d.memory.pairs.get(4, 7).tolist() == [9, 10, 11]
    assert d.memory.pairs.get(3, 4) is None  # another context of the same token


def test_no_pair_for_a_root_without_a_predecessor():
    d = drafter()
    step(d, 4, Draft.empty(), [], logits_ranking([1, 2, 3]))
    assert d.memory.matrix[4].tolist() == [1, 2, 3]
    assert not (d.memory.pairs.keys >= 0).any()


def test_a_seen_two_token_context_wins_over_the_matrix():
    d = drafter(tree=[[0], [1], [0, 0]])
    fill(d, {1: [2, 3, 4], 2: [5, 6, 7]})
    pairs = d.memory.pairs
    pairs.put(np.array([0]), np.array([1]), np.array([[9, 10, 11]]))  # after 0, 1: 9, 10, 11
    pairs.put(np.array([1]), np.array([9]), np.array([[8, 8, 8]]))
    draft = d.propose(state([0, 1]))
    assert draft.tokens == [9, 10, 8]  # root (0, 1) and node (1, 9) both from the pair table
    assert draft.classes == [RANK_CLASSES, RANK_CLASSES + 1, RANK_CLASSES]
    other = d.propose(state([3, 1]))  # context (3, 1) never seen: the matrix, then (1, 2)
    assert other.tokens == [2, 3, 5]
    assert other.classes == [0, 1, 0]


def test_pair_context_can_be_switched_off():
    d = drafter(tree=[[0]], pair_context=False)
    fill(d, {1: [2, 3, 4]})
    step(d, 1, Draft.empty(), [], logits_ranking([5, 6, 7]), before=0)
    assert d.memory.pairs is None
    assert d.propose(state([0, 1])).tokens == [5]


def test_pair_table_newest_wins_and_collisions_replace():
    table = PairTable(VOCAB, 2, slots_log2=1)  # two slots: contexts must collide
    contexts = [(a, b) for a in range(VOCAB) for b in range(VOCAB)]
    prev = np.array([a for a, _ in contexts])
    tokens = np.array([b for _, b in contexts])
    rows = np.arange(2 * len(contexts)).reshape(-1, 2)
    table.put(prev, tokens, rows)
    stored = [(a, b) for a, b in contexts if table.get(a, b) is not None]
    assert len(stored) == 2  # one context per slot ...
    for a, b in stored:  # ... the last one put there, with its own row
        j = contexts.index((a, b))
        assert table.get(a, b).tolist() == rows[j].tolist()
        later = [c for c in contexts[j + 1 :] if slot_of(table, c) == slot_of(table, (a, b))]
        assert not later
    table.put(np.array([3, 3]), np.array([4, 4]), np.array([[1, 1], [2, 2]]))
    assert table.get(3, 4).tolist() == [2, 2]  # a repeated context: the later row wins
    table.clear()
    assert table.get(3, 4) is None


def slot_of(table: PairTable, context: tuple[int, int]) -> int:
    """Which slot a context hashes to (by elimination: put it alone into an empty copy)."""
    probe = PairTable(table.vocab_size, 2, slots_log2=64 - table.shift)
    probe.put(np.array([context[0]]), np.array([context[1]]), np.zeros((1, 2), dtype=np.int32))
    return int(np.flatnonzero(probe.keys >= 0)[0])
