"""The only device-aware code: each op has a torch implementation (CPU path and oracle) and a Triton one.

``select_*`` pick the implementation for a device once, when the model is built.
"""

from __future__ import annotations

import logging
import os

import torch

from loraserve.ops.attention import paged_attention, store_kv
from loraserve.ops.lora import DENSE_MAX_ROWS, LoRAApplyFn, lora_apply

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


def select_attention_ops(device: torch.device):
    """``(paged_attention, store_kv)`` for ``device``."""
    if _triton_enabled(device):
        from loraserve.ops.triton_attention import paged_attention_triton, store_kv_triton

        return paged_attention_triton, store_kv_triton
    return paged_attention, store_kv
