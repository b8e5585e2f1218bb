"""The device adapter pool: rank rows of every LoRA layer, allocated per adapter by its own rank.

Layout (see ``loraserve.ops.lora``): for each layer kind (qkv, o, gate_up, down) one tensor
``a[kind]``: ``[L, R, S, in]`` and ``S`` tensors ``b[kind][s]``: ``[L, R, out_s]``. An adapter of rank
``r`` owns rows ``[row, row + r)`` in every layer and kind. Free space is kept contiguous by
compaction between steps (moving resident adapters down), so an adapter fits whenever the free
row count allows, whatever the mix of ranks.

``PackedAdapter`` is the same layout for one adapter on the host (``[L, r, S, in]`` ...), with the
scale folded into B: moving an adapter onto the device is one copy per pool tensor.

Memory: one rank row costs :func:`row_bytes` (every layer, every kind), so an adapter of rank ``r``
takes ``r * row_bytes`` on the device and as a packed host copy -- its own rank, not the maximum.
:func:`apply_memory_budget` splits one device budget between this pool and the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from loraserve.config import EngineConfig, ModelConfig
from loraserve.lora.adapter import LoRAWeights
from loraserve.model.layers import DenseLoRAWeights, LoRALayerWeights
from loraserve.model.llama import LORA_LAYER_SLICES
from loraserve.ops.lora import DENSE_MAX_ROWS, LoRAApplyFn


def kind_shapes(cfg: ModelConfig) -> dict[str, tuple[int, list[int]]]:
    """``kind -> (in_features, [out_s per slice])``."""
    shapes = cfg.lora_shapes()
    return {
        kind: (shapes[mods[0]][0], [shapes[m][1] for m in mods]) for kind, mods in LORA_LAYER_SLICES.items()
    }


@dataclass
class PackedAdapter:
    """One adapter in pool layout on the host: ``a[kind]`` ``[L, r, S, in]``, ``b[kind][s]`` ``[L, r, out_s]``."""

    rank: int
    a: dict[str, torch.Tensor]
    b: dict[str, list[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.a.values()) + sum(
            t.numel() * t.element_size() for bs in self.b.values() for t in bs
        )

    def pin_memory(self) -> PackedAdapter:
        return PackedAdapter(
            self.rank,
            {k: v.pin_memory() for k, v in self.a.items()},
            {k: [t.pin_memory() for t in v] for k, v in self.b.items()},
        )


def pack_adapter(weights: LoRAWeights, cfg: ModelConfig, dtype: torch.dtype) -> PackedAdapter:
    """Lay an adapter out in pool rows, folding each module's scale into its B.

    Modules the adapter does not target, and rows past a module's own rank (``rank_pattern``),
    stay zero, so they add nothing.
    """
    r = weights.rank
    num_layers = cfg.num_layers
    # Packed where the weights are (a caller holding them on a GPU packs at device speed); the
    # result always lives on the host, which is the tier it is cached in.
    where = next(iter(weights.modules.values())).a.device if weights.modules else torch.device("cpu")
    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, list[torch.Tensor]] = {}
    for kind, (in_f, outs) in kind_shapes(cfg).items():
        mods = LORA_LAYER_SLICES[kind]
        a = torch.zeros(num_layers, r, len(mods), in_f, dtype=torch.float32, device=where)
        bs = [torch.zeros(num_layers, r, o, dtype=torch.float32, device=where) for o in outs]
        for (layer, name), w in weights.modules.items():
            if name not in mods:
                continue
            s = mods.index(name)
            rank = w.a.shape[0]
            a[layer, :rank, s] = w.a
            bs[s][layer, :rank] = (w.b * w.scale).T
        a_out[kind] = a.to("cpu", dtype)
        b_out[kind] = [b.to("cpu", dtype) for b in bs]
    return PackedAdapter(r, a_out, b_out)


def row_bytes(cfg: ModelConfig, dtype: torch.dtype, dense: bool = False) -> int:
    """Bytes of one rank row of the device pool: A and B of every kind in every layer.

    ``dense``: the CPU pool's block-diagonal B holds ``S * sum(out_s)`` per fused kind.
    """
    per_layer = sum(
        len(outs) * in_f + (len(outs) if dense else 1) * sum(outs) for in_f, outs in kind_shapes(cfg).values()
    )
    return cfg.num_layers * per_layer * dtype.itemsize


def kv_block_bytes(cfg: EngineConfig) -> int:
    """Bytes of one KV block (K and V of every layer), as the runner allocates them."""
    m = cfg.model
    return 2 * m.num_layers * cfg.cache.block_size * m.num_kv_heads * m.head_dim * cfg.dtype.itemsize


def apply_memory_budget(cfg: EngineConfig) -> EngineConfig:
    """Split one device budget between the adapter pool and the KV cache (``adapter_memory_fraction``).

    With ``LoRAConfig.adapter_memory_fraction = f`` set, ``CacheConfig.kv_cache_memory`` is read as
    the budget for adapters *and* KV together: the pool gets ``f`` of it, rounded down to whole
    ``max_lora_rank`` slots (so ``max_loras`` is derived, and rows are sized by the model's bytes
    per rank row), and the KV cache gets the rest. Without ``f`` the config is returned unchanged
    (``max_loras * max_lora_rank`` rows plus ``kv_cache_memory`` of KV, as before).

    The split is fixed once the engine is built: the runner allocates the pool and the KV cache as
    separate tensors, and the LoRA kernels address one contiguous row pool, so neither side can
    grow into the other's free memory at runtime (see docs/architecture.md).
    """
    lora = cfg.lora
    frac = lora.adapter_memory_fraction
    if frac is None or not lora.enabled:
        return cfg
    if not 0.0 < frac < 1.0:
        raise ValueError(f"adapter_memory_fraction must be in (0, 1), got {frac}")
    if cfg.cache.num_blocks is not None:
        raise ValueError(
            "adapter_memory_fraction splits kv_cache_memory between adapters and KV; "
            "it cannot be combined with a fixed num_blocks"
        )
    budget = cfg.cache.kv_cache_memory
    # Off CUDA, small pools use the dense op's larger rows (see select_lora_apply).
    slot = row_bytes(cfg.model, cfg.dtype, dense=not cfg.device.startswith("cuda")) * lora.max_lora_rank
    slots = int(frac * budget) // slot
    if slots * lora.max_lora_rank > DENSE_MAX_ROWS:
        slot = row_bytes(cfg.model, cfg.dtype) * lora.max_lora_rank
        slots = int(frac * budget) // slot
    if slots < 1:
        raise ValueError(
            f"adapter_memory_fraction={frac} of {budget} bytes is less than one rank-{lora.max_lora_rank} "
            f"adapter ({slot} bytes)"
        )
    kv = budget - slots * slot
    if kv < 16 * kv_block_bytes(cfg):
        raise ValueError(
            f"adapter_memory_fraction={frac} leaves {kv} bytes of KV cache, fewer than 16 blocks"
        )
    return replace(cfg, lora=replace(lora, max_loras=slots), cache=replace(cfg.cache, kv_cache_memory=kv))


class DeviceLoRAPool:
    """Fixed device tensors for ``total_rows`` rank rows, plus a contiguous row allocator."""

    def __init__(
        self,
        cfg: ModelConfig,
        total_rows: int,
        dtype: torch.dtype,
        device: torch.device | str,
        apply: LoRAApplyFn,
        dense: bool = False,
    ) -> None:
        self.total_rows = total_rows
        self.device = torch.device(device)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, list[torch.Tensor]] = {}
        # The dense CPU layout (lora_linear_dense): per kind one [L, out + R*S, in] tensor holding each
        # layer's base weight above its A rows (one matmul computes both), and a block-diagonal B
        # [L, R, S, out] whose per-slice views are what writes and compaction touch.
        self.dense = dense
        self._fused: dict[str, torch.Tensor] = {}
        self._b_block: dict[str, torch.Tensor] = {}
        for kind, (in_f, outs) in kind_shapes(cfg).items():
            slices = len(LORA_LAYER_SLICES[kind])
            n_out = sum(outs)
            if dense:
                fused = torch.zeros(
                    cfg.num_layers, n_out + total_rows * slices, in_f, dtype=dtype, device=device
                )
                self._fused[kind] = fused
                self.a[kind] = fused[:, n_out:].view(cfg.num_layers, total_rows, slices, in_f)
                block = torch.zeros(cfg.num_layers, total_rows, slices, n_out, dtype=dtype, device=device)
                offs = [sum(outs[:s]) for s in range(slices)]
                self._b_block[kind] = block
                self.b[kind] = [block[:, :, s, offs[s] : offs[s] + o] for s, o in enumerate(outs)]
            else:
                self.a[kind] = torch.zeros(
                    cfg.num_layers, total_rows, slices, in_f, dtype=dtype, device=device
                )
                self.b[kind] = [
                    torch.zeros(cfg.num_layers, total_rows, o, dtype=dtype, device=device) for o in outs
                ]
        self.num_layers = cfg.num_layers
        self.apply = apply
        self.row_bytes = row_bytes(cfg, dtype, dense=self.dense)
        self._owners: dict[object, tuple[int, int]] = {}  # key -> (row, rank)
        # Called before compaction moves rows, so that copies still in flight into them land first.
        self.before_compact: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter rows (the base weights that share the dense tensors excluded)."""
        b_tensors = list(self._b_block.values()) or [t for bs in self.b.values() for t in bs]
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *b_tensors])

    def layer_weights(self, layer: int) -> dict[str, LoRALayerWeights]:
        """Views of one layer's rows, handed to that layer's LoRA linears at construction."""
        out = {}
        for kind, a in self.a.items():
            dense = None
            if self.dense:
                block = self._b_block[kind][layer]
                dense = DenseLoRAWeights(self._fused[kind][layer], block.view(-1, block.shape[-1]))
            out[kind] = LoRALayerWeights(a[layer], [t[layer] for t in self.b[kind]], self.apply, dense)
        return out

    @property
    def used_rows(self) -> int:
        return sum(rank for _, rank in self._owners.values())

    @property
    def free_rows(self) -> int:
        return self.total_rows - self.used_rows

    @property
    def num_adapters(self) -> int:
        return len(self._owners)

    def row_of(self, key: object) -> int:
        return self._owners[key][0]

    def __contains__(self, key: object) -> bool:
        return key in self._owners

    def allocate(self, key: object, rank: int) -> int | None:
        """Reserve ``rank`` contiguous rows for ``key``; None if fewer than ``rank`` rows are free.

        Compacts when the free rows are fragmented: only between steps, since the rows of the
        adapters that move are rewritten before the next step's metadata is built.
        """
        if rank > self.free_rows:
            return None
        row = self._first_fit(rank)
        if row is None:
            self._compact()
            row = self._first_fit(rank)
        assert row is not None
        self._owners[key] = (row, rank)
        return row

    def release(self, key: object) -> None:
        """Give ``key``'s rows back. Stale values are left in place: a row is only read through a segment."""
        del self._owners[key]

    def write(self, row: int, packed: PackedAdapter, non_blocking: bool = False) -> None:
        """Copy a packed adapter into rows ``[row, row + packed.rank)`` of every layer and kind."""
        r = packed.rank
        for kind, a in self.a.items():
            a[:, row : row + r].copy_(packed.a[kind], non_blocking=non_blocking)
            for b, pb in zip(self.b[kind], packed.b[kind], strict=True):
                b[:, row : row + r].copy_(pb, non_blocking=non_blocking)

    def _first_fit(self, rank: int) -> int | None:
        cursor = 0
        for row, r in sorted(self._owners.values()):
            if row - cursor >= rank:
                return cursor
            cursor = max(cursor, row + r)
        return cursor if self.total_rows - cursor >= rank else None

    def _compact(self) -> None:
        if self.before_compact is not None:
            self.before_compact()
        cursor = 0
        for key, (row, r) in sorted(self._owners.items(), key=lambda kv: kv[1][0]):
            if row != cursor:
                for a in self.a.values():
                    a[:, cursor : cursor + r] = a[:, row : row + r].clone()
                for bs in self.b.values():
                    for b in bs:
                        b[:, cursor : cursor + r] = b[:, row : row + r].clone()
                self._owners[key] = (cursor, r)
            cursor += r
