"""Unit tests of the tiered adapter store: bounds, eviction order, pins, prefetch order, identity."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from loraserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from loraserve.lora import adapter as adapter_module
from loraserve.lora import store as store_module
from loraserve.lora.adapter import AdapterError
from loraserve.lora.pool import DeviceLoRAPool, apply_memory_budget, kv_block_bytes, row_bytes
from loraserve.lora.prefetch import HostLoader
from loraserve.lora.resolver import DirectoryResolver
from loraserve.lora.store import NOT_NEEDED, AdapterBusy, AdapterStore
from loraserve.ops.lora import lora_apply
from loraserve.testing import make_tiny_model
from tests.test_many_adapters import write_adapter


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ModelConfig:
    return ModelConfig.from_dir(make_tiny_model(tmp_path_factory.mktemp("store") / "base", seed=3))


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory) -> dict[str, Path]:
    """Eight rank-8 adapters ``a0..a7`` and one of each rank 4/16/64."""
    root = tmp_path_factory.mktemp("store-adapters")
    out = {f"a{i}": write_adapter(root / f"a{i}", model, 8, seed=i) for i in range(8)}
    for r in (4, 16, 64):
        out[f"r{r}"] = write_adapter(root / f"r{r}", model, r, seed=100 + r)
    return out


def make_store(model: ModelConfig, rows: int = 32, workers: int = 0, **lora) -> AdapterStore:
    lora.setdefault("max_lora_rank", 16)
    lora.setdefault("max_cpu_loras", 4)
    pool = DeviceLoRAPool(model, rows, torch.float32, "cpu", lora_apply)
    return AdapterStore(model, LoRAConfig(prefetch_workers=workers, **lora), pool, torch.float32)


def test_register_eager_and_lazy_agree_on_identity(model, adapters):
    store = make_store(model)
    eager = store.register("e", adapters["a0"])
    lazy = store.register("l", adapters["a0"], lazy=True)
    assert eager.tier(store) == "cpu" and eager.content_hash is not None
    assert lazy.tier(store) == "disk" and lazy.content_hash is None and lazy.rank == 8
    assert lazy.packed_nbytes == eager.packed_nbytes == 8 * store.pool.row_bytes
    store.set_demand([lazy])
    store.prefetch()
    assert lazy.content_hash == eager.content_hash and lazy.tier(store) == store.device_tier


def test_device_packing_out_of_memory_falls_back_to_the_host(model, adapters, monkeypatch, caplog):
    """A CUDA store packs on the GPU; when that runs out of device memory the read still succeeds,
    packed on the host, with the same identity and bytes."""
    reference = make_store(model)
    want = reference.register("a", adapters["a0"])

    def out_of_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(store_module, "pack_adapter_on_device", out_of_memory)
    store = make_store(model)
    store._pack_stream = object()  # as on CUDA: reads try the device path first
    got = store.register("a", adapters["a0"])
    assert got.content_hash == want.content_hash and got.tier(store) == "cpu"
    assert all(
        torch.equal(p, q)
        for p, q in zip(store.host[got].tensors(), reference.host[want].tensors(), strict=True)
    )
    assert "packing on the host" in caplog.text


def test_lazy_registration_refuses_what_the_header_shows(model, adapters):
    store = make_store(model, max_lora_rank=16)
    with pytest.raises(AdapterError, match="max_lora_rank"):
        store.register("big", adapters["r64"], lazy=True)
    with pytest.raises(AdapterError, match="does not exist"):
        store.register("nope", adapters["a0"].parent / "missing", lazy=True)
    assert not store.by_name


def test_host_tier_bounded_by_count_and_bytes(model, adapters):
    per = 8 * row_bytes(model, torch.float32)
    store = make_store(model, max_cpu_loras=3, max_cpu_lora_bytes=2 * per + per // 2)
    for i in range(5):
        store.register(f"a{i}", adapters[f"a{i}"])
        assert len(store.host) <= 3 and store.host_bytes <= store.cfg.max_cpu_lora_bytes
    # Bytes bind first (2 fit), and the least recently registered went first.
    assert [e.name for e in store.host] == ["a3", "a4"]
    assert store.stats.host_evictions == 3


def test_host_eviction_spares_adapters_queued_requests_need(model, adapters):
    store = make_store(model, rows=8, max_cpu_loras=2)  # device: one rank-8 adapter
    a0 = store.register("a0", adapters["a0"])
    store.register("a1", adapters["a1"])
    store.set_demand([a0])  # a0 is needed (not on the device), a1 is not: a1 goes
    store.register("a2", adapters["a2"])
    assert set(e.name for e in store.host) == {"a0", "a2"}
    # With every cached adapter needed sooner, a new registration is simply not cached.
    store.set_demand([a0, store.get("a2")])
    store.register("a3", adapters["a3"])
    assert store.get("a3").tier(store) == "disk" and len(store.host) == 2


def test_device_eviction_follows_the_queue_then_lru(model, adapters):
    store = make_store(model, rows=24, max_cpu_loras=8)  # three rank-8 adapters
    e = [store.register(f"a{i}", adapters[f"a{i}"]) for i in range(4)]
    for x in e[:3]:
        assert store.make_resident(x, NOT_NEEDED)
    # a0 is needed next, a2 later, a1 not at all: loading a3 for the queue's head evicts a1.
    store.set_demand([e[3], e[0], e[2]])
    assert store.make_resident(e[3], 0)
    assert e[1] not in store.pool and {e[0], e[2], e[3]} <= set(store.device_lru)
    # Nothing needed later than position 0 is left unused: a request at position 1 (a1) cannot
    # evict the adapters needed at 0 and 2... but a2 is needed later than a1's position, so it goes.
    store.set_demand([e[3], e[1], e[0], e[2]])
    assert store.make_resident(e[1], 1)
    assert e[2] not in store.pool
    # Among adapters nobody queued needs, the least recently used goes first.
    store.set_demand([])
    store.acquire(e[0])
    store.release(e[0])
    assert store.make_resident(e[2], NOT_NEEDED)
    assert e[3] not in store.pool and e[0] in store.pool


def test_in_use_and_pinned_adapters_are_never_evicted(model, adapters):
    store = make_store(model, rows=24, max_cpu_loras=8)  # three rank-8 adapters; 8 rows may be pinned
    e = [store.register(f"a{i}", adapters[f"a{i}"]) for i in range(4)]
    store.set_pinned("a0", True)
    assert store.make_resident(e[1], NOT_NEEDED)
    store.acquire(e[1])
    assert store.make_resident(e[2], NOT_NEEDED)
    store.set_demand([e[2], e[3]])
    assert not store.make_resident(e[3], 1)  # only a2 is evictable, and it is needed sooner
    assert store.make_resident(e[3], -1)  # the most urgent load may take it
    assert e[2] not in store.pool and e[0] in store.pool and e[1] in store.pool
    with pytest.raises(AdapterBusy, match="pinned"):
        store.evict("a0", "gpu")
    with pytest.raises(AdapterBusy, match="in use"):
        store.evict("a1", "gpu")
    with pytest.raises(AdapterBusy, match="fewer than"):
        store.set_pinned("a3", True)  # 16 pinned rows would leave fewer than max_lora_rank=16
    store.release(e[1])
    store.set_pinned("a0", False)
    assert store.evict("a0", "cpu").tier(store) == "disk"


def test_preload_and_evict_move_between_tiers(model, adapters):
    store = make_store(model, rows=32, max_cpu_loras=8)
    e = store.register("a0", adapters["a0"], lazy=True)
    assert e.tier(store) == "disk"
    store.preload("a0", "cpu")
    assert e.tier(store) == "cpu" and e.content_hash is not None
    store.preload("a0", "gpu")
    assert e.tier(store) == store.device_tier
    store.evict("a0", "gpu")
    assert e.tier(store) == "cpu"
    store.evict("a0", "cpu")
    assert e.tier(store) == "disk"
    info = store.info("a0")
    assert info["device_loads"] == 1 and info["disk_reads"] == 1
    assert info["evictions"] == {store.device_tier: 1, "cpu": 1}
    with pytest.raises(ValueError, match="tier"):
        store.preload("a0", "ssd")


def test_prefetch_reads_in_queue_order_and_within_host_room(model, adapters):
    store = make_store(model, rows=8, max_cpu_loras=3)
    order: list[str] = []
    gate = threading.Event()

    def read(path: str, name: str):
        gate.wait(10)
        order.append(name)
        return store._read_packed(path, name)

    store.loader = HostLoader(read, workers=1)
    e = [store.register(f"a{i}", adapters[f"a{i}"], lazy=True) for i in range(6)]
    store.set_demand([e[4], e[1], e[5], e[0], e[2]])
    store.prefetch()
    # Two reads in flight at most (2 * workers); the host has room for three.
    assert store.loader.num_in_flight == 2
    gate.set()
    while store.num_loading:
        store.wait_for_progress(1.0)
        store.prefetch()
    # In queue order; a4 went on to the device, so its host copy made room for a0; then the host is
    # full of adapters needed before a2, which is not read.
    assert order == ["a4", "a1", "a5", "a0"]
    assert {x.name for x in store.host} == {"a1", "a5", "a0"} and e[4] in store.pool
    store.close()


def test_concurrent_reads_split_over_the_shared_io_threads(model, adapters, monkeypatch):
    """Reads on two reader threads at once, each split over the shared I/O threads, give exactly
    what one read at a time gives: the same identity and the same packed bytes."""
    names = ("a0", "a1", "a2", "r4")
    eager = make_store(model, rows=64, max_cpu_loras=8)
    expected = {name: eager.register(name, adapters[name]) for name in names}
    monkeypatch.setattr(adapter_module, "_PARALLEL_GRAIN", 1)
    monkeypatch.setattr(adapter_module, "_IO_THREADS", 3)
    store = make_store(model, rows=64, max_cpu_loras=8, workers=2)
    lazy = [store.register(name, adapters[name], lazy=True) for name in names]
    store.set_demand(lazy)
    store.prefetch()
    while store.num_loading:
        store.wait_for_progress(1.0)
        store.prefetch()
    for entry in lazy:
        want = expected[entry.name]
        assert entry.content_hash == want.content_hash and entry.packed_nbytes == want.packed_nbytes
        got, ref = store.host[entry].tensors(), eager.host[want].tensors()
        assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    store.close()


def test_rereading_changed_files_is_refused(model, adapters, tmp_path):
    src = write_adapter(tmp_path / "x", model, 8, seed=1)
    store = make_store(model, rows=8, max_cpu_loras=1)
    x = store.register("x", src)
    store.register("other", adapters["a1"])  # pushes x's host copy out
    write_adapter(tmp_path / "x", model, 8, seed=2)  # the files change under the registration
    store.set_demand([x])
    store.prefetch()
    err = store.take_error([x])
    assert isinstance(err, AdapterError) and "changed since registration" in str(err)
    assert x.tier(store) == "disk"
    # Registering again serves the new weights under a new identity; the old entry's copies are gone.
    x2 = store.register("x", src)
    assert x2 is not x and x2.content_hash != x.content_hash and x.removed and x not in store.host


def test_reregistration_never_serves_stale_host_copies(model, tmp_path):
    src = write_adapter(tmp_path / "y", model, 8, seed=1)
    store = make_store(model, rows=16, max_cpu_loras=4)
    y1 = store.register("y", src)
    store.make_resident(y1, NOT_NEEDED)
    old_rows = store.pool.a["qkv"][:, store.row(y1) : store.row(y1) + 8].clone()
    write_adapter(tmp_path / "y", model, 8, seed=2)
    y2 = store.register("y", src, lazy=True)
    assert y1 not in store.pool and y1 not in store.host
    store.set_demand([y2])
    store.prefetch()
    new_rows = store.pool.a["qkv"][:, store.row(y2) : store.row(y2) + 8]
    assert not torch.equal(old_rows, new_rows)


def test_resolver_finds_names_under_its_roots_only(model, adapters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(adapters["a0"], root / "escape")  # a link out of the root is refused
    write_adapter(root / "inside", model, 8, seed=3)
    resolver = DirectoryResolver([root])
    assert resolver.find("inside") == (root / "inside").resolve()
    assert resolver.find("escape") is None and resolver.find("../root/inside") is None
    assert resolver.find("missing") is None
    store = make_store(model, lora_resolver_dirs=(str(root),))
    entry = store.resolve("inside")
    assert entry is not None and entry.content_hash is None and store.resolve("inside") is entry


def test_stats_report_bytes_per_tier(model, adapters):
    store = make_store(model, rows=32, max_cpu_loras=4)
    a = store.register("a0", adapters["a0"])
    store.register("r4", adapters["r4"], lazy=True)
    store.make_resident(a, NOT_NEEDED)
    store.acquire(a)
    stats = store.stats_dict()
    dev = stats["tiers"][store.device_tier]
    assert dev["adapters"] == 1 and dev["bytes"] == 8 * store.pool.row_bytes == a.packed_nbytes
    assert dev["capacity_bytes"] == store.pool.nbytes and dev["in_use"] == 1
    assert stats["tiers"]["cpu"]["bytes"] == a.packed_nbytes
    assert stats["tiers"]["disk"] == {"registered": 2, "adapters": 1}
    assert stats["counters"]["device_misses"] == 1 and stats["counters"]["host_hits"] == 1


def test_memory_budget_split(model):
    budget = 4 << 20
    base = EngineConfig(
        model=model, cache=CacheConfig(kv_cache_memory=budget), lora=LoRAConfig(max_lora_rank=16)
    )
    assert apply_memory_budget(base) is base
    cfg = apply_memory_budget(
        EngineConfig(
            model=model,
            cache=CacheConfig(kv_cache_memory=budget),
            lora=LoRAConfig(max_lora_rank=16, adapter_memory_fraction=0.25),
        )
    )
    slot = 16 * row_bytes(model, torch.float32, dense=True)  # a CPU pool this small uses the dense op
    assert cfg.lora.max_loras == int(0.25 * budget) // slot
    assert cfg.lora.max_loras * slot + cfg.cache.kv_cache_memory == budget
    assert cfg.cache.kv_cache_memory >= 16 * kv_block_bytes(cfg)
    with pytest.raises(ValueError, match="fixed num_blocks"):
        apply_memory_budget(
            EngineConfig(
                model=model, cache=CacheConfig(num_blocks=64), lora=LoRAConfig(adapter_memory_fraction=0.5)
            )
        )


@pytest.mark.gpu
def test_cuda_copies_run_on_a_side_stream_and_steps_wait_only_for_theirs(model, adapters):
    pool = DeviceLoRAPool(model, 32, torch.float32, "cuda", lora_apply)
    store = AdapterStore(model, LoRAConfig(max_lora_rank=16, prefetch_workers=1), pool, torch.float32)
    a, b = store.register("a0", adapters["a0"]), store.register("a1", adapters["a1"])
    assert store.host[a].a["qkv"].is_pinned()
    assert store.make_resident(a, NOT_NEEDED) and store.make_resident(b, NOT_NEEDED)
    assert set(store._copies) <= {a, b}
    store.prepare_step([a])  # the compute stream now waits for a's copy, not b's
    row = store.row(a)
    got = pool.a["qkv"][:, row : row + 8].cpu()  # runs on the compute stream, after the wait
    assert torch.equal(got, store.host[a].a["qkv"])
    torch.cuda.synchronize()
    store.poll()
    assert not store._copies
    store.close()
