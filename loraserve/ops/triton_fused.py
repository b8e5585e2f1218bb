"""Fused elementwise Triton kernels of the decoder layer (the GPU path; the model's torch code is the oracle).

Each op is one kernel that reads and writes every tensor once, where torch needs several kernels and
fp32 temporaries:

* :func:`rms_norm_triton` / :func:`fused_add_rms_norm_triton`: RMSNorm, and the residual add fused with
  the next RMSNorm (vLLM's ``fused_add_rms_norm``). Reference: :func:`loraserve.model.layers.rms_norm`.
* :func:`silu_and_mul_triton`: the SwiGLU activation of the fused gate_up output. Reference:
  :func:`loraserve.model.layers.silu_and_mul`.
* :func:`rotary_triton`: neox-style rotary embedding of queries and keys, in place in the fused qkv
  output. Reference: :func:`loraserve.model.layers.apply_rotary`.

Arithmetic is fp32 and the intermediate results that the torch reference materialises in the model
dtype (the normalised row before the weight multiply, ``x + residual``, ``silu(gate)``) are rounded
to it at the same points, so low-precision outputs differ from the reference only where fp32 sums in
another order round differently.

Norms and rotary run one program per token row with the whole row in registers (``BLOCK`` = the next
power of two of the row, ``num_warps`` by size, as vLLM's and unsloth's Triton kernels do); the
activation, which has no reduction, also splits the row into column blocks so that small decode
batches still spread over the SMs. Launches depend only on tensor shapes, never on device values,
so every op can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.ops import FusedOps

# Columns per program of the activation kernel: 8 elements per thread of 4 warps (one 16-byte load each
# of gate and up in half precision).
_ACT_BLOCK = 1024
# Rows wider than this would no longer fit one program's registers.
_MAX_ROW_BLOCK = 65536


def _num_warps(block: int) -> int:
    """Warps for a program holding ``block`` elements per loaded tensor: about 8-16 elements a thread."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _row_block(width: int) -> int:
    block = triton.next_power_of_2(width)
    if block > _MAX_ROW_BLOCK:
        raise ValueError(f"rows of {width} elements exceed the fused kernels' limit of {_MAX_ROW_BLOCK}")
    return block


def _check_rows(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, H] with contiguous rows"
    assert weight.shape == (x.shape[1],) and weight.is_contiguous() and weight.dtype == x.dtype


# ------------------------------------------------------------------------------------------------ RMSNorm


@triton.jit
def _normalize(x, w_ptr, cols, mask, hidden, eps):
    """``weight * rmsnorm(x)`` of an fp32 row, in fp32 (rounding as the torch reference does)."""
    var = tl.sum(x * x, axis=0) / hidden
    # The reference casts the normalised row to the model dtype before the weight multiply.
    normed = (x * tl.rsqrt(var + eps)).to(w_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return normed * w


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    out = _normalize(x, w_ptr, cols, mask, hidden, eps)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, stride_x, stride_res, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x_ptrs = x_ptr + row * stride_x + cols
    res_ptrs = res_ptr + row * stride_res + cols
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    # The new residual is rounded to the model dtype before it is normalised, as ``x + residual`` is.
    total = (x + res).to(res_ptr.dtype.element_ty)
    tl.store(res_ptrs, total, mask=mask)
    out = _normalize(total.to(tl.float32), w_ptr, cols, mask, hidden, eps)
    tl.store(x_ptrs, out.to(x_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` per row: a new contiguous ``[T, H]`` tensor.

    ``x``: ``[T, H]`` (rows contiguous, any row stride); ``weight``: ``[H]``, same dtype. Launch: one
    program per row, ``BLOCK = next_power_of_2(H)``, ``num_warps`` by ``BLOCK`` (8 at ``H = 4096``).
    """
    _check_rows(x, weight)
    num_tokens, hidden = x.shape
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    block = _row_block(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x, weight, out, x.stride(0), out.stride(0), hidden, eps, BLOCK=block, num_warps=_num_warps(block)
    )
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """vLLM's ``fused_add_rms_norm``, both in place: ``residual += x``, then ``x = weight * rmsnorm(residual)``.

    ``x``, ``residual``: ``[T, H]`` of one dtype (rows contiguous, any row stride, not overlapping);
    ``weight``: ``[H]``. Returns ``x``. Launch as :func:`rms_norm_triton`.
    """
    _check_rows(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    num_tokens, hidden = x.shape
    block = _row_block(hidden)
    _add_rms_norm_kernel[(num_tokens,)](
        x,
        residual,
        weight,
        x.stride(0),
        residual.stride(0),
        hidden,
        eps,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return x


# ------------------------------------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate_ptrs = gu_ptr + row * stride_gu + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    # torch's silu (x / (1 + exp(-x)) in fp32), rounded to the model dtype before the multiply as
    # ``F.silu(gate) * up`` is.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]``: a new contiguous ``[T, I]`` tensor.

    ``gate_up``: ``[T, 2 * I]`` (rows contiguous, any row stride). Launch: grid ``(T, cdiv(I, BLOCK))``
    with ``BLOCK = min(1024, next_power_of_2(I))``, 4 warps.
    """
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(_ACT_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=_num_warps(block)
    )
    return out


# ------------------------------------------------------------------------------------------------- rotary


@triton.jit
def _rotary_kernel(
    qk_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_cos,
    stride_sin,
    heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    mask = (h[:, None] < heads) & d_mask[None, :]
    # One table row serves every head of the token; both halves are read, so any table works.
    cos_lo = tl.load(cos_ptr + tok * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + tok * stride_cos + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + tok * stride_sin + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + tok * stride_sin + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    lo_ptrs = qk_ptr + tok * stride_qt + h[:, None] * stride_qh + d[None, :]
    lo = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(lo_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-hi, lo).
    tl.store(lo_ptrs, (lo * cos_lo - hi * sin_lo).to(qk_ptr.dtype.element_ty), mask=mask)
    tl.store(lo_ptrs + half, (hi * cos_hi + lo * sin_hi).to(qk_ptr.dtype.element_ty), mask=mask)


def rotary_triton(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding of ``qk`` in place; returns ``qk``.

    ``qk``: ``[T, heads, D]``, queries and keys side by side (a strided view of the fused qkv output:
    last dim contiguous, any token and head strides), ``D`` even; ``cos``, ``sin``: ``[T, 1, D]`` or
    ``[T, D]`` float tables of this step's positions (:meth:`~loraserve.model.layers.RotaryEmbedding.tables`).
    Computes ``qk * cos + rotate_half(qk) * sin`` in fp32 with ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``.
    Launch: one program per token holding all its heads, ``[next_power_of_2(heads),
    next_power_of_2(D / 2)]`` per half, ``num_warps`` by that size (8 for 64 heads of 128).
    """
    num_tokens, heads, head_dim = qk.shape
    assert qk.stride(2) == 1 and head_dim % 2 == 0
    cos, sin = cos.reshape(num_tokens, head_dim), sin.reshape(num_tokens, head_dim)
    assert cos.stride(1) == 1 and sin.stride(1) == 1
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
    _rotary_kernel[(num_tokens,)](
        qk,
        cos,
        sin,
        qk.stride(0),
        qk.stride(1),
        cos.stride(0),
        sin.stride(0),
        heads,
        head_dim // 2,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_h * block_d),
    )
    return qk


TRITON_FUSED_OPS = FusedOps(
    rms_norm=rms_norm_triton,
    fused_add_rms_norm=fused_add_rms_norm_triton,
    silu_and_mul=silu_and_mul_triton,
    rotary=rotary_triton,
)
