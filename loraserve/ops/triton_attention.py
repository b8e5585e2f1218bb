"""Triton paged attention and KV-cache writes (the GPU path; :mod:`loraserve.ops.attention` is the oracle).

Same layout and semantics as :mod:`loraserve.ops.attention`: caches are indexed
``[num_blocks, block_size, num_kv_heads, head_dim]`` with any strides but a contiguous last dim. The
engine's CUDA caches are stored head-major (``[num_blocks, num_kv_heads, block_size, head_dim]``,
passed as a transposed view; :func:`loraserve.ops.kv_cache_layout`): one head's keys of a block are
then one contiguous run (4 KB at 16 tokens x 128 x bf16) instead of rows 8 KB apart. Sequence ``b`` owns the flat query tokens
``query_start[b] : query_start[b + 1]``, which are the last ``q_len_b`` positions of a context of
``seq_lens[b]`` tokens, and query ``i`` attends causally to keys ``0 .. seq_lens[b] - q_len_b + i``.

Two kernels of one family share the inner loop (:func:`_attend_tiles`: K/V gathered through the block
table token by token, scores and softmax in fp32, online softmax in the log2 domain):

* **general** (any mix of prefill chunks, chunked prefill with cached context, prefix-cache hits and
  decode tokens): one program per (query block, KV head). A program's ``BLOCK_M`` rows are
  ``BLOCK_Q`` query tokens x the ``GROUP = num_heads // num_kv_heads`` query heads that share the KV
  head, so every K/V tile is loaded once for the whole GQA group. The grid is a host-known upper bound
  on the number of query blocks (``T // BLOCK_Q + B``); each program finds its sequence by binary
  search over ``query_start``, so no per-step block list has to be built or copied.
* **decode** (every sequence has exactly one query token): one program per (sequence, KV head,
  split); the split dimension is flash-decoding (split-K over the context) so that a few long
  sequences still fill the GPU, followed by a small reduction kernel when ``num_splits > 1``.
  Without GQA (``num_heads == num_kv_heads``) there is no tile to share between heads, so
  :func:`_decode_mha_kernel` multiplies and reduces in registers and pipelines its own loads (each
  tile's K/V issued one iteration ahead); a program may take ``block_m`` adjacent heads, though one
  head per program measured fastest.

Nothing reads device values on the host: grids come from ``T``, ``B`` and ``max_seq_len`` (host copies
in :class:`~loraserve.ops.attention.AttentionMeta`), loop bounds from device ``seq_lens`` / ``query_start``.

CUDA-graph padding (decode): the batch may be padded to a fixed size ``B_pad`` (``T = B_pad``). Padded
entries must have ``query_len`` 1 (a dummy token, any ``q`` values; ``query_start`` is then
``arange(B_pad + 1)``), ``seq_lens`` 0 (device and host copies), ``slot_mapping`` -1
(:func:`store_kv_triton` skips the write) and any ``block_tables`` row (never read). Their output rows
are zeros. Pass a fixed ``num_splits`` when capturing (e.g.
``decode_num_splits(B_pad, num_kv_heads, max_model_len, device)``): the split count is baked into the
captured grid, while each split's context range is computed on the device from ``seq_lens``, so one graph
serves any context lengths up to the captured ``block_tables`` width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraserve.ops.attention import AttentionMeta

_LOG2E = 1.4426950408889634

# Flash-decoding heuristic: aim for this many programs per SM, never split below this many context
# tokens per split (shorter splits cost more in the reduction than they gain), at most this many splits.
_DECODE_PROGRAMS_PER_SM = 2
_DECODE_MIN_TOKENS_PER_SPLIT = 128
_DECODE_MAX_SPLITS = 32


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one attention kernel.

    ``block_m``: rows per program: for the general kernel query tokens x GQA group, at least the
    group size; for the decode kernel without GQA the heads of one token (the largest power of two
    up to ``block_m`` that divides ``num_heads``); unused by the GQA decode kernel, whose rows are
    one token's group.
    ``block_n``: keys per inner-loop tile; Triton's ``num_warps`` / ``num_stages``.
    ``head_major``: decode without GQA only: order the grid heads-first, so that the programs
    resident at one time cover all heads of a few sequences rather than one head of many.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    head_major: bool = False


# The defaults below were picked from sm_90 compiles (ptxas register counts, no spills) rather than
# timings; benchmarks/bench_attention.py --sweep times alternatives on the real device.


def general_config(group: int, max_query_len: int, dtype: torch.dtype) -> KernelConfig:
    """Default tiles of the general (prefill / mixed) kernel.

    fp32 (ieee tl.dot) needs much smaller tiles to stay in registers.
    """
    if dtype == torch.float32:
        return KernelConfig(
            block_m=max(32, triton.next_power_of_2(group)), block_n=16, num_warps=4, num_stages=2
        )
    # The H200 sweep (8 x 512-token prefill, D=128) favoured 64 x 32 tiles on 4 warps over 128 x 64
    # on 8, for both MHA and GQA 4 (25% faster); 64 rows still hold any GQA group up to 64.
    return KernelConfig(block_m=max(64, triton.next_power_of_2(group)), block_n=32, num_warps=4, num_stages=2)


# Heads per program of the decode kernel without GQA (its ``block_m``). The H200 sweeps
# (benchmarks/RESULTS.md) found one head per program fastest once loads are pipelined, and then
# 32-key tiles on 2 warps with a heads-first grid (597 us at B=256, ctx 512, against 744 us for
# 64 keys on 4 warps): each thread keeps more loads in flight, and the programs resident together
# read whole token rows of a few sequences. 64 keys on 2 warps spill registers.
_MHA_DECODE_HEADS = 1


def decode_config(dtype: torch.dtype, group: int = 2) -> KernelConfig:
    """Default tiles of the decode kernel (8 warps keep a 64-key K and V tile in registers at D=128).

    Without GQA (``group == 1``) a program takes ``_MHA_DECODE_HEADS`` heads of one token and
    ``block_n`` keys: its K and V tiles are ``[block_n, heads, head_dim]``.
    """
    if group == 1:
        return KernelConfig(block_m=_MHA_DECODE_HEADS, block_n=32, num_warps=2, num_stages=2, head_major=True)
    if dtype == torch.float32:
        return KernelConfig(block_m=16, block_n=16, num_warps=8, num_stages=2)
    return KernelConfig(block_m=16, block_n=64, num_warps=8, num_stages=2)


def _mha_heads_per_program(block_m: int, num_heads: int) -> int:
    """The largest power of two ``<= block_m`` that divides ``num_heads``."""
    heads = 1
    while heads * 2 <= block_m and num_heads % (heads * 2) == 0:
        heads *= 2
    return heads


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number keeps the split path exercised by the heuristic


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device, group: int = 2
) -> int:
    """Flash-decoding split count: enough (seq, kv_head, split) programs to fill the SMs.

    Deterministic in its arguments, so a CUDA-graph runner can call it once per captured batch size with
    the model's maximum length and pass the result as ``num_splits``.
    """
    heads = (
        num_kv_heads // _mha_heads_per_program(_MHA_DECODE_HEADS, num_kv_heads)
        if group == 1
        else num_kv_heads
    )
    programs = max(1, num_seqs * heads)
    want = -(-_DECODE_PROGRAMS_PER_SM * _num_sms(device) // programs)
    by_len = -(-max_seq_len // _DECODE_MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_len, _DECODE_MAX_SPLITS))


# --------------------------------------------------------------------------------------------- store_kv


# Integer arguments that change from step to step (sequence count, block-table width). Triton would
# otherwise compile a variant per value class (== 1, divisible by 16) of each: a compile in the middle
# of serving costs a step ~1 s. They index scalars, so the specialization buys nothing.
_PER_STEP_INTS = ["num_seqs", "stride_btb"]
_PER_STEP_INTS_DECODE = ["stride_btb"]


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:  # CUDA-graph padding token: nothing to store
        return
    h = tl.arange(0, HEADS_P)
    d = tl.arange(0, HEAD_DIM)
    mask = (h < num_kv_heads)[:, None]
    src = h[:, None] * stride_kh + d[None, :]
    dst = (
        (slot // BLOCK_SIZE) * stride_cb
        + (slot % BLOCK_SIZE) * stride_co
        + h[:, None] * stride_ch
        + d[None, :]
    )
    k = tl.load(k_ptr + tok.to(tl.int64) * stride_kt + src, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    src = h[:, None] * stride_vh + d[None, :]
    v = tl.load(v_ptr + tok.to(tl.int64) * stride_vt + src, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's keys/values into the paged cache; slot ``-1`` skips the token.

    ``k``, ``v``: ``[T, num_kv_heads, head_dim]`` (may be strided views of a fused qkv output, last dim
    contiguous); caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` (last dim contiguous);
    ``slot_mapping``: ``[T]`` int64. ``k_cache.view(-1, H, D)[slot_mapping[i]] = k[i]`` for every
    ``slot_mapping[i] >= 0``. torch's ``index_copy_`` moves the same bytes (benchmarks/bench_attention.py
    times both) but faults on slot -1, and skipping padded tokens there would need a host-side filter.
    """
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        kv_heads,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        HEADS_P=triton.next_power_of_2(kv_heads),
    )


# --------------------------------------------------------------------------------------------- attention


@triton.jit
def _attend_tiles(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    stride_btn,
    stride_cb,
    stride_co,
    stride_ch,
    kv_head,
    row_limit,
    kv_lo,
    kv_hi,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation of keys ``[kv_lo, kv_hi)``; row ``r`` only sees keys ``< row_limit[r]``.

    ``q``: ``[M, D]`` in the compute dtype; ``acc`` ``[M, D]``, ``m_i``, ``l_i`` ``[M]`` fp32 running state
    (``m_i`` in log2 units, i.e. of ``score * scale * log2(e)``). Returns the updated ``(acc, m_i, l_i)``.
    """
    d = tl.arange(0, HEAD_DIM)
    head_off = kv_head * stride_ch
    for start in range(kv_lo, kv_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < kv_hi
        # Gather token by token: a tile may straddle blocks, and unused table entries are never read.
        blk = tl.load(bt_row_ptr + (kpos // BLOCK_SIZE) * stride_btn, mask=kmask, other=0).to(tl.int64)
        tok_off = blk * stride_cb + (kpos % BLOCK_SIZE) * stride_co + head_off
        kv_off = tok_off[:, None] + d[None, :]
        # other=0 matters: unwritten cache memory may hold NaN/inf, and 0 * NaN would poison P @ V.
        k = tl.load(k_cache_ptr + kv_off, mask=kmask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off, mask=kmask[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(kpos[None, :] < row_limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _find_seq(query_start_ptr, block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest ``b`` with ``query_start[b] // BLOCK_Q + b <= block_idx`` (binary search).

    ``query_start[b] // BLOCK_Q + b`` is sequence ``b``'s first query-block index: the ranges are
    disjoint because sequence ``b`` needs at most ``q_len_b // BLOCK_Q + 1`` blocks, and the last one
    ends below ``T // BLOCK_Q + B``, the grid size.
    """
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _general_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_seqs,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_btb,
    stride_btn,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_ptr, block_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_block = block_idx - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:  # a gap index of the upper-bound grid
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len

    # Row r = query token (r // GROUP) of this block, query head kv_head * GROUP + r % GROUP.
    r = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_valid = (r < BLOCK_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, HEAD_DIM)
    tok_g = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + tok_g[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    row_limit = tl.minimum(ctx_start + tok + 1, seq_len)
    # Keys needed by the block's last valid query; later tiles are fully masked for every row.
    kv_hi = tl.minimum(ctx_start + tl.minimum((q_block + 1) * BLOCK_Q, q_len), seq_len)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        q,
        acc,
        m_i,
        l_i,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_btb,
        stride_btn,
        stride_cb,
        stride_co,
        stride_ch,
        kv_head,
        row_limit,
        0,
        kv_hi,
        qk_scale,
        BLOCK_SIZE,
        HEAD_DIM,
        BLOCK_N,
        DOT_PRECISION,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + tok_g[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


@triton.jit
def _split_range(seq_len, split, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Keys ``[kv_lo, kv_hi)`` of flash-decoding split ``split``: whole tiles, computed from the
    device ``seq_len`` so that a captured grid fits any length (an empty range past the end)."""
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    kv_lo = split * tiles_per_split * BLOCK_N
    return kv_lo, tl.minimum(kv_lo + tiles_per_split * BLOCK_N, seq_len)


@triton.jit(do_not_specialize=_PER_STEP_INTS_DECODE)
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_heads,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_btb,
    stride_btn,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)  # 0 for CUDA-graph padding: no tiles, zero output

    r = tl.arange(0, GROUP_P)  # the GQA group's query heads (padded to tl.dot's 16 rows)
    head = kv_head * GROUP + r
    row_valid = r < GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    kv_lo, kv_hi = _split_range(seq_len, split, BLOCK_N, NUM_SPLITS)

    acc = tl.zeros([GROUP_P, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        q,
        acc,
        m_i,
        l_i,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_btb,
        stride_btn,
        stride_cb,
        stride_co,
        stride_ch,
        kv_head,
        tl.zeros([GROUP_P], dtype=tl.int32) + seq_len,
        kv_lo,
        kv_hi,
        qk_scale,
        BLOCK_SIZE,
        HEAD_DIM,
        BLOCK_N,
        DOT_PRECISION,
    )
    _store_decode(
        acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, seq, head, row_valid, split, num_heads,
        stride_ot, stride_oh, HEAD_DIM, NUM_SPLITS,
    )  # fmt: skip


@triton.jit
def _store_decode(
    acc,
    m_i,
    l_i,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    seq,
    head,
    row_valid,
    split,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Write a decode program's rows (``head`` ``[M]``): the output, or its split's partials."""
    d = tl.arange(0, HEAD_DIM)
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        # Unnormalised partials [B, H, S, D] and (m, l) [B, H, S, 2]; an empty split leaves m=-inf, l=0.
        part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_valid[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit(do_not_specialize=_PER_STEP_INTS_DECODE)
def _decode_mha_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_heads,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_btb,
    stride_btn,
    HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    """Decode without GQA: one program per (sequence, ``HEADS`` adjacent heads, split).

    Each head has its own K/V, so there is no shared tile for ``tl.dot``; scores are a broadcast
    multiply-reduce in fp32 over ``[BLOCK_N, HEADS, HEAD_DIM]`` tiles, whose ``HEADS * HEAD_DIM``
    inner elements are contiguous in the cache.
    """
    if HEAD_MAJOR:  # grid (heads, seqs, splits): programs that run together share a sequence
        seq = tl.program_id(1)
        head = tl.program_id(0) * HEADS + tl.arange(0, HEADS)
    else:
        seq = tl.program_id(0)
        head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)  # 0 for CUDA-graph padding: no tiles, zero output
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :]).to(tl.float32)
    kv_lo, kv_hi = _split_range(seq_len, split, BLOCK_N, NUM_SPLITS)

    acc = tl.zeros([HEADS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([HEADS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS], dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_btb
    inner = head[:, None] * stride_ch + d[None, :]  # [HEADS, D]
    ar = tl.arange(0, BLOCK_N)
    # Software pipelining by hand (Triton's pipeliner only stages loads that feed tl.dot): a tile's
    # K/V are loaded one iteration before they are used and its block ids two, so each iteration's
    # loads are in flight while the previous tile is computed. Masked-off loads cost no traffic.
    # other=0 matters: unwritten cache memory may hold NaN/inf, and 0 * NaN would poison P @ V.
    pos = kv_lo + ar
    blk = tl.load(bt_row_ptr + (pos // BLOCK_SIZE) * stride_btn, mask=pos < kv_hi, other=0).to(tl.int64)
    off = (blk * stride_cb + (pos % BLOCK_SIZE) * stride_co)[:, None, None] + inner[None, :, :]
    k = tl.load(k_cache_ptr + off, mask=(pos < kv_hi)[:, None, None], other=0.0)
    v = tl.load(v_cache_ptr + off, mask=(pos < kv_hi)[:, None, None], other=0.0)
    pos = pos + BLOCK_N
    blk = tl.load(bt_row_ptr + (pos // BLOCK_SIZE) * stride_btn, mask=pos < kv_hi, other=0).to(tl.int64)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        kpos = start + ar
        npos = kpos + BLOCK_N
        nmask = (npos < kv_hi)[:, None, None]
        noff = (blk * stride_cb + (npos % BLOCK_SIZE) * stride_co)[:, None, None] + inner[None, :, :]
        k_next = tl.load(k_cache_ptr + noff, mask=nmask, other=0.0)
        v_next = tl.load(v_cache_ptr + noff, mask=nmask, other=0.0)
        fpos = npos + BLOCK_N
        blk = tl.load(bt_row_ptr + (fpos // BLOCK_SIZE) * stride_btn, mask=fpos < kv_hi, other=0).to(tl.int64)

        s = tl.sum(k.to(tl.float32) * q[None, :, :], 2) * qk_scale  # [BLOCK_N, HEADS]
        s = tl.where((kpos < kv_hi)[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), 0)
        m_i = m_new
        k, v = k_next, v_next
    _store_decode(
        acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, seq, head, head < num_heads, split, num_heads,
        stride_ot, stride_oh, HEAD_DIM, NUM_SPLITS,
    )  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, HEAD_DIM)
    smask = s < NUM_SPLITS
    part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + part * 2, mask=smask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # all-empty (seq_len 0): all zeros
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    acc = tl.sum(acc * w[:, None], 0)
    l_tot = tl.sum(l_s * w, 0)
    out = acc / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run in tf32 (10-bit mantissa) on tensor cores; keep them exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    *,
    num_splits: int | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's paged context (Triton).

    Args:
        q: ``[T, num_heads, head_dim]`` fp32/fp16/bf16 (last dim contiguous; may be a strided view);
            ``num_heads`` a multiple of ``num_kv_heads``; ``head_dim`` a power of two (64, 128).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, this step's K/V already
            stored (:func:`store_kv_triton`); converted to ``q``'s dtype on load.
        meta: the step's :class:`~loraserve.ops.attention.AttentionMeta`; only its host copies
            (``query_lens``, ``seq_lens_host``) are read on the host.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        num_splits: flash-decoding splits of the decode path (ignored otherwise); ``None`` picks
            :func:`decode_num_splits` from this step's sizes. Pass a fixed value under CUDA-graph capture.
        config: launch parameters of the kernel that runs; ``None`` uses :func:`decode_config` or
            :func:`general_config`.
    Returns:
        ``[T, num_heads, head_dim]`` in ``q``'s dtype. Rows of tokens that belong to no sequence
        (beyond ``query_start[B]``) are left uninitialised, as in the torch path.

    When every sequence has one query token (``T == B`` and ``max_query_len == 1``) the decode kernel
    runs, with token ``b`` taken as sequence ``b``'s query (``query_start`` is not read); otherwise the
    general kernel handles the whole mixed batch in one launch.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    group = num_heads // num_kv_heads
    num_seqs = meta.num_seqs
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if num_tokens == 0 or num_seqs == 0:
        return out
    qk_scale = scale * _LOG2E
    precision = _dot_precision(q.dtype)
    bt = meta.block_tables
    common = (
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        bt.stride(0),
        bt.stride(1),
    )

    if num_tokens == num_seqs and meta.max_query_len == 1:
        cfg = config or decode_config(q.dtype, group)
        splits = num_splits or decode_num_splits(num_seqs, num_kv_heads, meta.max_seq_len, q.device, group)
        if splits > 1:
            part_acc = torch.empty(
                num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device
            )
            part_ml = torch.empty(num_seqs, num_heads, splits, 2, dtype=torch.float32, device=q.device)
        else:  # unused by the kernel (NUM_SPLITS == 1 writes out directly)
            part_acc = part_ml = out
        args = (q, k_cache, v_cache, out, part_acc, part_ml, meta.seq_lens, bt, num_heads, qk_scale, *common)
        if group == 1:
            heads = _mha_heads_per_program(cfg.block_m, num_heads)
            grid = (num_heads // heads, num_seqs) if cfg.head_major else (num_seqs, num_heads // heads)
            _decode_mha_kernel[(*grid, splits)](
                *args,
                HEADS=heads,
                HEAD_MAJOR=cfg.head_major,
                BLOCK_SIZE=block_size,
                HEAD_DIM=head_dim,
                BLOCK_N=cfg.block_n,
                NUM_SPLITS=splits,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        else:
            _decode_kernel[(num_seqs, num_kv_heads, splits)](
                *args,
                GROUP=group,
                GROUP_P=max(16, triton.next_power_of_2(group)),
                BLOCK_SIZE=block_size,
                HEAD_DIM=head_dim,
                BLOCK_N=cfg.block_n,
                NUM_SPLITS=splits,
                DOT_PRECISION=precision,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        if splits > 1:
            _decode_reduce_kernel[(num_seqs, num_heads)](
                part_acc,
                part_ml,
                out,
                num_heads,
                out.stride(0),
                out.stride(1),
                HEAD_DIM=head_dim,
                NUM_SPLITS=splits,
                SPLITS_P=triton.next_power_of_2(splits),
            )
        return out

    cfg = config or general_config(group, meta.max_query_len, q.dtype)
    assert cfg.block_m >= group, "block_m must hold a whole GQA group"
    block_q = cfg.block_m // group
    _general_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start,
        meta.seq_lens,
        bt,
        num_seqs,
        qk_scale,
        *common,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
