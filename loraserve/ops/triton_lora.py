"""Triton kernels for batched multi-LoRA (shrink / expand), the GPU path of :mod:`loraserve.ops.lora`.

Same pool layout and contract as the torch reference (see :mod:`loraserve.ops.lora`)::

    shrink:  t[s, i0:i1, :r] = x[i0:i1] @ a[row:row+r, s, :]^T          for each segment (i0, i1, row, r)
    expand:  y[i0:i1, off_s:off_s+out_s] += t[s, i0:i1, :r] @ b[s][row:row+r]

with ``a: [R, S, in]``, ``b[s]: [R, out_s]`` (scale folded in), ``x: [T, in]``, ``y: [T, sum out_s]`` and
``t: [S, T, max_rank]`` float32. Ranks differ per segment (1..128) and weights are not padded to a
maximum rank: every load of adapter rows is masked by the segment's own rank, so an adapter costs the
bytes of its own rows only.

Segment tiles (both kernel families). Each segment is cut into tiles of ``BLOCK_M`` tokens, numbered
segment after segment by a prefix sum over ``cdiv(seg_len, BLOCK_M)`` computed inside the kernel (no
host sync, no extra launch). Since ``sum_i cdiv(len_i, BLOCK_M) <= cdiv(T, BLOCK_M) + N``, that bound
covers every tile for *any* split of ``T`` tokens into ``N`` segments. Base-model tokens belong to no
segment, get no tile, and cost nothing.

Two kernel families, picked on the host from the mean tokens per segment ``T / N``:

* Tiled (prefill, long segments; :class:`ShrinkConfig` / :class:`ExpandConfig`). Grid axis 0 has one
  program per possible tile (``cdiv(T, BLOCK_M) + N``; surplus programs return at once), axis 1 the
  column blocks, shrink's axis 2 its K splits. ``BLOCK_M``-token tiles feed ``tl.dot``.
* Decode (1-16 tokens per segment; :class:`DecodeShrinkConfig` / :class:`DecodeExpandConfig`). A 1-D
  grid of ``P >= cdiv(T, 16) + N`` programs (``P`` ~ a few per SM) is shared at run time by the
  *active* tiles, in proportion to the weight bytes each streams (``_decode_tile``: a rank-64
  adapter's tile gets more programs than a rank-8 one's), which split its work (expand:
  runs of column tiles of all slices; shrink: 16-column tiles of the adapter's ``r * S`` fused
  columns, times K splits). One tile per segment of up to 16 tokens, so each adapter's rows are
  read once; each program streams several tiles of weights through a pipelined loop instead of
  thousands of programs moving a few KB each; the loops use the segment's own rank (shrink: its
  fused columns; expand: a rank chunk of 16/32/64/128, the smallest that holds it), not
  ``max_rank``. The split adapts to the real number of segments, which the host does not know
  under CUDA graphs.

CUDA graphs. Grids depend only on host-known sizes: ``T = x.shape[0]``, ``N = seg_len.numel()``,
``max_rank`` and the layer's shapes. To capture at a fixed batch size, the caller pads the segment
tensors to a fixed capacity ``N_cap``: entries past the real segments get ``seg_len = 0`` (their
``seg_start``/``seg_row``/``seg_rank`` are never read; 0 is fine), ``T`` is the padded token count (the
padding tokens belong to no segment) and ``meta.max_rank`` is fixed to the largest rank the engine
admits, so block sizes and ``t``'s shape stay constant across replays. New steps ``copy_`` their
segments into the same tensors before replay. The ops never read ``meta.segments``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraserve.ops.lora import LoRASegments, SegmentTensors

# Triton's interpreter (TRITON_INTERPRET=1, up to at least 3.9) stores bf16 as uint16 and feeds the raw
# bits to np.matmul in tl.dot. Under the interpreter the kernels therefore upcast dot operands to fp32
# (exact for bf16/fp16 products, so results match an fp32-accumulating GPU dot). Never set on GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Expand takes the S slices' B tensors as separate pointers (they need not share storage).
_MAX_SLICES = 3

# Decode kernels: token tile (the smallest tl.dot tile; one per segment of up to 16 tokens), shrink's
# fused-column tile (the smallest tl.dot tile: a rank-16 o-proj adapter is one tile, not a masked
# max_rank-wide one) and the largest rank the expand's rank chunks (16/32/64/128) hold.
DECODE_BLOCK_M = 16
DECODE_SHRINK_BLOCK_N = 16
MAX_DECODE_RANK = 128
# The decode expand's rank chunks: 16, 32, 64, 128.
_DECODE_CHUNKS = (MAX_DECODE_RANK // 16).bit_length()
# Decode grids: programs per SM. A few resident programs per SM, each streaming tens of KB through a
# pipelined loop, keep enough loads in flight to approach copy bandwidth. 4 per SM and 3 pipeline
# stages for both kernels, 512-byte K steps for the shrink: the best of a sweep over 2-8 programs per SM,
# 3-4 stages, K steps of 128-512 bytes and B tiles of 4-16 KB on the H200 (T = 256 over 32 and 128
# adapters, rank 16, in CUDA graphs: benchmarks/RESULTS.md, eighth session).
_DECODE_SHRINK_PROGRAMS_PER_SM = 4
_DECODE_EXPAND_PROGRAMS_PER_SM = 4
# Integer arguments that change from step to step (segment count; the tiled shrink's K split).
# Triton would otherwise compile a variant per value class (== 1, divisible by 16): a compile in
# the middle of serving stalls a step for about a second. t's slice stride (T * max_rank) keeps
# its specialization: the alignment it proves feeds vector loads of t, and with max_rank bucketed
# to powers of two >= 16 (ops.lora.max_rank_bucket) its value class never changes.
_PER_STEP_INTS = ["num_segs"]
_MIN_BLOCK_SEG = 256


# Launch compiled kernels directly (_Launch) instead of through Triton's JIT entry point; "0" turns it
# off (for measuring the two against each other: benchmarks/bench_lora_launch.py). Read at import.
FAST_LAUNCH = os.environ.get("LORASERVE_TRITON_FAST_LAUNCH", "1") != "0"


def _arg_key(arg: object) -> object:
    """What Triton may specialize a kernel argument on, or more: dtype and 16-byte alignment of a tensor;
    for an int, whether it is 1, a multiple of 16 and within int32 (bools are ints)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    return type(arg), arg


# Compiled variants of each kernel by _Launch key (shared by every step's launches).
_VARIANTS: dict[tuple, object] = {}


class _Launch:
    """One kernel launch of a step, prepared once per step and layer kind; each layer passes its tensors.

    The arguments are ``(*head, *tail)``: ``head`` the tensors that change from layer to layer (``x``,
    ``a``, ``t``, or ``y``, ``t``, ``b``), ``tail`` the segment tensors and integers the step's layers of
    one kind share. ``kernel[grid](...)`` binds every argument, computes Triton's specialization key,
    looks the variant up and gathers launch hooks on every call, and the ops worked out their
    configuration and arguments again for every layer: 118 us of host time per shrink + expand on one
    H200 machine's CPU, which made a 7B model's mixed prefill/decode steps wait on the host (28-41 ms
    of launches per step, benchmarks/RESULTS.md). Here the configuration, grid and the tail's key are computed once per step
    and kind, and a variant is looked up by a key that refines Triton's (:func:`_arg_key`: each head
    tensor's dtype and alignment, the tail's, the constexprs and launch options) and launched through
    its own launcher, the way PyTorch Inductor launches Triton kernels. A new key goes through
    ``kernel[grid]`` once (which compiles if needed) and keeps the variant it returns. Under the
    interpreter (CPU) and with :data:`FAST_LAUNCH` off every call takes ``kernel[grid]``.
    """

    __slots__ = ("kernel", "grid", "tail", "consts", "tail_key", "values")

    def __init__(self, kernel: triton.JITFunction, grid: tuple[int, ...], tail: tuple, consts: dict) -> None:
        self.kernel = kernel
        self.grid = (*grid, *(1,) * (3 - len(grid)))
        self.tail = tail
        self.consts = consts
        self.tail_key = (kernel, *map(_arg_key, tail), *consts.items())
        # The launcher takes every parameter in signature order, constexprs included (as Triton's
        # JITFunction.run passes its bound arguments); launch options (num_warps...) are not parameters.
        self.values = (*tail, *(consts[p] for p in kernel.arg_names if p in consts))

    def __call__(self, *head: torch.Tensor) -> None:
        if _INTERPRET or not FAST_LAUNCH:
            self.kernel[self.grid](*head, *self.tail, **self.consts)
            return
        key = (*[(h.dtype, h.data_ptr() % 16 == 0) for h in head], self.tail_key)
        compiled = _VARIANTS.get(key)
        if compiled is None:
            _VARIANTS[key] = self.kernel[self.grid](*head, *self.tail, **self.consts)
            return
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        compiled.run(  # type: ignore[attr-defined]
            *self.grid, stream, compiled.function, compiled.packed_metadata, None, None, None,  # type: ignore[attr-defined]
            *head, *self.values,
        )  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv / next_power_of_2 are constexpr functions: a few microseconds per host call.
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


@dataclass(frozen=True)
class ShrinkConfig:
    """Tile sizes of the tiled (prefill) shrink kernel.

    ``block_n`` tiles the ``max_rank * S`` fused output columns (all slices of an adapter at once, so
    ``x`` is read once for every slice); ``split_k`` > 1 splits ``in`` across programs that
    ``atomic_add`` into ``t`` (more parallelism when few tiles exist, e.g. one adapter).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpandConfig:
    """Tile sizes of the tiled (prefill) expand kernel: ``block_r`` is the rank chunk of the inner loop."""

    block_m: int
    block_n: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class DecodeShrinkConfig:
    """Decode shrink (module docstring): a 1-D grid of ``max(programs, cdiv(T, 16) + N)`` programs.

    The active tiles share the grid; a tile's programs take its 16-wide fused-column tiles
    (``cdiv(r * S, 16)``, from the segment's own rank) and split ``in`` over the programs the column
    tiles leave free, at most ``k_tiles // 2`` ways so that a split streams >= 2 ``block_k`` steps
    (partial sums ``atomic_add`` into the zeroed ``t``).
    """

    programs: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class DecodeExpandConfig:
    """Decode expand (module docstring): a 1-D grid of ``max(programs, cdiv(T, 16) + N)`` programs.

    Each program of a tile takes a run of consecutive column tiles (slice 0's, then slice 1's, ...).
    ``b_tile`` is the number of B elements one loop step loads: a segment of rank ``r`` uses the rank
    chunk ``BLOCK_R``, the smallest of 16/32/64/128 that holds ``r``, and ``BLOCK_N = b_tile // BLOCK_R``
    columns, so every chunk streams the same bytes per step.
    """

    programs: int
    b_tile: int = 4096
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.b_tile < 16 * MAX_DECODE_RANK or self.b_tile & (self.b_tile - 1):
            raise ValueError(f"b_tile must be a power of two >= {16 * MAX_DECODE_RANK}, got {self.b_tile}")


def _block_m(num_tokens: int, num_segs: int) -> int:
    # Mean tokens per segment decides decode-like (16: the smallest tl.dot tile, one token used) or
    # prefill-like (64-token tiles). Uses the padded N for graphs, which only errs towards decode.
    mean = num_tokens / max(num_segs, 1)
    if mean <= 16:
        return 16
    return 32 if mean <= 48 else 64


# Which family serves batches whose ranks fit the decode kernels: "auto" (the heuristic below),
# "decode" or "tiled". A knob for measuring the families against each other in the engine
# (benchmarks/RESULTS.md, run 7), read once at import.
KERNEL_FAMILY = os.environ.get("LORASERVE_LORA_KERNELS", "auto")
if KERNEL_FAMILY not in ("auto", "decode", "tiled"):
    raise ValueError(f"LORASERVE_LORA_KERNELS must be auto, decode or tiled, got {KERNEL_FAMILY!r}")


def _use_decode(num_tokens: int, num_segs: int, max_rank: int) -> bool:
    """Decode kernels for decode-like batches (<= 16 tokens per segment on average) whose ranks fit the
    decode expand's largest rank chunk (unless :data:`KERNEL_FAMILY` forces a family)."""
    if max_rank > MAX_DECODE_RANK or KERNEL_FAMILY == "tiled":
        return False
    return KERNEL_FAMILY == "decode" or _block_m(num_tokens, num_segs) == DECODE_BLOCK_M


@functools.lru_cache(maxsize=256)
def tiled_shrink_config(
    num_tokens: int,
    num_segs: int,
    in_features: int,
    num_slices: int,
    max_rank: int,
    elem_size: int,
    num_sms: int,
) -> ShrinkConfig:
    """Heuristic tiles for the tiled shrink, keyed on the layer shape, ``max_rank`` and the batch shape.

    The default for prefill-like batches; for decode-like ones it is the configuration before the
    decode kernels existed (benchmarks compare the two).
    """
    block_m = _block_m(num_tokens, num_segs)
    # tl.dot needs every tile dim >= 16; 128 fused columns keep the fp32 accumulator in registers.
    block_n = min(max(16, _next_power_of_2(num_slices * max_rank)), 128)
    block_k = 128 if block_m == 16 and elem_size == 2 else 64 if elem_size == 2 else 32
    # Programs that will have work: at least T / BLOCK_M tiles, at most one per (short) segment.
    tiles = max(_cdiv(num_tokens, block_m), min(num_segs, num_tokens))
    programs = tiles * _cdiv(num_slices * max_rank, block_n)
    # Split K until the GPU has ~2 programs per SM, keeping >= 2 K steps per split.
    split_k = 1
    while programs * split_k < 2 * num_sms and in_features >= 4 * split_k * block_k and split_k < 16:
        split_k *= 2
    # 64-row tiles use wgmma; 8 warps keep the 64 x 128 fp32 accumulator from spilling. Four
    # pipeline stages won in the H200 sweep for every shape (benchmarks/results/lora_sweep.json).
    return ShrinkConfig(block_m, block_n, block_k, split_k, num_warps=8 if block_m == 64 else 4, num_stages=4)


@functools.lru_cache(maxsize=256)
def tiled_expand_config(num_tokens: int, num_segs: int, max_rank: int) -> ExpandConfig:
    """Heuristic tiles for the tiled expand, keyed on ``max_rank`` and the batch shape (see
    :func:`tiled_shrink_config`)."""
    block_m = _block_m(num_tokens, num_segs)
    block_r = min(max(16, _next_power_of_2(max_rank)), 64)
    # Decode-like: wide column tiles so that each program moves a useful number of B bytes
    # (rank * 256 * 2 bytes); prefill: 64 x 128 accumulator.
    block_n = 256 if block_m == 16 and block_r <= 32 else 128
    return ExpandConfig(block_m, block_n, block_r, num_warps=8 if block_m == 64 else 4)


@functools.lru_cache(maxsize=256)
def shrink_config(
    num_tokens: int,
    num_segs: int,
    in_features: int,
    num_slices: int,
    max_rank: int,
    elem_size: int,
    num_sms: int,
) -> ShrinkConfig | DecodeShrinkConfig:
    """Default shrink configuration: decode kernel for decode-like batches, else tiled."""
    if _use_decode(num_tokens, num_segs, max_rank):
        # 512 bytes of each row per K step: [16, block_k] tiles of x and A, 8 KB of A per step.
        return DecodeShrinkConfig(programs=_DECODE_SHRINK_PROGRAMS_PER_SM * num_sms, block_k=512 // elem_size)
    return tiled_shrink_config(num_tokens, num_segs, in_features, num_slices, max_rank, elem_size, num_sms)


@functools.lru_cache(maxsize=256)
def expand_config(
    num_tokens: int, num_segs: int, max_rank: int, elem_size: int, num_sms: int
) -> ExpandConfig | DecodeExpandConfig:
    """Default expand configuration: decode kernel for decode-like batches, else tiled."""
    if _use_decode(num_tokens, num_segs, max_rank):
        # 8 KB of B per loop step: 4096 bf16/fp16 or 2048 fp32 elements.
        return DecodeExpandConfig(programs=_DECODE_EXPAND_PROGRAMS_PER_SM * num_sms, b_tile=8192 // elem_size)
    return tiled_expand_config(num_tokens, num_segs, max_rank)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter (CPU tensors): no SMs to fill, so the heuristics never split


@triton.jit
def _segment_tiles(seg_len_ptr, num_segs, BLOCK_M: tl.constexpr, BLOCK_SEG: tl.constexpr):
    """``(idx, tiles, ends)`` over ``BLOCK_SEG`` segment slots: tiles of each segment and their
    inclusive prefix sum (tiles are numbered segment after segment; zero-length segments own none)."""
    idx = tl.arange(0, BLOCK_SEG)
    lens = tl.load(seg_len_ptr + idx, mask=idx < num_segs, other=0)
    tiles = (lens + BLOCK_M - 1) // BLOCK_M
    return idx, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def _locate(n, idx, counts, ends):
    """``(segment, index within it)`` of item ``n`` of items numbered segment after segment, ``counts``
    per segment and ``ends`` their inclusive prefix sum; segment >= num_segs past the last."""
    seg = tl.sum((ends <= n).to(tl.int32), axis=0)
    first = tl.sum(tl.where(idx == seg, ends - counts, 0), axis=0)
    return seg, n - first


@triton.jit
def _rank_chunk(rank):
    """Index of the decode expand's rank chunk (16 * 2**i: 16, 32, 64, 128), the smallest holding ``rank``."""
    return (rank > 16).to(tl.int32) + (rank > 32).to(tl.int32) + (rank > 64).to(tl.int32)


@triton.jit
def _segment_tile(pid, seg_len_ptr, num_segs, BLOCK_M: tl.constexpr, BLOCK_SEG: tl.constexpr):
    """Tiled kernels: program ``pid`` takes tile ``pid``; segment >= num_segs: no work."""
    idx, tiles, ends = _segment_tiles(seg_len_ptr, num_segs, BLOCK_M, BLOCK_SEG)
    seg, tile = _locate(pid, idx, tiles, ends)
    return seg, tile * BLOCK_M


@triton.jit
def _decode_tile(
    seg_len_ptr,
    seg_rank_ptr,
    num_segs,
    BLOCK_M: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    SHRINK_SLICES: tl.constexpr,
):
    """Decode kernels: ``(segment, first token offset, q, per_tile)`` of this program.

    Every active tile gets one program, and the rest of the grid is shared out in proportion to the
    work of one tile, ``w``: a tile of segment ``s`` gets ``per_tile = 1 + spare * w_s // W`` programs,
    with ``spare`` = programs - active tiles and ``W`` the sum of ``w`` over the active tiles (so the
    tiles take at most the whole grid). ``w`` counts the weight bytes a tile streams, in units:
    ``SHRINK_SLICES`` > 0 (the shrink, S slices): its 16-wide fused column tiles, ``cdiv(r * S, 16)``;
    0 (the expand): its rank chunk over 16 (1, 2, 4, 8; every loop step moves the same bytes). Equal
    shares let the programs of a rank-64 adapter's tile run 4-8x longer than those of rank 8 or 16,
    and a kernel lasts as long as its busiest program. This program is number ``q`` of its tile.
    Segment >= num_segs: no work.
    """
    idx, tiles, _ = _segment_tiles(seg_len_ptr, num_segs, BLOCK_M, BLOCK_SEG)
    ranks = tl.load(seg_rank_ptr + idx, mask=idx < num_segs, other=0)
    work = (ranks * SHRINK_SLICES + 15) // 16 if SHRINK_SLICES > 0 else 1 << _rank_chunk(ranks)
    work = tl.maximum(work, 1)
    spare = tl.num_programs(0) - tl.sum(tiles, axis=0)
    per_tile = 1 + spare * work // tl.maximum(tl.sum(tiles * work, axis=0), 1)
    progs = tiles * per_tile
    seg, local = _locate(tl.program_id(0), idx, progs, tl.cumsum(progs, axis=0))
    share = tl.maximum(tl.sum(tl.where(idx == seg, per_tile, 0), axis=0), 1)
    return seg, (local // share) * BLOCK_M, local % share, share


@triton.jit
def _shrink_k_loop(
    acc,
    x_ptrs,
    a_ptrs,
    mask_m,
    mask_n,
    offs_k,
    k_lo,
    k_hi,
    stride_xk,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``acc += x[:, k_lo:k_hi] @ a[:, k_lo:k_hi]^T`` over ``[BLOCK_M, BLOCK_K]`` / ``[BLOCK_N, BLOCK_K]`` tiles."""
    for k in range(k_lo, k_hi, BLOCK_K):
        # A K mask varies along the contiguous dim and defeats vectorised async copies (no
        # pipelining): only emit it when `in` is not a multiple of BLOCK_K (never for real models).
        if EVEN_K:
            xt = tl.load(x_ptrs + k * stride_xk, mask=mask_m[:, None], other=0.0)
            at = tl.load(a_ptrs + k, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k + offs_k) < k_hi
            xt = tl.load(x_ptrs + k * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=[*_PER_STEP_INTS, "split_k"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_row_ptr,
    seg_rank_ptr,
    num_segs,
    in_features,
    stride_xm,
    stride_xk,
    stride_a,
    stride_ts,
    stride_tm,
    stride_tr,
    split_k,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seg, m0 = _segment_tile(tl.program_id(0), seg_len_ptr, num_segs, BLOCK_M, BLOCK_SEG)
    if seg >= num_segs:
        return
    rank = tl.load(seg_rank_ptr + seg)
    n0 = tl.program_id(1) * BLOCK_N
    # Fused column n = j * S + s is rank row j of slice s: a[row + j, s] (rows of all slices of an
    # adapter are one contiguous [r * S, in] block). Column blocks past this adapter's r * S: no work.
    if n0 >= rank * NUM_SLICES:
        return
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    row = tl.load(seg_row_ptr + seg)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < length
    mask_n = offs_n < rank * NUM_SLICES
    tok = (start + offs_m).to(tl.int64)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # a viewed as [R * S, in] (row stride stride_a): the adapter's block starts at row * S. Loaded as
    # [BLOCK_N, BLOCK_K] (contiguous along in) and transposed for the dot.
    a_ptrs = a_ptr + (row * NUM_SLICES + offs_n).to(tl.int64)[:, None] * stride_a + offs_k[None, :]

    k_chunk = tl.cdiv(tl.cdiv(in_features, BLOCK_K), split_k) * BLOCK_K
    k_lo = tl.program_id(2) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _shrink_k_loop(
        acc, x_ptrs, a_ptrs, mask_m, mask_n, offs_k, k_lo, k_hi, stride_xk, BLOCK_K, EVEN_K, PRECISION, UPCAST
    )

    j = offs_n // NUM_SLICES
    s = offs_n % NUM_SLICES
    t_ptrs = t_ptr + s[None, :] * stride_ts + tok[:, None] * stride_tm + j[None, :] * stride_tr
    mask = mask_m[:, None] & mask_n[None, :]
    if split_k == 1:
        tl.store(t_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(t_ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _shrink_decode_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_row_ptr,
    seg_rank_ptr,
    num_segs,
    in_features,
    stride_xm,
    stride_xk,
    stride_a,
    stride_ts,
    stride_tm,
    stride_tr,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seg, m0, q, per_tile = _decode_tile(seg_len_ptr, seg_rank_ptr, num_segs, BLOCK_M, BLOCK_SEG, NUM_SLICES)
    if seg >= num_segs:
        return
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    row = tl.load(seg_row_ptr + seg)
    rank = tl.load(seg_rank_ptr + seg)

    # This segment's own fused columns (n = j * S + s, as in _shrink_kernel), not max_rank's.
    num_cols = rank * NUM_SLICES
    col_tiles = tl.cdiv(num_cols, BLOCK_N)
    k_tiles = tl.cdiv(in_features, BLOCK_K)
    # Split K over the programs that the column tiles leave free, keeping >= 2 K steps per split (one
    # adapter, or a few, still spreads over the GPU); recomputed so that no split is empty.
    split = tl.maximum(tl.minimum(per_tile // col_tiles, k_tiles // 2), 1)
    k_steps = tl.cdiv(k_tiles, split)
    split = tl.cdiv(k_tiles, k_steps)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < length
    tok = (start + offs_m).to(tl.int64)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Work item w = (column tile w // split, K split w % split); this program takes every per_tile-th.
    # More column tiles than programs (many segments): one program loops over several, full K each.
    for w in range(q, col_tiles * split, per_tile):
        offs_n = (w // split) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < num_cols
        a_ptrs = a_ptr + (row * NUM_SLICES + offs_n).to(tl.int64)[:, None] * stride_a + offs_k[None, :]
        k_lo = (w % split) * k_steps * BLOCK_K
        k_hi = tl.minimum(k_lo + k_steps * BLOCK_K, in_features)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _shrink_k_loop(
            acc, x_ptrs, a_ptrs, mask_m, mask_n, offs_k, k_lo, k_hi, stride_xk, BLOCK_K, EVEN_K, PRECISION,
            UPCAST,
        )  # fmt: skip
        j = offs_n // NUM_SLICES
        s = offs_n % NUM_SLICES
        t_ptrs = t_ptr + s[None, :] * stride_ts + tok[:, None] * stride_tm + j[None, :] * stride_tr
        mask = mask_m[:, None] & mask_n[None, :]
        if split == 1:
            tl.store(t_ptrs, acc, mask=mask)
        else:
            # Relaxed: the splits' sums need no ordering among themselves; expand runs after the kernel.
            tl.atomic_add(t_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _expand_kernel(
    y_ptr,
    t_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_row_ptr,
    seg_rank_ptr,
    num_segs,
    out0,
    out1,
    out2,
    nblk0,
    nblk1,
    stride_b0,
    stride_b1,
    stride_b2,
    stride_ym,
    stride_ts,
    stride_tm,
    stride_tr,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seg, m0 = _segment_tile(tl.program_id(0), seg_len_ptr, num_segs, BLOCK_M, BLOCK_SEG)
    if seg >= num_segs:
        return
    # Grid axis 1 enumerates the column blocks of slice 0, then slice 1, then slice 2; pick this
    # program's slice, its B tensor and its column range of y.
    pid_n = tl.program_id(1)
    b_ptr = b0_ptr
    slice_id = 0
    blk = pid_n
    n_out = out0
    col0 = 0
    stride_b = stride_b0
    if NUM_SLICES > 1:
        in1 = pid_n >= nblk0
        if in1:
            b_ptr = b1_ptr
        slice_id = tl.where(in1, 1, 0)
        blk = tl.where(in1, pid_n - nblk0, pid_n)
        n_out = tl.where(in1, out1, out0)
        col0 = tl.where(in1, out0, 0)
        stride_b = tl.where(in1, stride_b1, stride_b0)
        if NUM_SLICES > 2:
            in2 = pid_n >= nblk0 + nblk1
            if in2:
                b_ptr = b2_ptr
            slice_id = tl.where(in2, 2, slice_id)
            blk = tl.where(in2, pid_n - nblk0 - nblk1, blk)
            n_out = tl.where(in2, out2, n_out)
            col0 = tl.where(in2, out0 + out1, col0)
            stride_b = tl.where(in2, stride_b2, stride_b)
        if ALIGNED:
            # The selects hide the divisibility the JIT knew of the raw ints; without it, loads and
            # stores of B and y are not vectorised (one pointer per element, register spills).
            n_out = tl.multiple_of(n_out, 16)
            col0 = tl.multiple_of(col0, 16)
            stride_b = tl.multiple_of(stride_b, 16)

    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    row = tl.load(seg_row_ptr + seg)
    rank = tl.load(seg_rank_ptr + seg)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < length
    mask_n = offs_n < n_out
    tok = (start + offs_m).to(tl.int64)
    t_ptrs = t_ptr + slice_id * stride_ts + tok[:, None] * stride_tm + offs_r[None, :] * stride_tr
    b_ptrs = b_ptr + (row + offs_r).to(tl.int64)[:, None] * stride_b + offs_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Loop over this segment's own rank only: a rank-8 adapter in a max-rank-128 batch reads 8 rows.
    for r0 in range(0, rank, BLOCK_R):
        mask_r = (r0 + offs_r) < rank
        tt = tl.load(t_ptrs + r0 * stride_tr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_ptrs + r0 * stride_b, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        # Round t to B's dtype like the reference (t.to(b.dtype) @ b); accumulate in fp32.
        tt = tt.to(b_ptr.dtype.element_ty)
        if UPCAST:
            tt = tt.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tt, bt, acc, input_precision=PRECISION)

    y_ptrs = y_ptr + tok[:, None] * stride_ym + (col0 + offs_n)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_slice_tiles(
    y_rows,
    t_ptrs,
    t_mask,
    b_ptr,
    b_rows,
    mask_r,
    mask_m,
    stride_b,
    n_out,
    col0,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Column tiles ``[lo, hi)`` of one slice (``n_out`` wide, at column ``col0`` of y):
    ``y[rows, col0 + n] += t @ b[b_rows, n]``, one ``[BLOCK_R, BLOCK_N]`` B tile per step.

    ``y_rows``: ``[BLOCK_M, 1]`` row pointers of y; ``t_ptrs``/``t_mask``: the slice's ``[BLOCK_M, BLOCK_R]``
    t tile; ``b_rows``: ``[BLOCK_R, 1]`` pool rows (int64), valid where ``mask_r``.
    """
    # t rounded to B's dtype like the reference (t.to(b.dtype) @ b); the dot accumulates in fp32.
    tt = tl.load(t_ptrs, mask=t_mask, other=0.0).to(b_ptr.dtype.element_ty)
    if UPCAST:
        tt = tt.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # Triton's pipeliner stages the B loads (they feed tl.dot) but not y's: y is loaded one tile ahead
    # by hand, so its latency overlaps the previous tile. y's tile is addressed through scalars (first
    # column in y, columns left; 0 past the run masks the whole tile) so that no [BLOCK_M, BLOCK_N]
    # index tensor of the B loads' pipeline stage lives on to the store. Masked-off rows cost nothing.
    y_col = col0 + lo * BLOCK_N
    y_lim = n_out - lo * BLOCK_N
    y_next = tl.load(
        y_rows + (y_col + offs_n)[None, :], mask=mask_m[:, None] & (offs_n < y_lim)[None, :], other=0.0
    )
    for j in range(lo, hi):
        cols = j * BLOCK_N + offs_n
        bt = tl.load(
            b_ptr + b_rows * stride_b + cols[None, :],
            mask=mask_r[:, None] & (cols < n_out)[None, :],
            other=0.0,
        )
        if UPCAST:
            bt = bt.to(tl.float32)
        acc = tl.dot(tt, bt, input_precision=PRECISION)

        y_old = y_next
        y_ptrs = y_rows + (y_col + offs_n)[None, :]
        y_mask = mask_m[:, None] & (offs_n < y_lim)[None, :]
        y_col = y_col + BLOCK_N
        y_lim = tl.where(j + 1 < hi, y_lim - BLOCK_N, 0)
        y_next = tl.load(
            y_rows + (y_col + offs_n)[None, :], mask=mask_m[:, None] & (offs_n < y_lim)[None, :], other=0.0
        )
        tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_rows.dtype.element_ty), mask=y_mask)


@triton.jit
def _expand_decode_tiles(
    y_ptr,
    t_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    out0,
    out1,
    out2,
    stride_b0,
    stride_b1,
    stride_b2,
    stride_ym,
    stride_ts,
    stride_tm,
    stride_tr,
    tok,
    mask_m,
    row,
    rank,
    q,
    per_tile,
    NUM_SLICES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``q`` of the ``per_tile`` of one token tile (rows ``tok``, valid where ``mask_m``): adds
    ``t @ b[row:row+rank]`` to its run of the tile's column tiles (slice 0's, then slice 1's, ...);
    ``BLOCK_R >= rank``."""
    nt0 = tl.cdiv(out0, BLOCK_N)
    nt1 = tl.cdiv(out1, BLOCK_N)
    nt2 = tl.cdiv(out2, BLOCK_N)
    run = tl.cdiv(nt0 + nt1 + nt2, per_tile)
    j_lo = q * run
    j_hi = j_lo + run

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    t_ptrs = t_ptr + tok[:, None] * stride_tm + offs_r[None, :] * stride_tr
    t_mask = mask_m[:, None] & mask_r[None, :]
    b_rows = (row + offs_r).to(tl.int64)[:, None]
    y_rows = y_ptr + tok[:, None] * stride_ym
    # One loop per slice the run touches, with the slice's pointers and sizes loop-invariant.
    lo = j_lo
    hi = tl.minimum(j_hi, nt0)
    if lo < hi:
        _expand_slice_tiles(
            y_rows, t_ptrs, t_mask, b0_ptr, b_rows, mask_r, mask_m, stride_b0, out0, 0, lo, hi,
            BLOCK_N, PRECISION, UPCAST,
        )  # fmt: skip
    if NUM_SLICES > 1:
        lo = tl.maximum(j_lo, nt0) - nt0
        hi = tl.minimum(j_hi, nt0 + nt1) - nt0
        if lo < hi:
            _expand_slice_tiles(
                y_rows, t_ptrs + stride_ts, t_mask, b1_ptr, b_rows, mask_r, mask_m, stride_b1, out1, out0,
                lo, hi, BLOCK_N, PRECISION, UPCAST,
            )  # fmt: skip
    if NUM_SLICES > 2:
        lo = tl.maximum(j_lo, nt0 + nt1) - nt0 - nt1
        hi = tl.minimum(j_hi - nt0 - nt1, nt2)
        if lo < hi:
            _expand_slice_tiles(
                y_rows, t_ptrs + 2 * stride_ts, t_mask, b2_ptr, b_rows, mask_r, mask_m, stride_b2, out2,
                out0 + out1, lo, hi, BLOCK_N, PRECISION, UPCAST,
            )  # fmt: skip


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _expand_decode_kernel(
    y_ptr,
    t_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_row_ptr,
    seg_rank_ptr,
    num_segs,
    out0,
    out1,
    out2,
    stride_b0,
    stride_b1,
    stride_b2,
    stride_ym,
    stride_ts,
    stride_tm,
    stride_tr,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    B_TILE: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seg, m0, q, per_tile = _decode_tile(seg_len_ptr, seg_rank_ptr, num_segs, BLOCK_M, BLOCK_SEG, 0)
    if seg >= num_segs:
        return
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    row = tl.load(seg_row_ptr + seg)
    rank = tl.load(seg_rank_ptr + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    tok = (start + offs_m).to(tl.int64)
    # The smallest rank chunk (16 * 2**i: 16, 32, 64, 128) that holds this segment's rank, so that a
    # rank-16 adapter in a batch with max_rank 64 loads [16, B_TILE // 16] B tiles. One loop per chunk
    # size keeps each a single pipelined sweep.
    chunk = _rank_chunk(rank)
    for i in tl.static_range(NUM_CHUNKS):
        if chunk == i:
            _expand_decode_tiles(
                y_ptr, t_ptr, b0_ptr, b1_ptr, b2_ptr, out0, out1, out2, stride_b0, stride_b1, stride_b2,
                stride_ym, stride_ts, stride_tm, stride_tr, tok, mask_m, row, rank, q, per_tile,
                NUM_SLICES, 16 * 2**i, B_TILE // (16 * 2**i), PRECISION, UPCAST,
            )  # fmt: skip


def _dot_args(dtype: torch.dtype) -> tuple[str, bool]:
    """``(input_precision, upcast)``: fp32 stays IEEE fp32 (as torch's default matmul); see ``_INTERPRET``."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return precision, _INTERPRET and dtype != torch.float32


def _segment_tensors(meta: LoRASegments) -> SegmentTensors | None:
    if meta.seg_start is None or meta.seg_len is None or meta.seg_row is None or meta.seg_rank is None:
        return None
    return meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank


def _block_seg(num_segs: int) -> int:
    # At least 256 lanes (the segment capacity of a CUDA graph at 256 sequences): a prefix sum over
    # unused lanes is nearly free, while each distinct value would be one more compiled variant.
    return max(_MIN_BLOCK_SEG, _next_power_of_2(num_segs))


def _decode_grid(programs: int, num_tokens: int, num_segs: int) -> tuple[int]:
    # At least one program per possible tile, so that every active tile gets >= 1 program.
    return (max(programs, _cdiv(num_tokens, DECODE_BLOCK_M) + num_segs),)


def lora_shrink_triton(
    x: torch.Tensor,
    a: torch.Tensor,
    meta: LoRASegments,
    config: ShrinkConfig | DecodeShrinkConfig | None = None,
) -> torch.Tensor:
    """Shrink: ``t[s, i0:i1, :r] = x[i0:i1] @ a[row:row+r, s, :]^T`` for each segment.

    Args:
        x: ``[T, in]`` activations (fp32/bf16/fp16, same dtype as ``a``).
        a: ``[R, S, in]`` A pool of one layer.
        meta: the step's segments; only the device tensors and ``max_rank`` are used (may be padded
            with zero-length segments, see the module docstring).
        config: kernel and tile sizes; default :func:`shrink_config`.
    Returns:
        ``t``: ``[S, T, max_rank]`` float32; rows of base tokens and columns past a segment's rank are 0.
    """
    _check_a(a)
    # Zeroed: both kernels may split K and atomic_add (the decode one decides at run time).
    t = meta.zeroed_t(a.shape[1], x.shape[0], x.device)
    segs = _segment_tensors(meta)
    if segs is not None and x.shape[0] and meta.max_rank:
        _shrink_launch(x, a, t, segs, meta.max_rank, config)(x, a, t)
    return t


def lora_expand_triton(
    y: torch.Tensor,
    t: torch.Tensor,
    b: Sequence[torch.Tensor],
    meta: LoRASegments,
    config: ExpandConfig | DecodeExpandConfig | None = None,
) -> None:
    """Expand in place: ``y[i0:i1, off_s:off_s+out_s] += t[s, i0:i1, :r] @ b[s][row:row+r]``.

    One launch for all slices; each slice's product lands in its own column range of ``y``. Reads
    ``t`` only on segment rows and below each segment's rank.

    Args:
        y: ``[T, sum_s out_s]`` output of the base projection (fp32/bf16/fp16, last dim contiguous).
            Accumulation is fp32, rounded once into ``y``'s dtype.
        t: ``[S, T, max_rank]`` float32 from :func:`lora_shrink_triton` (or the torch reference).
        b: ``S`` (1..3) tensors ``[R, out_s]`` (scale folded in, last dim contiguous); ``t`` is rounded
            to their dtype before the product, as in the reference.
        meta: the step's segments (may be padded, see the module docstring).
        config: kernel and tile sizes; default :func:`expand_config`. The decode kernel needs
            ``meta.max_rank <= MAX_DECODE_RANK``.
    """
    segs = _segment_tensors(meta)
    if segs is None or y.shape[0] == 0 or meta.max_rank == 0:
        return
    _check_expand(y, b)
    _expand_launch(y, t, b, segs, meta.max_rank, config)(*_expand_head(y, t, b))


def lora_apply_triton(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: Sequence[torch.Tensor], meta: LoRASegments
) -> None:
    """``y += LoRA(x)`` for every token's adapter (shrink then expand); base tokens are untouched.

    Shapes as in :func:`lora_shrink_triton` / :func:`lora_expand_triton`. Launches the kernels whenever
    the segment tensors exist (even if all are zero-length padding), so it is safe to capture in a
    CUDA graph. The two launches are planned once per step and layer shape (``meta.op_cache``) and
    reused by every layer of that shape, so that a layer costs little more host time than its launches.
    """
    segs = _segment_tensors(meta)
    if segs is None:
        return
    t = meta.zeroed_t(a.shape[1], x.shape[0], x.device)
    key = ("lora", x.shape, x.stride(), a.shape, y.shape, y.stride(0), len(b), x.dtype)
    if key in meta.op_cache:
        plan = meta.op_cache[key]
    else:
        _check_a(a)
        _check_expand(y, b)
        plan = None
        if x.shape[0] and meta.max_rank:
            plan = (
                _shrink_launch(x, a, t, segs, meta.max_rank, None),
                _expand_launch(y, t, b, segs, meta.max_rank, None),
            )
        meta.op_cache[key] = plan
    if plan is not None:
        plan[0](x, a, t)
        plan[1](*_expand_head(y, t, b))


def _check_a(a: torch.Tensor) -> None:
    if a.stride(2) != 1 or (a.shape[1] > 1 and a.stride(0) != a.shape[1] * a.stride(1)):
        raise ValueError("a must be contiguous in its last two dims (an adapter's rows form one block)")


def _check_expand(y: torch.Tensor, b: Sequence[torch.Tensor]) -> None:
    if not 1 <= len(b) <= _MAX_SLICES:
        raise ValueError(f"expand supports 1..{_MAX_SLICES} slices, got {len(b)}")
    if y.stride(1) != 1 or any(b_s.stride(1) != 1 for b_s in b):
        raise ValueError("y and b[s] must be contiguous along their last dim")


def _expand_head(y: torch.Tensor, t: torch.Tensor, b: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The expand kernels' tensor arguments: ``y``, ``t`` and _MAX_SLICES B pointers (unused ones
    repeat ``b[0]`` and are never read)."""
    return (y, t, *b, *[b[0]] * (_MAX_SLICES - len(b)))


def _shrink_launch(
    x: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor,
    segs: SegmentTensors,
    max_rank: int,
    config: ShrinkConfig | DecodeShrinkConfig | None,
) -> _Launch:
    """The shrink launch of this step for ``x``/``a``/``t`` shaped as given (see :class:`_Launch`)."""
    num_tokens, in_features = x.shape
    num_slices = a.shape[1]
    num_segs = segs[0].numel()
    cfg = config or shrink_config(
        num_tokens, num_segs, in_features, num_slices, max_rank, x.element_size(), _num_sms(x.device)
    )
    precision, upcast = _dot_args(x.dtype)
    tail: tuple = (
        *segs,
        num_segs,
        in_features,
        x.stride(0),
        x.stride(1),
        a.stride(1) if num_slices > 1 else a.stride(0),
        *t.stride(),
    )
    consts = dict(
        NUM_SLICES=num_slices,
        BLOCK_K=cfg.block_k,
        BLOCK_SEG=_block_seg(num_segs),
        EVEN_K=in_features % cfg.block_k == 0,
        PRECISION=precision,
        UPCAST=upcast,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if isinstance(cfg, DecodeShrinkConfig):
        consts.update(BLOCK_M=DECODE_BLOCK_M, BLOCK_N=DECODE_SHRINK_BLOCK_N)
        return _Launch(_shrink_decode_kernel, _decode_grid(cfg.programs, num_tokens, num_segs), tail, consts)
    consts.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    grid = (
        _cdiv(num_tokens, cfg.block_m) + num_segs,
        _cdiv(num_slices * max_rank, cfg.block_n),
        cfg.split_k,
    )
    return _Launch(_shrink_kernel, grid, (*tail, cfg.split_k), consts)


def _expand_launch(
    y: torch.Tensor,
    t: torch.Tensor,
    b: Sequence[torch.Tensor],
    segs: SegmentTensors,
    max_rank: int,
    config: ExpandConfig | DecodeExpandConfig | None,
) -> _Launch:
    """The expand launch of this step for ``y``/``t``/``b`` shaped as given (see :class:`_Launch`)."""
    num_tokens = y.shape[0]
    num_slices = len(b)
    num_segs = segs[0].numel()
    cfg = config or expand_config(num_tokens, num_segs, max_rank, b[0].element_size(), _num_sms(y.device))
    outs = [b_s.shape[1] for b_s in b] + [0] * (_MAX_SLICES - num_slices)
    strides = [b_s.stride(0) for b_s in _expand_head(y, t, b)[2:]]
    precision, upcast = _dot_args(b[0].dtype)
    consts = dict(
        NUM_SLICES=num_slices,
        BLOCK_SEG=_block_seg(num_segs),
        PRECISION=precision,
        UPCAST=upcast,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    t_strides = (y.stride(0), *t.stride())
    if isinstance(cfg, DecodeExpandConfig):
        if max_rank > MAX_DECODE_RANK:
            raise ValueError(f"the decode expand supports max_rank <= {MAX_DECODE_RANK}, got {max_rank}")
        # Every rank chunk, whatever the step's max_rank: one compiled variant per layer shape, so
        # that eager steps (max_rank bucketed from their segments) run the variant the CUDA graphs
        # (max_rank = the pool's) compiled, instead of compiling their own mid-run (run 5: 1.7 s).
        consts.update(BLOCK_M=DECODE_BLOCK_M, NUM_CHUNKS=_DECODE_CHUNKS, B_TILE=cfg.b_tile)
        tail = (*segs, num_segs, *outs, *strides, *t_strides)
        return _Launch(_expand_decode_kernel, _decode_grid(cfg.programs, num_tokens, num_segs), tail, consts)
    nblks = [_cdiv(o, cfg.block_n) for o in outs]
    consts.update(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        ALIGNED=all(v % 16 == 0 for v in [*outs, *strides[:num_slices]]),
    )
    grid = (_cdiv(num_tokens, cfg.block_m) + num_segs, sum(nblks))
    tail = (*segs, num_segs, *outs, nblks[0], nblks[1], *strides, *t_strides)
    return _Launch(_expand_kernel, grid, tail, consts)


def warm_up(
    layers: dict[str, tuple[torch.Tensor, Sequence[torch.Tensor]]], max_lora_rank: int, dtype: torch.dtype
) -> int:
    """Compile, before serving, every kernel variant an eager step can pick, so that no step stalls on a
    compile (~1 s each; a variant first needed mid-run cost a benchmark step 2 s).

    Variants follow the layer kind, the kernel family / ``BLOCK_M`` (from mean tokens per segment:
    <= 16, <= 48, more) and ``max_rank`` (bucketed, up to ``max_lora_rank``'s bucket); the split
    counts and segment count are not specialized on. ``layers``: each LoRA layer kind's ``(a, b)``
    pools (one layer's; read only: ``x`` is 0, so ``y`` stays 0). Returns the calls made.
    """
    calls = 0
    a0 = next(iter(layers.values()))[0]
    max_bucket = max(16, _next_power_of_2(max_lora_rank))
    ranks = [r for r in (16, 32, 64, 128, 256, 512) if r <= max_bucket]
    # (tokens, segments): decode-like (mean 1), BLOCK_M 32 (mean 32), BLOCK_M 64 (mean 128).
    for num_tokens, num_segs in ((16, 16), (64, 2), (128, 1)):
        per = num_tokens // num_segs
        for rank in ranks:
            rank_in_pool = min(rank, a0.shape[0])
            segments = [(i * per, (i + 1) * per, 0, rank_in_pool) for i in range(num_segs)]
            meta = LoRASegments.build(segments, num_tokens, device=a0.device)
            meta.max_rank = rank
            for a, b in layers.values():
                x = torch.zeros(num_tokens, a.shape[2], dtype=dtype, device=a.device)
                y = torch.zeros(num_tokens, sum(b_s.shape[1] for b_s in b), dtype=dtype, device=a.device)
                lora_apply_triton(y, x, a, b, meta)
                calls += 1
    return calls
