"""Where a GPU step's time goes at Llama-2-7B shape: host vs device, and the kernels of each.

For decode-only steps at a fixed batch and context, and for a window of the anchor workload (mixed
prefill + decode steps), it reports the wall time per engine step, the device time the kernels
took in that window (the rest is the GPU waiting for the host), and the kernels ranked by device
time.

    python benchmarks/profile_gpu.py --out benchmarks/results/profile.json
"""

from __future__ import annotations

import argparse
import json
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
    while llm.engine.has_unfinished():
        llm.engine.step()


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


def workload_profile(llm: LLM, n: int, loras, top: int) -> dict:
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
    wall, steps, prof = timed_steps(llm, 30, lambda st: True)
    drain(llm)
    gpu, kernels = kernel_table(prof, steps, top)
    return {"steps": steps, "step_ms": 1e3 * wall / steps, "gpu_ms_per_step": gpu, "kernels": kernels}


def show(title: str, r: dict) -> None:
    print(f"\n== {title}: step {r['step_ms']:.2f} ms wall, kernels {r['gpu_ms_per_step']:.2f} ms/step")
    for name, ms, count in r["kernels"]:
        print(f"  {ms:8.3f} ms  x{count:<4d} {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--lora-adapters", type=int, default=32, help="adapters for the LoRA profile (0: skip)")
    ap.add_argument(
        "--workload-requests", type=int, default=400, help="requests of the workload window (0: skip it)"
    )
    ap.add_argument("--out", default="benchmarks/results/profile.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prof-7b-"))
    (root / "config.json").write_text(json.dumps(LLAMA2_7B))
    common = ENGINE_ARGS
    results: dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    llm = LLM(str(root), enable_lora=False, **common)
    for b in args.batches:
        r = decode_profile(llm, b, args.ctx, [None], args.top)
        results[f"a_decode_{b}"] = r
        show(f"(a) decode batch {b} ctx {args.ctx}", r)
    if args.workload_requests:
        r = workload_profile(llm, args.workload_requests, [None], args.top)
        results["a_workload"] = r
        show(f"(a) workload window (steps 44-73 of {args.workload_requests} requests)", r)
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
        r = decode_profile(llm, 64, args.ctx, names, args.top)
        results["d_decode_64"] = r
        show(f"(d) decode batch 64, {len(names)} adapters", r)
        if args.workload_requests:
            r = workload_profile(llm, args.workload_requests, names, args.top)
            results["d_workload"] = r
            show(f"(d) workload window, {len(names)} adapters", r)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
