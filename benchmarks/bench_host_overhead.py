"""Host (Python) time of one engine step, measured on the CPU with a tiny model.

On a GPU the model's forward is kernel launches (or one graph replay) that run asynchronously;
everything else ``LLMEngine.step`` does (scheduling, building the batch's ids / positions / slots
/ block tables / LoRA segments, the sampler's bookkeeping, recording the new tokens) is host
time, and the part of it after the sampler's device-to-host copy is time the GPU waits. With a
tiny model on the CPU the forward is cheap, so this script measures that host time directly: per
step, the time of ``step()`` minus the time spent inside the model's forward, split into phases
by thin timing wrappers around the engine's parts (no profiler overhead in the numbers). The
``sample`` phase includes the sampler's tensor work (logsumexp, argmax, ...), which runs on the
GPU there; ``prepare`` (``ModelRunner.run`` minus the forward) includes freeing the forward's CPU
activations, noticeable on large prefill steps.

Times are this thread's CPU time by default (``--clock thread``), which a busy shared machine
disturbs far less than elapsed time; the forward runs on this thread (``--threads 1``).

Scenarios (``--scenarios``):

* ``decode``: 256 requests with 512-token prompts, decode-only steps at batch 256 (no LoRA);
* ``decode-lora``: the same on a LoRA engine, request ``i`` on adapter ``i mod 128``;
* ``mixed``: the anchor workload (1,000 requests, prompts and outputs uniform in [8, 512], up to
  256 running, 8,192 batched tokens, greedy, ``ignore_eos``), the first ``--mixed-steps`` steps;
* ``lora``: the same workload on a LoRA engine with ``--num-adapters`` (128) rank-16 adapters
  built in memory, request ``i`` on adapter ``i mod 128``, all resident (as the GPU benchmark).

    python benchmarks/bench_host_overhead.py --out benchmarks/results/host_overhead.json
    python benchmarks/bench_host_overhead.py --scenarios decode --profile 25

``--profile N`` also prints cProfile's N most expensive functions (cumulative time per step)
over the measured steps of each scenario, in a second, separate run of the same steps.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_many_adapters import write_model_config  # beside this script

from loraserve import LLM, SamplingParams
from loraserve.lora.adapter import LORA_MODULES, LoRAModuleWeights, LoRAWeights

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
PHASES = ("schedule", "prepare", "forward", "sample", "on_step_done", "other")
COLUMNS = ("step", "host", *PHASES)


def random_adapter(llm: LLM, name: str, rank: int, seed: int) -> LoRAWeights:
    """A rank-``rank`` adapter on all seven projections with random weights."""
    mcfg = llm.engine.cfg.model
    shapes = mcfg.lora_shapes()
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(mcfg.num_layers):
        for m in LORA_MODULES:
            fin, fout = shapes[m]
            a = torch.randn(rank, fin, generator=gen) * fin**-0.5
            b = torch.randn(fout, rank, generator=gen) * 0.02
            modules[(layer, m)] = LoRAModuleWeights(a=a, b=b, scale=2.0)
    return LoRAWeights(
        name=name, path=f"<bench:{name}>", rank=rank, modules=modules, content_hash=f"h-{seed}"
    )


def workload(n: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The anchor's request shapes (prompts and outputs uniform in [8, 512]), token ids within ``vocab``."""
    rng = np.random.default_rng(0)
    in_lens = rng.integers(8, 513, size=n)
    out_lens = rng.integers(8, 513, size=n)
    prompts = [rng.integers(3, vocab, size=int(k)).tolist() for k in in_lens]
    return prompts, [int(x) for x in out_lens]


class PhaseTimer:
    """Wraps the engine's parts in place and accumulates their time per phase (by ``clock``)."""

    def __init__(self, llm: LLM, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        engine = llm.engine
        runner = engine.runner
        engine.scheduler.schedule = self._timed("schedule", engine.scheduler.schedule)
        engine.scheduler.on_step_done = self._timed("on_step_done", engine.scheduler.on_step_done)
        runner.run = self._timed("run", runner.run)
        runner.model = self._timed("forward", runner.model)
        engine.sampler = self._timed("sample", engine.sampler)

    def _timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[phase] += self.clock() - t0

        return wrapper

    def reset(self) -> None:
        self.totals.clear()


def build(root: Path, lora: bool, num_adapters: int) -> tuple[LLM, list[str | None]]:
    llm = LLM(
        str(root),
        device="cpu",
        dtype="float32",
        load_format="dummy",
        skip_tokenizer_init=True,
        enable_lora=lora,
        max_loras=64,
        max_lora_rank=64,
        max_cpu_loras=1024,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        num_kv_blocks=16384,
        prefetch_workers=0,
    )
    names: list[str | None] = [None]
    if lora:
        store = llm.engine.store
        assert store is not None
        names = []
        for i in range(num_adapters):
            entry = store.register_weights(f"ad{i}", random_adapter(llm, f"ad{i}", 16, seed=i))
            store.preload(entry.name, "gpu")
            names.append(entry.name)
    return llm, names


def add_requests(llm: LLM, prompts: list[list[int]], out_lens: list[int], names: list[str | None]) -> None:
    engine = llm.engine
    for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True)):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add_request(f"r{i}", p, params, engine.resolve_lora(names[i % len(names)]), stream=False)


def setup(scenario: str, root: Path, args: argparse.Namespace) -> LLM:
    """Build the engine for ``scenario``, queue its requests and run up to the measured window."""
    lora = scenario in ("lora", "decode-lora")
    llm, names = build(root, lora, args.num_adapters)
    engine = llm.engine
    vocab = TINY["vocab_size"]
    if scenario.startswith("decode"):
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, vocab, size=512).tolist() for _ in range(256)]
        add_requests(llm, prompts, [1000] * 256, names)
        while not (engine.last_step.num_seqs == 256 and engine.last_step.num_tokens == 256):
            engine.step()
        for _ in range(3):
            engine.step()
        return llm
    prompts, out_lens = workload(args.requests, vocab)
    add_requests(llm, prompts, out_lens, names)
    return llm


def measure(llm: LLM, steps: int, clock: Callable[[], float]) -> dict[str, Any]:
    """Run ``steps`` steps (or until done); per-step time, forward, host and phase times in ms.

    Means and medians over the steps: the median resists the noise of a shared machine.
    """
    timer = PhaseTimer(llm, clock)
    engine = llm.engine
    per_step: list[dict[str, float]] = []
    tokens = seqs = 0
    while len(per_step) < steps and engine.has_unfinished():
        timer.reset()
        t0 = clock()
        engine.step()
        total = clock() - t0
        t = timer.totals
        row = {
            "schedule": t["schedule"],
            "prepare": t["run"] - t["forward"],
            "forward": t["forward"],
            "sample": t["sample"],
            "on_step_done": t["on_step_done"],
        }
        row["other"] = total - sum(row.values())
        row["step"] = total
        row["host"] = total - row["forward"]
        per_step.append({k: 1e3 * v for k, v in row.items()})
        tokens += engine.last_step.num_tokens
        seqs += engine.last_step.num_seqs
    n = max(len(per_step), 1)
    return {
        "steps": len(per_step),
        "mean_seqs": seqs / n,
        "mean_tokens": tokens / n,
        "mean_ms": {k: float(np.mean([r[k] for r in per_step])) for k in COLUMNS},
        "median_ms": {k: float(np.median([r[k] for r in per_step])) for k in COLUMNS},
    }


def profile(llm: LLM, steps: int, top: int) -> list[tuple[str, float, float]]:
    """cProfile over ``steps`` steps: the ``top`` functions by cumulative time, ms per step (cum, own)."""
    engine = llm.engine
    prof = cProfile.Profile()
    n = 0
    prof.enable()
    while n < steps and engine.has_unfinished():
        engine.step()
        n += 1
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, _, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({name})" if line else name
        rows.append((where, 1e3 * cum / max(n, 1), 1e3 * own / max(n, 1)))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=["decode", "mixed", "lora"])
    ap.add_argument("--decode-steps", type=int, default=50)
    ap.add_argument("--mixed-steps", type=int, default=300)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--num-adapters", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the forward runs here)")
    ap.add_argument(
        "--clock",
        choices=["thread", "wall"],
        default="thread",
        help="thread: this thread's CPU time (robust on a shared machine); wall: elapsed time",
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N functions")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--compare", type=Path, default=None, help="a JSON of an earlier run (--out): print its rows too"
    )
    args = ap.parse_args()
    earlier = json.loads(args.compare.read_text()) if args.compare is not None else {}
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"model": TINY, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_model_config(Path(tmp) / "tiny", TINY)
        for scenario in args.scenarios:
            steps = args.decode_steps if scenario.startswith("decode") else args.mixed_steps
            llm = setup(scenario, root, args)
            res = measure(llm, steps, time.thread_time if args.clock == "thread" else time.perf_counter)
            results[scenario] = res
            print(
                f"\n{scenario}: {res['steps']} steps, {res['mean_seqs']:.0f} seqs and "
                f"{res['mean_tokens']:.0f} tokens per step (ms per step)"
            )
            print(" " * 16 + "".join(f"{k:>13}" for k in COLUMNS))
            for label, run in (("earlier", earlier.get(scenario)), ("", res)):
                for stat in ("mean", "median") if run is not None else ():
                    name = f"{label} {stat}".strip()
                    print(f"  {name:>14}" + "".join(f"{run[stat + '_ms'][k]:13.3f}" for k in COLUMNS))
            if args.profile:
                llm = setup(scenario, root, args)
                rows = profile(llm, steps, args.profile)
                results[scenario]["profile"] = rows
                print(f"  cProfile, ms per step (cumulative / own), {scenario}:")
                for where, cum, own in rows:
                    print(f"    {cum:9.3f} {own:9.3f}  {where}")
    if args.compare is not None:
        results["earlier"] = {"path": str(args.compare), "results": earlier}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
