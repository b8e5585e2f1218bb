"""Thousands of adapters through a small device tier and host tier, with a Zipf request stream.

Every output must equal the same request served alone, the tiers must stay within their bounds
after every step, pinned adapters must never leave the device, and the scheduler's stated wait
bound (``loraserve.engine.scheduler``) must hold for every request.

The adapters are written directly as PEFT directories (``adapter_config.json`` +
``adapter_model.safetensors`` under peft's tensor names) by :func:`write_adapter`, because building
thousands with ``peft`` itself would take minutes; one of them is loaded by ``peft`` and checked
against the transformers+peft oracle to prove the format.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraserve.core import SeqStatus
from loraserve.engine.engine import LLMEngine
from loraserve.lora.adapter import LORA_MODULES
from loraserve.lora.store import AdapterBusy, AdapterNotFound
from loraserve.sampling import SamplingParams
from loraserve.testing import make_tiny_model
from tests.reference import peft_greedy

RANKS = (4, 8, 12, 16, 24, 32, 48, 64)
WAIT_BOUND = 1  # adapter_wait_bound_steps: tiny, so that reservations happen and bound (b) is exercised
RATE = (
    24.0  # arrivals per step: more than the device rows serve serve, so a queue builds and adapters compete
)


def write_adapter(
    out: Path,
    model: ModelConfig,
    rank: int,
    seed: int,
    targets: tuple[str, ...] = LORA_MODULES,
    alpha: float | None = None,
) -> Path:
    """Write a random LoRA adapter exactly as ``peft``'s ``save_pretrained`` lays it out.

    Both A and B are random (peft would start B at zero, a no-op adapter), scaled like
    ``loraserve.testing.make_peft_adapter`` so that each adapter visibly changes the outputs.
    """
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = model.lora_shapes()
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(model.num_layers):
        for module in targets:
            in_f, out_f = shapes[module]
            parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * (0.8 / in_f**0.5)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * (0.8 / rank**0.5)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.path,
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model's ops are far below threading's break-even, and the reader threads want a
    core: one intra-op thread is several times faster here (and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("many") / "base", seed=5)


@dataclass
class Fleet:
    base: Path
    model: ModelConfig
    dirs: list[Path]
    ranks: list[int]


_FLEETS: dict[int, Fleet] = {}


def fleet(base: Path, n: int) -> Fleet:
    """``n`` adapters of mixed ranks next to ``base`` (written once per module and size)."""
    if n not in _FLEETS:
        model = ModelConfig.from_dir(base)
        rng = random.Random(n)
        ranks = [rng.choice(RANKS) for _ in range(n)]
        root = base.parent / f"fleet{n}"
        dirs = [write_adapter(root / f"ad{i:05d}", model, ranks[i], seed=1000 + i) for i in range(n)]
        _FLEETS[n] = Fleet(base, model, dirs, ranks)
    return _FLEETS[n]


def engine_config(model: ModelConfig, *, max_loras: int, max_cpu_loras: int, **lora: object) -> EngineConfig:
    return EngineConfig(
        model=model,
        dtype=torch.float32,
        device="cpu",
        cache=CacheConfig(block_size=4, num_blocks=1024),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=64, max_cpu_loras=max_cpu_loras, **lora),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(
            max_num_seqs=64,
            max_num_batched_tokens=512,
            max_model_len=128,
            adapter_wait_bound_steps=WAIT_BOUND,
        ),
    )


@dataclass
class Req:
    rid: str
    adapter: int | None
    prompt: list[int]
    max_new: int
    tokens: list[int] = field(default_factory=list)


def zipf_stream(n_requests: int, n_adapters: int, seed: int) -> list[Req]:
    """Zipf(alpha=1) popularity over a random permutation of the adapters; 5% base-model requests."""
    rng = random.Random(seed)
    order = list(range(n_adapters))
    rng.shuffle(order)
    weights = [1.0 / (k + 1) for k in range(n_adapters)]
    picks = rng.choices(order, weights=weights, k=n_requests)
    reqs = []
    for i, a in enumerate(picks):
        prompt = [rng.randrange(5, 250) for _ in range(rng.randrange(3, 13))]
        reqs.append(Req(str(i), None if rng.random() < 0.05 else a, prompt, rng.randrange(2, 5)))
    return reqs


def serve_alone(fl: Fleet, reqs: list[Req]) -> dict[str, list[int]]:
    """Each request on its own, on a fresh engine holding one adapter at a time."""
    eng = LLMEngine(engine_config(fl.model, max_loras=1, max_cpu_loras=4, prefetch_workers=0), tokenizer=None)
    names = {}
    for a in sorted({r.adapter for r in reqs if r.adapter is not None}):
        names[a] = eng.add_lora(f"ad{a}", fl.dirs[a], lazy=True)
    out = {}
    for r in reqs:
        params = SamplingParams(temperature=0, max_tokens=r.max_new, ignore_eos=True)
        eng.add_request(r.rid, r.prompt, params, names.get(r.adapter) if r.adapter is not None else None)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
    return out


@dataclass
class Observed:
    steps: int = 0
    max_resident: int = 0
    max_host: int = 0
    max_host_bytes: int = 0
    max_waited: int = 0
    reservations: int = 0
    max_reservation_steps: int = 0
    max_queue_steps: int = 0  # arrival to admission, in steps (queueing included)
    counters: dict[str, object] = field(default_factory=dict)


def serve_stream(fl: Fleet, reqs: list[Req], *, pinned: list[int], host_bytes: int, rate: float) -> Observed:
    """Serve ``reqs`` arriving Poisson(``rate``) per step; check every invariant after every step."""
    cfg = engine_config(fl.model, max_loras=16, max_cpu_loras=64, max_cpu_lora_bytes=host_bytes)
    eng = LLMEngine(cfg, tokenizer=None)
    entries = [eng.add_lora(f"ad{i}", d, pinned=i in pinned) for i, d in enumerate(fl.dirs)]
    store, sched = eng.store, eng.scheduler
    assert store is not None
    rng = random.Random(7)
    obs = Observed()
    by_id = {r.rid: r for r in reqs}
    pending = list(reqs)
    holder = None  # (seq, step it took the reservation, the most steps a running sequence still needed)
    arrived: dict[object, int] = {}
    while pending or eng.has_unfinished():
        for _ in range(min(len(pending), _poisson(rng, rate))):
            r = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=r.max_new, ignore_eos=True)
            eng.add_request(r.rid, r.prompt, params, entries[r.adapter] if r.adapter is not None else None)
            arrived[sched.waiting[-1]] = obs.steps
        for o in eng.step():
            if o.finished:
                by_id[o.request_id].tokens = o.outputs[0].token_ids
        obs.steps += 1
        for seq in sched.running:
            if seq in arrived:
                obs.max_queue_steps = max(obs.max_queue_steps, obs.steps - arrived.pop(seq))
        # Tier bounds, pins, and the wait bound, after every step.
        assert store.pool.used_rows <= store.pool.total_rows
        assert len(store.host) <= cfg.lora.max_cpu_loras and store.host_bytes <= host_bytes
        assert store.host_bytes == sum(p.nbytes for p in store.host.values())
        for i in pinned:
            assert entries[i] in store.pool and entries[i].pinned
        waited = max((s.waited_steps for s in sched.waiting), default=0)
        assert waited <= WAIT_BOUND, "bound (a): a request was overtaken more than B times"
        obs.max_waited = max(obs.max_waited, waited)
        obs.max_resident = max(obs.max_resident, store.pool.num_adapters)
        obs.max_host = max(obs.max_host, len(store.host))
        obs.max_host_bytes = max(obs.max_host_bytes, store.host_bytes)
        if holder is not None and holder[0].status is not SeqStatus.WAITING:
            # Bound (b): admitted at most D steps after the reservation step; ``holder[2]`` was measured
            # after that step, when every running sequence had one step less to go (D - 1).
            taken = obs.steps - holder[1]
            assert taken <= holder[2] + 1, f"reservation held {taken} steps, bound {holder[2] + 1}"
            obs.max_reservation_steps = max(obs.max_reservation_steps, taken)
            holder = None
        if holder is None and sched.reserved is not None:
            d = max((_remaining_steps(s) for s in sched.running), default=0)
            holder = (sched.reserved, obs.steps, d)
            obs.reservations += 1
    obs.counters = eng.lora_stats()["counters"]
    return obs


def _remaining_steps(seq) -> int:
    prefill = 1 if seq.num_computed < seq.num_prompt_tokens else 0  # prompts fit one token budget
    return prefill + seq.params.max_tokens - seq.num_output


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small rates used here.
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def run_scenario(base: Path, n_adapters: int, n_requests: int) -> Observed:
    fl = fleet(base, n_adapters)
    reqs = zipf_stream(n_requests, n_adapters, seed=n_adapters)
    hot = max(set(r.adapter for r in reqs if r.adapter is not None), key=[r.adapter for r in reqs].count)
    pinned = [hot, next(i for i in range(n_adapters) if fl.ranks[i] == 64)]
    # The host tier is bounded by bytes below its 64-adapter count for the average rank, so that
    # both bounds bind at times.
    mean_bytes = sum(fl.ranks) / len(fl.ranks) * _row_bytes(fl.model)
    host_bytes = int(48 * mean_bytes)
    t0 = time.perf_counter()
    obs = serve_stream(fl, reqs, pinned=pinned, host_bytes=host_bytes, rate=RATE)
    served = time.perf_counter() - t0
    alone = serve_alone(fl, reqs)
    wrong = [r.rid for r in reqs if r.tokens != alone[r.rid]]
    assert not wrong, f"{len(wrong)} requests differ from the same request served alone, e.g. {wrong[:5]}"
    assert all(len(r.tokens) == r.max_new for r in reqs)
    print(f"\n{n_adapters} adapters, {n_requests} requests: {obs} served in {served:.1f}s")
    return obs


def _row_bytes(model: ModelConfig) -> int:
    from loraserve.lora.pool import row_bytes

    return row_bytes(model, torch.float32)


def test_fast_writer_is_the_peft_format(base_dir):
    """One written adapter loads in peft, and the engine serves it exactly as transformers+peft do."""
    fl = fleet(base_dir, 4)
    prompt = [11, 42, 97, 150, 7]
    for i in (0, 3):
        ref, _ = peft_greedy(base_dir, fl.dirs[i], prompt, 4)
        reqs = [Req("x", i, prompt, 4)]
        assert serve_alone(fl, reqs)["x"] == ref


def test_many_adapters_zipf(base_dir):
    """2,000 adapters (ranks 4-64), a device tier of 16 rank-64 slots (1,024 rank rows), a host tier
    of 64 adapters and fewer bytes, two pinned adapters, and 3,000 Zipf-distributed requests."""
    obs = run_scenario(base_dir, 2000, 3000)
    assert obs.max_resident >= 16 and obs.max_host <= 64
    assert obs.counters["device_evictions"] > 0 and obs.counters["host_evictions"] > 0


def test_resolver_serves_unregistered_names(base_dir):
    """A name found under ``lora_resolver_dirs`` is registered lazily on first request and served
    exactly like the same adapter registered up front; an unknown name is refused."""
    fl = fleet(base_dir, 4)
    cfg = engine_config(fl.model, max_loras=2, max_cpu_loras=2, lora_resolver_dirs=(str(fl.dirs[0].parent),))
    eng = LLMEngine(cfg, tokenizer=None)
    entry = eng.resolve_lora(fl.dirs[2].name)
    assert entry is not None and entry.content_hash is None and eng.resolve_lora(fl.dirs[2].name) is entry
    with pytest.raises(AdapterNotFound):
        eng.resolve_lora("not-there")
    prompt = [11, 42, 97, 150, 7]
    eng.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), entry)
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
    assert done["r"] == serve_alone(fl, [Req("r", 2, prompt, 4)])["r"]
    assert entry.content_hash is not None and eng.adapter_info(entry.name)["disk_reads"] == 1
    eng.store.close()


def test_explicit_control_and_stats(base_dir):
    fl = fleet(base_dir, 4)
    cfg = engine_config(fl.model, max_loras=2, max_cpu_loras=2, adapter_memory_fraction=0.5)
    cfg = replace(cfg, cache=CacheConfig(block_size=4, kv_cache_memory=4 << 20))
    eng = LLMEngine(cfg, tokenizer=None)
    for i, d in enumerate(fl.dirs):
        eng.add_lora(f"ad{i}", d, lazy=True)
    eng.preload_lora("ad0", "gpu")
    eng.preload_lora("ad1", "cpu")
    tiers = {e.name: e.tier(eng.store) for e in eng.list_loras()}
    assert tiers == {"ad0": "device", "ad1": "cpu", "ad2": "disk", "ad3": "disk"}
    eng.pin_lora("ad0")
    with pytest.raises(AdapterBusy):
        eng.evict_lora("ad0")
    eng.pin_lora("ad0", False)
    eng.evict_lora("ad0", "gpu")
    assert eng.adapter_info("ad0")["tier"] == "cpu"
    stats = eng.lora_stats()
    dev, cpu = stats["tiers"]["device"], stats["tiers"]["cpu"]
    assert dev["adapters"] == 0 and cpu["adapters"] == 2
    assert cpu["bytes"] == sum(eng.adapter_info(n)["bytes"]["cpu"] for n in ("ad0", "ad1"))
    budget = stats["budget"]
    assert budget["adapter_pool_bytes"] + budget["kv_bytes"] <= 4 << 20
    assert (
        budget["adapter_pool_bytes"] == dev["capacity_bytes"] and stats["kv"]["bytes"] == budget["kv_bytes"]
    )
    assert stats["counters"]["device_evictions"] == 1 and stats["counters"]["loads_from_disk"] == 2
    eng.store.close()
