"""Where a GPU step's time goes at Llama-2-7B shape: host vs device, and the kernels of each.

For decode-only steps at a fixed batch and context, and for a window of the anchor workload (mixed
prefill + decode steps), it reports the wall time per engine step, the device time the kernels
took in that window (the rest is the GPU waiting for the host), and the kernels ranked by device
time.

    python benchmarks/profile_gpu.py --out benchmarks/results/profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import ENGINE_ARGS, LLAMA2_7B, add_decode_batch, random_adapter, workload  # noqa: E402

from loraserve import LLM, SamplingParams  # noqa: E402


def kernel_table(prof, steps: int, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Device time per step of every kernel name (ms), ranked, and the total."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_name[ev.name]
            entry[0] += ev.device_time_total / 1e3 / steps
            entry[1] += 1
    ranked = sorted(((n[:90], t, c // steps) for n, (t, c) in per_name.items()), key=lambda x: -x[1])
    return sum(t for _, t, _ in ranked), ranked[:top]


def timed_steps(llm: LLM, steps: int, predicate) -> tuple[float, int, object]:
    """Run engine steps; profile ``steps`` consecutive ones that satisfy ``predicate``."""
    engine = llm.engine
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    done = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        while done < steps and engine.has_unfinished():
            engine.step()
            if predicate(engine.last_step):
                done += 1
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return wall, done, prof


def drain(llm: LLM) -> None:
    """Abort what is left (the window is measured; the rest of the workload is not needed)."""
    for rid in list(llm.engine.requests):
        llm.engine.abort(rid)


def decode_profile(llm: LLM, batch: int, ctx: int, loras, top: int) -> dict:
    engine = llm.engine
    add_decode_batch(llm, batch, ctx, loras, 60, f"p{time.monotonic_ns()}-")
    while True:  # run the prefills
        engine.step()
        st = engine.last_step
        if st.num_tokens == st.num_seqs == batch:
            break
    # Wall time without the profiler first: its per-event overhead inflates host time.
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    wall, n, prof = timed_steps(llm, 10, lambda st: st.num_tokens == st.num_seqs == batch)
    drain(llm)
    gpu, kernels = kernel_table(prof, n, top)
    return {
        "batch": batch,
        "ctx": ctx,
        "step_ms": 1e3 * float(np.median(times)),
        "profiled_step_ms": 1e3 * wall / max(n, 1),
        "gpu_ms_per_step": gpu,
        "kernels": kernels,
    }


def host_table(llm: LLM, steps: int, predicate, top: int) -> list[tuple[str, float, float]]:
    """cProfile of ``steps`` engine steps that satisfy ``predicate``: the host functions ranked by own
    time, as ``(function, own ms per step, cumulative ms per step)``."""
    engine = llm.engine
    prof = cProfile.Profile()
    done = 0
    while done < steps and engine.has_unfinished():
        prof.enable()
        engine.step()
        prof.disable()
        if predicate(engine.last_step):
            done += 1
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = [
        (f"{Path(file).name}:{line}({name})", tt * 1e3 / max(done, 1), ct * 1e3 / max(done, 1))
        for (file, line, name), (_, _, tt, ct, _) in stats.items()
    ]
    return sorted(rows, key=lambda r: -r[1])[:top]


def is_mixed(st) -> bool:
    return st.num_tokens != st.num_seqs


def workload_profile(llm: LLM, n: int, loras, top: int, mixed_only: bool = False) -> dict:
    """A window of the anchor workload after 40 steps: all steps, or only prefill / mixed ones."""
    prompts, out_lens = workload(n)
    engine = llm.engine
    for i, (p, o) in enumerate(zip(prompts, out_lens, strict=True)):
        engine.add_request(
            f"w{i}",
            p,
            SamplingParams(temperature=0, max_tokens=o, ignore_eos=True),
            engine.resolve_lora(loras[i % len(loras)]),
            stream=False,
        )
    for _ in range(40):
        engine.step()
    pred = is_mixed if mixed_only else (lambda st: True)
    result: dict = {}
    if mixed_only:
        # Wall time of mixed steps without a profiler attached (its per-event overhead inflates host time).
        times = []
        while len(times) < 20 and engine.has_unfinished():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            if is_mixed(engine.last_step):
                times.append(time.perf_counter() - t0)
        result["unprofiled_step_ms"] = 1e3 * float(np.median(times))
        result["host"] = host_table(llm, 10, pred, top)
    wall, steps, prof = timed_steps(llm, 20 if mixed_only else 30, pred)
    drain(llm)
    gpu, kernels = kernel_table(prof, steps, top)
    result.update(steps=steps, step_ms=1e3 * wall / steps, gpu_ms_per_step=gpu, kernels=kernels)
    return result


def show(title: str, r: dict) -> None:
    unprofiled = f" ({r['unprofiled_step_ms']:.2f} ms unprofiled)" if "unprofiled_step_ms" in r else ""
    print(
        f"\n== {title}: step {r['step_ms']:.2f} ms wall{unprofiled}, kernels {r['gpu_ms_per_step']:.2f} ms/step"
    )
    for name, ms, count in r["kernels"]:
        print(f"  {ms:8.3f} ms  x{count:<4d} {name}")
    if "host" in r:
        print("  host (cProfile, ms per step): own / cumulative")
        for name, own, cum in r["host"]:
            print(f"  {own:8.3f} {cum:8.3f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--lora-adapters", type=int, default=32, help="adapters for the LoRA profile (0: skip)")
    ap.add_argument(
        "--workload-requests", type=int, default=400, help="requests of the workload window (0: skip it)"
    )
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="profile only prefill / mixed workload steps, with their host functions",
    )
    ap.add_argument(
        "--mixed-ranks",
        type=int,
        nargs="*",
        default=[],
        help="also profile (e): as many adapters with these ranks in turn (e.g. 8 16 32 64)",
    )
    ap.add_argument("--skip-base", action="store_true", help="skip the engine without LoRA")
    ap.add_argument("--out", default="benchmarks/results/profile.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prof-7b-"))
    (root / "config.json").write_text(json.dumps(LLAMA2_7B))
    common = ENGINE_ARGS
    results: dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    window = "mixed steps" if args.mixed else "steps 44-73"
    if not args.skip_base:
        llm = LLM(str(root), enable_lora=False, **common)
        for b in args.batches:
            r = decode_profile(llm, b, args.ctx, [None], args.top)
            results[f"a_decode_{b}"] = r
            show(f"(a) decode batch {b} ctx {args.ctx}", r)
        if args.workload_requests:
            r = workload_profile(llm, args.workload_requests, [None], args.top, args.mixed)
            results["a_workload"] = r
            show(f"(a) workload window ({window} of {args.workload_requests} requests)", r)
        out.write_text(json.dumps(results, indent=2))
        del llm
        torch.cuda.empty_cache()

    if args.lora_adapters:
        llm = LLM(str(root), enable_lora=True, max_loras=64, max_lora_rank=64, **common)
        mcfg = llm.engine.cfg.model
        names = [f"d{i}" for i in range(args.lora_adapters)]
        for i, name in enumerate(names):
            weights = random_adapter(name, 16, 1000 + i, mcfg.lora_shapes(), mcfg.num_layers)
            llm.engine.store.register_weights(name, weights)
        for b in args.batches:
            r = decode_profile(llm, b, args.ctx, names, args.top)
            results[f"d_decode_{b}"] = r
            show(f"(d) decode batch {b}, {len(names)} adapters", r)
        if args.workload_requests:
            r = workload_profile(llm, args.workload_requests, names[:1], args.top, args.mixed)
            results["c_workload"] = r
            show(f"(c) workload window ({window}), 1 adapter", r)
            r = workload_profile(llm, args.workload_requests, names, args.top, args.mixed)
            results["d_workload"] = r
            show(f"(d) workload window ({window}), {len(names)} adapters", r)
        if args.mixed_ranks:
            ranks = args.mixed_ranks
            e_names = [f"e{i}" for i in range(args.lora_adapters)]
            for i, name in enumerate(e_names):
                weights = random_adapter(
                    name, ranks[i % len(ranks)], 5000 + i, mcfg.lora_shapes(), mcfg.num_layers
                )
                llm.engine.store.register_weights(name, weights)
            label = f"{len(e_names)} adapters, ranks {ranks}"
            for b in args.batches:
                r = decode_profile(llm, b, args.ctx, e_names, args.top)
                results[f"e_decode_{b}"] = r
                show(f"(e) decode batch {b}, {label}", r)
            if args.workload_requests:
                r = workload_profile(llm, args.workload_requests, e_names, args.top, args.mixed)
                results["e_workload"] = r
                show(f"(e) workload window ({window}), {label}", r)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
