"""GPU end-to-end throughput at Llama-2-7B shape: loraserve without LoRA, with base rows, 1 / 128 / mixed-rank adapters.

Everything is built on the device (random bf16 weights at real shape, nothing downloaded) and
measured side by side in one run. The workload is the issue's anchor: ``rng = default_rng(0)``,
input and output lengths uniform in [8, 512], prompt ids uniform in [100, 31000), outputs forced to
full length, at most 256 running sequences.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json            # the full set
    python benchmarks/bench_gpu.py --num-requests 200 --configs a d              # a quick look

Configurations: (a) engine without LoRA; (b) base-only requests on a LoRA engine; (c) one rank-16
adapter on all seven projections for every request; (d) 128 such adapters, request i -> adapter
i mod 128; (e) 128 adapters with ranks in {8, 16, 32, 64}; (peft) transformers + peft on the same
weights with ``adapter_names`` batching, on a subset of requests.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compile_counter import COMPILES  # noqa: E402

from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.lora.adapter import LORA_MODULES, LoRAModuleWeights, LoRAWeights  # noqa: E402

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}

# The anchor's engine settings: random bf16 weights made on the device, 256 running sequences,
# 8,192 batched tokens, an 80 GB KV cache.
ENGINE_ARGS = dict(
    device="cuda",
    dtype="bfloat16",
    load_format="dummy",
    skip_tokenizer_init=True,
    max_num_seqs=256,
    max_num_batched_tokens=8192,
    kv_cache_memory=int(80e9),
    max_model_len=2048,
)


def workload(n: int) -> tuple[list[list[int]], list[int]]:
    """The anchor's requests, drawn exactly as specified (the first ``n`` of the 1,000)."""
    rng = np.random.default_rng(0)
    in_lens = rng.integers(8, 513, size=1000)
    out_lens = rng.integers(8, 513, size=1000)
    prompts = [rng.integers(100, 31000, size=int(n_in)).tolist() for n_in in in_lens]
    return prompts[:n], [int(x) for x in out_lens[:n]]


def random_adapter(
    name: str, rank: int, seed: int, shapes: dict[str, tuple[int, int]], layers: int
) -> LoRAWeights:
    """A rank-``rank`` adapter on all seven projections, random (bf16-representable) weights, alpha = 2r."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for m in LORA_MODULES:
            fin, fout = shapes[m]
            a = (torch.randn(rank, fin, device="cuda", generator=gen) * fin**-0.5).bfloat16().float()
            b = (torch.randn(fout, rank, device="cuda", generator=gen) * 0.02).bfloat16().float()
            modules[(layer, m)] = LoRAModuleWeights(a=a, b=b, scale=2.0)
    return LoRAWeights(
        name=name, path=f"<bench:{name}>", rank=rank, modules=modules, content_hash=f"bench-{seed}-{rank}"
    )


def warm_up(llm: LLM, prompts, loras) -> None:
    """Compile every kernel specialization a run will meet (prefill, mixed and decode shapes) untimed."""
    n = min(len(prompts), 300)
    run_engine(llm, prompts[:n], [16] * n, loras[:n])


class GCPauses:
    """Python garbage-collector pauses (seconds, by generation) while installed: a full collection
    scans every live object, which can stall a step as long as a kernel compile does."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t0))

    def __enter__(self) -> GCPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        by_gen = {}
        for gen in (0, 1, 2):
            p = [d for g, d in self.pauses if g == gen]
            by_gen[f"gen{gen}"] = {"count": len(p), "seconds": sum(p), "max_s": max(p, default=0.0)}
        return by_gen


def run_engine(llm: LLM, prompts, out_lens, loras) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    engine = llm.engine
    steps: list[tuple[int, int, int, float, int, float, float]] = []
    ids = []
    for i, (p, sp, lora) in enumerate(zip(prompts, params, loras, strict=True)):
        rid = f"r{i}"
        engine.add_request(rid, p, sp, engine.resolve_lora(lora), stream=False)
        ids.append(rid)
    # No prompt KV from earlier runs (the warm-up ran the workload's first prompts): a timed run
    # reusing it would skip part of its prefill, more so the earlier its schedule admits them.
    llm.reset_prefix_cache()
    torch.cuda.synchronize()
    compiles = COMPILES.mark()
    allocator = _allocator_counts()
    start = time.perf_counter()
    done = 0
    with GCPauses() as gc_pauses:
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outs = engine.step()
            st = engine.last_step
            steps.append(
                (
                    st.num_seqs,
                    st.num_adapters,
                    st.adapter_bytes,
                    time.perf_counter() - t0,
                    st.num_tokens,
                    st.launch_seconds,
                    st.wait_seconds,
                )
            )
            done += sum(1 for o in outs if o.finished)
    elapsed = time.perf_counter() - start
    out_tokens = sum(out_lens)
    decode = [s for s in steps if s[4] == s[0]]
    other = [s for s in steps if s[4] != s[0]]
    kinds = {"decode": decode, "other": other}
    slowest = sorted(range(len(steps)), key=lambda i: steps[i][3], reverse=True)[:8]
    return {
        "seconds": elapsed,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / elapsed,
        "steps": len(steps),
        "decode_steps": len(decode),
        # Wall time split by step kind: decode-only steps (CUDA graphs) vs prefill / mixed steps.
        "decode_seconds": sum(s[3] for s in decode),
        "other_seconds": sum(s[3] for s in other),
        "other_tokens": sum(s[4] for s in other),
        "mean_distinct_adapters_per_step": statistics.mean(s[1] for s in steps) if steps else 0,
        "max_distinct_adapters_per_step": max((s[1] for s in steps), default=0),
        "mean_adapter_bytes_per_step": statistics.mean(s[2] for s in steps) if steps else 0,
        "mean_batch": statistics.mean(s[0] for s in steps) if steps else 0,
        "slowest_steps_s": [round(steps[i][3], 4) for i in slowest[:5]],
        # What the slowest steps were, to tell stalls (compiles, GC, loads) from heavy steps.
        "slowest_steps": [
            {
                "index": i,
                "seconds": round(steps[i][3], 4),
                "seqs": steps[i][0],
                "tokens": steps[i][4],
                "adapters": steps[i][1],
            }
            for i in slowest
        ],
        # Median step time by kind, to set the slow steps against.
        "median_decode_step_s": statistics.median(s[3] for s in decode) if decode else 0,
        "median_other_step_s": statistics.median(s[3] for s in other) if other else 0,
        # Host time until the forward was launched, and then until the sampled tokens arrived
        # (StepStats): a wait near zero means the host's launches, not the GPU, set the pace.
        "median_launch_s": {k: statistics.median(s[5] for s in v) if v else 0 for k, v in kinds.items()},
        "median_wait_s": {k: statistics.median(s[6] for s in v) if v else 0 for k, v in kinds.items()},
        "compiles_during_run": COMPILES.since(compiles),
        # cudaMalloc / cudaFree calls and allocation retries of torch's caching allocator during the
        # run: each free (and a retry frees cached blocks) synchronizes the device, so a launch phase
        # that does them waits on the GPU.
        "allocator": {k: v - allocator[k] for k, v in _allocator_counts().items()},
        "gc_pauses": gc_pauses.summary(),
    }


def _allocator_counts() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def add_decode_batch(llm: LLM, batch: int, ctx: int, loras, max_tokens: int, tag: str) -> None:
    """Queue ``batch`` requests of ``ctx`` random prompt tokens, request i on ``loras[i % len]``."""
    engine = llm.engine
    rng = np.random.default_rng(1)
    for i in range(batch):
        engine.add_request(
            f"{tag}{batch}-{i}",
            rng.integers(100, 31000, size=ctx).tolist(),
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            engine.resolve_lora(loras[i % len(loras)]),
            stream=False,
        )


def decode_step_times(llm: LLM, batch: int, ctx: int, loras) -> float:
    """Median decode step time at ``batch`` sequences of context ``ctx`` (after their prefill)."""
    engine = llm.engine
    add_decode_batch(llm, batch, ctx, loras, 40, "d")
    times = []
    while engine.has_unfinished():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        st = engine.last_step
        if st.num_tokens == st.num_seqs == batch:
            times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) if len(times) > 5 else float("nan")


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--configs", nargs="+", default=["a", "b", "c", "d", "e", "peft", "floor"])
    ap.add_argument("--num-adapters", type=int, default=128)
    ap.add_argument("--peft-requests", type=int, default=64)
    ap.add_argument("--peft-adapters", type=int, default=16)
    ap.add_argument("--peft-batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-7b-"))
    (root / "config.json").write_text(json.dumps(LLAMA2_7B))
    prompts, out_lens = workload(args.num_requests)
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "num_requests": args.num_requests,
        "input_tokens": sum(map(len, prompts)),
        "output_tokens": sum(out_lens),
        "configs": {},
    }
    common = ENGINE_ARGS
    bw = copy_bandwidth()
    results["copy_bandwidth_GBs"] = bw / 1e9

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, r: dict) -> None:
        results["configs"][name] = r
        # Written after every configuration, so a run cut short by a time limit keeps what it measured.
        out_path.write_text(json.dumps(results, indent=2, default=str))
        base = results["configs"].get("a", {}).get("output_tok_s")
        ratio = f"{r['output_tok_s'] / base:.3f}" if base else "-"
        print(
            f"{name:6s} {r['output_tok_s']:10.1f} tok/s  ratio {ratio}  steps {r.get('steps', '-')}  "
            f"adapters/step {r.get('mean_distinct_adapters_per_step', 0):.1f}  "
            f"adapter MB/step {r.get('mean_adapter_bytes_per_step', 0) / 1e6:.0f}  "
            f"decode {r.get('decode_seconds', 0):.1f} s  prefill/mixed {r.get('other_seconds', 0):.1f} s  "
            f"compiles {r.get('compiles_during_run')}  slowest {r.get('slowest_steps_s', [])[:3]}",
            flush=True,
        )
        if "slowest_steps" in r:
            gen2 = r["gc_pauses"]["gen2"]
            print(
                f"       median step decode {r['median_decode_step_s'] * 1e3:.1f} ms, "
                f"other {r['median_other_step_s'] * 1e3:.1f} ms (host launch / wait for the GPU: decode "
                f"{r['median_launch_s']['decode'] * 1e3:.1f} / {r['median_wait_s']['decode'] * 1e3:.1f} ms, "
                f"other {r['median_launch_s']['other'] * 1e3:.1f} / {r['median_wait_s']['other'] * 1e3:.1f} ms); "
                f"allocator {r.get('allocator')}; full GCs {gen2['count']} "
                f"({gen2['seconds']:.2f} s, max {gen2['max_s'] * 1e3:.0f} ms); slowest: "
                + ", ".join(
                    f"#{x['index']} {x['seconds'] * 1e3:.0f} ms ({x['tokens']} tok, {x['seqs']} seqs, "
                    f"{x['adapters']} ad)"
                    for x in r["slowest_steps"][:5]
                ),
                flush=True,
            )

    if "a" in args.configs:
        llm = LLM(str(root), enable_lora=False, **common)
        warm_up(llm, prompts, [None] * len(prompts))
        record("a", run_engine(llm, prompts, out_lens, [None] * len(prompts)))
        if "floor" in args.configs:
            results["decode_step_a"] = {b: decode_step_times(llm, b, 512, [None]) for b in (1, 64, 256)}
        del llm
        torch.cuda.empty_cache()

    lora_cfgs = [c for c in args.configs if c in ("b", "c", "d", "e")]
    if lora_cfgs or "floor" in args.configs:
        llm = LLM(str(root), enable_lora=True, max_loras=64, max_lora_rank=64, max_cpu_loras=1024, **common)
        mcfg = llm.engine.cfg.model
        shapes, layers = mcfg.lora_shapes(), mcfg.num_layers
        t0 = time.perf_counter()
        ranks = [8, 16, 32, 64]
        for i in range(args.num_adapters):
            llm.engine.store.register_weights(f"d{i}", random_adapter(f"d{i}", 16, 1000 + i, shapes, layers))
            if "e" in args.configs:
                r = ranks[i % 4]
                llm.engine.store.register_weights(
                    f"e{i}", random_adapter(f"e{i}", r, 5000 + i, shapes, layers)
                )
        results["adapter_setup_seconds"] = time.perf_counter() - t0
        n = len(prompts)
        plans = {
            "b": [None] * n,
            "c": ["d0"] * n,
            "d": [f"d{i % args.num_adapters}" for i in range(n)],
            "e": [f"e{i % args.num_adapters}" for i in range(n)],
        }
        for c in lora_cfgs:
            warm_up(llm, prompts, plans[c])
            record(c, run_engine(llm, prompts, out_lens, plans[c]))
        if "floor" in args.configs:
            results["decode_step_d"] = {
                b: decode_step_times(llm, b, 512, [f"d{i}" for i in range(args.num_adapters)])
                for b in (1, 64, 256)
            }
        del llm
        torch.cuda.empty_cache()

    if "floor" in args.configs:
        weights = 6.74e9 * 2
        kv_per_token = 2 * 32 * 4096 * 2
        floor = {}
        for b in (1, 64, 256):
            kv = b * 512 * kv_per_token
            adapters = min(b, args.num_adapters) * 80e6
            floor[b] = {"a_floor_s": (weights + kv) / bw, "d_floor_s": (weights + kv + adapters) / bw}
        results["decode_floor"] = floor
        for cfg in ("a", "d"):
            for b, t in results.get(f"decode_step_{cfg}", {}).items():
                fl = floor[b][f"{cfg}_floor_s"]
                print(
                    f"decode step ({cfg}) batch {b}: {t * 1e3:.2f} ms, floor {fl * 1e3:.2f} ms, "
                    f"{fl / t:.0%} of floor",
                    flush=True,
                )

    if "peft" in args.configs:
        results["configs"]["peft"] = run_peft(args, prompts, out_lens)
        record("peft", results["configs"]["peft"])

    out_path.write_text(json.dumps(results, indent=2, default=str))


def run_peft(args, prompts, out_lens) -> dict:
    """transformers + peft with adapter_names batching on a subset (same length distribution)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{k: v for k, v in LLAMA2_7B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    t0 = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no 27 GB fp32 copy first
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
            lcfg = LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_MODULES), lora_dropout=0.0)
            model = get_peft_model(model, lcfg, adapter_name="p0")
            for i in range(1, args.peft_adapters):
                model.add_adapter(f"p{i}", lcfg)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    build_s = time.perf_counter() - t0
    print(f"peft: model and {args.peft_adapters} adapters built in {build_s:.1f} s", flush=True)
    n = args.peft_requests
    sub_p, sub_o = prompts[:n], out_lens[:n]
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Progress(StoppingCriteria):
        """Never stops; prints the decode rate so a run cut short by a time limit still says something."""

        def __init__(self) -> None:
            self.steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            if self.steps % 64 == 0:
                print(f"peft: step {self.steps} at {time.perf_counter() - start:.1f} s", flush=True)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    batch = args.peft_batch
    total_tokens, start = 0, time.perf_counter()
    for s in range(0, n, batch):
        ps, os_ = sub_p[s : s + batch], sub_o[s : s + batch]
        width = max(map(len, ps))
        ids = torch.zeros(len(ps), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(ps):  # left padding
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        new = max(os_)
        with torch.no_grad():
            model.generate(
                input_ids=ids.cuda(),
                attention_mask=mask.cuda(),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                adapter_names=[f"p{(s + j) % args.peft_adapters}" for j in range(len(ps))],
                stopping_criteria=StoppingCriteriaList([Progress()]),
            )
        total_tokens += sum(os_)  # tokens the requests asked for; peft runs each batch to its longest
        print(f"peft: batch of {len(ps)} done at {time.perf_counter() - start:.1f} s", flush=True)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "output_tokens": total_tokens,
        "output_tok_s": total_tokens / elapsed,
        "requests": n,
        "adapters": args.peft_adapters,
        "batch": batch,
        "build_seconds": build_s,
    }


if __name__ == "__main__":
    main()
