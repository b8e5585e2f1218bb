"""GPU microbenchmark of the Triton paged attention and KV store (needs CUDA; only torch + triton).

Cases (bf16 by default, block size 16, shuffled block tables):

* decode at batch 1 / 64 / 256 with context 512 / 1024 for Llama-2-7B (32 heads, head_dim 128, no GQA)
  and Llama-3-8B (32 heads, 8 KV heads);
* prefill of 8 x 512 tokens for both.

Every timed call rotates over enough per-layer caches to overflow L2 (as a real forward pass does) and is
replayed from a CUDA graph, so the numbers are device time without Python launch overhead; ``eager_us``
is the same call launched from Python (what an uncaptured step pays). Decode is judged by the KV bytes it
reads against a device-to-device copy measured in the same run; prefill by TFLOP/s. Reference points:
torch SDPA on contiguous (non-paged) K/V and the torch paged path of ``loraserve.ops.attention`` (which
also checks correctness). ``--sweep`` additionally times alternative tile configs / split counts.

Usage: ``python benchmarks/bench_attention.py [--out benchmarks/results/attention.json] [--sweep]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import triton  # noqa: E402

from loraserve.ops.attention import AttentionMeta, paged_attention  # noqa: E402
from loraserve.ops.triton_attention import (  # noqa: E402
    KernelConfig,
    decode_config,
    decode_num_splits,
    general_config,
    paged_attention_triton,
    store_kv_triton,
)

BLOCK_SIZE = 16
L2_FLUSH_BYTES = 256 << 20  # rotate over per-layer caches until this much KV is touched per replay
MODELS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # heads, kv_heads, head_dim


@dataclass
class Workload:
    """One attention call repeated over ``layers`` distinct caches (same metadata)."""

    name: str
    model: str
    kind: str  # "decode" | "prefill"
    batch: int
    q_len: int
    ctx: int
    meta: AttentionMeta
    q: torch.Tensor
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]

    @property
    def kv_bytes(self) -> int:
        """K and V bytes one call must read: each sequence's context, all KV heads."""
        _, _, kv_heads, head_dim = self.k_caches[0].shape
        return 2 * self.batch * self.ctx * kv_heads * head_dim * self.q.element_size()

    @property
    def flops(self) -> int:
        """Causal attention FLOPs (QK^T and PV), counting only the unmasked scores."""
        heads, head_dim = self.q.shape[1], self.q.shape[2]
        ctx_start = self.ctx - self.q_len
        scores = self.q_len * ctx_start + self.q_len * (self.q_len + 1) // 2
        return 4 * self.batch * scores * heads * head_dim


def make_workload(
    model: str,
    kind: str,
    batch: int,
    q_len: int,
    ctx: int,
    dtype: torch.dtype,
    device: torch.device,
    layout: str = "hnd",
) -> Workload:
    heads, kv_heads, head_dim = MODELS[model]
    nblocks = -(-ctx // BLOCK_SIZE)
    pool = batch * nblocks + 8
    tables = torch.randperm(pool, device=device)[: batch * nblocks].view(batch, nblocks).to(torch.int32)
    pos = torch.arange(ctx - q_len, ctx, device=device)
    slots = tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    meta = AttentionMeta(
        slot_mapping=slots.flatten(),
        query_start=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        block_tables=tables,
        query_lens=[q_len] * batch,
        seq_lens_host=[ctx] * batch,
        block_size=BLOCK_SIZE,
    )
    layer_bytes = 2 * pool * BLOCK_SIZE * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    layers = max(1, min(64, -(-L2_FLUSH_BYTES // layer_bytes)))

    def cache() -> torch.Tensor:
        # Indexed [blocks, block_size, kv_heads, D] either way; "hnd" stores heads outermost (the
        # engine's CUDA layout), "nhd" a token's heads as one row.
        if layout == "hnd":
            return torch.randn(pool, kv_heads, BLOCK_SIZE, head_dim, dtype=dtype, device=device).transpose(
                1, 2
            )
        return torch.randn(pool, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)

    k_caches = [cache() for _ in range(layers)]
    v_caches = [cache() for _ in range(layers)]
    q = torch.randn(batch * q_len, heads, head_dim, dtype=dtype, device=device)
    name = f"{kind} {model} B={batch} q={q_len} ctx={ctx} {layout}"
    return Workload(name, model, kind, batch, q_len, ctx, meta, q, k_caches, v_caches)


def graph_time_us(calls: list[Callable[[], object]], warmup: int, iters: int) -> float:
    """Median device time of one call: the calls are captured once into a CUDA graph and replayed."""
    for _ in range(warmup):
        for call in calls:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / len(calls)


def eager_time_us(calls: list[Callable[[], object]], warmup: int, iters: int) -> float:
    """Median time of one call launched from Python (includes launch overhead when it dominates)."""
    for _ in range(warmup):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / len(calls)


def copy_bandwidth_gbps(device: torch.device, warmup: int, iters: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)], warmup, iters)
    return 2 * src.numel() / us / 1e3


def triton_calls(w: Workload, **kwargs: object) -> list[Callable[[], object]]:
    scale = w.q.shape[-1] ** -0.5
    return [
        lambda k=k, v=v: paged_attention_triton(w.q, k, v, w.meta, scale, **kwargs)
        for k, v in zip(w.k_caches, w.v_caches, strict=True)
    ]


def sdpa_calls(w: Workload) -> list[Callable[[], object]]:
    """torch SDPA on contiguous ``[B, heads, len, D]`` copies of the same K/V (the non-paged bound)."""
    heads, kv_heads = w.q.shape[1], w.k_caches[0].shape[2]
    q = w.q.view(w.batch, w.q_len, heads, -1).transpose(1, 2)
    tables = w.meta.block_tables.long()

    def contiguous(cache: torch.Tensor) -> torch.Tensor:
        return cache[tables].flatten(1, 2)[:, : w.ctx].transpose(1, 2).contiguous()

    pairs = [(contiguous(k), contiguous(v)) for k, v in zip(w.k_caches, w.v_caches, strict=True)]
    causal = w.kind == "prefill"  # prefill here has no cached context, so SDPA's causal mask is exact
    return [
        lambda k=k, v=v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=heads != kv_heads
        )
        for k, v in pairs
    ]


def max_error(w: Workload, **kwargs: object) -> float:
    scale = w.q.shape[-1] ** -0.5
    out = paged_attention_triton(w.q, w.k_caches[0], w.v_caches[0], w.meta, scale, **kwargs)
    ref = paged_attention(w.q.float(), w.k_caches[0].float(), w.v_caches[0].float(), w.meta, scale)
    return float((out.float() - ref).abs().max())


def measure(w: Workload, copy_gbps: float, args: argparse.Namespace) -> dict[str, Any]:
    scale = w.q.shape[-1] ** -0.5
    us = graph_time_us(triton_calls(w), args.warmup, args.iters)
    err = max_error(w)
    torch_paged = [
        lambda k=k, v=v: paged_attention(w.q, k, v, w.meta, scale)
        for k, v in zip(w.k_caches, w.v_caches, strict=True)
    ]
    row: dict[str, Any] = {
        "name": w.name,
        "model": w.model,
        "kind": w.kind,
        "batch": w.batch,
        "q_len": w.q_len,
        "ctx": w.ctx,
        "triton_us": us,
        "triton_eager_us": eager_time_us(triton_calls(w), args.warmup, args.iters),
        "sdpa_contiguous_us": graph_time_us(sdpa_calls(w), args.warmup, args.iters),
        "torch_paged_eager_us": eager_time_us(torch_paged, 2, max(3, args.iters // 10)),
        "kv_bytes": w.kv_bytes,
        "kv_gbps": w.kv_bytes / us / 1e3,
        "kv_frac_of_copy": w.kv_bytes / us / 1e3 / copy_gbps,
        "tflops": w.flops / us / 1e6,
        "max_abs_err": err,
        "ok": err < args.tol,
    }
    kv_heads = w.k_caches[0].shape[2]
    if w.kind == "decode":
        row["config"] = decode_config(w.q.dtype, w.q.shape[1] // kv_heads).__dict__
        row["num_splits"] = decode_num_splits(w.batch, kv_heads, w.ctx, w.q.device, w.q.shape[1] // kv_heads)
    else:
        row["config"] = general_config(w.q.shape[1] // kv_heads, w.q_len, w.q.dtype).__dict__
    return row


def sweep(w: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time alternative launch configs (and split counts for decode); failures to compile are skipped."""
    group = w.q.shape[1] // w.k_caches[0].shape[2]
    if w.kind == "decode" and group == 1:
        # block_m = heads per program of the MHA decode kernel.
        base = decode_num_splits(w.batch, w.k_caches[0].shape[2], w.ctx, w.q.device, group)
        variants = [
            {"config": KernelConfig(bm, bn, nw, 2, head_major=hm), "num_splits": s}
            for bm, bn, nw, hm, s in itertools.product(
                (1, 2), (32, 64, 128), (2, 4, 8), (False, True), sorted({1, base})
            )
        ]
    elif w.kind == "decode":
        base = decode_num_splits(w.batch, w.k_caches[0].shape[2], w.ctx, w.q.device)
        variants = [
            {"config": KernelConfig(16, bn, nw, ns), "num_splits": s}
            for bn, nw, ns, s in itertools.product((32, 64, 128), (4, 8), (2,), sorted({1, base, 2 * base}))
        ]
    else:
        variants = [
            {"config": KernelConfig(bm, bn, nw, ns)}
            for bm, bn, nw, ns in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
            if bm >= group
        ]
    rows = []
    for kwargs in variants:
        try:
            us = graph_time_us(triton_calls(w, **kwargs), 2, max(5, args.iters // 4))
            err = max_error(w, **kwargs)
        except Exception as exc:  # a config the device cannot run (shared memory, registers): record, go on
            rows.append({"name": w.name, **_describe(kwargs), "error": type(exc).__name__})
            continue
        rows.append({"name": w.name, **_describe(kwargs), "us": us, "max_abs_err": err, "ok": err < args.tol})
    return rows


def _describe(kwargs: dict[str, Any]) -> dict[str, Any]:
    cfg = kwargs["config"]
    assert isinstance(cfg, KernelConfig)
    return {**cfg.__dict__, "num_splits": kwargs.get("num_splits")}


def bench_store_kv(
    tokens: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    """Triton store (skips slot -1) vs torch ``index_copy_`` (cannot skip) for one step of ``tokens``."""
    _, kv_heads, head_dim = MODELS["llama3-8b"]
    blocks = 16384
    k_cache = torch.zeros(blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(blocks * BLOCK_SIZE, device=device)[:tokens]
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)

    def torch_store() -> None:
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)

    def triton_store() -> None:
        store_kv_triton(k, v, k_cache, v_cache, slots)

    return {
        "tokens": tokens,
        "triton_us": graph_time_us([triton_store], args.warmup, args.iters),
        "torch_index_copy_us": graph_time_us([torch_store], args.warmup, args.iters),
    }


def print_table(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    head = (
        f"{'case':44s} {'triton':>9s} {'eager':>9s} {'sdpa':>9s} {'torch':>10s} {'KV GB/s':>8s} "
        f"{'%copy':>6s} {'TFLOP/s':>8s} {'err':>8s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:44s} {r['triton_us']:8.1f}u {r['triton_eager_us']:8.1f}u "
            f"{r['sdpa_contiguous_us']:8.1f}u {r['torch_paged_eager_us']:9.1f}u "
            f"{r['kv_gbps']:8.0f} {100 * r['kv_frac_of_copy']:5.0f}% "
            f"{r['tflops']:8.1f} {r['max_abs_err']:8.1e}{'' if r['ok'] else '  FAIL'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tol", type=float, default=3e-2, help="max abs error vs the fp32 torch reference")
    parser.add_argument("--sweep", action="store_true", help="also time alternative configs / split counts")
    parser.add_argument(
        "--sweep-filter", nargs="*", default=[], help="sweep only cases whose name contains one of these"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--layouts", nargs="+", default=["hnd", "nhd"], choices=["hnd", "nhd"], help="KV cache storage orders"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    copy_gbps = copy_bandwidth_gbps(device, args.warmup, args.iters)
    specs = [("decode", b, 1, ctx) for b in (1, 64, 256) for ctx in (512, 1024)] + [("prefill", 8, 512, 512)]
    rows, sweeps = [], []
    for model, layout in itertools.product(args.models, args.layouts):
        for kind, batch, q_len, ctx in specs:
            w = make_workload(model, kind, batch, q_len, ctx, dtype, device, layout)
            rows.append(measure(w, copy_gbps, args))
            if args.sweep and (not args.sweep_filter or any(f in w.name for f in args.sweep_filter)):
                sweeps.extend(sweep(w, args))
            del w
            torch.cuda.empty_cache()
    print_table(rows, copy_gbps)
    store = [bench_store_kv(tokens, device, dtype, args) for tokens in (256, 4096)]
    for r in store:
        triton_us, torch_us = r["triton_us"], r["torch_index_copy_us"]
        print(f"store_kv {r['tokens']:5d} tokens: triton {triton_us:.1f}us, index_copy_ {torch_us:.1f}us")
    if sweeps:
        best: dict[str, dict[str, Any]] = {}
        for r in sweeps:
            if r.get("ok") and (r["name"] not in best or r["us"] < best[r["name"]]["us"]):
                best[r["name"]] = r
        print("\nsweep: best config per case (default in parentheses)")
        default = {r["name"]: r["triton_us"] for r in rows}
        for name, r in best.items():
            cfg = f"m={r['block_m']} n={r['block_n']} w={r['num_warps']} s={r['num_stages']}"
            cfg += f" splits={r['num_splits']}" + (" heads-first" if r.get("head_major") else "")
            print(f"{name:44s} {r['us']:8.1f}us ({default[name]:.1f}us)  {cfg}")

    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "block_size": BLOCK_SIZE,
        "copy_gbps": copy_gbps,
        "results": rows,
        "store_kv": store,
        "sweep": sweeps,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
