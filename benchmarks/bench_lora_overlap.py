"""GPU microbenchmark: LoRA kernels run after the base GEMMs, or beside them on a second stream.

A decode step is memory-bound and the LoRA kernels are short: at 64 tokens over 64 rank-16 adapters
a decoder layer's eight LoRA launches take ~95 us for ~37 us worth of bytes, the rest being each
launch's fixed cost (ramp-up, tail, launch gap). The shrink depends only on the projection's input,
like the base GEMM, so it can run on a second stream while the GEMM runs; only the expand has to wait
for the GEMM's output. This measures whether that pays, on a chain of the four projections of a
decoder layer (attention and norms left out: they do not touch LoRA), captured in one CUDA graph
over ``--layers`` layers of distinct weights, L2 flushed before each replay:

* ``base``: the four GEMMs alone (what a step without adapters costs);
* ``serial``: GEMM, then shrink + expand (what the engine does);
* ``overlap``: shrink on a side stream beside the GEMM, expand after both;
* ``cublas`` / ``epilogue`` (cases of at most 8 adapters): the LoRA through cuBLAS one segment at
  a time, added in place after the GEMM, or written first for the GEMM to accumulate onto.

Each mode is checked against ``serial`` on one layer first. Results: benchmarks/RESULTS.md.

    python benchmarks/bench_lora_overlap.py [--layers 8] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora_ops import DTYPE, LAYERS, Timer, copy_bandwidth, make_inputs, tlora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ((64, 1), (64, 64), (256, 1), (256, 52), (256, 128), (1024, 1), (4096, 1), (4096, 8))
MAX_RANK = 64


def build(
    num_tokens: int, num_adapters: int, rank: int, layers: int
) -> tuple[list[dict[str, Any]], Any, int]:
    """Per layer, each projection's base weight and LoRA pools; the shared segments; the LoRA bytes."""
    mods: list[dict[str, Any]] = [{} for _ in range(layers)]
    meta = None
    lora_bytes = 0
    for name, (in_features, outs) in LAYERS.items():
        inp = make_inputs(
            in_features, outs, num_tokens, num_adapters, rank,
            num_layers=layers, capacity=num_tokens, max_rank=MAX_RANK,
        )  # fmt: skip
        meta = inp.meta
        lora_bytes += 2 * num_adapters * rank * (len(outs) * in_features + sum(outs))
        for i in range(layers):
            w = torch.randn(sum(outs), in_features, device="cuda", dtype=DTYPE) / in_features**0.5
            mods[i][name] = (w, inp.a[i], inp.b[i])
    return mods, meta, lora_bytes


def cublas_proj(
    h: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: list[torch.Tensor], segments: list, epilogue: bool
) -> torch.Tensor:
    """One projection with LoRA through cuBLAS, one segment at a time: ``t = x @ A^T`` (all slices at
    once), then per slice ``y[:, cols] += t_s @ B_s`` in place (beta = 1), or (``epilogue``) the deltas
    written first and the base GEMM accumulating onto them (cuBLAS reads them in its epilogue)."""
    num_slices = a.shape[1]
    y = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype) if epilogue else F.linear(h, w)
    lo, hi = segments[0][0], segments[-1][1]
    for start, end, row, rank in segments:
        t = (h[start:end] @ a[row : row + rank].reshape(rank * num_slices, -1).T).view(
            end - start, rank, num_slices
        )
        t = t.transpose(1, 2).contiguous()
        col = 0
        for s, b_s in enumerate(b):
            out = y[start:end, col : col + b_s.shape[1]]
            if epilogue:
                torch.mm(t[:, s], b_s[row : row + rank], out=out)
            else:
                out.addmm_(t[:, s], b_s[row : row + rank])
            col += b_s.shape[1]
    if epilogue:
        y[:lo].zero_()
        y[hi:].zero_()
        y.addmm_(h, w.T)
    return y


def layer_chain(mods: list[dict[str, Any]], meta: Any, x: torch.Tensor, mode: str, side: torch.cuda.Stream):
    """The four projections of every layer in order, each fed by the previous one's output."""

    def proj(h: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: list[torch.Tensor]) -> torch.Tensor:
        if mode == "base":
            return F.linear(h, w)
        if mode == "serial":
            y = F.linear(h, w)
            tlora.lora_apply_triton(y, h, a, b, meta)
            return y
        if mode in ("cublas", "epilogue"):
            return cublas_proj(h, w, a, b, meta.segments, epilogue=mode == "epilogue")
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            t = tlora.lora_shrink_triton(h, a, meta)
        y = F.linear(h, w)
        main.wait_stream(side)
        tlora.lora_expand_triton(y, t, b, meta)
        return y

    h = x
    for layer in mods:
        qkv = proj(h, *layer["qkv"])
        o = proj(qkv[:, : x.shape[1]], *layer["o"])
        gate_up = proj(o, *layer["gate_up"])
        h = proj(gate_up[:, : LAYERS["down"][0]], *layer["down"])
    return h


def time_case(
    num_tokens: int,
    num_adapters: int,
    args: argparse.Namespace,
    timer: Timer,
    side: torch.cuda.Stream,
    modes: tuple[str, ...],
    copy_bw: float,
) -> tuple[dict[str, float], float]:
    """us per layer of each mode (checked against ``serial`` first), and the LoRA bytes' copy time."""
    mods, meta, lora_bytes = build(num_tokens, num_adapters, args.rank, args.layers)
    # The cuBLAS modes launch per segment: only meant for a few long segments (prefill).
    modes = tuple(m for m in modes if num_adapters <= 8 or m not in ("cublas", "epilogue"))
    x = torch.randn(num_tokens, LAYERS["qkv"][0], device="cuda", dtype=DTYPE)
    # One layer: over many chained random layers, the shrink's atomic split-K sums (their order
    # varies run to run) grow into large differences.
    ref = layer_chain(mods[:1], meta, x, "serial", side)
    for mode in modes[2:]:
        got = layer_chain(mods[:1], meta, x, mode, side)
        torch.cuda.synchronize()
        torch.testing.assert_close(got.float(), ref.float(), atol=0.25, rtol=2e-2)
    us = {m: timer.graph(lambda m=m: layer_chain(mods, meta, x, m, side)) / args.layers * 1e6 for m in modes}
    return us, lora_bytes / copy_bw * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="*", help="only the cases with these token counts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_overlap.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora_overlap needs a CUDA device")
    timer = Timer(args.reps, 3)
    copy_bw = copy_bandwidth(timer)
    side = torch.cuda.Stream()
    modes = ("base", "serial", "overlap", "cublas", "epilogue")
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    print(f"us per decoder layer (4 projections), {args.layers} layers per graph, rank {args.rank}")
    header = (
        f"{'T':>4} {'ad':>4} | "
        + " ".join(f"{m:>8}" for m in modes)
        + " | lora: serial overlap cublas epilogue | adapter-bytes-floor"
    )
    print(header)
    rows = []
    for num_tokens, num_adapters in CASES:
        if args.tokens and num_tokens not in args.tokens:
            continue
        us, floor_us = time_case(num_tokens, num_adapters, args, timer, side, modes, copy_bw)
        rows.append({"tokens": num_tokens, "adapters": num_adapters, "lora_floor_us": floor_us,
                     **{f"{m}_us": v for m, v in us.items()}})  # fmt: skip
        print(
            f"{num_tokens:4} {num_adapters:4} | " + " ".join(f"{us[m]:8.1f}" if m in us else f"{'-':>8}" for m in modes)
            + " | " + " ".join(f"{us[m] - us['base']:8.1f}" if m in us else f"{'-':>8}" for m in modes[1:])
            + f" | {floor_us:8.1f}",
            flush=True,
        )  # fmt: skip
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth_gbps": copy_bw / 1e9,
                                    "layers": args.layers, "rank": args.rank, "cases": rows}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
