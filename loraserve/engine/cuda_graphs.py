"""CUDA graphs for decode steps: one graph per padded batch size, with and without LoRA.

A decode step (every sequence adds one token) is replayed from a graph captured at the next
larger batch size. Every input lives in a fixed-address buffer that the replay fills first: token
ids, positions, KV slots (``-1`` for padding rows: nothing stored), context lengths (0 for padding:
nothing read), block tables, and the LoRA segments (fixed capacity, zero-length padding, the rank
bound fixed to ``max_lora_rank``). Adapter weights are rows of the device pool, whose address never
changes, so one graph serves any mix of adapters and base rows. Steps without any adapter replay a
graph captured without LoRA kernels, so base-only traffic costs what an engine without LoRA costs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from loraserve.model.llama import ForwardContext, LlamaModel
from loraserve.ops.attention import AttentionMeta
from loraserve.ops.lora import LoRASegments

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then steps of 8 up to 32 and of 16 up to ``max_batch``."""
    sizes = [1, 2, 4, 8] + list(range(16, 33, 8)) + list(range(48, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class DecodeGraphs:
    """Captured decode graphs and their static input buffers."""

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attention,
        store_kv,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        max_rank: int | None,
        device: torch.device,
        scratch_slices: int = 0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attention = attention
        self.store_kv = store_kv
        self.block_size = block_size
        self.max_rank = max_rank
        self.device = device
        self.sizes = capture_sizes(max_batch)
        n = self.sizes[-1]
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slots = torch.full((n,), -1, **i64)
        self.seq_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, max_blocks, **i32)
        self.query_start = torch.arange(n + 1, **i32)
        self.logits_idx = torch.arange(n, **i64)
        self.segs = torch.zeros(4, n, **i32)  # start, len, row, rank
        # One LoRA t workspace for every graph (replays never overlap): each uses its prefix.
        self.scratch_slices = scratch_slices
        self.lora_scratch = torch.empty(
            scratch_slices * n * (max_rank or 0), dtype=torch.float32, device=device
        )
        self.graphs: dict[tuple[int, bool], _Graph] = {}
        self.pool = None

    def capture(self, max_model_len: int) -> None:
        """Capture every size (largest first, so smaller graphs reuse its memory pool)."""
        from loraserve.ops.triton_attention import decode_num_splits

        kv_heads = self.kv_caches[0][0].shape[2]
        group = self.model.cfg.num_heads // kv_heads
        variants = [False, True] if self.max_rank else [False]
        for size in reversed(self.sizes):
            splits = decode_num_splits(size, kv_heads, max_model_len, self.device, group)
            attention = functools.partial(self.attention, num_splits=splits)
            for with_lora in variants:
                ctx = self._context(size, with_lora, attention)
                for _ in range(2):  # compile kernels and settle allocations outside the capture
                    self._forward(size, ctx)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = self._forward(size, ctx)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(size, with_lora)] = _Graph(graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def padded_size(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        tables: np.ndarray,
        segments: list[tuple[int, int, int, int]],
    ) -> torch.Tensor:
        """Fill the buffers for a decode step of ``len(input_ids)`` sequences and replay; returns logits.

        ``input_ids``, ``positions``, ``slots``, ``seq_lens``: ``[batch]`` integer arrays; ``tables``:
        ``[batch, nb]`` block tables (``nb`` at most the captured width); ``segments``: the LoRA runs
        ``(start, end, row, rank)``, empty for a step without adapters. Rows past ``batch`` up to the
        graph's size are padding: slot -1 and context length 0 (nothing stored or read), segments of
        length 0.
        """
        batch = len(input_ids)
        size = self.padded_size(batch)
        assert size is not None
        nb = tables.shape[1]
        with_lora = bool(segments)
        # Every input is staged in pinned host memory (two buffers, one per dtype) so that the
        # copies are asynchronous: from pageable memory the driver stages each copy synchronously.
        pin = self.device.type == "cuda"
        host64 = torch.empty(3, size, dtype=torch.long, pin_memory=pin)
        h64 = host64.numpy()
        h64[:, :batch] = (input_ids, positions, slots)
        h64[:2, batch:] = 0
        h64[2, batch:] = -1
        tables_at = size
        segs_at = tables_at + batch * nb
        host32 = torch.empty(segs_at + (4 * size if with_lora else 0), dtype=torch.int32, pin_memory=pin)
        h32 = host32.numpy()
        h32[:batch] = seq_lens
        h32[batch:size] = 0
        h32[tables_at:segs_at] = tables.ravel()
        if with_lora:
            seg = h32[segs_at:].reshape(4, size)
            seg[:] = 0
            t = np.array(segments, dtype=np.int32)
            n = len(segments)
            seg[0, :n] = t[:, 0]
            seg[1, :n] = t[:, 1] - t[:, 0]
            seg[2, :n] = t[:, 2]
            seg[3, :n] = t[:, 3]
        self.input_ids[:size].copy_(host64[0], non_blocking=True)
        self.positions[:size].copy_(host64[1], non_blocking=True)
        self.slots[:size].copy_(host64[2], non_blocking=True)
        self.seq_lens[:size].copy_(host32[:size], non_blocking=True)
        self.block_tables[:batch, :nb].copy_(host32[tables_at:segs_at].view(batch, nb), non_blocking=True)
        if with_lora:
            self.segs[:, :size].copy_(host32[segs_at:].view(4, size), non_blocking=True)
        g = self.graphs[(size, with_lora)]
        g.graph.replay()
        return g.logits[:batch]

    def _context(self, size: int, with_lora: bool, attention) -> ForwardContext:
        meta = AttentionMeta(
            slot_mapping=self.slots[:size],
            query_start=self.query_start[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_lens=[1] * size,
            seq_lens_host=[1] * size,
            block_size=self.block_size,
        )
        lora = None
        if with_lora:
            lora = LoRASegments(num_tokens=size, segments=[], max_rank=self.max_rank or 0)
            lora.seg_start, lora.seg_len, lora.seg_row, lora.seg_rank = (
                self.segs[i, :size] for i in range(4)
            )
            if self.scratch_slices:
                lora.scratch = self.lora_scratch[: self.scratch_slices * size * lora.max_rank]
        return ForwardContext(
            attn=meta, lora=lora, kv_caches=self.kv_caches, attention=attention, store_kv=self.store_kv
        )

    def _forward(self, size: int, ctx: ForwardContext) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], ctx, self.logits_idx[:size])
