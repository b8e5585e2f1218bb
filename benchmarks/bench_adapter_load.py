"""Cold load of one adapter from disk (page cache), stage by stage: issue 4's 534 ms, target < 50 ms.

One random rank-16 adapter on all seven projections of Llama-2-7B's shape (32 layers, hidden 4096,
MLP 11008, 32 heads), stored in bf16 as a PEFT directory (448 tensors, ~80 MB), written with
``bench_many_adapters``' helpers; no model is built (only its ``config.json`` is written). The
file is read once first so that "disk" is the page cache, as in the issue. Each stage is timed
alone, median of ``--repeats`` runs after one untimed warm-up:

* ``validate``: config + safetensors header, every check that needs no weight value;
* ``read``: the tensor data into one buffer (parallel ``preadv``);
* ``hash``: the content hash of the canonical tensors (parallel sha256), alone;
* ``pack``: pool layout in the serving dtype, scale folded into B, finiteness check (into pinned
  memory on CUDA, as the store does);
* ``pin_alloc``: of that, the pinned host buffer (caching host allocator; CUDA only);
* ``pack_on_device``: the same packing done on the GPU, as the store does on CUDA: the read buffer
  up, pack there, the packed adapter back into pinned memory (CUDA only);
* ``read_packed``: ``AdapterStore._read_packed``, the whole disk -> host path the reader threads
  run (validate, then reading and hashing on the shared I/O threads, packing meanwhile: on the GPU
  on CUDA, else its byte moves on the I/O threads);
* ``host_to_device``: the packed copy into the device pool, synchronised (CUDA only);
* ``cold_load``: ``read_packed`` then ``host_to_device``: the issue's disk -> GPU figure (CUDA only);
* ``load_adapter_fp32``: the float32 :func:`load_adapter` API (not on the serving path), for reference.

    python benchmarks/bench_adapter_load.py [--repeats 20] [--out benchmarks/results/adapter_load.json]

Runs on the CPU (serving dtype bf16 by default, as on the GPU) and on CUDA. ``--file-dtype
float32`` stores the adapter in float32 (peft's dtype for adapters trained in float32), which
packing converts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraserve.config import LoRAConfig, ModelConfig
from loraserve.lora import adapter
from loraserve.lora.pool import DeviceLoRAPool, PackedAdapter, pack_adapter, pack_adapter_on_device
from loraserve.lora.store import AdapterStore
from loraserve.ops.lora import lora_apply

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_many_adapters import LLAMA2_7B, write_adapters, write_model_config  # noqa: E402

DTYPES = ["bfloat16", "float16", "float32"]


def median_ms(fn: Callable[[], Any], repeats: int, sync: bool) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the serving dtype")
    ap.add_argument(
        "--file-dtype", default=None, choices=DTYPES, help="the adapter file's (default: --dtype)"
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workdir", default=None, help="where to write the adapter (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    file_dtype = getattr(torch, args.file_dtype or args.dtype)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        model_cfg = ModelConfig.from_dir(write_model_config(root / "model", LLAMA2_7B))
        # Generated on the CPU either way: the file's bytes do not depend on where they were made.
        (path,) = write_adapters(
            root / "adapters", model_cfg, 1, 1, args.rank, torch.device("cpu"), file_dtype
        )
        weights_file = path / adapter.SAFETENSORS_NAME
        weights_file.read_bytes()  # page cache warm: "disk" here is the filesystem cache, as in the issue
        report = run(path, model_cfg, device, dtype, args.rank, args.repeats)
        report["file_bytes"] = weights_file.stat().st_size
        report["file_dtype"] = str(file_dtype).removeprefix("torch.")
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def run(
    path: Path, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype, rank: int, repeats: int
) -> dict[str, Any]:
    """Time every stage on the adapter at ``path`` (see the module docstring)."""
    cuda = device.type == "cuda"
    pool = DeviceLoRAPool(model_cfg, rank, dtype, device, lora_apply)
    store = AdapterStore(model_cfg, LoRAConfig(max_lora_rank=rank, prefetch_workers=0), pool, dtype)
    spec, where = store.spec, f"adapter 'bench' ({path})"
    config = adapter._parse_config(json.loads((path / adapter.CONFIG_NAME).read_text()), where)

    def validate() -> None:
        parsed = adapter._parse_config(json.loads((path / adapter.CONFIG_NAME).read_text()), where)
        with adapter._open_weights(path, where) as (metas, _):
            adapter._plan_modules(metas, parsed, spec, rank, where)

    def read() -> dict[str, torch.Tensor]:
        with adapter._open_weights(path, where, pin=cuda) as (_, read_data):
            return read_data()

    stored = adapter.read_adapter(path, spec, rank, name="bench", pin=cuda)
    canonical = {
        f"{adapter._short_name(*loc)}.lora_{ab}": t
        for loc, m in stored.modules.items()
        for ab, t in (("A", m.a), ("B", m.b))
    }
    packed = store._read_packed(str(path), "bench").packed

    def host_to_device() -> None:
        pool.write(0, packed, non_blocking=True)

    def cold_load() -> None:
        pool.write(0, store._read_packed(str(path), "bench").packed, non_blocking=True)

    stages: dict[str, Callable[[], Any]] = {
        "validate": validate,
        "read": read,
        "hash": lambda: adapter.hash_adapter(config.canonical(), canonical),
        "pack": lambda: pack_adapter(stored, model_cfg, dtype, pin=cuda),
    }
    if cuda:
        stages["pin_alloc"] = lambda: PackedAdapter.allocate(rank, model_cfg, dtype, "cpu", pin=True)
        pack_stream = torch.cuda.Stream(device)
        stages["pack_on_device"] = lambda: pack_adapter_on_device(stored, model_cfg, dtype, pack_stream)
    stages["read_packed"] = lambda: store._read_packed(str(path), "bench")
    if cuda:
        stages["host_to_device"] = host_to_device
        stages["cold_load"] = cold_load
    stages["load_adapter_fp32"] = lambda: adapter.load_adapter(path, spec, rank, name="bench")
    timings = {name: median_ms(fn, repeats, sync=cuda) for name, fn in stages.items()}
    store.close()
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "io_threads": adapter._IO_THREADS,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": rank,
        "tensors": 2 * len(stored.modules),
        "packed_bytes": packed.nbytes,
        "repeats": repeats,
        "median_ms": timings,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"one rank-{report['rank']} adapter, {report['tensors']} tensors, {report['file_bytes'] / 1e6:.1f} MB "
        f"{report['file_dtype']} file -> {report['packed_bytes'] / 1e6:.1f} MB packed {report['dtype']}; "
        f"{report['device']}, "
        f"{report['cpus']} CPUs ({report['io_threads']} I/O threads, {report['torch_threads']} torch threads); "
        f"median of {report['repeats']}"
    )
    for name, ms in report["median_ms"].items():
        print(f"  {name:<18} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
