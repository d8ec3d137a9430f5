"""Static, preallocated KV cache (gpt-fast style) with tree-aware commit.

A forward writes the K/V of its n new rows after the committed `length`; `commit(keep)` then
moves the chosen rows (the accepted path of a draft tree) to directly follow the committed
prefix and advances `length`. Rows that are not kept are simply overwritten later: rejecting a
draft costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # rows past length never read
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # committed rows
        # Rotary embedding writes keys as complex pairs; half precision has no complex type.
        complex_ok = dtype in (torch.float32, torch.float64)
        pairs = self.k.view(*shape[:-1], head_dim // 2, 2)
        self.k_pairs = torch.view_as_complex(pairs) if complex_ok else None

    def commit(self, rows: Sequence[int]) -> None:
        """rows: ascending indices of the last forward's rows to retain, in order."""
        start = self.length
        # Row by row, only the rows that move (a step keeps a few): cheaper than two gathers
        # and scatters. Ascending rows never overwrite a row still to be read.
        for j, row in enumerate(rows):
            if row != j:
                self.k[:, :, start + j].copy_(self.k[:, :, start + row])
                self.v[:, :, start + j].copy_(self.v[:, :, start + row])
        self.length += len(rows)
