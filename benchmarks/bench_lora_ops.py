"""GPU microbenchmark of the Triton multi-LoRA kernels (shrink + expand) on Llama-2-7B layer shapes.

For each layer (qkv, o, gate_up, down) and batch shape it reports the time of
``lora_apply_triton`` (and of shrink / expand alone), the bytes the op must move (x, the active
adapters' A and B rows, y read and written), the achieved GB/s against a device-to-device copy
measured in the same run, and the torch reference (``loraserve.ops.lora.lora_apply``) for
comparison. Every case is checked against the reference first.

    python benchmarks/bench_lora_ops.py [--out benchmarks/results/lora_ops.json] [--reps 50] [--sweep]

``--sweep`` also times a small grid of tile configs per case and reports the best, to tune the
heuristics in ``triton_lora.shrink_config`` / ``expand_config``. Needs only torch and triton.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_ops() -> tuple[types.ModuleType, types.ModuleType]:
    """Import ``loraserve.ops.lora`` and ``.triton_lora`` without running the package ``__init__``s,
    which pull in the whole engine and its dependencies (the benchmark needs only torch and triton)."""
    for name, path in (("loraserve", ROOT / "loraserve"), ("loraserve.ops", ROOT / "loraserve" / "ops")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    return importlib.import_module("loraserve.ops.lora"), importlib.import_module("loraserve.ops.triton_lora")


lora, tlora = _import_ops()

HIDDEN, MLP = 4096, 11008  # Llama-2-7B (32 heads x 128 = 4096: q, k and v are all 4096 wide)
LAYERS: dict[str, tuple[int, list[int]]] = {
    "qkv": (HIDDEN, [HIDDEN, HIDDEN, HIDDEN]),
    "o": (HIDDEN, [HIDDEN]),
    "gate_up": (HIDDEN, [MLP, MLP]),
    "down": (MLP, [HIDDEN]),
}
# name: (tokens, adapters); tokens are split evenly into one contiguous run per adapter.
SCENARIOS: dict[str, tuple[int, int]] = {
    "T256_a256": (256, 256),
    "T256_a16": (256, 16),
    "T256_a1": (256, 1),
    "T4096_a8": (4096, 8),
}
DTYPE = torch.bfloat16


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    a: torch.Tensor
    b: list[torch.Tensor]
    y: torch.Tensor
    meta: Any  # LoRASegments
    min_bytes: int


def make_inputs(in_features: int, outs: list[int], num_tokens: int, num_adapters: int, rank: int) -> Inputs:
    """A pool holding exactly the active adapters, in shuffled row order; one run of tokens each."""
    gen = torch.Generator().manual_seed(0)
    num_slices = len(outs)
    rows = num_adapters * rank
    x = torch.randn(num_tokens, in_features, device="cuda", dtype=DTYPE)
    a = torch.randn(rows, num_slices, in_features, device="cuda", dtype=DTYPE) / in_features**0.5
    b = [torch.randn(rows, o, device="cuda", dtype=DTYPE) / rank**0.5 for o in outs]
    y = torch.randn(num_tokens, sum(outs), device="cuda", dtype=DTYPE)
    order = torch.randperm(num_adapters, generator=gen).tolist()
    segments = [
        (i * num_tokens // num_adapters, (i + 1) * num_tokens // num_adapters, order[i] * rank, rank)
        for i in range(num_adapters)
    ]
    meta = lora.LoRASegments.build(segments, num_tokens, device="cuda")
    elem = x.element_size()
    min_bytes = elem * (
        num_tokens * in_features  # x
        + num_adapters * rank * num_slices * in_features  # A rows
        + num_adapters * rank * sum(outs)  # B rows
        + 2 * num_tokens * sum(outs)  # y read + write
    )
    return Inputs(x, a, b, y, meta, min_bytes)


class Timer:
    """Median of ``reps`` single-call CUDA-event timings after ``warmup`` calls; L2 flushed before each."""

    def __init__(self, reps: int, warmup: int) -> None:
        self.reps, self.warmup = reps, warmup
        self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # > H200's 50 MB L2

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median seconds per call."""
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends, strict=True):
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) / 1e3


def copy_bandwidth(timer: Timer) -> float:
    """Device copy bandwidth in bytes/s (read + write of a 2 GiB buffer)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds


def check(inp: Inputs) -> None:
    y_ref, y = inp.y.clone(), inp.y.clone()
    lora.lora_apply(y_ref, inp.x, inp.a, inp.b, inp.meta)
    tlora.lora_apply_triton(y, inp.x, inp.a, inp.b, inp.meta)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=6e-2, rtol=2e-2)


def sweep(inp: Inputs, timer: Timer) -> dict[str, Any]:
    """Best shrink and expand configs of a small grid around the heuristic's choice."""
    num_tokens, in_features = inp.x.shape
    num_slices = inp.a.shape[1]
    base_s = tlora.shrink_config(
        num_tokens,
        inp.meta.seg_len.numel(),
        in_features,
        num_slices,
        inp.meta.max_rank,
        inp.x.element_size(),
        torch.cuda.get_device_properties(0).multi_processor_count,
    )
    best_s = (float("inf"), base_s)
    for block_k in (64, 128):
        for split_k in (1, 2, 4, 8):
            for stages in (3, 4):
                cfg = dataclasses.replace(base_s, block_k=block_k, split_k=split_k, num_stages=stages)
                sec = timer(lambda cfg=cfg: tlora.lora_shrink_triton(inp.x, inp.a, inp.meta, cfg))
                best_s = min(best_s, (sec, cfg), key=lambda v: v[0])
    t = tlora.lora_shrink_triton(inp.x, inp.a, inp.meta)
    base_e = tlora.expand_config(num_tokens, inp.meta.seg_len.numel(), inp.meta.max_rank)
    best_e = (float("inf"), base_e)
    for block_n in (64, 128, 256, 512):
        for warps in (4, 8):
            cfg = dataclasses.replace(base_e, block_n=block_n, num_warps=warps)
            sec = timer(lambda cfg=cfg: tlora.lora_expand_triton(inp.y, t, inp.b, inp.meta, cfg))
            best_e = min(best_e, (sec, cfg), key=lambda v: v[0])
    return {
        "shrink_us": best_s[0] * 1e6,
        "shrink_config": dataclasses.asdict(best_s[1]),
        "expand_us": best_e[0] * 1e6,
        "expand_config": dataclasses.asdict(best_e[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_ops.json")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also search a small grid of tile configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora_ops needs a CUDA device")

    import triton

    timer = Timer(args.reps, args.warmup)
    copy_bw = copy_bandwidth(timer)
    rows: list[dict[str, Any]] = []
    header = (
        f"{'layer':8} {'scenario':10} {'MB':>8} {'apply us':>9} {'shrink':>8} {'expand':>8} "
        f"{'GB/s':>7} {'%copy':>6} {'torch us':>9} {'speedup':>8}"
    )
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    print(header)
    print("-" * len(header))
    for scenario, (num_tokens, num_adapters) in SCENARIOS.items():
        for layer, (in_features, outs) in LAYERS.items():
            inp = make_inputs(in_features, outs, num_tokens, num_adapters, args.rank)
            check(inp)
            t = tlora.lora_shrink_triton(inp.x, inp.a, inp.meta)
            apply_s = timer(lambda inp=inp: tlora.lora_apply_triton(inp.y, inp.x, inp.a, inp.b, inp.meta))
            shrink_s = timer(lambda inp=inp: tlora.lora_shrink_triton(inp.x, inp.a, inp.meta))
            expand_s = timer(lambda inp=inp, t=t: tlora.lora_expand_triton(inp.y, t, inp.b, inp.meta))
            torch_s = timer(lambda inp=inp: lora.lora_apply(inp.y, inp.x, inp.a, inp.b, inp.meta))
            gbps = inp.min_bytes / apply_s / 1e9
            row: dict[str, Any] = {
                "layer": layer,
                "scenario": scenario,
                "tokens": num_tokens,
                "adapters": num_adapters,
                "rank": args.rank,
                "in_features": in_features,
                "outs": outs,
                "min_bytes": inp.min_bytes,
                "apply_us": apply_s * 1e6,
                "shrink_us": shrink_s * 1e6,
                "expand_us": expand_s * 1e6,
                "torch_ref_us": torch_s * 1e6,
                "achieved_gbps": gbps,
                "fraction_of_copy_bw": gbps * 1e9 / copy_bw,
                "speedup_vs_torch": torch_s / apply_s,
            }
            if args.sweep:
                row["sweep"] = sweep(inp, timer)
            rows.append(row)
            print(
                f"{layer:8} {scenario:10} {inp.min_bytes / 1e6:8.1f} {apply_s * 1e6:9.1f} {shrink_s * 1e6:8.1f} "
                f"{expand_s * 1e6:8.1f} {gbps:7.0f} {100 * gbps * 1e9 / copy_bw:5.0f}% {torch_s * 1e6:9.0f} "
                f"{torch_s / apply_s:7.1f}x"
                + (
                    f"  best shrink {row['sweep']['shrink_us']:.1f} expand {row['sweep']['expand_us']:.1f}"
                    if args.sweep
                    else ""
                ),
                flush=True,
            )
            del inp, t
            torch.cuda.empty_cache()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE),
        "copy_bandwidth_gbps": copy_bw / 1e9,
        "reps": args.reps,
        "cases": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
