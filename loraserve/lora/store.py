"""The adapter store: every registered adapter and the tier it lives in (device pool, host LRU, disk).

Identity is the adapter's *content hash* (weights + config), never its name: an entry object is
created per registration, requests hold a reference to the entry they resolved, and re-registering
a name with changed weights makes a new entry (new hash: new KV prefix seed, new pool rows, new
host copy) while requests in flight finish on the old one. Every cache here (host LRU, device
pool, reads in flight) is keyed by the entry object, and a re-read whose hash differs from the
entry's is refused, so no tier can serve weights other than the ones the entry's hash names.

Tiers:
* disk: every registered adapter (its directory). Registration reads and validates it (or, with
  ``lazy=True``, only its config and tensor header; the first full read then fixes the hash).
* host: packed adapters (pool layout, model dtype; pinned memory on CUDA), LRU bounded by
  ``max_cpu_loras`` adapters *and* ``max_cpu_lora_bytes`` bytes.
* device: rows of the :class:`DeviceLoRAPool` (bounded by its rows, i.e. bytes: an adapter takes
  ``rank`` rows). An adapter is resident while a running request uses it and stays cached after.

Moves between tiers never stall a step: disk -> host reads (parse, validate, hash, pack, pin) run
on :class:`HostLoader` threads and are collected by :meth:`AdapterStore.poll`; host -> device
copies are ``non_blocking`` on a side CUDA stream with an event, and :meth:`AdapterStore.prepare_step`
makes the compute stream wait (on the GPU, not the host) only for the adapters the step uses.

Eviction (both tiers) follows the queue: the scheduler tells the store, with
:meth:`AdapterStore.set_demand`, which adapters queued requests need and in which order; a victim
is never an adapter needed sooner than the one being loaded (Belady's rule with the queue as the
future), never pinned, never in use; ties go to the least recently used.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loraserve.config import LoRAConfig, ModelConfig
from loraserve.lora.adapter import (
    CONFIG_NAME,
    LORA_MODULES,
    SAFETENSORS_NAME,
    AdapterError,
    LoRAModelSpec,
    LoRAWeights,
    read_adapter,
)
from loraserve.lora.pool import DeviceLoRAPool, PackedAdapter, pack_adapter, pack_adapter_on_device, row_bytes
from loraserve.lora.prefetch import HostLoader, ReadResult
from loraserve.lora.resolver import DirectoryResolver

logger = logging.getLogger(__name__)

NOT_NEEDED = sys.maxsize
"""Queue position of an adapter no queued request needs (it is evicted first)."""


class AdapterNotFound(KeyError):
    """No adapter is registered under this name."""


class AdapterBusy(RuntimeError):
    """A tier move was refused: the adapter is pinned or in use, or the tier has no room."""


@dataclass(eq=False)
class AdapterEntry:
    """One registration of an adapter. Compared by identity; ``content_hash`` is its cache identity.

    ``content_hash`` is None only for a lazily registered adapter not read yet (no request can run
    on it before it is read). ``nbytes`` counts its float32 weights; ``packed_nbytes`` what it takes
    on the host and device tiers (``rank`` pool rows in the model dtype).
    """

    name: str
    path: str
    content_hash: str | None
    rank: int
    nbytes: int
    int_id: int
    packed_nbytes: int = 0
    pinned: bool = False
    removed: bool = False
    in_flight: int = 0
    requests_served: int = 0
    last_used: float = 0.0
    target_modules: frozenset[str] = field(default_factory=frozenset)
    # Per-adapter counters (see StoreStats for the meaning of hits and misses).
    hits: int = 0
    misses: int = 0
    device_loads: int = 0
    disk_reads: int = 0
    device_evictions: int = 0
    host_evictions: int = 0
    # Loaded onto the device and not used since: its next admission counts as a device miss.
    fresh: bool = False
    # The host copy came from a disk read that no device load has used yet (a host miss).
    from_disk: bool = False
    # When a queued request first needed it off the device (for the load-latency histogram).
    wanted_since: float | None = None
    # Registered from tensors (no directory to re-read): its host copy is never dropped.
    memory_only: bool = False

    def tier(self, store: AdapterStore) -> str:
        """The fastest tier holding it: ``"gpu"`` (``"device"`` off CUDA), ``"cpu"`` or ``"disk"``."""
        if self in store.pool:
            return store.device_tier
        if self in store.host:
            return "cpu"
        return "disk"


@dataclass
class StoreStats:
    """Counters since start.

    A *device hit* is an admission whose adapter was already on the device from an earlier use; a
    *device miss* the first admission after a device load. A *host hit* is a device load served
    by a host copy that was already cached; a *host miss* one that needed a disk read first
    (prefetched or not). ``load_seconds``: per device load, the time from when a queued request
    first needed the adapter to when its copy was issued (disk read included); ``read_seconds``: per
    disk read, the time the read itself took on its worker thread (no queueing).
    """

    loads_from_disk: int = 0
    device_loads: int = 0
    device_hits: int = 0
    device_misses: int = 0
    device_evictions: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    load_errors: int = 0
    load_seconds: list[float] = field(default_factory=list)
    read_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Probe:
    path: str
    rank: int
    nbytes: int
    target_modules: frozenset[str]


def _probe(path: str | Path, name: str, max_rank: int) -> _Probe | None:
    """Read only ``adapter_config.json`` and the safetensors header: enough to size the adapter.

    Returns None for a legacy ``.bin`` adapter (no header to read without loading it all).
    """
    resolved = Path(path).expanduser().resolve()
    where = f"adapter {name!r} ({resolved})"
    if not resolved.is_dir():
        raise AdapterError(
            f"{where}: the adapter path {'is not a directory' if resolved.exists() else 'does not exist'}"
        )
    try:
        raw = json.loads((resolved / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{where}: missing {CONFIG_NAME}; not a PEFT adapter directory") from None
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterError(f"{where}: cannot parse {CONFIG_NAME}: {e}") from e
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: not a LoRA adapter (peft_type must be 'LORA')")
    st = resolved / SAFETENSORS_NAME
    if not st.is_file():
        return None
    rank, numel, modules = 0, 0, set()
    try:
        with safe_open(str(st), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = f.get_slice(key).get_shape()
                numel += int(torch.Size(shape).numel())
                if ".lora_A" in key and shape:
                    rank = max(rank, int(shape[0]))
                    modules.update(m for m in LORA_MODULES if f".{m}.lora_A" in key)
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise AdapterError(f"{where}: cannot read the header of {SAFETENSORS_NAME}: {e}") from e
    if rank == 0:
        raise AdapterError(f"{where}: the weights file holds no LoRA tensors (lora_A/lora_B)")
    if rank > max_rank:
        raise AdapterError(
            f"{where}: rank {rank} exceeds max_lora_rank={max_rank}; start the engine with a larger max_lora_rank"
        )
    return _Probe(str(resolved), rank, numel * 4, frozenset(modules))


class AdapterStore:
    """Registry and tier manager. Its methods run on the engine thread; only reads run elsewhere."""

    def __init__(
        self, model_cfg: ModelConfig, lora_cfg: LoRAConfig, pool: DeviceLoRAPool, dtype: torch.dtype
    ) -> None:
        self.model_cfg = model_cfg
        self.cfg = lora_cfg
        self.pool = pool
        self.dtype = dtype
        self.spec = LoRAModelSpec(
            num_layers=model_cfg.num_layers, shapes=model_cfg.lora_shapes(), base_model_name=model_cfg.name
        )
        self.by_name: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[AdapterEntry, PackedAdapter] = OrderedDict()  # LRU: oldest first
        self.host_bytes = 0
        self.device_lru: OrderedDict[AdapterEntry, None] = OrderedDict()
        self.stats = StoreStats()
        self.resolver = DirectoryResolver(lora_cfg.lora_resolver_dirs)
        self.loader: HostLoader[AdapterEntry] = HostLoader(self._read_packed, lora_cfg.prefetch_workers)
        self.cuda = pool.device.type == "cuda"
        self.device_tier = "gpu" if self.cuda else "device"
        self._copy_stream = torch.cuda.Stream(pool.device) if self.cuda else None
        # Reads pack on the GPU (pool.pack_adapter_on_device), all on one stream so that its
        # transient buffers are reused from read to read.
        self._pack_stream = torch.cuda.Stream(pool.device) if self.cuda else None
        self._copies: dict[AdapterEntry, tuple[torch.cuda.Event, PackedAdapter]] = {}
        pool.before_compact = self._order_after_copies
        self._next_use: dict[AdapterEntry, int] = {}
        self._failed: dict[AdapterEntry, Exception] = {}
        self._next_id = 1

    # registration ---------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, pinned: bool = False, lazy: bool = False) -> AdapterEntry:
        """Validate the adapter at ``path`` and register it as ``name``.

        Raises :class:`AdapterError` (nothing changes) when the adapter is refused. Registering a
        name again replaces the entry; requests in flight keep the one they resolved. ``lazy``
        reads only the config and the tensor header now (cheap, for thousands of adapters or a
        first request); the weights are read, fully validated and hashed by the prefetch threads
        before any request runs on them, and a refusal then fails that adapter's requests.
        """
        probe = _probe(path, name, self.cfg.max_lora_rank) if lazy else None
        packed: PackedAdapter | None = None
        if probe is not None:
            entry = AdapterEntry(
                name=name,
                path=probe.path,
                content_hash=None,
                rank=probe.rank,
                nbytes=probe.nbytes,
                int_id=self._next_id,
                packed_nbytes=probe.rank * row_bytes(self.model_cfg, self.dtype),
                target_modules=probe.target_modules,
            )
        else:
            res = self._read_packed(str(path), name)
            packed = res.packed
            entry = AdapterEntry(
                name=name,
                path=str(Path(path).expanduser().resolve()),
                content_hash=res.content_hash,
                rank=res.rank,
                nbytes=res.nbytes,
                int_id=self._next_id,
                packed_nbytes=packed.nbytes,
                target_modules=res.target_modules,
            )
        limit = self.cfg.max_cpu_lora_bytes
        if limit is not None and entry.packed_nbytes > limit:
            raise AdapterError(
                f"adapter {name!r}: needs {entry.packed_nbytes} bytes on the host tier, more than "
                f"max_cpu_lora_bytes={limit}"
            )
        self._install(entry)
        if packed is not None:
            self._put_host(entry, packed, NOT_NEEDED)
        logger.info(
            "registered adapter %s (rank %d, %.1f MB packed%s) from %s",
            name,
            entry.rank,
            entry.packed_nbytes / 1e6,
            ", lazy" if entry.content_hash is None else "",
            path,
        )
        if pinned:
            try:
                self.set_pinned(name, True)
            except BaseException:
                self.remove(name)
                raise
        return entry

    def register_weights(self, name: str, weights: LoRAWeights, pinned: bool = False) -> AdapterEntry:
        """Register an adapter given as tensors (built in memory, not read from a PEFT directory).

        ``weights`` must already be valid for this model (as :func:`load_adapter` returns them);
        its ``content_hash`` is its identity. Its host copy is kept for as long as it is registered,
        since there is no file to read it back from.
        """
        if weights.rank > self.cfg.max_lora_rank:
            raise AdapterError(
                f"adapter {name!r}: rank {weights.rank} exceeds max_lora_rank={self.cfg.max_lora_rank}"
            )
        packed = pack_adapter(weights, self.model_cfg, self.dtype, pin=self.cuda)
        entry = AdapterEntry(
            name=name,
            path=weights.path,
            content_hash=weights.content_hash,
            rank=weights.rank,
            nbytes=weights.nbytes,
            int_id=self._next_id,
            packed_nbytes=packed.nbytes,
            target_modules=weights.target_modules,
            memory_only=True,
        )
        self._install(entry)
        self.host[entry] = packed
        self.host_bytes += packed.nbytes
        if pinned:
            self.set_pinned(name, True)
        return entry

    def _install(self, entry: AdapterEntry) -> None:
        """Make ``entry`` the registration of its name (the previous one retires once unused)."""
        self._next_id += 1
        old = self.by_name.get(entry.name)
        if old is not None:
            self._retire(old)
        self.by_name[entry.name] = entry

    def resolve(self, name: str) -> AdapterEntry | None:
        """Register ``name`` lazily from the resolver directories if one has it (None otherwise)."""
        if name in self.by_name:
            return self.by_name[name]
        found = self.resolver.find(name) if self.resolver else None
        if found is None:
            return None
        logger.info("resolved adapter %r to %s", name, found)
        return self.register(name, found, lazy=True)

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

    # explicit control -----------------------------------------------------------------------
    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        """Pin (load onto the device now and never evict) or unpin an adapter.

        Pins must leave ``max_lora_rank`` unpinned rows, or some adapter could never be served.
        Raises :class:`AdapterBusy` (a RuntimeError) when that rule or a full device refuses it.
        """
        entry = self.get(name)
        if pinned and not entry.pinned:
            pinned_rows = sum(e.rank for e in self.device_lru if e.pinned)
            if pinned_rows + entry.rank > self.pool.total_rows - self.cfg.max_lora_rank:
                raise AdapterBusy(
                    f"cannot pin adapter {name!r} (rank {entry.rank}): pinned adapters would hold "
                    f"{pinned_rows + entry.rank} of {self.pool.total_rows} rank rows, leaving fewer than "
                    f"max_lora_rank={self.cfg.max_lora_rank} for the others"
                )
            self._ensure_device(entry, priority=-1)
        entry.pinned = pinned
        return entry

    def preload(self, name: str, tier: str = "gpu") -> AdapterEntry:
        """Load ``name`` into ``tier`` ("gpu"/"device" or "cpu") now, synchronously.

        It evicts only adapters that no queued request needs; raises :class:`AdapterBusy` if the
        tier has no such room, AdapterError if the files no longer load.
        """
        entry = self.get(name)
        kind = self._tier_kind(tier)
        if kind == "device":
            self._ensure_device(entry, priority=NOT_NEEDED)
        elif entry not in self.host:
            packed = self._read_now(entry)
            if not self._put_host(entry, packed, NOT_NEEDED):
                raise AdapterBusy(
                    f"no room on the host tier for adapter {name!r}: queued requests need every slot"
                )
        else:
            self.host.move_to_end(entry)
        return entry

    def evict(self, name: str, tier: str = "gpu") -> AdapterEntry:
        """Drop ``name`` from ``tier``: "gpu"/"device" removes it from the device (a host copy, if any,
        stays); "cpu" from the host and the device (it is then on disk only).

        Raises :class:`AdapterBusy` if it is pinned or used by a running request.
        """
        entry = self.get(name)
        kind = self._tier_kind(tier)
        if entry in self.pool:
            if entry.pinned:
                raise AdapterBusy(f"adapter {name!r} is pinned; unpin it before evicting it")
            if entry.in_flight:
                raise AdapterBusy(f"adapter {name!r} is in use by {entry.in_flight} running request(s)")
            self._drop_device(entry)
            self._count_device_eviction(entry)
        if kind == "cpu" and entry in self.host:
            self._drop_host(entry)
            self._count_host_eviction(entry)
        return entry

    # residency (scheduler side) -------------------------------------------------------------
    def is_ready(self, entry: AdapterEntry) -> bool:
        """Whether a request on ``entry`` can run this step (its rows are allocated and written, or
        being written by a copy that :meth:`prepare_step` orders before the forward)."""
        return entry in self.pool

    def make_resident(self, entry: AdapterEntry, priority: int) -> bool:
        """Try to put ``entry`` on the device now, from its host copy; False if it is not on the host
        or no rows can be had without evicting an adapter needed at or before ``priority``."""
        if entry in self.pool:
            return True
        if entry in self._failed or entry not in self.host:
            return False
        return self._start_device_load(entry, self.host[entry], priority)

    def set_demand(self, order: Iterable[AdapterEntry]) -> None:
        """The distinct adapters queued requests need, most urgent first (eviction follows it)."""
        self._next_use = {}
        now = time.monotonic()
        for entry in order:
            if entry in self._next_use:
                continue
            self._next_use[entry] = len(self._next_use)
            if entry.wanted_since is None and entry not in self.pool:
                entry.wanted_since = now

    def prefetch(self, device_upto: int = NOT_NEEDED) -> None:
        """Move the demanded adapters up a tier, in demand order.

        Disk -> host: reads are started while the loader has capacity and the host tier has room
        that no more urgent adapter needs. Host -> device: copies are started for adapters at demand
        positions up to ``device_upto`` (the scheduler narrows it while a request holds a
        reservation) when rows can be had from free rows or adapters needed later.
        """
        loader = self.loader
        reading_count = loader.num_in_flight
        reading_bytes = sum(e.packed_nbytes for e in self._next_use if loader.is_reading(e))
        host_full = False
        for entry, pos in self._next_use.items():
            if entry in self.pool or entry in self._failed:
                continue
            if entry in self.host:
                if pos <= device_upto:
                    self._start_device_load(entry, self.host[entry], pos)
                continue
            if host_full or loader.is_reading(entry) or loader.num_in_flight >= loader.max_in_flight:
                continue
            if self._host_victims(entry.packed_nbytes, pos, reading_count, reading_bytes) is None:
                # Everything cached is needed sooner: later adapters would not fit either.
                host_full = True
                continue
            loader.submit(entry, entry.path, entry.name)
            if loader.workers == 0:
                self.poll()  # the read already ran: cache it before sizing the next one
                if entry in self.host and pos <= device_upto:
                    self._start_device_load(entry, self.host[entry], pos)
            else:
                reading_count += 1
                reading_bytes += entry.packed_nbytes

    def poll(self) -> None:
        """Collect finished disk reads into the host tier and retire completed device copies."""
        for entry, res in self.loader.harvest():
            self._on_read(entry, res)
        for entry, (event, _) in list(self._copies.items()):
            if event.query():
                del self._copies[entry]

    def wait_for_progress(self, timeout: float) -> None:
        """Block until a disk read finishes (or ``timeout``): for steps that have nothing to run."""
        self.loader.wait_any(timeout)
        self.poll()

    @property
    def num_loading(self) -> int:
        """Disk reads and device copies in flight."""
        return self.loader.num_in_flight + len(self._copies)

    def take_error(self, entries: Iterable[AdapterEntry]) -> Exception | None:
        """The load error of the first of ``entries`` (queued adapters) whose read failed, cleared so
        that a later request retries the read; errors of adapters nobody waits for are dropped."""
        if not self._failed:
            return None
        wanted = set(entries)
        for entry in list(self._failed):
            exc = self._failed.pop(entry)
            if entry in wanted:
                return exc
        return None

    def prepare_step(self, entries: Iterable[AdapterEntry]) -> None:
        """Order this step's forward after the device copies of the adapters it uses (GPU-side wait)."""
        if not self._copies:
            return
        stream = torch.cuda.current_stream(self.pool.device)
        for entry in set(entries):
            copy = self._copies.get(entry)
            if copy is not None:
                stream.wait_event(copy[0])

    def acquire(self, entry: AdapterEntry) -> int:
        """Take a reference on a resident adapter (see :meth:`is_ready`) and return its pool row."""
        if entry not in self.pool:
            raise RuntimeError(
                f"adapter {entry.name!r} is not resident; the scheduler must wait for is_ready()"
            )
        if entry.fresh:
            entry.fresh = False
            entry.misses += 1
            self.stats.device_misses += 1
        else:
            entry.hits += 1
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
            self._drop_host(entry)

    def row(self, entry: AdapterEntry) -> int:
        return self.pool.row_of(entry)

    def evictable_rows(self) -> int:
        """Rows held by resident adapters that are neither pinned nor in use."""
        return sum(e.rank for e in self.device_lru if e.in_flight == 0 and not e.pinned)

    # introspection --------------------------------------------------------------------------
    def stats_dict(self) -> dict[str, Any]:
        """Adapters and bytes per tier, capacities and the counters (see :class:`StoreStats`)."""
        on_device = list(self.device_lru)
        registered = set(self.by_name.values())
        counters = asdict(self.stats)
        for key in ("load_seconds", "read_seconds"):
            seconds = counters.pop(key)
            counters[f"{key}_mean"] = sum(seconds) / len(seconds) if seconds else None
            counters[f"{key}_max"] = max(seconds, default=None)
        return {
            "tiers": {
                self.device_tier: {
                    "adapters": len(on_device),
                    "pinned": sum(1 for e in on_device if e.pinned),
                    "in_use": sum(1 for e in on_device if e.in_flight),
                    "bytes": self.pool.used_rows * self.pool.row_bytes,
                    "capacity_bytes": self.pool.nbytes,
                    "rows_used": self.pool.used_rows,
                    "rows_total": self.pool.total_rows,
                    "copies_in_flight": len(self._copies),
                },
                "cpu": {
                    "adapters": len(self.host),
                    "bytes": self.host_bytes,
                    "capacity_adapters": self.cfg.max_cpu_loras,
                    "capacity_bytes": self.cfg.max_cpu_lora_bytes,
                    "reads_in_flight": self.loader.num_in_flight,
                },
                "disk": {
                    "registered": len(registered),
                    "adapters": sum(1 for e in registered if e not in self.pool and e not in self.host),
                },
            },
            "counters": counters,
        }

    def info(self, name: str) -> dict[str, Any]:
        """One adapter: identity, tier, bytes per tier, state and its counters."""
        e = self.get(name)
        return {
            "name": e.name,
            "path": e.path,
            "content_hash": e.content_hash,
            "rank": e.rank,
            "target_modules": sorted(e.target_modules),
            "tier": e.tier(self),
            "pinned": e.pinned,
            "in_flight": e.in_flight,
            "requests_served": e.requests_served,
            "last_used": e.last_used or None,
            "size_bytes": e.nbytes,
            "bytes": {
                self.device_tier: e.packed_nbytes if e in self.pool else 0,
                "cpu": self.host[e].nbytes if e in self.host else 0,
            },
            "loading": "disk->cpu"
            if self.loader.is_reading(e)
            else ("cpu->gpu" if e in self._copies else None),
            "hits": e.hits,
            "misses": e.misses,
            "device_loads": e.device_loads,
            "disk_reads": e.disk_reads,
            "evictions": {self.device_tier: e.device_evictions, "cpu": e.host_evictions},
        }

    def close(self) -> None:
        """Stop the reader threads."""
        self.loader.shutdown()

    # internals ------------------------------------------------------------------------------
    def _tier_kind(self, tier: str) -> str:
        if tier in ("gpu", "device", "cuda"):
            return "device"
        if tier in ("cpu", "host"):
            return "cpu"
        raise ValueError(f"tier must be 'gpu' (or 'device') or 'cpu', got {tier!r}")

    def _read_packed(self, path: str, name: str) -> ReadResult:
        """Read, validate, hash and pack one adapter (runs on reader threads: touches no store state).

        The file is read once and packed from its bytes straight into the model dtype; reading and
        hashing (and, off CUDA, packing's byte moves) are split over the shared I/O threads (see
        ``loraserve.lora.adapter.in_io_threads``). On CUDA the packing itself runs on the GPU,
        meanwhile (``pool.pack_adapter_on_device``), and the read buffer and the packed copy are
        pinned: the packed copy for ``non_blocking`` copies, and both so that torch's caching host
        allocator recycles them (fresh memory costs a page fault per 4 KiB).
        """
        t0 = time.perf_counter()
        stored = read_adapter(path, self.spec, self.cfg.max_lora_rank, name=name, pin=self.cuda)
        packed = None
        if self._pack_stream is not None:
            try:
                packed = pack_adapter_on_device(stored, self.model_cfg, self.dtype, self._pack_stream)
            except torch.OutOfMemoryError:
                # No room for its transient buffers (they lie outside the budget): the host path
                # needs none, and the adapter still loads.
                logger.warning(
                    "adapter %r: no device memory to pack it on the GPU; packing on the host", name
                )
        if packed is None:
            packed = pack_adapter(stored, self.model_cfg, self.dtype, pin=self.cuda)
        return ReadResult(
            stored.content_hash,
            stored.rank,
            stored.nbytes,
            stored.target_modules,
            packed,
            time.perf_counter() - t0,
        )

    def _read_now(self, entry: AdapterEntry) -> PackedAdapter:
        """Synchronous read for explicit control (pin, preload); raises what the read raises."""
        res = self.loader.read_now(entry, entry.path, entry.name)
        self._adopt(entry, res)
        return res.packed

    def _on_read(self, entry: AdapterEntry, res: ReadResult | Exception) -> None:
        if isinstance(res, Exception):
            self._failed[entry] = res
            self.stats.load_errors += 1
            logger.warning("adapter %r failed to load: %s", entry.name, res)
            return
        self.stats.read_seconds.append(res.seconds)
        try:
            self._adopt(entry, res)
        except AdapterError as e:
            self._failed[entry] = e
            self.stats.load_errors += 1
            return
        if entry.removed and entry not in self._next_use:
            return  # unregistered while it was read, and no queued request needs it
        self._put_host(entry, res.packed, self._next_use.get(entry, NOT_NEEDED))

    def _adopt(self, entry: AdapterEntry, res: ReadResult) -> None:
        """Check a fresh read against the entry's identity (fixing it on a lazy entry's first read)."""
        if entry.content_hash is None:
            entry.content_hash = res.content_hash
            entry.rank, entry.nbytes, entry.target_modules = res.rank, res.nbytes, res.target_modules
            entry.packed_nbytes = res.packed.nbytes
        elif res.content_hash != entry.content_hash:
            raise AdapterError(
                f"adapter {entry.name!r}: the files at {entry.path} changed since registration "
                "(content hash differs); register it again to serve the new weights"
            )
        self.stats.loads_from_disk += 1
        entry.disk_reads += 1
        entry.from_disk = True

    def _host_next_use(self, entry: AdapterEntry) -> int:
        # An adapter already on the device does not need its host copy for its next use.
        return NOT_NEEDED if entry in self.pool else self._next_use.get(entry, NOT_NEEDED)

    def _host_victims(
        self, nbytes: int, priority: int, extra_count: int = 0, extra_bytes: int = 0
    ) -> list[AdapterEntry] | None:
        """Host copies to drop so ``nbytes`` more fit (with ``extra_*`` already promised to reads in
        flight), taking only adapters needed no sooner than ``priority``; None if impossible."""
        over_count = len(self.host) + extra_count + 1 - self.cfg.max_cpu_loras
        limit = self.cfg.max_cpu_lora_bytes
        over_bytes = self.host_bytes + extra_bytes + nbytes - limit if limit is not None else 0
        if over_count <= 0 and over_bytes <= 0:
            return []
        # Stable sort on the LRU order: furthest next use first, least recently used among equals.
        candidates = sorted(
            (e for e in self.host if self._host_next_use(e) >= priority and not e.memory_only),
            key=lambda e: -self._host_next_use(e),
        )
        chosen: list[AdapterEntry] = []
        for victim in candidates:
            if over_count <= 0 and over_bytes <= 0:
                break
            chosen.append(victim)
            over_count -= 1
            over_bytes -= self.host[victim].nbytes
        return chosen if over_count <= 0 and over_bytes <= 0 else None

    def _put_host(self, entry: AdapterEntry, packed: PackedAdapter, priority: int) -> bool:
        """Cache a packed adapter on the host; False (not cached) if only more urgent ones could go."""
        if entry in self.host:
            self.host.move_to_end(entry)
            return True
        victims = self._host_victims(packed.nbytes, priority)
        if victims is None:
            return False
        for victim in victims:
            self._drop_host(victim)
            self._count_host_eviction(victim)
        self.host[entry] = packed
        self.host_bytes += packed.nbytes
        return True

    def _drop_host(self, entry: AdapterEntry) -> None:
        packed = self.host.pop(entry, None)
        if packed is not None:
            self.host_bytes -= packed.nbytes

    def _device_victims(self, rank: int, priority: int) -> list[AdapterEntry] | None:
        """Resident adapters to evict so ``rank`` rows fit: unused, unpinned, needed no sooner than
        ``priority``; furthest next use first, then least recently used. None if impossible."""
        short = rank - self.pool.free_rows
        if short <= 0:
            return []
        candidates = sorted(
            (
                e
                for e in self.device_lru
                if e.in_flight == 0 and not e.pinned and self._next_use.get(e, NOT_NEEDED) >= priority
            ),
            key=lambda e: -self._next_use.get(e, NOT_NEEDED),
        )
        chosen: list[AdapterEntry] = []
        for victim in candidates:
            if short <= 0:
                break
            chosen.append(victim)
            short -= victim.rank
        return chosen if short <= 0 else None

    def _start_device_load(self, entry: AdapterEntry, packed: PackedAdapter, priority: int) -> bool:
        victims = self._device_victims(entry.rank, priority)
        if victims is None:
            return False
        for victim in victims:
            self._drop_device(victim)
            self._count_device_eviction(victim)
        row = self.pool.allocate(entry, entry.rank)
        if row is None:  # cannot happen after _device_victims; kept as a hard error, not a silent skip
            raise RuntimeError(f"pool allocation failed for adapter {entry.name!r} after eviction")
        self._copy_in(entry, row, packed)
        self.device_lru[entry] = None
        if entry in self.host:
            self.host.move_to_end(entry)
        self.stats.device_loads += 1
        entry.device_loads += 1
        entry.fresh = True
        if entry.from_disk:
            self.stats.host_misses += 1
            entry.from_disk = False
        else:
            self.stats.host_hits += 1
        if entry.wanted_since is not None:
            self.stats.load_seconds.append(time.monotonic() - entry.wanted_since)
            entry.wanted_since = None
        return True

    def _copy_in(self, entry: AdapterEntry, row: int, packed: PackedAdapter) -> None:
        if self._copy_stream is None:
            self.pool.write(row, packed)
            return
        stream = self._copy_stream
        # The rows may have been read by the previous step's kernels: write after them.
        stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        with torch.cuda.stream(stream):
            self.pool.write(row, packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        # Keeping ``packed`` referenced keeps its pinned pages alive until the copy has read them.
        self._copies[entry] = (event, packed)

    def _order_after_copies(self) -> None:
        """Before compaction moves rows on the compute stream, order it after copies in flight."""
        if self._copy_stream is not None and self._copies:
            torch.cuda.current_stream(self.pool.device).wait_stream(self._copy_stream)

    def _ensure_device(self, entry: AdapterEntry, priority: int) -> None:
        """Put ``entry`` on the device now and wait for its copy (explicit control only)."""
        if entry not in self.pool:
            packed = self.host.get(entry)
            if packed is None:
                packed = self._read_now(entry)
                self._put_host(entry, packed, NOT_NEEDED)
            if not self._start_device_load(entry, packed, priority):
                raise AdapterBusy(
                    f"no room on the device for adapter {entry.name!r} (rank {entry.rank}): every "
                    "resident adapter is pinned, in use or needed by queued requests"
                )
        copy = self._copies.pop(entry, None)
        if copy is not None:
            copy[0].synchronize()

    def _retire(self, entry: AdapterEntry) -> None:
        entry.removed = True
        entry.pinned = False
        if entry.in_flight == 0:
            self._drop_device(entry)
            self._drop_host(entry)

    def _drop_device(self, entry: AdapterEntry) -> None:
        if entry in self.pool:
            self.pool.release(entry)
        self.device_lru.pop(entry, None)
        entry.fresh = False

    def _count_device_eviction(self, entry: AdapterEntry) -> None:
        self.stats.device_evictions += 1
        entry.device_evictions += 1

    def _count_host_eviction(self, entry: AdapterEntry) -> None:
        self.stats.host_evictions += 1
        entry.host_evictions += 1
