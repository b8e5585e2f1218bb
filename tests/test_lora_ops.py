"""The torch LoRA ops: the segment reference against a per-token loop, and the dense CPU op against both
(on plain and on oneDNN-packed weights)."""

from __future__ import annotations

import pytest
import torch

from loraserve.ops.lora import (
    DensePack,
    LoRASegments,
    lora_apply,
    lora_linear_dense,
    max_rank_bucket,
    onednn_packing_available,
)


def _per_token(x, a, b, token_rows):
    """Oracle of the oracle: each token alone, ``sum_s (x A_s^T) B_s`` into its slice's columns."""
    outs = [bs.shape[1] for bs in b]
    y = torch.zeros(x.shape[0], sum(outs), dtype=torch.float64)
    for i, rr in enumerate(token_rows):
        if rr is None:
            continue
        row, rank = rr
        off = 0
        for s, bs in enumerate(b):
            t = x[i].double() @ a[row : row + rank, s].double().T
            y[i, off : off + outs[s]] = t @ bs[row : row + rank].double()
            off += outs[s]
    return y


@pytest.mark.parametrize("slices,outs", [(1, [24]), (2, [40, 40]), (3, [32, 16, 16])])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_reference_and_dense_op(slices, outs, seed):
    g = torch.Generator().manual_seed(seed)
    in_f, rows = 32, 48
    # Adapters at rows (0, r=8), (8, r=5), (13, r=16); the rest of the pool is stale garbage.
    adapters = [(0, 8), (8, 5), (13, 16)]
    a = torch.randn(rows, slices, in_f, generator=g)
    b = [torch.randn(rows, o, generator=g) for o in outs]
    n_out = sum(outs)
    # Tokens grouped by adapter (as the runner orders them), base tokens last.
    plan = [adapters[0]] * 3 + [adapters[2]] * 1 + [adapters[1]] * 4 + [None] * 3
    segments, start = [], 0
    for rr in adapters[:1] + adapters[2:3] + adapters[1:2]:
        n = sum(1 for p in plan if p == rr)
        segments.append((start, start + n, rr[0], rr[1]))
        start += n
    meta = LoRASegments.build(segments, len(plan))
    x = torch.randn(len(plan), in_f, generator=g)
    w = torch.randn(n_out, in_f, generator=g)
    bias = torch.randn(n_out, generator=g)
    expected = _per_token(x, a, b, plan)

    y_ref = torch.zeros(len(plan), n_out)
    lora_apply(y_ref, x, a, b, meta)
    torch.testing.assert_close(y_ref.double(), expected, rtol=1e-5, atol=1e-4)

    # The dense layout: [W; A rows] in one tensor and B block-diagonal in (r, s) row order.
    fused = torch.cat([w, a.reshape(rows * slices, in_f)])
    block = torch.zeros(rows, slices, n_out)
    off = 0
    for s, o in enumerate(outs):
        block[:, s, off : off + o] = b[s]
        off += o
    y = lora_linear_dense(x, fused, n_out, slices, bias, block.view(rows * slices, n_out), meta)
    torch.testing.assert_close(y.double(), (x @ w.T + bias).double() + expected, rtol=1e-5, atol=1e-4)
    # Base tokens get exactly the base projection.
    torch.testing.assert_close(y[-3:], (x @ w.T + bias)[-3:])


@pytest.mark.skipif(
    not onednn_packing_available(torch.float32), reason="no oneDNN weight packing on this CPU"
)
def test_dense_op_on_packed_weights_follows_pool_writes():
    """The oneDNN-packed dense op equals the plain one, and in-place writes (as pool writes and
    compaction do) or a step reaching rows past the packed copy rebuild the copies."""
    g = torch.Generator().manual_seed(3)
    in_f, outs, rows = 32, [24, 8, 8], 16
    slices, n_out = len(outs), sum(outs)
    fused = torch.randn(n_out + rows * slices, in_f, generator=g)
    block = torch.randn(rows * slices, n_out, generator=g)
    in_use = [8]
    pack = DensePack(rows_in_use=lambda: in_use[0])
    x = torch.randn(6, in_f, generator=g)

    def check(segments):
        meta = LoRASegments.build(segments, 6)
        want = lora_linear_dense(x, fused, n_out, slices, None, block, meta)
        got = lora_linear_dense(x, fused, n_out, slices, None, block, meta, pack)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    check([(0, 2, 0, 8), (2, 4, 4, 4)])
    assert pack.fused.rows == n_out + 8 * slices  # packed to the pool's rows in use
    fused[n_out : n_out + slices].mul_(-2.0)  # an adapter's A rows rewritten in place
    block[:slices].add_(1.0)  # and its B rows
    check([(0, 2, 0, 8)])
    in_use[0] = 12
    check([(0, 3, 0, 8), (3, 5, 8, 4)])  # rows 8..12: past the packed copy
    assert pack.fused.rows == n_out + 12 * slices and pack.b.rows == 12 * slices
    check([])  # a base-only step: the projection only


def test_max_rank_bucket_holds_every_rank_in_few_values() -> None:
    """The step's max_rank covers its largest rank and takes only powers of two >= 16 (few kernel variants)."""
    assert max_rank_bucket(0) == 0
    buckets = {r: max_rank_bucket(r) for r in range(1, 257)}
    assert all(b >= r for r, b in buckets.items())
    assert set(buckets.values()) == {16, 32, 64, 128, 256}
    assert max_rank_bucket(16) == 16 and max_rank_bucket(17) == 32


@pytest.mark.parametrize("num_segs", [1, 2, 3, 5])
def test_built_segment_tensors_are_16_byte_aligned(num_segs: int) -> None:
    """Each field starts on a 16-byte boundary whatever the segment count (the GPU kernels compile a
    variant per pointer alignment, and the runner's uploads are aligned), and holds the runs."""
    segments = [(3 * i, 3 * i + 2, 7 * i, 4 + i) for i in range(num_segs)]
    meta = LoRASegments.build(segments, 3 * num_segs)
    fields = [meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank]
    assert all(f is not None and f.data_ptr() % 16 == 0 for f in fields)
    assert [f.tolist() for f in fields] == [
        [s[0] for s in segments],
        [2] * num_segs,
        [s[2] for s in segments],
        [s[3] for s in segments],
    ]
