"""The static KV cache's commit: the kept rows of the last forward follow the committed prefix in
order, whatever moves; nothing before them changes."""

from __future__ import annotations

import pytest
import torch

from onepass.kv_cache import KVCache


def filled_cache(committed: int) -> KVCache:
    """A cache with `committed` rows committed and a forward's rows written after them; every
    row's values name it (row r holds r + layer / 10 + head / 100)."""
    cache = KVCache(2, 3, 32, 8, torch.float32, torch.device("cpu"))
    rows = torch.arange(32.0)[None, None, :, None]
    tags = (
        torch.arange(2.0)[:, None, None, None] / 10 + torch.arange(3.0)[None, :, None, None] / 100
    )
    cache.k.copy_((rows + tags).expand_as(cache.k))
    cache.v.copy_(-(rows + tags).expand_as(cache.v))
    cache.length = committed
    return cache


@pytest.mark.parametrize("keep", [[0], [0, 1, 2], [0, 3], [0, 2, 5, 6], [1, 4], [], [2]])
def test_commit_moves_the_kept_rows_after_the_prefix(keep):
    cache = filled_cache(committed=5)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.commit(keep)
    assert cache.length == 5 + len(keep)
    assert torch.equal(cache.k[:, :, :5], before_k[:, :, :5])  # the prefix is untouched
    for j, row in enumerate(keep):
        assert torch.equal(cache.k[:, :, 5 + j], before_k[:, :, 5 + row]), (j, row)
        assert torch.equal(cache.v[:, :, 5 + j], before_v[:, :, 5 + row]), (j, row)
