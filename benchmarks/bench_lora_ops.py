"""GPU microbenchmark of the Triton multi-LoRA kernels (shrink + expand) on Llama-2-7B layer shapes.

Two suites (``--suite``, default both), each checked against the torch reference first:

``eager``: for each layer (qkv, o, gate_up, down) and batch shape, the time of ``lora_apply_triton``
(and of shrink / expand alone) with the default kernels, one call at a time with L2 flushed, the bytes
the op must move (x, the active adapters' A and B rows, y read and written), the achieved GB/s against
a device-to-device copy measured in the same run, and the torch reference
(``loraserve.ops.lora.lora_apply``) for comparison.

``decode``: decode steps as the engine's CUDA graphs run them. ``T`` in {64, 256} tokens spread evenly
over {1, 32, 64, 128, 256} rank-16 adapters (at most ``T``), ``max_rank`` 64 (the engine's max LoRA
rank), segment tensors padded to ``N_cap = T`` with zero-length segments. Each case and layer is
captured in CUDA graphs over ``--layers`` copies of the layer's pools (a model's layers: each replay
reads every copy's adapter rows once, with L2 flushed before the replay), for shrink + expand, shrink
alone and expand alone, once with the ``old`` kernels (the tiled kernels at the tiles of
``tiled_shrink_config`` / ``tiled_expand_config``: the configuration before the decode kernels) and
once with the ``new`` defaults (the decode kernels). It prints us per layer copy and the fraction of
copy bandwidth achieved over the bytes the layer must move; the ``all4`` rows sum the four layers
(one decoder layer).

``crossover`` (only when asked for): the decode kernels against the tiled ones on the segment
layouts of eager prefill / mixed steps (one adapter over T tokens; 8 even segments; 51 adapters'
decode rows of 4 tokens plus one prefill chunk), T from 256 to 8,192, per decoder layer in CUDA
graphs, with the kernel family the heuristic (``_use_decode``) picks: where it should switch.

    python benchmarks/bench_lora_ops.py [--suite eager|decode|crossover|all] [--reps 50] [--layers 32] [--sweep]

``--sweep`` also times a small grid of configs per case (eager: around the default kernels' configs;
decode: the decode kernels') and reports the best, to tune the heuristics in ``triton_lora``. Needs
only torch and triton.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import statistics
import sys
import types
from collections.abc import Callable, Sequence
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
    "T1024_a1": (1024, 1),
    "T8192_a1": (8192, 1),
}
# Decode suite: tokens, distinct adapters (at most the tokens), and the max_rank graphs are captured with.
DECODE_TOKENS = (64, 256)
DECODE_ADAPTERS = (1, 32, 64, 128, 256)
DECODE_MAX_RANK = 64
DTYPE = torch.bfloat16


@dataclasses.dataclass
class Inputs:
    """One layer's inputs; ``a`` and ``b`` hold ``num_layers`` independent pools of that layer."""

    x: torch.Tensor
    a: list[torch.Tensor]
    b: list[list[torch.Tensor]]
    y: torch.Tensor
    meta: Any  # LoRASegments
    min_bytes: int  # per pool: x, the active A and B rows, y read and written


def make_inputs(
    in_features: int,
    outs: list[int],
    num_tokens: int,
    num_adapters: int,
    rank: int | Sequence[int],
    *,
    num_layers: int = 1,
    capacity: int = 0,
    max_rank: int = 0,
    lengths: Sequence[int] | None = None,
) -> Inputs:
    """Pools holding exactly the active adapters, in shuffled row order; one run of tokens each.

    ``rank``: every adapter's, or a list that adapter ``i`` takes entry ``i % len`` of (mixed ranks).
    ``capacity``: pad the segment tensors with zero-length segments to this size (a CUDA graph's
    ``N_cap``); ``max_rank``: the ``max_rank`` to run with instead of ``rank``; ``lengths``: each
    adapter's tokens (default: ``num_tokens`` split evenly).
    """
    gen = torch.Generator().manual_seed(0)
    num_slices = len(outs)
    choices = [rank] if isinstance(rank, int) else list(rank)
    ranks = [choices[i % len(choices)] for i in range(num_adapters)]
    rows = sum(ranks)
    x = torch.randn(num_tokens, in_features, device="cuda", dtype=DTYPE)
    a = [
        torch.randn(rows, num_slices, in_features, device="cuda", dtype=DTYPE) / in_features**0.5
        for _ in range(num_layers)
    ]
    b = [
        [torch.randn(rows, o, device="cuda", dtype=DTYPE) / max(ranks) ** 0.5 for o in outs]
        for _ in range(num_layers)
    ]
    y = torch.randn(num_tokens, sum(outs), device="cuda", dtype=DTYPE)
    order = torch.randperm(num_adapters, generator=gen).tolist()
    # Pool rows: adapters packed in shuffled order, so neighbours in the batch are not in the pool.
    first_row = dict(zip(order, itertools.accumulate((ranks[i] for i in order), initial=0), strict=False))
    if lengths is None:
        lengths = [
            (i + 1) * num_tokens // num_adapters - i * num_tokens // num_adapters for i in range(num_adapters)
        ]
    ends = list(itertools.accumulate(lengths))
    segments = [
        (end - n, end, first_row[i], ranks[i]) for i, (n, end) in enumerate(zip(lengths, ends, strict=True))
    ]
    meta = lora.LoRASegments.build(segments, num_tokens, device="cuda")
    if capacity:
        pad = torch.zeros(capacity - len(segments), dtype=torch.int32, device="cuda")
        meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank = (
            torch.cat([v, pad]) for v in (meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank)
        )
    if max_rank:
        meta.max_rank = max_rank
    elem = x.element_size()
    min_bytes = elem * (
        num_tokens * in_features  # x
        + rows * num_slices * in_features  # A rows
        + rows * sum(outs)  # B rows
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

    def graph(self, fn: Callable[[], object]) -> float:
        """Median seconds per replay of a CUDA graph capturing one call of ``fn`` (L2 flushed before each)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and warm the allocator outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay)


def copy_bandwidth(timer: Timer) -> float:
    """Device copy bandwidth in bytes/s (read + write of a 2 GiB buffer)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds


def check(inp: Inputs, shrink_cfg: Any = None, expand_cfg: Any = None) -> None:
    """Shrink + expand with the given configs (default: the heuristics') against the reference, first pool."""
    y_ref, y = inp.y.clone(), inp.y.clone()
    lora.lora_apply(y_ref, inp.x, inp.a[0], inp.b[0], inp.meta)
    t = tlora.lora_shrink_triton(inp.x, inp.a[0], inp.meta, shrink_cfg)
    tlora.lora_expand_triton(y, t, inp.b[0], inp.meta, expand_cfg)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=6e-2, rtol=2e-2)


def config_grid(base: Any, num_sms: int) -> list[Any]:
    """A small grid of configs of ``base``'s kind around it (``--sweep``)."""
    if isinstance(base, tlora.DecodeShrinkConfig):
        axes = {
            "programs": [p * num_sms for p in (2, 4, 6, 8)],
            "block_k": [64, 128, 256],
            "num_stages": [3, 4],
        }
    elif isinstance(base, tlora.DecodeExpandConfig):
        axes = {
            "programs": [p * num_sms for p in (2, 3, 4, 6)],
            "b_tile": [2048, 4096, 8192],
            "num_stages": [3, 4],
        }
    elif isinstance(base, tlora.ShrinkConfig):
        axes = {"block_k": [64, 128], "split_k": [1, 2, 4, 8], "num_stages": [3, 4]}
    else:
        axes = {"block_n": [64, 128, 256, 512], "num_warps": [4, 8]}
    return [
        dataclasses.replace(base, **dict(zip(axes, v, strict=True)))
        for v in itertools.product(*axes.values())
    ]


def best_config(configs: Sequence[Any], time_fn: Callable[[Any], float]) -> tuple[float, Any]:
    """``(seconds, config)`` of the fastest of ``configs``."""
    return min(((time_fn(cfg), cfg) for cfg in configs), key=lambda v: v[0])


def default_configs(inp: Inputs, num_sms: int) -> tuple[Any, Any]:
    """The heuristics' ``(shrink, expand)`` configs for ``inp`` (the decode kernels for decode batches)."""
    num_tokens, in_features = inp.x.shape
    num_segs, max_rank = inp.meta.seg_len.numel(), inp.meta.max_rank
    elem = inp.x.element_size()
    return (
        tlora.shrink_config(num_tokens, num_segs, in_features, inp.a[0].shape[1], max_rank, elem, num_sms),
        tlora.expand_config(num_tokens, num_segs, max_rank, elem, num_sms),
    )


def old_configs(inp: Inputs, num_sms: int) -> tuple[Any, Any]:
    """The tiled kernels' configs for ``inp``: what ran before the decode kernels existed."""
    num_tokens, in_features = inp.x.shape
    num_segs, max_rank = inp.meta.seg_len.numel(), inp.meta.max_rank
    elem = inp.x.element_size()
    return (
        tlora.tiled_shrink_config(
            num_tokens, num_segs, in_features, inp.a[0].shape[1], max_rank, elem, num_sms
        ),
        tlora.tiled_expand_config(num_tokens, num_segs, max_rank),
    )


def sweep_result(best_s: tuple[float, Any], best_e: tuple[float, Any]) -> dict[str, Any]:
    """A sweep's best shrink and expand, as ``(seconds, config)`` pairs, for the JSON."""
    return {
        "shrink_us": best_s[0] * 1e6,
        "shrink_config": dataclasses.asdict(best_s[1]),
        "expand_us": best_e[0] * 1e6,
        "expand_config": dataclasses.asdict(best_e[1]),
    }


def sweep_eager(inp: Inputs, timer: Timer, num_sms: int) -> dict[str, Any]:
    """Best shrink and expand configs of a small grid around the defaults, each op timed alone."""
    base_s, base_e = default_configs(inp, num_sms)
    x, a, b, y, meta = inp.x, inp.a[0], inp.b[0], inp.y, inp.meta
    best_s = best_config(
        config_grid(base_s, num_sms), lambda c: timer(lambda: tlora.lora_shrink_triton(x, a, meta, c))
    )
    t = tlora.lora_shrink_triton(x, a, meta)
    best_e = best_config(
        config_grid(base_e, num_sms), lambda c: timer(lambda: tlora.lora_expand_triton(y, t, b, meta, c))
    )
    return sweep_result(best_s, best_e)


def run_eager(args: argparse.Namespace, timer: Timer, copy_bw: float, num_sms: int) -> list[dict[str, Any]]:
    """The ``eager`` suite: default kernels, one call at a time; prints a table, returns its rows."""
    rows: list[dict[str, Any]] = []
    header = (
        f"{'layer':8} {'scenario':10} {'MB':>8} {'apply us':>9} {'shrink':>8} {'expand':>8} "
        f"{'GB/s':>7} {'%copy':>6} {'torch us':>9} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for scenario, (num_tokens, num_adapters) in SCENARIOS.items():
        if args.scenarios and scenario not in args.scenarios:
            continue
        for layer, (in_features, outs) in LAYERS.items():
            inp = make_inputs(in_features, outs, num_tokens, num_adapters, args.rank)
            check(inp)
            x, a, b, y, meta = inp.x, inp.a[0], inp.b[0], inp.y, inp.meta
            t = tlora.lora_shrink_triton(x, a, meta)
            apply_s = timer(lambda x=x, a=a, b=b, y=y, meta=meta: tlora.lora_apply_triton(y, x, a, b, meta))
            shrink_s = timer(lambda x=x, a=a, meta=meta: tlora.lora_shrink_triton(x, a, meta))
            expand_s = timer(lambda y=y, t=t, b=b, meta=meta: tlora.lora_expand_triton(y, t, b, meta))
            torch_s = timer(lambda x=x, a=a, b=b, y=y, meta=meta: lora.lora_apply(y, x, a, b, meta))
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
                row["sweep"] = sweep_eager(inp, timer, num_sms)
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
    return rows


DECODE_KINDS = ("apply", "shrink", "expand")


def time_decode(
    inp: Inputs, timer: Timer, shrink_cfg: Any, expand_cfg: Any, kinds: Sequence[str] = DECODE_KINDS
) -> dict[str, float]:
    """Seconds per pool of ``kinds``: shrink + expand (``apply``), shrink alone, expand alone; each
    captured in one CUDA graph over all pools."""
    x, y, meta = inp.x, inp.y, inp.meta
    t = tlora.lora_shrink_triton(x, inp.a[0], meta, shrink_cfg)  # expand alone reads one shared t

    def apply() -> None:
        for a, b in zip(inp.a, inp.b, strict=True):
            tlora.lora_expand_triton(y, tlora.lora_shrink_triton(x, a, meta, shrink_cfg), b, meta, expand_cfg)

    def shrink() -> None:
        for a in inp.a:
            tlora.lora_shrink_triton(x, a, meta, shrink_cfg)

    def expand() -> None:
        for b in inp.b:
            tlora.lora_expand_triton(y, t, b, meta, expand_cfg)

    fns = {"apply": apply, "shrink": shrink, "expand": expand}
    return {kind: timer.graph(fns[kind]) / len(inp.a) for kind in kinds}


def sweep_decode(inp: Inputs, timer: Timer, num_sms: int) -> dict[str, Any]:
    """Best decode-kernel configs of a small grid (shrink with the default expand and vice versa)."""
    base_s, base_e = default_configs(inp, num_sms)
    best_s = best_config(
        config_grid(base_s, num_sms), lambda c: time_decode(inp, timer, c, base_e, ["shrink"])["shrink"]
    )
    best_e = best_config(
        config_grid(base_e, num_sms), lambda c: time_decode(inp, timer, base_s, c, ["expand"])["expand"]
    )
    return sweep_result(best_s, best_e)


def run_decode(args: argparse.Namespace, timer: Timer, copy_bw: float, num_sms: int) -> list[dict[str, Any]]:
    """The ``decode`` suite: old vs new kernels in CUDA graphs; prints a table, returns its rows."""
    rows: list[dict[str, Any]] = []
    kinds = DECODE_KINDS
    header = (
        f"{'T':>4} {'ad':>4} {'layer':8} {'MB':>6} | "
        + " ".join(f"{'old ' + k:>10}" for k in kinds)
        + f" {'%copy':>6} | "
        + " ".join(f"{'new ' + k:>10}" for k in kinds)
        + f" {'%copy':>6} | {'speedup':>7}"
    )
    print(
        f"decode: us per layer copy ({args.layers} copies per graph), rank {args.ranks or args.rank}, "
        f"max_rank {DECODE_MAX_RANK}"
    )
    print(header)
    print("-" * len(header))

    def line(num_tokens: int, num_adapters: int, layer: str, min_bytes: int, old: dict, new: dict) -> str:
        def part(times: dict[str, float]) -> str:
            pct = 100 * min_bytes / times["apply"] / copy_bw
            return " ".join(f"{times[k] * 1e6:10.1f}" for k in kinds) + f" {pct:5.0f}%"

        return (
            f"{num_tokens:4} {num_adapters:4} {layer:8} {min_bytes / 1e6:6.1f} | {part(old)} | {part(new)} | "
            f"{old['apply'] / new['apply']:6.2f}x"
        )

    for num_tokens in args.decode_tokens:
        for num_adapters in (n for n in args.decode_adapters if n <= num_tokens):
            total = {"old": dict.fromkeys(kinds, 0.0), "new": dict.fromkeys(kinds, 0.0)}
            total_bytes = 0
            for layer, (in_features, outs) in LAYERS.items():
                inp = make_inputs(
                    in_features,
                    outs,
                    num_tokens,
                    num_adapters,
                    args.ranks or args.rank,
                    num_layers=args.layers,
                    capacity=num_tokens,
                    max_rank=DECODE_MAX_RANK,
                )
                configs = {"old": old_configs(inp, num_sms), "new": default_configs(inp, num_sms)}
                times = {}
                for name, (shrink_cfg, expand_cfg) in configs.items():
                    check(inp, shrink_cfg, expand_cfg)
                    times[name] = time_decode(inp, timer, shrink_cfg, expand_cfg)
                    for k in kinds:
                        total[name][k] += times[name][k]
                total_bytes += inp.min_bytes
                row: dict[str, Any] = {
                    "tokens": num_tokens,
                    "adapters": num_adapters,
                    "capacity": num_tokens,
                    "rank": args.ranks or args.rank,
                    "max_rank": DECODE_MAX_RANK,
                    "layer": layer,
                    "in_features": in_features,
                    "outs": outs,
                    "min_bytes": inp.min_bytes,
                    **{f"{name}_{k}_us": times[name][k] * 1e6 for name in configs for k in kinds},
                    **{
                        f"{name}_fraction_of_copy_bw": inp.min_bytes / times[name]["apply"] / copy_bw
                        for name in configs
                    },
                    **{f"{name}_configs": [dataclasses.asdict(c) for c in configs[name]] for name in configs},
                }
                if args.sweep:
                    row["sweep"] = sweep_decode(inp, timer, num_sms)
                rows.append(row)
                print(
                    line(num_tokens, num_adapters, layer, inp.min_bytes, times["old"], times["new"])
                    + (
                        f"  best shrink {row['sweep']['shrink_us']:.1f} expand {row['sweep']['expand_us']:.1f}"
                        if args.sweep
                        else ""
                    ),
                    flush=True,
                )
                del inp
                torch.cuda.empty_cache()
            print(line(num_tokens, num_adapters, "all4", total_bytes, total["old"], total["new"]), flush=True)
    return rows


# Crossover suite: (label, tokens, segment lengths) as eager prefill / mixed steps have them.
def _crossover_cases() -> list[tuple[str, int, list[int]]]:
    cases = []
    for t in (256, 640, 1024, 2048, 4096, 8192):
        cases.append(("1 adapter", t, [t]))
        cases.append(("8 even", t, [t // 8] * 8))
        # A mixed step of the 128-adapter run: 51 adapters' decode rows (4 each) and one prefill chunk.
        cases.append(("51x4 + chunk", t, [4] * 51 + [t - 204]))
    return cases


def run_crossover(
    args: argparse.Namespace, timer: Timer, copy_bw: float, num_sms: int
) -> list[dict[str, Any]]:
    """The ``crossover`` suite: the decode kernels against the tiled ones on eager-step segment layouts
    (one prefill chunk among decode rows, or long segments), per decoder layer (4 layer kinds, shrink +
    expand), in CUDA graphs over ``--layers`` pool copies: where the heuristic should switch."""
    rows: list[dict[str, Any]] = []
    elem = torch.empty(0, dtype=DTYPE).element_size()
    decode_cfgs = (
        tlora.DecodeShrinkConfig(
            programs=tlora._DECODE_SHRINK_PROGRAMS_PER_SM * num_sms, block_k=256 // elem
        ),
        tlora.DecodeExpandConfig(
            programs=tlora._DECODE_EXPAND_PROGRAMS_PER_SM * num_sms, b_tile=8192 // elem
        ),
    )
    print(f"crossover: us per decoder layer ({args.layers} copies per graph), rank {args.rank}, max_rank 16")
    print(f"{'layout':14} {'T':>5} | {'tiled':>8} {'decode':>8} {'heuristic':>9} | winner")
    for label, num_tokens, lengths in _crossover_cases():
        total = {"tiled": 0.0, "decode": 0.0}
        for in_features, outs in LAYERS.values():
            inp = make_inputs(
                in_features,
                outs,
                num_tokens,
                len(lengths),
                args.rank,
                num_layers=args.layers,
                lengths=lengths,
            )
            for name, cfgs in (("tiled", old_configs(inp, num_sms)), ("decode", decode_cfgs)):
                check(inp, *cfgs)
                total[name] += time_decode(inp, timer, *cfgs, ["apply"])["apply"]
            del inp
            torch.cuda.empty_cache()
        chosen = "decode" if tlora._use_decode(num_tokens, len(lengths), 16) else "tiled"
        winner = min(total, key=total.get)
        rows.append(
            {"layout": label, "tokens": num_tokens, "lengths": lengths, "heuristic": chosen,
             **{f"{k}_us": v * 1e6 for k, v in total.items()}}
        )  # fmt: skip
        print(
            f"{label:14} {num_tokens:5} | {total['tiled'] * 1e6:8.1f} {total['decode'] * 1e6:8.1f} {chosen:>9} | "
            f"{winner} {max(total.values()) / min(total.values()):.2f}x",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["eager", "decode", "crossover", "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_ops.json")
    parser.add_argument(
        "--decode-out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_decode.json"
    )
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--ranks", type=int, nargs="+", help="decode suite: adapters take these ranks in turn (mixed ranks)"
    )
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=list(DECODE_TOKENS))
    parser.add_argument("--decode-adapters", type=int, nargs="+", default=list(DECODE_ADAPTERS))
    parser.add_argument("--layers", type=int, default=32, help="decode suite: pool copies per graph")
    parser.add_argument("--sweep", action="store_true", help="also search a small grid of configs")
    parser.add_argument("--scenarios", nargs="*", choices=sorted(SCENARIOS), help="eager suite: only these")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora_ops needs a CUDA device")

    import triton

    timer = Timer(args.reps, args.warmup)
    copy_bw = copy_bandwidth(timer)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE),
        "copy_bandwidth_gbps": copy_bw / 1e9,
        "reps": args.reps,
    }
    suites = [
        ("eager", args.out, run_eager),
        ("decode", args.decode_out, run_decode),
        ("crossover", args.out.with_name("lora_crossover.json"), run_crossover),
    ]
    for name, out, run in suites:
        if args.suite != name and (args.suite != "all" or name == "crossover"):
            continue
        rows = run(args, timer, copy_bw, num_sms)
        extra = {"layers": args.layers} if name in ("decode", "crossover") else {}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, **extra, "cases": rows}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
