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

import contextlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from loraserve.config import EngineConfig, ModelConfig
from loraserve.lora.adapter import (
    LoRAWeights,
    StoredAdapter,
    all_finite,
    in_io_threads,
    nonfinite_error,
)
from loraserve.model.layers import DenseLoRAWeights, LoRALayerWeights
from loraserve.model.llama import LORA_LAYER_SLICES
from loraserve.ops.lora import DENSE_MAX_ROWS, DensePack, LoRAApplyFn, onednn_packing_available


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

    @classmethod
    def allocate(
        cls, rank: int, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, pin: bool = False
    ) -> PackedAdapter:
        """Uninitialised tensors for a rank-``rank`` adapter, all views of one buffer.

        One allocation instead of one per tensor: with ``pin`` (host memory, CUDA present) it comes
        from torch's caching host allocator, so the pinned block of an evicted adapter is reused.
        """
        shapes = {
            kind: ([cfg.num_layers, rank, len(outs), in_f], [[cfg.num_layers, rank, o] for o in outs])
            for kind, (in_f, outs) in kind_shapes(cfg).items()
        }
        sizes = [math.prod(s) for a, bs in shapes.values() for s in [a, *bs]]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device, pin_memory=pin)
        views = iter(torch.split(flat, sizes))
        a: dict[str, torch.Tensor] = {}
        b: dict[str, list[torch.Tensor]] = {}
        for kind, (a_shape, b_shapes) in shapes.items():  # the order of ``sizes``
            a[kind] = next(views).view(a_shape)
            b[kind] = [next(views).view(s) for s in b_shapes]
        return cls(rank, a, b)

    def empty_like(self, device: torch.device | str, pin: bool = False) -> PackedAdapter:
        """Uninitialised tensors of the same shapes and dtype on ``device``, views of one buffer."""
        tensors = self.tensors()
        flat = torch.empty(
            sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=device, pin_memory=pin
        )
        views = iter(torch.split(flat, [t.numel() for t in tensors]))
        a: dict[str, torch.Tensor] = {}
        b: dict[str, list[torch.Tensor]] = {}
        for kind, a_kind in self.a.items():  # the order of ``tensors()``
            a[kind] = next(views).view(a_kind.shape)
            b[kind] = [next(views).view(b_s.shape) for b_s in self.b[kind]]
        return PackedAdapter(self.rank, a, b)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor: each kind's A, then its B slices."""
        return [t for kind, a in self.a.items() for t in (a, *self.b[kind])]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


# Where each projection goes: ``module -> (kind, slice)``.
_SLOTS: dict[str, tuple[str, int]] = {
    m: (kind, s) for kind, mods in LORA_LAYER_SLICES.items() for s, m in enumerate(mods)
}


def _operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as packing computes with it: float32 unless it already has the serving ``dtype``.

    So the result is what float32 weights would give -- float32 scaling, one rounding into
    ``dtype`` -- whatever dtype the file stores (a direct float64 -> bfloat16 cast, or a
    bfloat16 product written into float32, would round differently).
    """
    return t if t.dtype == dtype else t.float()


# Integer types of each element size: numpy has no bfloat16, but moving bytes needs no float type.
_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t``'s elements as same-size integers, for copies that only move bytes."""
    return t.detach().view(_RAW_DTYPES[t.element_size()]).numpy()


def _zero_unused_rows(packed: PackedAdapter, modules: Mapping[tuple[int, str], Any], num_layers: int) -> None:
    """Zero the kinds whose rows the modules do not all fill (untargeted modules, lower ranks)."""
    full_rank = {loc for loc, w in modules.items() if w.a.shape[0] == packed.rank}
    for kind, mods in LORA_LAYER_SLICES.items():
        if any((layer, m) not in full_rank for layer in range(num_layers) for m in mods):
            for t in (packed.a[kind], *packed.b[kind]):
                t.zero_()


def _move_bytes(staging: PackedAdapter, modules: Mapping[tuple[int, str], Any]) -> None:
    """Copy each module's A, and its B transposed, into its rows of ``staging`` (same dtype, host).

    Numpy copies on the shared I/O threads: one torch kernel per module would enter torch's
    intra-op thread pool hundreds of times, each a fork/join of every core, which stalls badly
    while other threads (hashing, the engine) hold cores.
    """
    a_raw = {kind: _raw(a) for kind, a in staging.a.items()}
    b_raw = {kind: [_raw(b) for b in bs] for kind, bs in staging.b.items()}

    def move(run: Sequence[tuple[tuple[int, str], Any]]) -> None:
        for (layer, module), w in run:
            kind, s = _SLOTS[module]
            rank = w.a.shape[0]
            np.copyto(a_raw[kind][layer, :rank, s], _raw(w.a))
            np.copyto(b_raw[kind][s][layer, :rank], _raw(w.b).T)

    items = list(modules.items())
    for run in in_io_threads(move, items, [w.a.nbytes + w.b.nbytes for _, w in items]):
        run.result()


def _convert_and_scale(
    packed: PackedAdapter,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, Sequence[torch.Tensor]],
    modules: Mapping[tuple[int, str], Any],
    num_layers: int,
) -> None:
    """``packed``'s A from ``a`` and its B from ``b`` times each module's scale, in ``packed``'s dtype
    (``a``/``b`` in pool layout, any dtype; ``a`` may be ``packed.a`` itself): a few large ops."""
    dtype = packed.a[next(iter(packed.a))].dtype
    for kind, mods in LORA_LAYER_SLICES.items():
        if a[kind] is not packed.a[kind]:
            packed.a[kind].copy_(_operand(a[kind], dtype))
        for s, module in enumerate(mods):
            # Scales differ between layers only with rank/alpha patterns: one op per run of layers
            # sharing one (zero rows of absent modules take any scale).
            scales = [
                modules[(layer, module)].scale if (layer, module) in modules else 1.0
                for layer in range(num_layers)
            ]
            start = 0
            for scale, run in itertools.groupby(scales):
                end = start + len(list(run))
                torch.mul(_operand(b[kind][s][start:end], dtype), scale, out=packed.b[kind][s][start:end])
                start = end


def _check_finite(packed: PackedAdapter, weights: LoRAWeights | StoredAdapter) -> None:
    """Raise :class:`AdapterError` naming the first tensor whose packed values are not finite."""
    if _all_finite(packed.tensors()):
        return
    dtype = packed.a[next(iter(packed.a))].dtype
    for (layer, module), w in weights.modules.items():
        kind, s = _SLOTS[module]
        rank = w.a.shape[0]
        if not all_finite(packed.a[kind][layer, :rank, s]):
            raise nonfinite_error(weights.where, weights.tensor_name((layer, module), "A"), dtype)
        if not all_finite(packed.b[kind][s][layer, :rank]):
            raise nonfinite_error(weights.where, weights.tensor_name((layer, module), "B"), dtype, w.scale)


def pack_adapter(
    weights: LoRAWeights | StoredAdapter, cfg: ModelConfig, dtype: torch.dtype, pin: bool = False
) -> PackedAdapter:
    """Lay an adapter out in pool rows in ``dtype``, folding each module's scale into its B.

    Straight from the weights as given (a :class:`StoredAdapter`'s file dtype, or float32), with
    float32 arithmetic (see :func:`_operand`). Modules the adapter does not target, and rows past
    a module's own rank (``rank_pattern``), are zero. Packed where the weights are (a caller
    holding them on a GPU packs at device speed); the result always lives on the host, the tier it
    is cached in, in pinned memory with ``pin``.

    Raises :class:`AdapterError` naming the tensor when a packed value is not finite: NaN or Inf
    in the weights, or a value that overflows ``dtype`` (once scaled, for B). Checked on the
    packed tensors, so nothing non-finite can reach the device.
    """
    r = weights.rank
    modules = weights.modules
    where = next(iter(modules.values())).a.device if modules else torch.device("cpu")
    packed = PackedAdapter.allocate(r, cfg, dtype, where, pin=pin and where.type == "cpu")
    src_dtypes = {t.dtype for w in modules.values() for t in (w.a, w.b)}
    if where.type == "cpu" and len(src_dtypes) == 1:
        # Host weights of one dtype: bytes moved into place in that dtype, then converted and
        # scaled by a few large torch ops (in place when it is already the serving dtype). A
        # staging copy is pinned along with the result, only so that the caching host allocator
        # recycles it (fresh memory costs a page fault per 4 KiB).
        (src_dtype,) = src_dtypes
        staging = packed if src_dtype == dtype else PackedAdapter.allocate(r, cfg, src_dtype, "cpu", pin)
        _zero_unused_rows(staging, modules, cfg.num_layers)
        _move_bytes(staging, modules)
        _convert_and_scale(packed, staging.a, staging.b, modules, cfg.num_layers)
    else:
        # On a GPU (kernels are cheap there), or with mixed dtypes: one torch op per tensor.
        _zero_unused_rows(packed, modules, cfg.num_layers)
        for (layer, module), w in modules.items():
            kind, s = _SLOTS[module]
            rank = w.a.shape[0]
            packed.a[kind][layer, :rank, s].copy_(_operand(w.a, dtype))
            torch.mul(_operand(w.b, dtype).T, w.scale, out=packed.b[kind][s][layer, :rank])
    _check_finite(packed, weights)
    return _to_host(packed, pin)


def pack_adapter_on_device(
    stored: StoredAdapter, cfg: ModelConfig, dtype: torch.dtype, stream: torch.cuda.Stream | None
) -> PackedAdapter:
    """:func:`pack_adapter` done on ``stream``'s GPU: the read buffer up in one copy, the layout
    gathered, converted, scaled and checked there by a few large ops, the packed adapter back into
    pinned host memory in one copy.

    At 7B size (80 MB) the host path costs ~24 ms of CPU on the H200's host, mostly byte moves,
    on the I/O threads that hashing needs meanwhile; a loop of per-module torch ops instead holds
    the GIL so long that the hashing threads (which take it back after every tensor) stall. Here
    each module type is one gather over all layers (an index of ``L x`` its elements, transient).
    Transient device memory: three to four times the adapter (the upload, the layout before
    and after conversion, one gather's int64 index), on ``stream``, whose
    caching-allocator blocks the next read reuses; only ``stream`` is waited for, never the
    engine's. Same values as :func:`pack_adapter` (same float32-opmath rounding into ``dtype``).

    ``stream`` None runs the same steps on the CPU (for tests). Adapters outside the common shape
    -- tensors of mixed dtypes, a misaligned tensor (copied apart from the read buffer), or a
    module type not on every layer at the adapter's rank (``rank_pattern``,
    ``layers_to_transform``) -- take :func:`pack_adapter`.
    """
    cuda = stream is not None
    modules = stored.modules
    r, num_layers = stored.rank, cfg.num_layers
    tensors = [t for w in modules.values() for t in (w.a, w.b)]
    src_dtype = tensors[0].dtype
    storage = tensors[0].untyped_storage()
    per_type: dict[str, list[Any]] = {}
    for module in _SLOTS:
        ws = [modules.get((layer, module)) for layer in range(num_layers)]
        if any(w is not None for w in ws):
            per_type[module] = ws
    if (
        any(t.dtype != src_dtype or t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors)
        or storage.nbytes() % src_dtype.itemsize
        or any(w is None or w.a.shape[0] != r for ws in per_type.values() for w in ws)
    ):
        return pack_adapter(stored, cfg, dtype, pin=cuda)
    offsets = torch.tensor(
        [[w.a.storage_offset(), w.b.storage_offset()] for ws in per_type.values() for w in ws]
    )
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        device = stream.device if cuda else torch.device("cpu")
        flat = torch.empty(0, dtype=torch.uint8).set_(storage).to(device, non_blocking=cuda).view(src_dtype)
        offsets = offsets.view(len(per_type), num_layers, 2).to(device, non_blocking=cuda)
        shapes = kind_shapes(cfg)
        a_src = {
            kind: torch.zeros(num_layers, r, len(outs), in_f, dtype=src_dtype, device=device)
            for kind, (in_f, outs) in shapes.items()
        }
        b_src = {
            kind: [torch.zeros(num_layers, r, out, dtype=src_dtype, device=device) for out in outs]
            for kind, (_, outs) in shapes.items()
        }
        for i, module in enumerate(per_type):
            kind, s = _SLOTS[module]
            in_f, out = shapes[kind][0], shapes[kind][1][s]
            # Element j of layer l's tensor is flat[offset[l] + j]: one gather per module type.
            a = flat[offsets[i, :, :1] + torch.arange(r * in_f, device=device)]
            a_src[kind][:, :, s] = a.view(num_layers, r, in_f)
            b = flat[offsets[i, :, 1:] + torch.arange(out * r, device=device)]
            b_src[kind][s] = b.view(num_layers, out, r).transpose(1, 2)
        packed = PackedAdapter.allocate(r, cfg, dtype, device)
        _convert_and_scale(packed, a_src, b_src, modules, num_layers)
        _check_finite(packed, stored)
        return _to_host(packed, pin=cuda)


def _to_host(packed: PackedAdapter, pin: bool) -> PackedAdapter:
    """``packed`` itself if on the host, else a host copy (pinned with ``pin``), made in one copy and
    waited for on the current stream only."""
    where = packed.a[next(iter(packed.a))].device
    if where.type == "cpu":
        return packed
    host = packed.empty_like("cpu", pin=pin)
    _whole_buffer(host).copy_(_whole_buffer(packed), non_blocking=pin)
    if pin:
        torch.cuda.current_stream(where).synchronize()
    return host


def _whole_buffer(packed: PackedAdapter) -> torch.Tensor:
    """The one buffer all of ``packed``'s tensors view (see :meth:`PackedAdapter.allocate`), as bytes."""
    first = next(iter(packed.a.values()))
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(first.untyped_storage())


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: on a GPU with one synchronisation in all."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors or tensors[0].device.type == "cpu":
        return all(all_finite(t) for t in tensors)
    extremes = torch.stack([v for t in tensors for v in torch.aminmax(t)])
    return bool(torch.isfinite(extremes).all())


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

    @property
    def slices_per_forward(self) -> int:
        """Output slices of all LoRA layers of the model: one forward's ``t`` tensors hold this many
        ``[T, max_rank]`` planes (see ``LoRASegments.zeroed_t``)."""
        return sum(a.shape[0] * a.shape[2] for a in self.a.values())

    def layer_weights(self, layer: int) -> dict[str, LoRALayerWeights]:
        """Views of one layer's rows, handed to that layer's LoRA linears at construction."""
        out = {}
        for kind, a in self.a.items():
            dense = None
            if self.dense:
                block = self._b_block[kind][layer]
                fused = self._fused[kind][layer]
                # CPU GEMMs on prepacked weights stream them ~2x faster (see ops.lora.PackedLinear).
                pack = None
                if not fused.is_inference() and onednn_packing_available(fused.dtype):
                    pack = DensePack(rows_in_use=self._rows_in_use)
                dense = DenseLoRAWeights(fused, block.view(-1, block.shape[-1]), pack)
            out[kind] = LoRALayerWeights(a[layer], [t[layer] for t in self.b[kind]], self.apply, dense)
        return out

    def _rows_in_use(self) -> int:
        """One past the highest allocated row: how many rows the dense layout's packed copies cover."""
        return max((row + rank for row, rank in self._owners.values()), default=0)

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
