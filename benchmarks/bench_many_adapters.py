"""Many adapters on one GPU: throughput and TTFT at 5, 100 and 1,000 adapters, plus cold-load times.

S-LoRA's synthetic trace: Poisson arrivals at ``--rate`` requests/s, adapter popularity Zipf with
``--alpha`` (1.0), input and output lengths uniform in ``[--min-len, --max-len]`` ([8, 512]). Each
adapter count is served from a cold start (every adapter evicted to disk, page cache warm) on the
same engine, one after the other, and the table reports requests/s, output tokens/s, mean and p99
time to first token (from the request's scheduled arrival) and the store's counters.

Model: Llama-2-7B's shape (32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32000) in bf16 with
random weights made *on the device* (``load_format="dummy"``: only a ``config.json`` is written, no
13 GB checkpoint); ``--checkpoint DIR`` uses a real one. Only torch, safetensors and numpy are
used; adapters are written directly as PEFT dirs.

Adapters (the disk compromise): 1,000 rank-16 adapters on all seven projections are ~80 MB each in
bf16, 80 GB in all, more than the device machine's 64 GB disk. So ``--distinct-files`` (100)
weight files are written and each adapter directory hard-links one of them next to its own
``adapter_config.json`` whose ``lora_alpha`` differs from every other adapter sharing the file.
The content hash covers the config, so all 1,000 are distinct adapters to the engine (distinct
identity, KV prefix seed and effective weights ``alpha/r * B A``): each is read, validated, hashed,
packed and copied separately. What is shared is the page cache: after the first read of a file,
the other nine adapters on it read from memory, as they would anyway on a host with 128 GB of RAM.

Cold loads of one adapter: host memory -> GPU (``evict_lora(name, "gpu")`` then
``preload_lora(name, "gpu")``: a pinned host copy onto the side stream, synchronised) and disk
(page cache) -> GPU (``evict_lora(name, "cpu")`` then ``preload_lora``: read, validate, hash, pack,
pin, copy).

``--tiny`` runs the same code with a tiny model, rank-8 adapters and short requests on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compile_counter import COMPILES
from safetensors.torch import save_file

from loraserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.lora.adapter import LORA_MODULES
from loraserve.sampling import SamplingParams

logger = logging.getLogger("bench_many_adapters")

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


# model ------------------------------------------------------------------------------------------
def write_model_config(out: Path, shape: dict[str, int]) -> Path:
    """A Llama ``config.json`` only: the engine makes random weights in place (``load_format="dummy"``)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **shape,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# adapters ---------------------------------------------------------------------------------------
def write_weight_file(
    path: Path, cfg: ModelConfig, rank: int, seed: int, device: torch.device, dtype: torch.dtype
) -> None:
    """PEFT-named random LoRA tensors for all seven projections, generated on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = cfg.lora_shapes()
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for module in LORA_MODULES:
            in_f, out_f = shapes[module]
            parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            a = torch.randn(rank, in_f, generator=gen, device=device) / math.sqrt(in_f)
            b = torch.randn(out_f, rank, generator=gen, device=device) * (0.1 / math.sqrt(rank))
            tensors[f"{key}.lora_A.weight"] = a.to(dtype).cpu()
            tensors[f"{key}.lora_B.weight"] = b.to(dtype).cpu()
    save_file(tensors, str(path))


def write_adapters(
    root: Path, cfg: ModelConfig, n: int, distinct: int, rank: int, device: torch.device, dtype: torch.dtype
) -> list[Path]:
    """``n`` PEFT adapter dirs over ``distinct`` weight files (see the module docstring)."""
    files = root / "weights"
    files.mkdir(parents=True, exist_ok=True)
    for g in range(min(distinct, n)):
        f = files / f"w{g:04d}.safetensors"
        if not f.exists():
            write_weight_file(f, cfg, rank, seed=g, device=device, dtype=dtype)
    dirs = []
    for i in range(n):
        g, k = i % distinct, i // distinct
        d = root / f"ad{i:05d}"
        d.mkdir(exist_ok=True)
        link = d / "adapter_model.safetensors"
        if not link.exists():
            os.link(files / f"w{g:04d}.safetensors", link)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": float(2 * rank + k),
            "target_modules": list(LORA_MODULES),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
        }
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


# trace ------------------------------------------------------------------------------------------
@dataclass
class TraceRequest:
    arrival: float
    adapter: int
    prompt: list[int]
    output_len: int


def make_trace(
    n: int, num_adapters: int, rate: float, alpha: float, lens: tuple[int, int], vocab: int, seed: int
) -> list[TraceRequest]:
    """S-LoRA's synthetic trace: Poisson arrivals, Zipf(alpha) adapter popularity, uniform lengths."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    weights = 1.0 / np.arange(1, num_adapters + 1) ** alpha
    adapters = rng.choice(num_adapters, size=n, p=weights / weights.sum())
    lo, hi = lens
    return [
        TraceRequest(
            arrival=float(t),
            adapter=int(a),
            prompt=rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).tolist(),
            output_len=int(rng.integers(lo, hi + 1)),
        )
        for t, a in zip(np.cumsum(gaps), adapters, strict=True)
    ]


@dataclass
class RunResult:
    num_adapters: int
    requests: int
    duration_s: float
    throughput_req_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_mean_s: float
    ttft_p99_s: float
    latency_mean_s: float
    distinct_adapters_used: int
    counters: dict[str, Any] = field(default_factory=dict)
    compiles_during_run: dict[str, int] | None = None


def serve_trace(
    engine: LLMEngine, names: list[str], trace: list[TraceRequest], num_adapters: int
) -> RunResult:
    """Replay ``trace`` in real time against ``engine``; TTFT counts from the scheduled arrival."""
    entries = {i: engine.store.get(names[i]) for i in {r.adapter for r in trace}}
    compiles = COMPILES.mark()
    start = time.monotonic()
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    out_tokens = 0
    nxt = 0
    while len(finish) < len(trace):
        now = time.monotonic() - start
        while nxt < len(trace) and trace[nxt].arrival <= now:
            r = trace[nxt]
            params = SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
            engine.add_request(str(nxt), r.prompt, params, entries[r.adapter])
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(trace[nxt].arrival - now, 0.01)))
            continue
        for out in engine.step():
            t = time.monotonic() - start
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = t
            if out.finished:
                finish[out.request_id] = t
                out_tokens += len(out.outputs[0].token_ids)
    duration = max(finish.values())
    ttft = sorted(first[str(i)] - r.arrival for i, r in enumerate(trace))
    in_tokens = sum(len(r.prompt) for r in trace)
    return RunResult(
        num_adapters=num_adapters,
        requests=len(trace),
        duration_s=duration,
        throughput_req_s=len(trace) / duration,
        output_tok_s=out_tokens / duration,
        total_tok_s=(out_tokens + in_tokens) / duration,
        ttft_mean_s=statistics.fmean(ttft),
        ttft_p99_s=ttft[min(len(ttft) - 1, math.ceil(0.99 * len(ttft)) - 1)],
        latency_mean_s=statistics.fmean(finish[str(i)] - r.arrival for i, r in enumerate(trace)),
        distinct_adapters_used=len(entries),
        counters=engine.lora_stats()["counters"],
        compiles_during_run=COMPILES.since(compiles),
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}ms"


def reset_tiers(engine: LLMEngine) -> None:
    """Evict every adapter down to disk and zero the counters: each run starts cold."""
    store = engine.store
    for entry in store.list():
        engine.evict_lora(entry.name, "cpu")
    store.stats = type(store.stats)()


def cold_loads(engine: LLMEngine, name: str, repeats: int) -> dict[str, float]:
    """Median seconds to put one adapter on the device from host memory and from disk (page cache)."""
    entry = engine.store.get(name)
    weights = Path(entry.path) / "adapter_model.safetensors"
    host, disk = [], []
    for _ in range(repeats):
        engine.evict_lora(name, "cpu")
        weights.read_bytes()  # page cache warm: "disk" here is the filesystem cache, as stated
        t = time.perf_counter()
        engine.preload_lora(name, "gpu")
        disk.append(time.perf_counter() - t)
        engine.evict_lora(name, "gpu")  # the pinned host copy stays
        t = time.perf_counter()
        engine.preload_lora(name, "gpu")
        host.append(time.perf_counter() - t)
    nbytes = entry.packed_nbytes
    h, d = statistics.median(host), statistics.median(disk)
    return {
        "adapter_bytes": nbytes,
        "host_to_gpu_s": h,
        "host_to_gpu_GBps": nbytes / h / 1e9,
        "disk_to_gpu_s": d,
        "disk_to_gpu_GBps": nbytes / d / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke run)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--checkpoint", default=None, help="a real Llama checkpoint instead of random weights")
    ap.add_argument("--workdir", default="/tmp/loraserve-bench-many")
    ap.add_argument("--adapter-counts", default=None, help="comma-separated (default 5,100,1000)")
    ap.add_argument("--distinct-files", type=int, default=100)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="requests per second")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--device-budget", type=float, default=None, help="bytes for KV + adapter pool")
    ap.add_argument("--adapter-fraction", type=float, default=0.1, help="share of the budget for adapters")
    ap.add_argument("--max-cpu-loras", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--prefetch-workers", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    tiny = args.tiny
    device = torch.device(args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    counts = [int(c) for c in (args.adapter_counts or ("5,20,50" if tiny else "5,100,1000")).split(",")]
    rank = args.rank or (8 if tiny else 16)
    n_req = args.num_requests or (40 if tiny else 300)
    rate = args.rate or (50.0 if tiny else 6.0)
    lens = (args.min_len or 8, args.max_len or (32 if tiny else 512))
    budget = int(args.device_budget or (2 << 20 if tiny else 48e9))
    work = Path(args.workdir)
    if tiny:
        torch.set_num_threads(1)

    model_dir = (
        Path(args.checkpoint)
        if args.checkpoint
        else write_model_config(work / "model", TINY if tiny else LLAMA2_7B)
    )
    model_cfg = ModelConfig.from_dir(model_dir)
    cfg = EngineConfig(
        load_format="auto" if args.checkpoint else "dummy",
        enforce_eager=args.enforce_eager,
        model=model_cfg,
        dtype=dtype,
        device=str(device),
        cache=CacheConfig(block_size=16, kv_cache_memory=budget),
        lora=LoRAConfig(
            max_lora_rank=rank,
            max_cpu_loras=args.max_cpu_loras or (16 if tiny else 256),
            adapter_memory_fraction=args.adapter_fraction,
            prefetch_workers=args.prefetch_workers
            if args.prefetch_workers is not None
            else (2 if tiny else 4),
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs or (32 if tiny else 128),
            max_num_batched_tokens=4096,
            max_model_len=2 * lens[1] + 8,
        ),
    )
    t = time.perf_counter()
    engine = LLMEngine(cfg, tokenizer=None)
    split = engine.lora_stats()["budget"]
    print(
        f"engine built in {time.perf_counter() - t:.1f}s on {device}: budget {split['bytes'] / 1e9:.2f} GB = "
        f"adapter pool {split['adapter_pool_bytes'] / 1e9:.2f} GB ({engine.cfg.lora.max_loras} rank-{rank} slots) "
        f"+ KV {split['kv_bytes'] / 1e9:.2f} GB ({engine.blocks.num_blocks} blocks)"
    )

    t = time.perf_counter()
    dirs = write_adapters(
        work / f"adapters-r{rank}", model_cfg, max(counts), args.distinct_files, rank, device, dtype
    )
    names = [f"ad{i}" for i in range(len(dirs))]
    for name, d in zip(names, dirs, strict=True):
        engine.add_lora(name, d, lazy=True)
    print(
        f"{len(dirs)} adapters written and registered in {time.perf_counter() - t:.1f}s "
        f"({engine.store.get(names[0]).packed_nbytes / 1e6:.1f} MB each on the device)"
    )

    # Warm-up (kernel compilation, allocator): not measured. Enough requests over enough adapters that
    # steps with prefill chunks, decode rows and many segments occur, so that their kernel variants
    # are compiled here and not inside the first measured run (each run reports any it still met).
    warm = make_trace(64, 32, 1000.0, args.alpha, (lens[0], lens[0] + 56), model_cfg.vocab_size, seed=99)
    serve_trace(engine, names, warm, 32)

    results = []
    for n in counts:
        reset_tiers(engine)
        trace = make_trace(n_req, n, rate, args.alpha, lens, model_cfg.vocab_size, seed=args.seed + n)
        res = serve_trace(engine, names, trace, n)
        results.append(res)
        logger.warning("done: %d adapters", n)

    reset_tiers(engine)
    cold = cold_loads(engine, names[0], repeats=3)

    print()
    print(
        f"{'adapters':>8} {'used':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT mean':>10} {'TTFT p99':>9} "
        f"{'dev loads':>9} {'disk reads':>10} {'dev evict':>9} {'wait mean':>9} {'read mean':>9}"
    )
    for r in results:
        c = r.counters
        print(
            f"{r.num_adapters:>8} {r.distinct_adapters_used:>5} {r.throughput_req_s:>7.2f} {r.output_tok_s:>10.1f} "
            f"{r.ttft_mean_s:>9.3f}s {r.ttft_p99_s:>8.3f}s {c['device_loads']:>9} {c['loads_from_disk']:>10} "
            f"{c['device_evictions']:>9} {_ms(c['load_seconds_mean']):>9} {_ms(c['read_seconds_mean']):>9}"
            f"  compiles {r.compiles_during_run}"
        )
    print(
        f"\ncold load of one {cold['adapter_bytes'] / 1e6:.1f} MB adapter: host->GPU {cold['host_to_gpu_s'] * 1e3:.1f} ms "
        f"({cold['host_to_gpu_GBps']:.1f} GB/s), disk (page cache)->GPU {cold['disk_to_gpu_s'] * 1e3:.1f} ms "
        f"({cold['disk_to_gpu_GBps']:.2f} GB/s)"
    )

    if args.out:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": {
                k: getattr(model_cfg, k)
                for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size")
            },
            "dtype": str(dtype),
            "config": {k: v for k, v in vars(args).items()},
            "adapter_slots": engine.cfg.lora.max_loras,
            "kv_blocks": engine.blocks.num_blocks,
            "budget": engine.lora_stats()["budget"],
            "runs": [asdict(r) for r in results],
            "cold_load": cold,
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    engine.store.close()


if __name__ == "__main__":
    main()
