"""Host time of one LoRA op call on the GPU path: Triton's JIT entry point vs the direct launcher.

An eager engine step launches every op from Python; when that host time exceeds the GPU's, the GPU
waits. This times ``lora_apply_triton`` (shrink + expand: two launches, planned once per step) at a
7B qkv shape on a mixed step's segments (decode rows of many adapters beside prefill chunks), with
``triton_lora.FAST_LAUNCH`` on and off, next to a torch op's launch for scale. Host time: ``N`` calls queued back to back (no sync inside), divided by
``N``; GPU time: CUDA events over the same loop. Also prints how far apart the two launch paths'
results are (split-K atomics sum in any order, so not always bit for bit).

    python benchmarks/bench_lora_launch.py --out benchmarks/results/lora_launch.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraserve.ops import triton_lora  # noqa: E402
from loraserve.ops.lora import LoRASegments  # noqa: E402


def mixed_segments(decode_adapters: int, rows_each: int, chunks: list[int], rank: int) -> list[tuple]:
    """Decode rows (``rows_each`` per adapter) then prefill chunks, each run on its own adapter."""
    segs, start, row = [], 0, 0
    for n in [rows_each] * decode_adapters + chunks:
        segs.append((start, start + n, row, rank))
        start += n
        row += rank
    return segs


def host_and_gpu_us(fn: Callable[[], None], calls: int) -> tuple[float, float]:
    """``(host us per call, GPU us per call)`` over ``calls`` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1e3 * begin.elapsed_time(end) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/lora_launch.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    in_features, outs, rank = 4096, [4096, 4096, 4096], 16
    segments = mixed_segments(50, 4, [900, 700], rank)
    num_tokens = segments[-1][1]
    rows = segments[-1][2] + rank
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(num_tokens, in_features, device=dev, dtype=dtype, generator=gen)
    a = torch.randn(rows, 3, in_features, device=dev, dtype=dtype, generator=gen) / 64
    b = [torch.randn(rows, o, device=dev, dtype=dtype, generator=gen) / 4 for o in outs]
    y0 = torch.randn(num_tokens, sum(outs), device=dev, dtype=dtype, generator=gen)
    meta = LoRASegments.build(segments, num_tokens, device=dev)
    small = torch.zeros(16, device=dev)
    rows_out = [("torch add_ (one launch)", *host_and_gpu_us(lambda: small.add_(1.0), args.calls))]
    results: dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": {}}
    outputs = {}
    for fast in (False, True):
        triton_lora.FAST_LAUNCH = fast
        y = y0.clone()
        triton_lora.lora_apply_triton(y, x, a, b, meta)  # the first call of a key takes Triton's path
        triton_lora.lora_apply_triton(y, x, a, b, meta)
        outputs[fast] = y
        scratch = y0.clone()
        host, gpu = host_and_gpu_us(
            lambda s=scratch: triton_lora.lora_apply_triton(s, x, a, b, meta), args.calls
        )
        rows_out.append((f"lora_apply, {'direct launcher' if fast else 'JIT entry point'}", host, gpu))
    results["max_abs_diff"] = float((outputs[False].float() - outputs[True].float()).abs().max())
    print(f"{num_tokens} tokens, {len(segments)} segments, qkv 4096 -> 3 x 4096, rank {rank}, bf16")
    print(f"{'call':<52} {'host us':>9} {'GPU us':>9}")
    for name, host, gpu in rows_out:
        print(f"{name:<52} {host:9.1f} {gpu:9.1f}")
        results["rows"][name] = {"host_us": host, "gpu_us": gpu}
    print("largest difference between the launch paths:", results["max_abs_diff"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
