"""The scheduler's adapter policy, without a model: skip-ahead, no thrashing, the wait bound, prefetch order.

A step here is ``schedule()`` plus a fake forward that appends one token to every sampling
sequence and finishes it at ``max_tokens``, so every scenario is exact and runs in milliseconds.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from loraserve.config import LoRAConfig, ModelConfig, SchedulerConfig
from loraserve.core import SeqStatus, Sequence
from loraserve.engine.scheduler import Scheduler
from loraserve.kvcache.block_manager import BlockManager
from loraserve.lora.adapter import AdapterError
from loraserve.lora.pool import DeviceLoRAPool
from loraserve.lora.prefetch import HostLoader
from loraserve.lora.store import AdapterEntry, AdapterStore
from loraserve.ops.lora import lora_apply
from loraserve.sampling import SamplingParams
from loraserve.testing import make_tiny_model
from tests.test_many_adapters import write_adapter


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ModelConfig:
    return ModelConfig.from_dir(make_tiny_model(tmp_path_factory.mktemp("sched") / "base", seed=4))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sched-adapters")


def adapter_dir(root: Path, model: ModelConfig, name: str, rank: int) -> Path:
    path = root / f"{name}-r{rank}"
    return path if path.exists() else write_adapter(path, model, rank, seed=sum(map(ord, name)) + rank)


def build(
    model: ModelConfig,
    rows: int,
    bound: int = 4,
    max_seqs: int = 16,
    cpu: int = 16,
    workers: int = 0,
    affinity: bool = True,
):
    pool = DeviceLoRAPool(model, rows, torch.float32, "cpu", lora_apply)
    lora = LoRAConfig(max_lora_rank=16, max_cpu_loras=cpu, prefetch_workers=workers)
    store = AdapterStore(model, lora, pool, torch.float32)
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=256,
        adapter_wait_bound_steps=bound,
        adapter_affinity=affinity,
    )
    return Scheduler(cfg, BlockManager(512, 4), store), store


_ids = iter(range(10**9))


def seq(adapter: AdapterEntry | None, max_tokens: int = 2, prompt_len: int = 4) -> Sequence:
    return Sequence(
        request_id=str(next(_ids)),
        index=0,
        token_ids=[5 + i for i in range(prompt_len)],
        num_prompt_tokens=prompt_len,
        params=SamplingParams(temperature=0, max_tokens=max_tokens),
        adapter=adapter,
        generator=None,
        detok=None,
    )


def step(sched: Scheduler) -> list[Sequence]:
    """One scheduling step and a fake forward; returns the sequences admitted by this step."""
    before = set(sched.running)
    out = sched.schedule()
    sampling = [item.seq for item in out if item.samples]  # decided before the step advances them
    sched.on_step_done(out)
    for s in sampling:
        s.token_ids.append(7)
        if s.num_output >= s.params.max_tokens:
            sched.finish(s)
    return [item.seq for item in out if item.seq not in before]


def gated(store: AdapterStore) -> tuple[threading.Event, list[str]]:
    """Make the store's disk reads wait for an event, recording their order."""
    gate, order = threading.Event(), []

    def read(path: str, name: str):
        gate.wait(10)
        order.append(name)
        return store._read_packed(path, name)

    store.loader = HostLoader(read, workers=1)
    return gate, order


def test_cold_adapter_does_not_stall_hot_ones(model, root):
    sched, store = build(model, rows=32, workers=1)
    gate, _ = gated(store)
    hot = store.register("hot", adapter_dir(root, model, "hot", 8))
    cold = store.register("cold", adapter_dir(root, model, "cold", 8), lazy=True)
    cold_seq = seq(cold)
    sched.add(cold_seq)
    hots = [seq(hot) for _ in range(3)]
    for s in hots:
        sched.add(s)
    assert step(sched) == hots  # the cold one is being read: the hot ones behind it go now
    assert cold_seq.status is SeqStatus.WAITING and cold_seq.waited_steps == 0  # I/O is not overtaking
    gate.set()
    for _ in range(50):
        if cold_seq in step(sched):
            break
    assert cold_seq.status is not SeqStatus.WAITING
    store.close()


def test_resident_adapters_batch_ahead_instead_of_thrashing(model, root):
    """Requests alternate over three adapters but the device holds two: FIFO order would swap an
    adapter in for almost every request; skipping ahead to resident adapters loads each once."""
    sched, store = build(model, rows=16, max_seqs=32)
    names = ("x", "y", "z")
    entries = [store.register(n, adapter_dir(root, model, n, 8)) for n in names]
    seqs = [seq(entries[i % 3]) for i in range(24)]
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        step(sched)
    assert store.stats.device_loads == 3 and store.stats.device_evictions == 1


def test_overtaking_bound_and_reservation(model, root):
    """Two hot adapters fill the device and keep getting requests; a cold rank-16 adapter needs all
    16 rows. It is overtaken at most B times, then takes the reservation and is admitted within
    D steps, D being the longest remaining work of what was running (``d`` is measured after the
    reservation step, so D = d + 1)."""
    bound = 3
    sched, store = build(model, rows=16, bound=bound)
    h1 = store.register("h1", adapter_dir(root, model, "h1", 8))
    h2 = store.register("h2", adapter_dir(root, model, "h2", 8))
    cold = store.register("c16", adapter_dir(root, model, "c16", 16))
    for h in (h1, h2):
        sched.add(seq(h, max_tokens=3))
    step(sched)
    victim = seq(cold)
    sched.add(victim)
    reserved_at = d = None
    for n in range(1, 40):
        for h in (h1, h2):  # the hot adapters always have fresh requests queued
            sched.add(seq(h, max_tokens=3))
        admitted = step(sched)
        assert max(s.waited_steps for s in sched.waiting) <= bound
        if reserved_at is not None:
            # Under the reservation, nothing but the holder is admitted.
            assert admitted in ([], [victim])
        if victim in admitted:
            break
        if reserved_at is None and sched.reserved is victim:
            reserved_at = n
            d = max(s.params.max_tokens - s.num_output for s in sched.running)
    else:
        pytest.fail("the cold adapter's request was never admitted")
    assert victim.waited_steps == bound and reserved_at is not None
    assert n - reserved_at <= d + 1
    assert sched.reserved is None and sched.num_reservations == 1


def test_without_the_bound_the_cold_adapter_starves(model, root):
    """The control for the test above: with an unreachable bound the hot stream starves it."""
    sched, store = build(model, rows=16, bound=10**9)
    h1 = store.register("h1", adapter_dir(root, model, "h1", 8))
    h2 = store.register("h2", adapter_dir(root, model, "h2", 8))
    cold = store.register("c16", adapter_dir(root, model, "c16", 16))
    for h in (h1, h2):
        sched.add(seq(h, max_tokens=3))
    step(sched)
    victim = seq(cold)
    sched.add(victim)
    for _ in range(30):
        for h in (h1, h2):
            sched.add(seq(h, max_tokens=3))
        step(sched)
    assert victim.status is SeqStatus.WAITING and victim.waited_steps >= 25


def test_prefetch_reads_in_queue_order(model, root):
    sched, store = build(model, rows=8, workers=1)
    gate, order = gated(store)
    entries = [store.register(f"d{i}", adapter_dir(root, model, f"d{i}", 8), lazy=True) for i in range(4)]
    for i in (2, 0, 2, 3, 1):
        sched.add(seq(entries[i]))
    step(sched)
    gate.set()
    while sched.has_unfinished():
        step(sched)
    assert order == ["d2", "d0", "d3", "d1"]
    store.close()


def test_a_failed_read_fails_before_anything_is_scheduled(model, root, tmp_path):
    sched, store = build(model, rows=16)
    bad_dir = write_adapter(tmp_path / "bad", model, 4, seed=9)
    config = json.loads((bad_dir / "adapter_config.json").read_text())
    (bad_dir / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))  # header: 4, config: 8
    bad = store.register("bad", bad_dir, lazy=True)  # the header looks fine
    good = store.register("good", adapter_dir(root, model, "good", 8))
    bad_seq, good_seq = seq(bad), seq(good)
    sched.add(bad_seq)
    sched.add(good_seq)
    step(sched)  # reads 'bad' (synchronously here); the failure surfaces on the next schedule()
    with pytest.raises(AdapterError, match="adapter 'bad'"):
        sched.schedule()
    assert all(s.status is SeqStatus.WAITING or s.finished for s in sched.waiting)
    sched.finish(bad_seq)  # what the engine's callers do with the failed request
    while sched.has_unfinished():
        step(sched)
    assert good_seq.finished and bad.tier(store) == "disk"


def test_pinned_adapter_stays_through_churn(model, root):
    sched, store = build(model, rows=32, max_seqs=4)
    pinned = store.register("pin", adapter_dir(root, model, "pin", 8), pinned=True)
    others = [store.register(f"o{i}", adapter_dir(root, model, f"o{i}", 16)) for i in range(5)]
    for i in range(30):
        sched.add(seq(others[i % 5]))
        if i % 3 == 0:
            sched.add(seq(pinned))
    while sched.has_unfinished():
        step(sched)
        assert pinned in store.pool
    assert store.stats.device_evictions > 0 and pinned.device_loads == 1 and pinned.misses <= 1


@pytest.mark.parametrize("affinity", [True, False])
def test_affinity_batches_one_adapters_requests_together(model, root, affinity):
    """Requests cycle over four resident adapters and the batch has eight seats. Arrival order puts
    all four in every batch; affinity admits two adapters' requests together, and later arrivals of
    an adapter already running join it ahead of an adapter not yet running."""
    sched, store = build(model, rows=32, max_seqs=8, affinity=affinity)
    entries = [store.register(f"g{i}", adapter_dir(root, model, f"g{i}", 8)) for i in range(4)]
    for i in range(16):
        sched.add(seq(entries[i % 4], max_tokens=3))
    first = step(sched)
    distinct = {s.adapter for s in first}
    if affinity:
        assert distinct == set(entries[:2]) and len(first) == 8
    else:
        assert distinct == set(entries) and len(first) == 8
    while sched.has_unfinished():
        step(sched)
        assert max((s.waited_steps for s in sched.waiting), default=0) <= 4


def test_affinity_passes_a_request_at_most_b_times(model, root):
    """A long request keeps a hot adapter in the batch and the hot adapter keeps getting short
    requests; a base-model request queued before them is passed by the hot ones (their adapter
    is running) exactly B times, then goes first."""
    bound = 3
    sched, store = build(model, rows=16, bound=bound, max_seqs=2)
    hot = store.register("hot", adapter_dir(root, model, "hot", 8))
    sched.add(seq(hot, max_tokens=50))
    step(sched)
    base = seq(None)
    sched.add(base)
    admitted_at = None
    for n in range(1, 20):
        sched.add(seq(hot, max_tokens=1))  # admitted and finished in one step: one seat frees each step
        admitted = step(sched)
        assert base.waited_steps <= bound
        if base in admitted:
            admitted_at = n
            break
    assert base.waited_steps == bound and admitted_at == bound + 1
