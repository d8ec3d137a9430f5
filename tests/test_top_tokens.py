"""Each row's largest logits (onepass.top_tokens): the native one-pass kernel and the torch
fallback against a reference order, including ties, masked rows, NaN, tails and strided rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import each_isa

from onepass.models import cpu_kernels
from onepass.top_tokens import _blocked_top_k, row_argmax, row_top_k


def reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Value descending, NaN above every number, ties (NaN included) by the lower index."""
    x = logits.numpy()
    key = np.where(np.isnan(x), -np.inf, -x)
    index = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    order = np.stack([np.lexsort((i, kk))[:k] for i, kk in zip(index, key, strict=True)])
    return torch.from_numpy(order).long()


def hard_rows(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, vocab, generator=g)
    logits[1, :] = logits[1, 0]  # a row of ties
    logits[2, -5:] = 100.0 + torch.arange(5.0)  # the largest at the very end (the tail)
    logits[3, :: max(1, vocab // 7)] = 50.0  # the largest spread out, tied
    crowd = min(100, vocab - 7)
    logits[4, 7 : 7 + crowd] = 20.0 + torch.arange(float(crowd))  # the largest in one run
    logits[5, : vocab // 2] = float("-inf")  # masked by a logits processor
    logits[6, :] = float("-inf")  # everything masked
    logits[7] = torch.linspace(-1.0, 1.0, vocab)  # increasing: every logit enters the list
    logits[8, vocab // 3] = float("nan")
    logits[9, [0, vocab - 1]] = float("nan")
    logits[10, vocab // 2 :] = logits[10, vocab // 2 :].max() + 1.0  # ties across the halves
    return logits


@each_isa
@pytest.mark.parametrize(
    ("vocab", "k"),
    [(v, k) for v in (49152, 49153, 5000, 1000, 37, 8) for k in (1, 3, 8, 64) if k <= v],
)
def test_native_kernel_matches_the_reference_order(isa, vocab, k):
    logits = hard_rows(vocab, seed=vocab + k)
    ours = cpu_kernels.ops(isa).row_top_k(logits, k)
    assert ours.dtype == torch.int64 and ours.shape == (12, k)
    assert torch.equal(ours, reference(logits, k))


@each_isa
def test_native_kernel_reads_strided_rows_and_rejects_bad_input(isa):
    row_top_k_native = cpu_kernels.ops(isa).row_top_k
    logits = hard_rows(3000, seed=1)
    assert torch.equal(row_top_k_native(logits[::2], 5), reference(logits[::2], 5))
    assert torch.equal(row_top_k_native(logits.t().contiguous().t(), 4), reference(logits, 4))
    assert row_top_k_native(logits[:0], 3).shape == (0, 3)
    with pytest.raises(RuntimeError, match="k must be in"):
        row_top_k_native(logits, 3001)
    with pytest.raises(RuntimeError, match="float32"):
        row_top_k_native(logits.double(), 3)


@pytest.mark.parametrize("vocab", [49152, 1000, 300, 20])  # whole blocks, a tail, few blocks
@pytest.mark.parametrize("k", [1, 3, 8])
def test_torch_fallback_matches_torch_topk(vocab, k):
    logits = hard_rows(vocab, seed=vocab + k)[:8]  # torch.topk's NaN order is its own
    ours = _blocked_top_k(logits, k)
    expected = torch.topk(logits, k, dim=-1)
    assert torch.equal(logits.gather(1, ours), expected.values)  # same values, same order
    assert all(len(set(r.tolist())) == k for r in ours)  # k distinct tokens
    untied = [0, 2, 4, 5, 7]
    assert torch.equal(ours[untied], expected.indices[untied])


def test_row_argmax_is_the_first_index_of_the_maximum_as_in_torch():
    logits = hard_rows(49152, seed=0)[:8]
    logits[0, [3, 700]] = 50.0  # a tie: the first index wins, as in torch.argmax
    assert row_argmax(logits) == logits.argmax(dim=-1).tolist()
    assert row_argmax(logits[::2]) == logits[::2].argmax(dim=-1).tolist()  # strided rows
    assert row_argmax(logits)[0] == 3 and row_argmax(logits)[1] == 0
    assert row_argmax(logits.double()) == logits.argmax(dim=-1).tolist()  # not the kernel's dtype


def test_row_top_k_agrees_with_torch_on_values():
    logits = hard_rows(49152, seed=2)[:8]
    ours = row_top_k(logits, 8)
    assert torch.equal(logits.gather(1, ours), torch.topk(logits, 8, dim=-1).values)
