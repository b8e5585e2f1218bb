"""The model runner: owns the model, the KV cache and the adapter pool; turns a schedule into one forward.

Per step it flattens the scheduled sequences into one batch, ordered by adapter (adapters by pool
row, base-model sequences last) so each adapter's tokens form one contiguous segment, and builds the
attention metadata and the LoRA segments once for every layer to share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence as Seq
from itertools import chain

import numpy as np
import torch

from loraserve.config import EngineConfig
from loraserve.engine.cuda_graphs import DecodeGraphs
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.lora.pool import DeviceLoRAPool
from loraserve.lora.store import AdapterEntry, AdapterStore
from loraserve.model.llama import ForwardContext, LlamaModel
from loraserve.model.loader import iter_checkpoint
from loraserve.ops import (
    allocate_kv_cache,
    select_attention_ops,
    select_lora_apply,
    uses_triton,
    warm_up_lora_kernels,
)
from loraserve.ops.attention import AttentionMeta
from loraserve.ops.lora import LoRASegments, max_rank_bucket

logger = logging.getLogger(__name__)


# Largest per-step LoRA workspace (LoRASegments.scratch) of an eager step; larger steps (long prefill)
# zero each layer's t on its own, a cost their GPU time dwarfs.
SCRATCH_MAX_BYTES = 64 << 20


class ModelRunner:
    """Loads the model once and runs steps. ``pool`` is None when LoRA is disabled."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        mcfg = cfg.model
        self.pool: DeviceLoRAPool | None = None
        # The Triton path's per-forward LoRA t workspace: its [T, max_rank] planes (0: none).
        self.scratch_slices = 0
        lora_layers = None
        if cfg.lora.enabled:
            rows = cfg.lora.max_loras * cfg.lora.max_lora_rank
            apply, dense = select_lora_apply(self.device, rows)
            self.pool = DeviceLoRAPool(mcfg, rows, cfg.dtype, self.device, apply, dense=dense)
            if uses_triton(self.device):
                self.scratch_slices = self.pool.slices_per_forward
            lora_layers = [self.pool.layer_weights(i) for i in range(mcfg.num_layers)]
            warm_up_lora_kernels(self.device, lora_layers[0], cfg.lora.max_lora_rank, cfg.dtype)
        self.model = LlamaModel(mcfg, lora_layers, cfg.dtype, self.device, cfg.max_model_len + 1)
        if cfg.load_format == "dummy":
            init_dummy_weights(self.model, cfg.seed)
        else:
            self.model.load_weights(iter_checkpoint(mcfg.path))
        self.model.eval()
        self.block_size = cfg.cache.block_size
        self.num_blocks = cfg.cache.num_blocks or self._blocks_for(cfg.cache.kv_cache_memory)
        shape = (self.num_blocks, self.block_size, mcfg.num_kv_heads, mcfg.head_dim)
        self.kv_caches = [
            (
                allocate_kv_cache(*shape, cfg.dtype, self.device),
                allocate_kv_cache(*shape, cfg.dtype, self.device),
            )
            for _ in range(mcfg.num_layers)
        ]
        self.attention, self.store_kv = select_attention_ops(self.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not cfg.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.attention,
                self.store_kv,
                max_batch=cfg.scheduler.max_num_seqs,
                max_blocks=-(-cfg.max_model_len // self.block_size),
                block_size=self.block_size,
                max_rank=cfg.lora.max_lora_rank if self.pool is not None else None,
                device=self.device,
                scratch_slices=self.scratch_slices,
            )
            self.graphs.capture(cfg.max_model_len)
        logger.info(
            "model %s loaded: %d layers, %d KV blocks of %d tokens, LoRA pool %s",
            mcfg.name,
            mcfg.num_layers,
            self.num_blocks,
            self.block_size,
            f"{self.pool.total_rows} rank rows ({self.pool.nbytes / 1e6:.1f} MB)" if self.pool else "off",
        )

    def _blocks_for(self, nbytes: int) -> int:
        m = self.cfg.model
        per_block = 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.cfg.dtype.itemsize
        return max(16, nbytes // per_block)

    @staticmethod
    def order(scheduled: Seq[ScheduledSeq], store: AdapterStore | None) -> list[ScheduledSeq]:
        """Group by adapter: adapter sequences by pool row, base-model sequences last."""
        if store is None:
            return list(scheduled)  # every key would be equal: the stable sort keeps this order
        rows: dict[AdapterEntry, int] = {}  # one pool lookup per adapter, not per sequence

        def key(item: ScheduledSeq) -> float:
            a = item.seq.adapter
            if a is None:
                return math.inf
            row = rows.get(a)
            if row is None:
                row = rows[a] = store.row(a)
            return row

        return sorted(scheduled, key=key)

    @torch.inference_mode()
    def run(
        self, scheduled: Seq[ScheduledSeq], store: AdapterStore | None
    ) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Run one forward over ``scheduled``; returns the batch order and logits of sampling rows.

        The logits tensor is ``[num_sampling, vocab]`` float32, in batch order of the sequences
        whose ``samples`` is True.
        """
        batch = self.order(scheduled, store)
        num_seqs = len(batch)
        bs = self.block_size
        # One Python pass gathers what is per sequence; everything per token is then numpy work,
        # so a step's host cost does not grow with the length of its prefill chunks.
        ids: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        sampling: list[int] = []
        segments: list[tuple[int, int, int, int]] = []
        rows: dict[AdapterEntry, int] = {}
        num_tokens = 0
        for i, item in enumerate(batch):
            seq = item.seq
            start, n = seq.num_computed, item.num_tokens
            if n == 1:
                ids.append(seq.token_ids[start])
            else:
                ids.extend(seq.token_ids[start : start + n])
            starts.append(start)
            query_lens.append(n)
            tables.append(seq.block_table)
            if item.samples:
                sampling.append(i)
            adapter = seq.adapter
            if adapter is not None and store is not None:
                row = rows.get(adapter)
                if row is None:
                    row = rows[adapter] = store.row(adapter)
                if segments and segments[-1][2] == row and segments[-1][1] == num_tokens:
                    segments[-1] = (segments[-1][0], num_tokens + n, row, adapter.rank)
                else:
                    segments.append((num_tokens, num_tokens + n, row, adapter.rank))
            num_tokens += n
        qlens = np.array(query_lens, dtype=np.int64)
        seq_lens = np.array(starts, dtype=np.int64) + qlens
        # Block tables padded with 0: the flat ids fill the row-major mask of valid entries.
        nblocks = np.fromiter(map(len, tables), dtype=np.int64, count=num_seqs)
        table_arr = np.zeros((num_seqs, int(nblocks.max())), dtype=np.int32)
        table_arr[np.arange(table_arr.shape[1]) < nblocks[:, None]] = np.fromiter(
            chain.from_iterable(tables), dtype=np.int32, count=int(nblocks.sum())
        )
        if num_tokens == num_seqs:  # one token per sequence: the token at position num_computed
            token_seq = np.arange(num_seqs)
            positions = seq_lens - 1
        else:
            token_seq = np.repeat(np.arange(num_seqs), qlens)
            positions = np.arange(num_tokens) - np.repeat(np.cumsum(qlens) - seq_lens, qlens)
        slots = table_arr[token_seq, positions // bs].astype(np.int64) * bs + positions % bs
        ids_arr = np.array(ids, dtype=np.int64)
        dev = self.device
        decode_only = num_tokens == num_seqs and len(sampling) == num_seqs
        if self.graphs is not None and decode_only and self.graphs.padded_size(num_seqs):
            return batch, self.graphs.run(ids_arr, positions, slots, seq_lens, table_arr, segments)
        qstart = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(qlens, out=qstart[1:])
        logits_idx = qstart[1:][sampling].astype(np.int64) - 1

        def upload(dtype: torch.dtype, *arrays: np.ndarray) -> list[torch.Tensor]:
            """``arrays`` (all of ``dtype``) on the device: on CUDA through one pinned staging
            buffer and one asynchronous copy (a pageable source is staged synchronously)."""
            if dev.type != "cuda":
                return [torch.from_numpy(a) for a in arrays]
            # Sections start on 16-byte boundaries, like separate allocations: kernels specialize
            # on pointer alignment.
            align = 16 // dtype.itemsize
            offsets = []
            total = 0
            for a in arrays:
                offsets.append(total)
                total += -(-a.size // align) * align
            host = torch.empty(total, dtype=dtype, pin_memory=True)
            staged = host.numpy()
            for a, off in zip(arrays, offsets, strict=True):
                staged[off : off + a.size] = a.ravel()
            device = host.to(dev, non_blocking=True)
            return [device[off : off + a.size].view(a.shape) for a, off in zip(arrays, offsets, strict=True)]

        # The LoRA segments' columns (start, length, pool row, rank) travel with the int32 inputs.
        seg = np.array(segments, dtype=np.int32).reshape(-1, 4).T.copy()
        seg[1] -= seg[0]
        ids_t, positions_t, slots_t, logits_idx_t = upload(torch.long, ids_arr, positions, slots, logits_idx)
        qstart_t, seq_lens_t, tables_t, *seg_t = upload(
            torch.int32, qstart, seq_lens.astype(np.int32), table_arr, *seg
        )
        attn = AttentionMeta(
            slot_mapping=slots_t,
            query_start=qstart_t,
            seq_lens=seq_lens_t,
            block_tables=tables_t,
            query_lens=query_lens,
            seq_lens_host=seq_lens.tolist(),
            block_size=bs,
        )
        lora = None
        if self.pool is not None:
            # What LoRASegments.build makes, without its own copy: the runs are in token order,
            # none empty.
            lora = LoRASegments(
                num_tokens=num_tokens,
                segments=segments,
                max_rank=max_rank_bucket(max((s[3] for s in segments), default=0)),
            )
            if segments:
                lora.seg_start, lora.seg_len, lora.seg_row, lora.seg_rank = seg_t
                scratch = self.scratch_slices * num_tokens * lora.max_rank
                if 4 * scratch <= SCRATCH_MAX_BYTES:
                    lora.scratch = torch.empty(scratch, dtype=torch.float32, device=dev)
        ctx = ForwardContext(
            attn=attn, lora=lora, kv_caches=self.kv_caches, attention=self.attention, store_kv=self.store_kv
        )
        logits = self.model(ids_t, positions_t, ctx, logits_idx_t)
        return batch, logits


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights at the model's shapes (vLLM's ``load_format="dummy"``), for benchmarks.

    Norm weights are 1 and projections ~ N(0, 1/in_features) so activations stay in range and the
    kernels see realistic values; nothing is read from disk.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
