"""Building blocks of the Llama-family model: LoRA-aware linear layers, RMSNorm, rotary embedding.

The torch code of the norm, activation and rotary is the CPU path and the reference of the fused Triton
kernels that the GPU path uses instead (:mod:`loraserve.ops.triton_fused`, chosen per device by
:func:`~loraserve.ops.select_fused_ops`).

LoRA is a constructor argument of the linear layers, not a wrapper swapped in after the model is
built: each LoRA target holds views into the device adapter pool (``LoRALayerWeights``) and adds
every token's adapter delta after the base matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.ops import FusedOps
from loraserve.ops.lora import (
    DensePack,
    LoRAApplyFn,
    LoRASegments,
    PackedLinear,
    lora_linear_dense,
    onednn_packing_available,
)


@dataclass
class DenseLoRAWeights:
    """The CPU dense layout of one layer (see :func:`~loraserve.ops.lora.lora_linear_dense`).

    ``fused``: ``[out + R * S, in]``, the base weight followed by the A pool rows (the layer's
    weight parameter is a view of its first ``out`` rows); ``b_block``: ``[R * S, out]``;
    ``pack``: their oneDNN-packed copies where the CPU supports them (None: plain matmuls).
    """

    fused: torch.Tensor
    b_block: torch.Tensor
    pack: DensePack | None = None


@dataclass
class LoRALayerWeights:
    """One layer's slice of the device adapter pool (see ``loraserve.ops.lora`` for the layout).

    ``a``: ``[R, S, in]``; ``b``: ``S`` tensors ``[R, out_s]`` with the scale folded in.
    ``apply``: the op that adds the deltas (torch segment loop or Triton); ``dense``: set when the
    pool uses the CPU dense layout, which computes the projection and the deltas together.
    """

    a: torch.Tensor
    b: list[torch.Tensor]
    apply: LoRAApplyFn
    dense: DenseLoRAWeights | None = None


class LoRALinear(nn.Module):
    """``y = x @ W^T (+ bias)`` with ``W`` the row-concatenation of ``S`` output slices, plus LoRA.

    Fused projections (qkv, gate_up) keep one weight so the base matmul and the LoRA shrink read
    ``x`` once for all slices.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool = False,
        lora: LoRALayerWeights | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        if lora is not None and lora.dense is not None:
            # The weight lives in the pool's fused tensor, just above this layer's A rows.
            weight = lora.dense.fused[: sum(out_sizes)]
        else:
            weight = torch.empty(sum(out_sizes), in_features, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(sum(out_sizes), dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.lora = lora
        # CPU: the base weight prepacked for oneDNN (a dense LoRA layout packs its own fused tensor).
        self._packed: PackedLinear | None = None
        if (
            self.weight.device.type == "cpu"
            and (lora is None or lora.dense is None)
            and not self.weight.is_inference()
            and onednn_packing_available(self.weight.dtype)
        ):
            self._packed = PackedLinear()

    def forward(self, x: torch.Tensor, lora_meta: LoRASegments | None) -> torch.Tensor:
        lora = self.lora
        if lora is not None and lora.dense is not None:
            return lora_linear_dense(
                x,
                lora.dense.fused,
                self.weight.shape[0],
                lora.a.shape[1],
                self.bias,
                lora.dense.b_block,
                lora_meta,
                lora.dense.pack,
            )
        if self._packed is not None:
            w = self._packed.weight(self.weight, self.weight.shape[0])
            y = PackedLinear.linear(x, w, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if lora is not None and lora_meta is not None and not lora_meta.empty:
            lora.apply(y, x, lora.a, lora.b, lora_meta)
        return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of the last dim, computed in float32 as transformers does, then cast back.

    The CPU path and the reference of :func:`~loraserve.ops.triton_fused.rms_norm_triton`.
    """
    # One fused kernel for the normalisation (fewer ops per layer matters on CPU).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm (:func:`rms_norm`); with ``fused`` ops (GPU) the Triton kernels instead."""

    def __init__(
        self,
        dim: int,
        eps: float,
        dtype: torch.dtype,
        device: torch.device | str,
        fused: FusedOps | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_norm_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Fused ops only: ``residual += x``, then ``x = rmsnorm(residual)``, both in place; returns ``x``."""
        assert self.fused is not None, "add_norm_ is the fused (GPU) path's op"
        return self.fused.fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Rotary inverse frequencies, with ``linear`` and ``llama3`` scaling as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (``rotate_half``) over a precomputed cos/sin table."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[T, 1, D]`` for this step's positions, looked up once for all layers."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``qk`` ``[T, heads, D]`` (queries and keys side by side, so one op chain serves both).

    Returns a new tensor. The CPU path and the reference of :func:`~loraserve.ops.triton_fused.rotary_triton`.
    """
    xf = qk.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(qk.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate_up output ``[T, 2 * I]``: ``[T, I]``.

    The CPU path and the reference of :func:`~loraserve.ops.triton_fused.silu_and_mul_triton`.
    """
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
