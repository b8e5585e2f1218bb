"""Prometheus metrics of one server, in its own ``CollectorRegistry`` (never the global one).

Request metrics are recorded by the API layer as requests finish, labelled by ``adapter`` (the
adapter's name, or the served base model name for base-model requests). Engine state (KV usage,
queue lengths, adapters per tier, the adapter store's load/eviction counters) is captured on the
engine thread as an :class:`EngineSnapshot` at scrape time, because the engine's structures must
not be read from another thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from loraserve.engine.engine import LLMEngine

TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TIERS = ("gpu", "device", "cpu", "disk")


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state at one instant; build it on the engine thread with :meth:`capture`."""

    num_requests_running: int
    num_requests_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_preemptions: int
    adapters_by_tier: dict[str, int] = field(default_factory=dict)
    adapter_device_loads: int = 0
    adapter_disk_loads: int = 0
    adapter_device_evictions: int = 0
    adapter_host_evictions: int = 0
    adapter_load_errors: int = 0
    adapter_load_seconds: tuple[float, ...] = ()

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by live sequences."""
        return 1.0 - self.kv_blocks_free / max(1, self.kv_blocks_total)

    @classmethod
    def capture(cls, engine: LLMEngine, load_seconds_seen: int = 0) -> EngineSnapshot:
        """Read the engine (engine thread only). ``adapter_load_seconds`` holds the load latencies
        recorded after the first ``load_seconds_seen`` ones."""
        sched = engine.scheduler
        tiers: dict[str, int] = {}
        extra: dict[str, object] = {}
        store = engine.store
        if store is not None:
            for entry in store.by_name.values():
                tier = entry.tier(store)
                tiers[tier] = tiers.get(tier, 0) + 1
            st = store.stats
            extra = dict(
                adapter_device_loads=st.device_loads,
                adapter_disk_loads=st.loads_from_disk,
                adapter_device_evictions=st.device_evictions,
                adapter_host_evictions=st.host_evictions,
                adapter_load_errors=st.load_errors,
                adapter_load_seconds=tuple(st.load_seconds[load_seconds_seen:]),
            )
        return cls(
            num_requests_running=len({s.request_id for s in sched.running}),
            num_requests_waiting=len({s.request_id for s in sched.waiting}),
            kv_blocks_total=engine.blocks.num_blocks,
            kv_blocks_free=engine.blocks.num_free,
            num_preemptions=sched.num_preemptions,
            adapters_by_tier=tiers,
            **extra,  # type: ignore[arg-type]
        )


class _EngineCounters(Collector):
    """Monotonic counters owned by the engine, exported as they were in the last snapshot."""

    def __init__(self) -> None:
        self.snapshot: EngineSnapshot | None = None
        self.step_failures = 0

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        yield CounterMetricFamily(
            "loraserve_adapter_loads",
            "Adapters written into the device pool",
            value=snap.adapter_device_loads,
        )
        yield CounterMetricFamily(
            "loraserve_adapter_disk_reads",
            "Adapters re-read from disk (not in host memory)",
            value=snap.adapter_disk_loads,
        )
        evictions = CounterMetricFamily(
            "loraserve_adapter_evictions", "Adapters evicted from a tier to make room", labels=["tier"]
        )
        evictions.add_metric(["device"], snap.adapter_device_evictions)
        evictions.add_metric(["cpu"], snap.adapter_host_evictions)
        yield evictions
        yield CounterMetricFamily(
            "loraserve_adapter_load_errors",
            "Adapter reads that failed (their requests failed)",
            value=snap.adapter_load_errors,
        )
        yield CounterMetricFamily(
            "loraserve_num_preemptions",
            "Sequences preempted for lack of KV blocks",
            value=snap.num_preemptions,
        )
        yield CounterMetricFamily(
            "loraserve_engine_step_failures",
            "Engine steps that raised (only their requests failed)",
            value=self.step_failures,
        )


class ServerMetrics:
    """The server's metrics; :meth:`render` returns the Prometheus text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "loraserve_requests", "Finished requests", ["adapter", "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter(
            "loraserve_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "loraserve_generation_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "loraserve_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            ["adapter"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loraserve_time_per_output_token_seconds",
            "Mean time between generated tokens of a request",
            ["adapter"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loraserve_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            ["adapter"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loraserve_adapter_load_seconds",
            "Time to make an adapter resident on the device",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapters_resident = Gauge(
            "loraserve_adapters_resident",
            "Registered adapters by the fastest tier holding them",
            ["tier"],
            registry=r,
        )
        self.kv_usage = Gauge("loraserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.kv_free = Gauge("loraserve_kv_cache_free_blocks", "Free KV blocks", registry=r)
        self.running = Gauge("loraserve_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("loraserve_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self._engine_counters = _EngineCounters()
        r.register(self._engine_counters)
        self.load_seconds_seen = 0

    def request_finished(
        self,
        adapter: str,
        finish_reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        e2e: float,
        tokens_per_seq: int,
    ) -> None:
        """Record one engine request (one prompt, all its ``n`` sequences)."""
        self.requests.labels(adapter, finish_reason).inc()
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generation_tokens.labels(adapter).inc(generation_tokens)
        self.e2e.labels(adapter).observe(e2e)
        if ttft is not None:
            self.ttft.labels(adapter).observe(ttft)
            if tokens_per_seq > 1:
                self.tpot.labels(adapter).observe((e2e - ttft) / (tokens_per_seq - 1))

    def update_engine(self, snap: EngineSnapshot, step_failures: int) -> None:
        """Set the engine gauges from a snapshot taken with ``load_seconds_seen``."""
        self.running.set(snap.num_requests_running)
        self.waiting.set(snap.num_requests_waiting)
        self.kv_usage.set(snap.kv_usage)
        self.kv_free.set(snap.kv_blocks_free)
        self._engine_counters.step_failures = step_failures
        for tier in TIERS:
            self.adapters_resident.labels(tier).set(snap.adapters_by_tier.get(tier, 0))
        for seconds in snap.adapter_load_seconds:
            self.adapter_load_seconds.observe(seconds)
        self.load_seconds_seen += len(snap.adapter_load_seconds)
        self._engine_counters.snapshot = snap

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
