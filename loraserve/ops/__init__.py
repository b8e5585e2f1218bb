"""The only device-aware code: each op has a torch implementation (CPU path and oracle) and a Triton one.

``select_*`` pick the implementation for a device once, when the model is built.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraserve.ops.attention import paged_attention, store_kv
from loraserve.ops.lora import DENSE_MAX_ROWS, LoRAApplyFn, lora_apply

if TYPE_CHECKING:
    from loraserve.model.layers import LoRALayerWeights

logger = logging.getLogger(__name__)


def _triton_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("LORASERVE_DISABLE_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning("triton is not importable: using the torch ops on %s", device)
        return False
    return True


def select_lora_apply(device: torch.device, pool_rows: int) -> tuple[LoRAApplyFn, bool]:
    """``(apply, dense)`` for a pool of ``pool_rows`` rows on ``device``.

    CUDA: the Triton segmented kernels. CPU: ``dense`` (``lora_linear_dense``, the base weight and
    the A pool in one matmul) for small pools, else the torch segment loop.
    """
    if _triton_enabled(device):
        from loraserve.ops.triton_lora import lora_apply_triton

        return lora_apply_triton, False
    return lora_apply, pool_rows <= DENSE_MAX_ROWS


def uses_triton(device: torch.device) -> bool:
    """Whether the ops on ``device`` are the Triton kernels (CUDA, triton importable, not disabled)."""
    return _triton_enabled(device)


def warm_up_lora_kernels(
    device: torch.device, layers: dict[str, LoRALayerWeights], max_lora_rank: int, dtype: torch.dtype
) -> None:
    """On the Triton path, compile every LoRA kernel variant eager steps can pick before serving
    (``triton_lora.warm_up``); nothing elsewhere. ``layers``: one decoder layer's LoRA weights."""
    if not _triton_enabled(device):
        return
    from loraserve.ops.triton_lora import warm_up

    start = time.perf_counter()
    calls = warm_up({kind: (w.a, w.b) for kind, w in layers.items()}, max_lora_rank, dtype)
    logger.info("LoRA kernels warmed up: %d calls in %.1f s", calls, time.perf_counter() - start)


def select_attention_ops(device: torch.device):
    """``(paged_attention, store_kv)`` for ``device``."""
    if _triton_enabled(device):
        from loraserve.ops.triton_attention import paged_attention_triton, store_kv_triton

        return paged_attention_triton, store_kv_triton
    return paged_attention, store_kv


def kv_cache_layout(device: torch.device) -> str:
    """Storage order of the KV cache on ``device``: ``"hnd"`` or ``"nhd"``.

    Every op indexes a cache as ``[num_blocks, block_size, num_kv_heads, head_dim]``. With the
    Triton ops the storage is head-major (``[num_blocks, num_kv_heads, block_size, head_dim]``,
    handed out as a transposed view) so that a decode program reading one head streams contiguous
    runs of ``block_size * head_dim`` elements; the torch ops keep token-major storage, where a
    token's heads are one row.
    """
    return "hnd" if _triton_enabled(device) else "nhd"


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """One zeroed cache tensor indexed ``[num_blocks, block_size, num_kv_heads, head_dim]``, stored per
    :func:`kv_cache_layout`."""
    if kv_cache_layout(device) == "hnd":
        return torch.zeros(
            num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device
        ).transpose(1, 2)
    return torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


@dataclass(frozen=True)
class FusedOps:
    """The GPU path's fused elementwise ops (:mod:`loraserve.ops.triton_fused` documents each).

    There is no torch table: off CUDA the model keeps its own torch code, which is these ops' reference.
    """

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    fused_add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def select_fused_ops(device: torch.device) -> FusedOps | None:
    """The Triton norm / activation / rotary kernels on CUDA; None elsewhere (the model's torch code)."""
    if _triton_enabled(device):
        from loraserve.ops.triton_fused import TRITON_FUSED_OPS

        return TRITON_FUSED_OPS
    return None
