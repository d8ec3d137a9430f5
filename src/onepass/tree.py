"""Draft trees as parent arrays (EAGLE-2 style; cheap to grow) and Medusa-style tuple paths
(vLLM's `speculative_token_tree`) as an input format.

Node i of a draft has parent `parents[i]` (-1 = child of the root, the last committed token),
and parents always precede children. The target scores the root and every node in one
forward: row 0 is the root and row i + 1 is node i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]
    """parents[i] in [-1, i): -1 = child of the root."""

    def __post_init__(self) -> None:
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")

    @classmethod
    def chain(cls, n: int) -> Tree:
        return cls(tuple(range(-1, n - 1)))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> tuple[Tree, list[tuple[int, ...]]]:
        """Medusa-style paths, e.g. [(0,), (1,), (0, 0), (0, 1)]: each path lists child ranks
        from the root. Returns the tree and the paths in node order (by depth, then rank).
        Every prefix of a path must itself be a path."""
        ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(ordered)}
        parents = []
        for p in ordered:
            if not p or any(r < 0 for r in p):
                raise ValueError(f"invalid tree path {p}")
            if len(p) > 1 and p[:-1] not in index:
                raise ValueError(f"tree path {p} lacks its parent path {p[:-1]}")
            parents.append(index[p[:-1]] if len(p) > 1 else -1)
        return cls(tuple(parents)), ordered

    def __len__(self) -> int:
        return len(self.parents)

    # A tree is immutable; drafting and verification ask for these several times a step.
    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of each node: children of the root have depth 1."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return tuple(depths)

    def ancestors(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node`, inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def children(self) -> tuple[tuple[int, ...], ...]:
        """children()[0] = the root's children; children()[i + 1] = node i's children."""
        return self._children

    @cached_property
    def _children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i)
        return tuple(tuple(k) for k in kids)

    def leaves(self) -> list[int]:
        has_child = set(self.parents)
        return [i for i in range(len(self)) if i not in has_child]

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path, as node indices."""
        return [self.ancestors(leaf) for leaf in self.leaves()]

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """[n + 1, n + 1] bool over the rows (root, node 0, ...): row r may attend to column c
        iff c is r or one of its ancestors. The root row sees only itself."""
        n = len(self)
        mask = np.eye(n + 1, dtype=bool)  # NumPy: a dozen row operations cost less than torch's
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i + 1] |= mask[p + 1]
        return torch.from_numpy(mask).to(device)

    def positions(self, start: int, device: torch.device | str = "cpu") -> Tensor:
        """[n + 1] positions of the rows, the root at `start`."""
        return torch.tensor([start, *(start + d for d in self.depths)], device=device)
