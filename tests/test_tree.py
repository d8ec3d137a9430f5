"""Property tests (hypothesis) for draft trees (onepass.tree) and Draft.truncated.

Every property is checked against an independent reference computed here from the parent array
alone (walking parents by hand), never against another method of Tree.
"""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onepass.draft import Draft
from onepass.tree import Tree

MAX_NODES = 14
# No per-example deadline: the machine is shared, and a slow example is not a wrong one.
relaxed = settings(deadline=None)


@st.composite
def parent_arrays(draw: st.DrawFn, max_nodes: int = MAX_NODES) -> tuple[int, ...]:
    """A valid parent array: parents[i] in [-1, i)."""
    n = draw(st.integers(0, max_nodes))
    return tuple(draw(st.integers(-1, i - 1)) for i in range(n))


@st.composite
def invalid_parent_arrays(draw: st.DrawFn) -> tuple[int, ...]:
    """A parent array with one node whose parent is itself, a later node, or below -1."""
    parents = list(draw(parent_arrays()))
    parents.append(-1)  # at least one node to break
    bad = draw(st.integers(0, len(parents) - 1))
    parents[bad] = draw(st.one_of(st.integers(bad, bad + 5), st.integers(-6, -2)))
    return tuple(parents)


def ancestors_or_self(parents: tuple[int, ...], node: int) -> set[int]:
    """Reference: the set of nodes on the way from `node` up to the root (root excluded)."""
    seen = set()
    while node >= 0:
        seen.add(node)
        node = parents[node]
    return seen


def ranks_as_paths(parents: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Reference: each node's Medusa path (child ranks from the root), ranks in node order."""
    paths: list[tuple[int, ...]] = []
    next_rank: dict[int, int] = {}
    for p in parents:
        rank = next_rank.get(p, 0)
        next_rank[p] = rank + 1
        paths.append((*(paths[p] if p >= 0 else ()), rank))
    return paths


@relaxed
@given(parent_arrays())
def test_mask_is_the_ancestor_or_self_relation(parents: tuple[int, ...]) -> None:
    tree = Tree(parents)
    n = len(parents)
    mask = tree.mask()  # [n + 1, n + 1], rows/columns: root, node 0, ...
    assert mask.shape == (n + 1, n + 1)
    assert mask.dtype == torch.bool
    assert mask[:, 0].all()  # everyone sees the root
    assert mask[0].tolist() == [True] + [False] * n  # the root sees only itself
    for i in range(n):
        seen = ancestors_or_self(parents, i)
        assert mask[i + 1, 1:].tolist() == [j in seen for j in range(n)]


@relaxed
@given(parent_arrays())
def test_depths_and_positions_follow_parents(parents: tuple[int, ...]) -> None:
    tree = Tree(parents)
    depths = tree.depths
    for i, p in enumerate(parents):
        assert depths[i] == (1 if p < 0 else depths[p] + 1)
        assert depths[i] == len(ancestors_or_self(parents, i))
    for start in (0, 17):
        positions = tree.positions(start)  # [n + 1]
        assert positions.tolist() == [start, *(start + d for d in depths)]


@relaxed
@given(parent_arrays())
def test_children_invert_parents(parents: tuple[int, ...]) -> None:
    kids = Tree(parents).children()
    assert len(kids) == len(parents) + 1
    for row, nodes in enumerate(kids):
        # row 0 is the root (parent -1), row i + 1 is node i; children listed in node order
        assert list(nodes) == [i for i, p in enumerate(parents) if p == row - 1]


@relaxed
@given(parent_arrays())
def test_paths_are_root_to_leaf_and_cover_every_node(parents: tuple[int, ...]) -> None:
    tree = Tree(parents)
    leaves = [i for i in range(len(parents)) if i not in parents]
    assert tree.leaves() == leaves
    paths = tree.paths()
    assert [path[-1] for path in paths] == leaves
    for path in paths:
        assert parents[path[0]] == -1  # starts at a child of the root
        for a, b in pairwise(path):
            assert parents[b] == a  # each step goes one level down
        assert tree.ancestors(path[-1]) == path
    assert {i for path in paths for i in path} == set(range(len(parents)))


@relaxed
@given(parent_arrays(), st.randoms(use_true_random=False))
def test_from_paths_round_trip(parents: tuple[int, ...], rnd: random.Random) -> None:
    paths = ranks_as_paths(parents)
    shuffled = paths + paths[: len(paths) // 2]  # duplicates are merged
    rnd.shuffle(shuffled)
    tree, ordered = Tree.from_paths(shuffled)
    # node order: by depth, then rank
    assert ordered == sorted(paths, key=lambda p: (len(p), p))
    assert len(tree) == len(paths)
    for j, path in enumerate(ordered):
        p = tree.parents[j]
        assert (ordered[p] if p >= 0 else ()) == path[:-1]
    # the returned tree has the same shape: its own rank paths are the ordered paths
    assert ranks_as_paths(tree.parents) == ordered
    # and node i of the original tree maps to the same parent structure
    index = {path: j for j, path in enumerate(ordered)}
    for i, p in enumerate(parents):
        assert tree.parents[index[paths[i]]] == (index[paths[p]] if p >= 0 else -1)


def test_from_paths_example_in_docstring() -> None:
    tree, ordered = Tree.from_paths([(0, 1), (1,), (0,), (0, 0)])
    assert ordered == [(0,), (1,), (0, 0), (0, 1)]
    assert tree.parents == (-1, -1, 0, 0)


@relaxed
@given(invalid_parent_arrays())
def test_invalid_parent_arrays_raise(parents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Tree(parents)


@pytest.mark.parametrize(
    "paths",
    [
        [()],  # the root itself is not a node
        [(0,), (-1,)],  # negative rank
        [(0,), (0, 0, 0)],  # missing prefix (0, 0)
        [(1, 0)],  # missing prefix (1,)
        [(0,), (0, -2)],
    ],
)
def test_invalid_paths_raise(paths: list[tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        Tree.from_paths(paths)


@relaxed
@given(st.integers(0, MAX_NODES))
def test_chain_is_a_causal_line(n: int) -> None:
    tree = Tree.chain(n)
    assert tree.parents == tuple(range(-1, n - 1))
    assert torch.equal(tree.mask(), torch.ones(n + 1, n + 1, dtype=torch.bool).tril())
    assert tree.paths() == ([list(range(n))] if n else [])


@relaxed
@given(
    parent_arrays(),
    st.integers(0, 8),
    st.integers(0, MAX_NODES + 2),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_truncated_keeps_parents_and_respects_limits(
    parents: tuple[int, ...], max_depth: int, max_nodes: int, with_probs: bool, rnd: random.Random
) -> None:
    n = len(parents)
    tokens = [rnd.randrange(50) for _ in range(n)]
    draft_probs = torch.rand(n, 5) if with_probs else None  # [n, vocab]
    draft = Draft(tokens, Tree(parents), draft_probs, aux_tokens=[7], aux_offsets=[1])
    out = draft.truncated(max_depth=max_depth, max_nodes=max_nodes)

    # Reference: the first max_nodes nodes (in node order) no deeper than max_depth.
    depths = [len(ancestors_or_self(parents, i)) for i in range(n)]
    kept = [i for i in range(n) if depths[i] <= max_depth][:max_nodes]
    assert len(out) == len(kept) <= max_nodes
    assert all(d <= max_depth for d in out.tree.depths)
    assert out.tokens == [tokens[i] for i in kept]
    # Parents before children (Tree validates it) and each node keeps its token path.
    for j, i in enumerate(kept):
        new_path = [out.tokens[a] for a in out.tree.ancestors(j)]
        assert new_path == [tokens[a] for a in Tree(parents).ancestors(i)]
    if len(kept) == n:
        assert out is draft  # nothing cut: aux rows survive
    else:
        assert out.aux_tokens == []  # aux rows are dropped when the tree changes
        if draft_probs is not None:
            assert out.draft_probs is not None
            assert torch.equal(out.draft_probs, draft_probs[kept])
        else:
            assert out.draft_probs is None


def test_truncated_example() -> None:
    # root -> 0 -> 2 -> 4 ; root -> 1 -> 3
    draft = Draft([10, 11, 12, 13, 14], Tree((-1, -1, 0, 1, 2)))
    out = draft.truncated(max_depth=2, max_nodes=3)
    assert out.tokens == [10, 11, 12]
    assert out.tree.parents == (-1, -1, 0)
    assert len(draft.truncated(max_depth=0, max_nodes=5)) == 0
