"""The model runner: owns the model, the KV cache and the adapter pool; turns a schedule into one forward.

Per step it flattens the scheduled sequences into one batch, ordered by adapter (adapters by pool
row, base-model sequences last) so each adapter's tokens form one contiguous segment, and builds the
attention metadata and the LoRA segments once for every layer to share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from loraserve.config import EngineConfig
from loraserve.engine.cuda_graphs import DecodeGraphs
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.lora.pool import DeviceLoRAPool
from loraserve.lora.store import AdapterStore
from loraserve.model.llama import ForwardContext, LlamaModel
from loraserve.model.loader import iter_checkpoint
from loraserve.ops import allocate_kv_cache, select_attention_ops, select_lora_apply
from loraserve.ops.attention import AttentionMeta
from loraserve.ops.lora import LoRASegments

logger = logging.getLogger(__name__)


class ModelRunner:
    """Loads the model once and runs steps. ``pool`` is None when LoRA is disabled."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        mcfg = cfg.model
        self.pool: DeviceLoRAPool | None = None
        lora_layers = None
        if cfg.lora.enabled:
            rows = cfg.lora.max_loras * cfg.lora.max_lora_rank
            apply, dense = select_lora_apply(self.device, rows)
            self.pool = DeviceLoRAPool(mcfg, rows, cfg.dtype, self.device, apply, dense=dense)
            lora_layers = [self.pool.layer_weights(i) for i in range(mcfg.num_layers)]
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

        def key(item: ScheduledSeq) -> tuple[int, int]:
            a = item.seq.adapter
            if a is None or store is None:
                return (1, 0)
            return (0, store.row(a))

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
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logits_idx: list[int] = []
        segments: list[tuple[int, int, int, int]] = []
        bs = self.block_size
        for item in batch:
            seq = item.seq
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            t0 = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(end - start)
            seq_lens.append(end)
            if item.samples:
                logits_idx.append(len(ids) - 1)
            if seq.adapter is not None and store is not None:
                row, rank = store.row(seq.adapter), seq.adapter.rank
                if segments and segments[-1][2] == row and segments[-1][1] == t0:
                    segments[-1] = (segments[-1][0], len(ids), row, rank)
                else:
                    segments.append((t0, len(ids), row, rank))
        dev = self.device
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = torch.tensor(
            [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch],
            dtype=torch.int32,
        )
        decode_only = len(ids) == len(batch) and all(item.samples for item in batch)
        if self.graphs is not None and decode_only and self.graphs.padded_size(len(batch)):
            return batch, self.graphs.run(ids, positions, slots, seq_lens, tables, segments)
        qstart = [0]
        for q in query_lens:
            qstart.append(qstart[-1] + q)
        attn = AttentionMeta(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_start=torch.tensor(qstart, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            query_lens=query_lens,
            seq_lens_host=seq_lens,
            block_size=bs,
        )
        lora = LoRASegments.build(segments, len(ids), dev) if self.pool is not None else None
        ctx = ForwardContext(
            attn=attn, lora=lora, kv_caches=self.kv_caches, attention=self.attention, store_kv=self.store_kv
        )
        logits = self.model(
            torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
            torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True),
            ctx,
            torch.tensor(logits_idx, dtype=torch.long).to(dev, non_blocking=True),
        )
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
