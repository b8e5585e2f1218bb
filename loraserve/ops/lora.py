"""Batched multi-LoRA ops (torch implementation: the CPU path and the oracle for the Triton kernels).

Adapter weights live in a *rank-row pool* per LoRA layer: every adapter resident on the device owns
``r`` consecutive rows ``[row, row + r)`` of the pool, where ``r`` is its own rank (no padding to a
maximum rank). For a layer with ``S`` fused output slices (qkv: S=3, gate_up: S=2, o/down: S=1):

* ``a``: ``[R, S, in]`` -- row ``row + j`` slice ``s`` is row ``j`` of that adapter's ``A_s`` (``[r, in]``).
  Slices share rows so that a fused projection reads ``x`` once for all slices.
* ``b``: ``S`` tensors, ``b[s]``: ``[R, out_s]`` -- rows ``row .. row + r`` hold ``(scale_s * B_s)^T``.
  The adapter's scaling (``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``) is folded in when the
  adapter is written into the pool, so the ops take no scale. An adapter that does not target a
  slice (or a layer) has zeros there.

A step's tokens are ordered so that the tokens of one adapter are contiguous; ``LoRASegments``
lists those runs. Tokens of the base model belong to no segment and are never touched.

Contract (each op's docstring repeats its part):
    shrink:  t[s, i0:i1, :r] = x[i0:i1] @ a[row:row+r, s, :]^T          for each segment (i0, i1, row, r)
    expand:  y[i0:i1, off_s:off_s+out_s] += t[s, i0:i1, :r] @ b[s][row:row+r]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

SegmentTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(seg_start, seg_len, seg_row, seg_rank)``: ``[N]`` int32 each, one entry per segment."""


@dataclass
class LoRASegments:
    """The per-step mapping from tokens to adapter pool rows, shared by every LoRA layer.

    ``segments`` holds ``(start, end, row, rank)`` for each run of tokens that use one adapter
    (``end`` exclusive). The tensor fields carry the same data on the device for kernels; they
    are built once per step by the runner.
    """

    num_tokens: int
    segments: list[tuple[int, int, int, int]]
    max_rank: int
    seg_start: torch.Tensor | None = None  # [N] int32
    seg_len: torch.Tensor | None = None  # [N] int32
    seg_row: torch.Tensor | None = None  # [N] int32
    seg_rank: torch.Tensor | None = None  # [N] int32
    # Float32 workspace for every LoRA layer's t in one forward (see zeroed_t); None: each shrink
    # allocates its own.
    scratch: torch.Tensor | None = None
    # The GPU ops' per-step cache: what they work out once per step and layer shape (launch plans).
    op_cache: dict = field(default_factory=dict, repr=False)
    _scratch_at: int = field(default=0, repr=False)
    _dense_mask: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @cached_property
    def span(self) -> tuple[int, int]:
        """``(lo, hi)``: the smallest token range holding every segment (the runner puts base tokens last)."""
        return (self.segments[0][0], self.segments[-1][1]) if self.segments else (0, 0)

    @cached_property
    def rows_hi(self) -> int:
        """One past the highest pool row any segment reads (the pool keeps used rows packed low)."""
        return max((row + rank for _, _, row, rank in self.segments), default=0)

    def begin_forward(self) -> None:
        """Zero :attr:`scratch` and hand it out from its start again; the model calls this first in
        every forward, so a CUDA graph records one fill for all layers instead of one per layer."""
        if self.scratch is not None:
            self.scratch.zero_()
            self._scratch_at = 0

    def zeroed_t(self, num_slices: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """A zeroed float32 ``[num_slices, num_tokens, max_rank]`` for one layer's ``t``: the next unused
        part of :attr:`scratch` (layers take parts in call order, the same in every forward), or a
        new tensor when there is no scratch or it is used up."""
        shape = (num_slices, num_tokens, self.max_rank)
        n = num_slices * num_tokens * self.max_rank
        if self.scratch is not None and self._scratch_at + n <= self.scratch.numel():
            t = self.scratch[self._scratch_at : self._scratch_at + n].view(shape)
            self._scratch_at += n
            return t
        return torch.zeros(shape, dtype=torch.float32, device=device)

    @property
    def empty(self) -> bool:
        """True when no token of the step uses an adapter: LoRA layers then do no LoRA work.

        Metadata captured in a CUDA graph carries fixed-capacity segment tensors (padded with
        zero-length segments) and is never empty, since the kernels must be recorded.
        """
        return not self.segments and self.seg_start is None

    @classmethod
    def build(
        cls,
        segments: Sequence[tuple[int, int, int, int]],
        num_tokens: int,
        device: torch.device | str = "cpu",
    ) -> LoRASegments:
        """Build from ``(start, end, row, rank)`` runs; empty runs are dropped."""
        segs = sorted(tuple(int(v) for v in s) for s in segments if s[1] > s[0])
        max_rank = max((s[3] for s in segs), default=0)
        out = cls(num_tokens=num_tokens, segments=segs, max_rank=max_rank)  # type: ignore[arg-type]
        if segs:
            # Rows padded to 4 entries (16 bytes): each field starts aligned, as the runner's uploads
            # do, since the GPU kernels compile one variant per pointer alignment.
            n = len(segs)
            t = torch.zeros(4, -(-n // 4) * 4, dtype=torch.int32)
            t[:, :n] = torch.tensor(segs, dtype=torch.int32).T
            t = t.to(device, non_blocking=True)[:, :n]
            out.seg_start, out.seg_len, out.seg_row, out.seg_rank = t[0], t[1] - t[0], t[2], t[3]
        return out

    def dense_mask(
        self, rows: int, num_slices: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``[hi - lo, rows * num_slices]`` for the tokens of :attr:`span`: column ``r * S + s`` is 1 where
        the token uses pool row ``r``, so it multiplies a dense shrink output laid out in ``(r, s)``
        order. Built once per step and shape, then shared by every layer.
        """
        key = (rows, num_slices, dtype)
        mask = self._dense_mask.get(key)
        if mask is None or mask.device != device:
            lo, hi = self.span
            by_row = torch.zeros(hi - lo, rows, dtype=dtype)
            for start, end, row, rank in self.segments:
                by_row[start - lo : end - lo, row : row + rank] = 1
            mask = by_row.repeat_interleave(num_slices, dim=1).to(device)
            self._dense_mask[key] = mask
        return mask


def max_rank_bucket(rank: int) -> int:
    """The ``max_rank`` a step's metadata carries for segments whose largest rank is ``rank``: the next
    power of two, at least 16 (0 stays 0).

    Any value >= every segment's rank is correct (the ops mask by each segment's own rank); a few
    fixed values keep the number of compiled kernel variants small, since the GPU kernels' tile sizes
    and ``t``'s width follow ``max_rank``.
    """
    return 0 if rank <= 0 else max(16, 1 << (rank - 1).bit_length())


# Above this many pool rows the dense CPU op (lora_linear_dense) does more wasted work than the
# per-segment loop saves.
DENSE_MAX_ROWS = 1024

LoRAApplyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[torch.Tensor], LoRASegments], None]
"""``apply(y, x, a, b, meta)``: add every token's adapter delta to ``y`` in place."""


def lora_shrink(x: torch.Tensor, a: torch.Tensor, meta: LoRASegments) -> torch.Tensor:
    """Shrink: ``t[s, i0:i1, :r] = x[i0:i1] @ a[row:row+r, s, :]^T`` for each segment.

    Args:
        x: ``[T, in]`` input activations.
        a: ``[R, S, in]`` A pool of one layer.
        meta: the step's segments.
    Returns:
        ``t``: ``[S, T, max_rank]`` float32; rows of base tokens and columns past a segment's rank are 0.
    """
    num_slices = a.shape[1]
    t = torch.zeros(num_slices, x.shape[0], meta.max_rank, dtype=torch.float32, device=x.device)
    for start, end, row, rank in meta.segments:
        a_rows = a[row : row + rank].reshape(rank * num_slices, -1)
        part = (x[start:end] @ a_rows.T).float().view(end - start, rank, num_slices)
        t[:, start:end, :rank] = part.permute(2, 0, 1)
    return t


def lora_expand(y: torch.Tensor, t: torch.Tensor, b: Sequence[torch.Tensor], meta: LoRASegments) -> None:
    """Expand in place: ``y[i0:i1, off_s:off_s+out_s] += t[s, i0:i1, :r] @ b[s][row:row+r]``.

    Args:
        y: ``[T, sum_s out_s]`` output of the base projection (slices laid out in order).
        t: ``[S, T, max_rank]`` from :func:`lora_shrink`.
        b: ``S`` tensors ``[R, out_s]`` (scale folded in).
        meta: the step's segments.
    """
    offsets = _slice_offsets(b)
    for start, end, row, rank in meta.segments:
        for s, b_s in enumerate(b):
            delta = t[s, start:end, :rank].to(b_s.dtype) @ b_s[row : row + rank]
            y[start:end, offsets[s] : offsets[s + 1]] += delta.to(y.dtype)


def lora_apply(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: Sequence[torch.Tensor], meta: LoRASegments
) -> None:
    """``y += LoRA(x)`` for every token's adapter (shrink then expand); base tokens are untouched.

    Shapes as in :func:`lora_shrink` / :func:`lora_expand`. This is the reference semantics; the
    dense CPU variant :func:`lora_linear_dense` computes the same result.
    """
    if meta.empty:
        return
    lora_expand(y, lora_shrink(x, a, meta), b, meta)


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """Whether CPU weights of ``dtype`` can be prepacked for oneDNN (:class:`PackedLinear`)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear:
    """A oneDNN-prepacked copy of the leading rows of a CPU weight, for ``x @ w[:rows]^T`` (the CPU path).

    ``F.linear`` on a plain bf16 / fp32 CPU weight re-lays the weight out for the GEMM kernel on every
    call; at serving batch sizes that halves the rate the weight streams from memory (measured on the
    2-core dev machine, the default model's 120 projections at 8 tokens: bf16 20.1 -> 12.2 ms, fp32
    43.3 -> 21.4 ms). This keeps the copy laid out once and rebuilds it when the source changes.

    The copy is keyed on the source's storage and version counter, so any in-place write to it (pool
    writes and compaction, which share the counter of the whole pool tensor) invalidates it; it is
    rebuilt lazily by the next call (see :meth:`weight`). Writes through ``.data`` do not move the version counter, so weights written that way (the model
    loader) must be written before the first call.
    """

    def __init__(self, transposed: bool = False) -> None:
        # transposed: the logical weight is ``source[:rows].T`` (a B pool: rows are the GEMM's K).
        self.transposed = transposed
        self.rows = 0
        self._packed: torch.Tensor | None = None
        self._key: tuple[int, int] | None = None

    def weight(
        self, source: torch.Tensor, rows: int, size: Callable[[], int] | None = None, exact: bool = False
    ) -> torch.Tensor:
        """The packed weight for ``source[:self.rows]`` (transposed if so built).

        Rebuilt when ``source`` changed or the copy covers fewer than ``rows`` rows (``exact``: other
        than ``rows``), then to ``size()`` rows (clamped to ``[rows, len(source)]``; default ``rows``).
        """
        key = (source.data_ptr(), source._version)
        if self._packed is None or key != self._key or rows > self.rows or (exact and rows != self.rows):
            keep = min(source.shape[0], max(rows, size() if size is not None else rows))
            w = source[:keep]
            w = w.t() if self.transposed else w
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
            self._key, self.rows = key, keep
        return self._packed

    @staticmethod
    def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ w^T (+ bias)`` against a weight from :meth:`weight`."""
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass
class DensePack:
    """oneDNN-packed copies of one dense layer (:func:`lora_linear_dense`): ``[W; A rows]`` and B.

    Both cover the same pool rows: at least the step's, and when rebuilt, ``rows_in_use()`` (the
    pool's rows in use), so that they are not rebuilt each time a step reaches a higher row.
    """

    rows_in_use: Callable[[], int]
    fused: PackedLinear = field(default_factory=PackedLinear)
    b: PackedLinear = field(default_factory=lambda: PackedLinear(transposed=True))

    def fused_weight(
        self, fused: torch.Tensor, out_features: int, num_slices: int, rows: int
    ) -> tuple[torch.Tensor, int]:
        """``(packed [W; A rows], pool rows it covers >= rows)``."""
        packed = self.fused.weight(
            fused, out_features + rows * num_slices, lambda: out_features + self.rows_in_use() * num_slices
        )
        return packed, (self.fused.rows - out_features) // num_slices

    def b_weight(self, b_block: torch.Tensor, width: int) -> torch.Tensor:
        """Packed ``b_block[:width]^T``, exactly ``width`` rows of B (those of the packed A)."""
        return self.b.weight(b_block, width, exact=True)


def lora_linear_dense(
    x: torch.Tensor,
    fused: torch.Tensor,
    out_features: int,
    num_slices: int,
    bias: torch.Tensor | None,
    b_block: torch.Tensor,
    meta: LoRASegments | None,
    pack: DensePack | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` plus every token's adapter delta, for a small pool (the CPU path).

    Args:
        x: ``[T, in]``.
        fused: ``[out + R * S, in]``: the base weight ``W`` (first ``out`` rows) followed by the
            layer's A pool (``[R, S, in]`` flattened, so rows in ``(r, s)`` order), one tensor, so ONE
            matmul yields the base output and the shrink ``t = x @ A_all^T`` together (the weight
            bytes dominate; the A rows add a few percent).
        out_features: ``out`` (the sum of the slices' widths).
        num_slices: ``S``.
        bias: ``[out]`` or None.
        b_block: ``[R * S, out]`` block-diagonal B: row ``r * S + s`` holds row ``r`` of slice ``s``
            (scale folded in) in that slice's columns, zeros elsewhere.
        meta: the step's segments; None or empty: only the projection is computed.
        pack: oneDNN-packed copies of ``fused`` and ``b_block`` (:class:`DensePack`), used when
            given; None computes on the plain tensors.
    Returns:
        ``y``: ``[T, out]``, ``y[i] = W x_i (+ bias) + B_a A_a x_i`` for token ``i``'s adapter ``a``
        (nothing added for base tokens): the reference :func:`lora_apply` on top of the projection.

    Only pool rows below ``meta.rows_hi`` are needed (the pool keeps used rows packed low; a packed
    copy may cover a few more, which the mask zeroes), and a token x row mask keeps each token's own
    adapter, so a step costs two matmuls and a mask multiply per layer whatever the number of
    segments or slices.
    """
    if meta is not None and meta.empty:
        meta = None
    rows = meta.rows_hi if meta is not None else 0
    if pack is not None:
        packed_fused, rows = pack.fused_weight(fused, out_features, num_slices, rows)
        out = PackedLinear.linear(x, packed_fused)
    else:
        out = F.linear(x, fused[: out_features + rows * num_slices])
    y = out[:, :out_features]
    if bias is not None:
        y = y + bias
    if meta is None:
        return y
    lo, hi = meta.span
    width = rows * num_slices
    t = out[lo:hi, out_features : out_features + width] * meta.dense_mask(rows, num_slices, x.dtype, x.device)
    if pack is not None:
        y[lo:hi] += PackedLinear.linear(t, pack.b_weight(b_block, width))
    else:
        y[lo:hi].addmm_(t, b_block[:width])
    return y


def _slice_offsets(b: Sequence[torch.Tensor]) -> list[int]:
    offsets = [0]
    for b_s in b:
        offsets.append(offsets[-1] + b_s.shape[1])
    return offsets
