"""The adapter store: every registered adapter and the tier it lives in (device pool, host LRU, disk).

Identity is the adapter's *content hash* (weights + config), never its name: an entry object is
created per registration, requests hold a reference to the entry they resolved, and re-registering
a name with changed weights makes a new entry (new hash: new KV prefix seed, new pool rows) while
requests in flight finish on the old one.

Tiers:
* disk: every registered adapter (its directory); read and validated on demand.
* host: packed adapters (pool layout, model dtype; pinned memory on CUDA), LRU bounded by
  ``max_cpu_loras``; pinned adapters are always kept here as well.
* device: rows of the :class:`DeviceLoRAPool`; an adapter is resident while a running request
  uses it, and stays cached afterwards until its rows are needed (LRU among unpinned, unused ones).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.config import LoRAConfig, ModelConfig
from loraserve.lora.adapter import AdapterError, LoRAModelSpec, LoRAWeights, load_adapter
from loraserve.lora.pool import DeviceLoRAPool, PackedAdapter, pack_adapter

logger = logging.getLogger(__name__)


class AdapterNotFound(KeyError):
    """No adapter is registered under this name."""


@dataclass(eq=False)
class AdapterEntry:
    """One registration of an adapter. Compared by identity; ``content_hash`` is its cache identity."""

    name: str
    path: str
    content_hash: str
    rank: int
    nbytes: int
    int_id: int
    pinned: bool = False
    removed: bool = False
    in_flight: int = 0
    requests_served: int = 0
    last_used: float = 0.0
    target_modules: frozenset[str] = field(default_factory=frozenset)

    def tier(self, store: AdapterStore) -> str:
        if self in store.pool:
            return "gpu" if store.pool.device.type == "cuda" else "device"
        if self in store.host:
            return "cpu"
        return "disk"


@dataclass
class StoreStats:
    loads_from_disk: int = 0
    device_loads: int = 0
    device_hits: int = 0
    device_evictions: int = 0
    host_hits: int = 0
    host_evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


class AdapterStore:
    """Registry and tier manager. Single-threaded: the engine calls it between steps."""

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoRAConfig, pool: DeviceLoRAPool, dtype) -> None:
        self.model_cfg = model_cfg
        self.cfg = lora_cfg
        self.pool = pool
        self.dtype = dtype
        self.spec = LoRAModelSpec(
            num_layers=model_cfg.num_layers, shapes=model_cfg.lora_shapes(), base_model_name=model_cfg.name
        )
        self.by_name: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[AdapterEntry, PackedAdapter] = OrderedDict()
        self.device_lru: OrderedDict[AdapterEntry, None] = OrderedDict()
        self.stats = StoreStats()
        self._next_id = 1

    # registration ---------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, pinned: bool = False) -> AdapterEntry:
        """Read and validate the adapter at ``path`` and register it as ``name``.

        Raises :class:`AdapterError` (nothing changes) when the adapter is refused. Registering a
        name again replaces the entry; requests in flight keep the one they resolved.
        """
        weights = self._read(path, name)
        entry = AdapterEntry(
            name=name, path=weights.path, content_hash=weights.content_hash, rank=weights.rank,
            nbytes=weights.nbytes, int_id=self._next_id, pinned=pinned, target_modules=weights.target_modules,
        )
        self._next_id += 1
        old = self.by_name.get(name)
        if old is not None:
            self._retire(old)
        self.by_name[name] = entry
        self._put_host(entry, pack_adapter(weights, self.model_cfg, self.dtype))
        logger.info("registered adapter %s (rank %d, %.1f MB) from %s", name, entry.rank, entry.nbytes / 1e6, path)
        return entry

    def remove(self, name: str) -> None:
        """Unregister ``name``; requests in flight finish first, then its memory is freed."""
        entry = self.get(name)
        del self.by_name[name]
        self._retire(entry)

    def get(self, name: str) -> AdapterEntry:
        try:
            return self.by_name[name]
        except KeyError:
            raise AdapterNotFound(name) from None

    def list(self) -> list[AdapterEntry]:
        return list(self.by_name.values())

    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        """Pin (load onto the device and never evict) or unpin an adapter."""
        entry = self.get(name)
        if pinned and entry not in self.pool:
            self._load_to_device(entry)
        entry.pinned = pinned
        return entry

    # residency ------------------------------------------------------------------------------
    def can_make_resident(self, entries: set[AdapterEntry]) -> bool:
        """Whether all of ``entries`` can be on the device at once next to every in-use adapter."""
        need = sum(e.rank for e in entries if e not in self.pool)
        return need <= self.pool.free_rows + self._evictable_rows(exclude=entries)

    def acquire(self, entry: AdapterEntry) -> int:
        """Make ``entry`` resident (loading/evicting as needed), take a reference, return its pool row."""
        if entry not in self.pool:
            self._load_to_device(entry)
        else:
            self.stats.device_hits += 1
        self.device_lru.move_to_end(entry)
        entry.in_flight += 1
        entry.requests_served += 1
        entry.last_used = time.time()
        return self.pool.row_of(entry)

    def release(self, entry: AdapterEntry) -> None:
        """Drop a request's reference; a removed entry is freed once nothing uses it."""
        entry.in_flight -= 1
        if entry.removed and entry.in_flight == 0:
            self._drop_device(entry)
            self.host.pop(entry, None)

    def row(self, entry: AdapterEntry) -> int:
        return self.pool.row_of(entry)

    # internals ------------------------------------------------------------------------------
    def _read(self, path: str | Path, name: str) -> LoRAWeights:
        return load_adapter(path, self.spec, self.cfg.max_lora_rank, name=name)

    def _retire(self, entry: AdapterEntry) -> None:
        entry.removed = True
        if entry.in_flight == 0:
            self._drop_device(entry)
            self.host.pop(entry, None)

    def _put_host(self, entry: AdapterEntry, packed: PackedAdapter) -> None:
        if self.pool.device.type == "cuda":
            packed = packed.pin_memory()
        self.host[entry] = packed
        self.host.move_to_end(entry)
        self._trim_host()

    def _trim_host(self) -> None:
        for victim in list(self.host):
            if len(self.host) <= self.cfg.max_cpu_loras:
                break
            if victim.pinned:
                continue
            del self.host[victim]
            self.stats.host_evictions += 1

    def _packed(self, entry: AdapterEntry) -> PackedAdapter:
        packed = self.host.get(entry)
        if packed is not None:
            self.stats.host_hits += 1
            self.host.move_to_end(entry)
            return packed
        weights = self._read(entry.path, entry.name)
        if weights.content_hash != entry.content_hash:
            raise AdapterError(
                f"adapter {entry.name!r}: the files at {entry.path} changed since registration "
                "(content hash differs); register it again to serve the new weights"
            )
        self.stats.loads_from_disk += 1
        packed = pack_adapter(weights, self.model_cfg, self.dtype)
        self._put_host(entry, packed)
        return packed

    def _evictable_rows(self, exclude: set[AdapterEntry]) -> int:
        return sum(e.rank for e in self.device_lru if e.in_flight == 0 and not e.pinned and e not in exclude)

    def _load_to_device(self, entry: AdapterEntry) -> None:
        start = time.perf_counter()
        packed = self._packed(entry)
        row = self.pool.allocate(entry, entry.rank)
        while row is None:
            victim = next(
                (e for e in self.device_lru if e.in_flight == 0 and not e.pinned and e is not entry), None
            )
            if victim is None:
                raise RuntimeError(
                    f"no room on the device for adapter {entry.name!r} (rank {entry.rank}): "
                    "every resident adapter is pinned or in use"
                )
            self._drop_device(victim)
            self.stats.device_evictions += 1
            row = self.pool.allocate(entry, entry.rank)
        self.device_lru[entry] = None
        self.pool.write(row, packed, non_blocking=True)
        self.stats.device_loads += 1
        self.stats.load_seconds.append(time.perf_counter() - start)

    def _drop_device(self, entry: AdapterEntry) -> None:
        if entry in self.pool:
            self.pool.release(entry)
        self.device_lru.pop(entry, None)
