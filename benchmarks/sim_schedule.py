"""The anchor workload's schedule on the CPU: distinct adapters per step and admission waits, per policy.

How many distinct adapters a step reads (and so the LoRA bytes it moves) is decided by the
scheduler alone, so it can be studied without a GPU. This runs the real engine (scheduler, block
manager, adapter store and pool) on issue 5's anchor workload (1,000 requests, ``default_rng(0)``,
lengths uniform in [8, 512], outputs forced to full length, 256 running sequences, 8,192 batched
tokens, request i on adapter i mod 128) with a tiny random model. With ``--model-forward zeros``
(the default) the forward pass is replaced by zero logits: outputs are forced to full length and
sampling is greedy, so the schedule is the same as with the real forward (the H200 run of
``bench_gpu.py`` config (d) took 1,308 steps with 73.8 distinct adapters per step; this gives
1,309 and 75.0), in about a second instead of minutes. ``--model-forward real`` runs the tiny
model.

    python benchmarks/sim_schedule.py --bounds 64 256 --out benchmarks/results/sim_schedule.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import workload  # noqa: E402

from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.lora.adapter import LORA_MODULES, LoRAModuleWeights, LoRAWeights  # noqa: E402
from loraserve.testing import TINY_VOCAB, make_tiny_model  # noqa: E402


def anchor_workload(n: int) -> tuple[list[list[int]], list[int]]:
    """The anchor's requests (``bench_gpu.workload``), prompt ids folded into the tiny vocabulary."""
    prompts, out_lens = workload(n)
    return [[t % (TINY_VOCAB - 8) + 3 for t in p] for p in prompts], out_lens


def simulate(model: Path, args: argparse.Namespace, bound: int, affinity: bool) -> dict:
    llm = LLM(
        str(model),
        max_loras=args.num_adapters,
        max_lora_rank=16,
        max_cpu_loras=2 * args.num_adapters,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_model_len=2048,
        kv_cache_memory=1 << 30,
        adapter_wait_bound_steps=bound,
        adapter_affinity=affinity,
    )
    engine = llm.engine
    mcfg = engine.cfg.model
    shapes = mcfg.lora_shapes()
    gen = torch.Generator().manual_seed(0)
    for i in range(args.num_adapters):
        modules = {
            (layer, m): LoRAModuleWeights(
                a=torch.randn(16, shapes[m][0], generator=gen) * 0.1,
                b=torch.randn(shapes[m][1], 16, generator=gen) * 0.01,
                scale=2.0,
            )
            for layer in range(mcfg.num_layers)
            for m in LORA_MODULES
        }
        name = f"d{i}"
        weights = LoRAWeights(name=name, path=f"<sim:{i}>", rank=16, modules=modules, content_hash=f"sim-{i}")
        engine.store.register_weights(name, weights)
    if args.model_forward == "zeros":
        runner = engine.runner

        def zero_logits(scheduled, store):
            batch = runner.order(scheduled, store)
            return batch, torch.zeros(sum(1 for item in batch if item.samples), mcfg.vocab_size)

        runner.run = zero_logits
    prompts, out_lens = anchor_workload(args.num_requests)
    for i, (p, o) in enumerate(zip(prompts, out_lens, strict=True)):
        params = SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)
        engine.add_request(f"r{i}", p, params, engine.resolve_lora(f"d{i % args.num_adapters}"), stream=False)
    scheduler = engine.scheduler
    steps: list[tuple[int, int, int]] = []
    admitted: dict[str, int] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        st = engine.last_step
        steps.append((st.num_seqs, st.num_adapters, st.num_tokens))
        for seq in scheduler.running:
            admitted.setdefault(seq.request_id, len(steps))
    waits = sorted(admitted.values())
    decode = [s for s in steps if s[0] == s[2]]
    return {
        "policy": "adapter affinity" if affinity else "arrival order",
        "bound": bound if affinity else None,
        "steps": len(steps),
        "mean_batch": statistics.mean(s[0] for s in steps),
        "mean_distinct_adapters": statistics.mean(s[1] for s in steps),
        "max_distinct_adapters": max(s[1] for s in steps),
        "mean_distinct_adapters_decode": statistics.mean(s[1] for s in decode) if decode else 0.0,
        "admission_step_p50": waits[len(waits) // 2],
        "admission_step_p99": waits[min(len(waits) - 1, int(0.99 * len(waits)))],
        "admission_step_max": waits[-1],
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bounds", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--num-adapters", type=int, default=128)
    ap.add_argument("--model-forward", choices=["zeros", "real"], default="zeros")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", max_position_embeddings=2048)
        runs = [simulate(model, args, args.bounds[0], affinity=False)]
        runs += [simulate(model, args, b, affinity=True) for b in args.bounds]
    print(
        f"{'policy':>17} {'bound':>6} {'steps':>6} {'batch':>6} {'adapters/step':>13} {'max':>4} "
        f"{'decode':>6} {'admit p50':>9} {'p99':>5} {'max':>5}"
    )
    for r in runs:
        print(
            f"{r['policy']:>17} {r['bound'] or '-':>6} {r['steps']:>6} {r['mean_batch']:>6.1f} "
            f"{r['mean_distinct_adapters']:>13.1f} {r['max_distinct_adapters']:>4} "
            f"{r['mean_distinct_adapters_decode']:>6.1f} {r['admission_step_p50']:>9} "
            f"{r['admission_step_p99']:>5} {r['admission_step_max']:>5}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(args), "runs": runs}, indent=2)
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
