"""Online serving benchmark: Poisson arrivals of streaming completions over a set of adapters.

Starts ``loraserve serve`` in a subprocess (or targets ``--url``), sends ``--num-requests``
requests whose inter-arrival times are exponential with rate ``--rate`` per second, each for a
random adapter, and reports throughput and TTFT / TPOT / end-to-end latency percentiles as a table
and as JSON (``--out``).

Without ``--model`` the server runs the default model (SmolLM2-135M-Instruct); ``--tiny`` uses a
tiny random Llama instead (seconds to build; for smoke tests). Adapters are created with
``make_peft_adapter`` for the chosen model unless ``--lora NAME=PATH`` gives them. Generation is
greedy with ``ignore_eos`` so every request produces exactly ``--max-tokens`` tokens.

Examples::

    python benchmarks/bench_online.py --out bench.json
    python benchmarks/bench_online.py --url http://127.0.0.1:8000 --rate 8 --num-requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger("bench_online")

_VOCABULARY = (
    "the model serves many adapters at once while the scheduler batches requests from every tenant "
    "and the cache keeps recent blocks so that similar prompts reuse earlier work quickly"
)
WORDS = _VOCABULARY.split()


@dataclass
class Result:
    """One request's timings (seconds) and token counts."""

    model: str
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    tpot: float = 0.0
    e2e: float = 0.0
    error: str = ""


@dataclass
class Report:
    """The benchmark's summary (what ``--out`` holds, plus the per-request results)."""

    config: dict[str, Any]
    duration_s: float
    completed: int
    failed: int
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    latency_ms: dict[str, dict[str, float]]
    per_adapter: dict[str, int]
    results: list[Result] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def prepare_model_and_adapters(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, str]]:
    """The base model directory and ``{name: path}`` adapters to serve."""
    from loraserve.testing import make_peft_adapter, make_tiny_model

    if args.model:
        model = Path(args.model)
    elif args.tiny:
        model = make_tiny_model(work / "tiny-llama")
    else:
        from loraserve.model.default_model import ensure_default_model

        model = ensure_default_model()
    loras: dict[str, str] = {}
    for item in args.lora:
        name, _, path = item.partition("=")
        loras[name] = path
    if not loras:
        for i in range(args.num_adapters):
            name = f"bench-{i}"
            logger.info("creating adapter %s (rank %d) for %s", name, args.adapter_rank, model)
            loras[name] = str(make_peft_adapter(model, work / name, r=args.adapter_rank, seed=100 + i))
    return model, loras


@contextlib.contextmanager
def launch_server(args: argparse.Namespace, model: Path, loras: dict[str, str]) -> Iterator[str]:
    """Run ``loraserve serve`` in a subprocess; yield its URL once ``/health`` answers."""
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "loraserve.server.cli", "--log-level", "WARNING", "serve"]
    cmd += ["--model", str(model), "--port", str(port), "--max-loras", str(args.max_loras)]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype]
    for name, path in loras.items():
        cmd += ["--lora", f"{name}={path}"]
    logger.info("starting server: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, headers: dict[str, str]
) -> Result:
    """Send one streaming completion and time it from the client's side."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    usage: dict[str, int] = {}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(model, False, error=f"HTTP {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(model, False, error=chunk["error"].get("message", "stream error"))
                if chunk.get("choices") and first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as e:
        return Result(model, False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    out_tokens = usage.get("completion_tokens", 0)
    ttft = (first or end) - start
    return Result(
        model=model,
        ok=True,
        prompt_tokens=usage.get("prompt_tokens", 0),
        output_tokens=out_tokens,
        ttft=ttft,
        tpot=(end - start - ttft) / (out_tokens - 1) if out_tokens > 1 else 0.0,
        e2e=end - start,
    )


async def run_load(args: argparse.Namespace, url: str, models: list[str]) -> tuple[list[Result], float]:
    """Fire the Poisson arrival schedule and gather every result; returns (results, wall seconds)."""
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    plan = []
    t = 0.0
    for _ in range(args.num_requests):
        plan.append(
            (t, rng.choice(models), make_prompt(rng, rng.randint(args.prompt_words // 2, args.prompt_words)))
        )
        t += rng.expovariate(args.rate)
    limits = httpx.Limits(max_connections=args.num_requests, max_keepalive_connections=args.num_requests)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        start = time.perf_counter()

        async def scheduled(at: float, model: str, prompt: str) -> Result:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await one_request(client, url, model, prompt, args.max_tokens, headers)

        results = await asyncio.gather(*(scheduled(*p) for p in plan))
    return list(results), time.perf_counter() - start


def summarize(results: list[Result], duration: float, config: dict[str, Any]) -> Report:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    all_tokens = out_tokens + sum(r.prompt_tokens for r in ok)
    latency = {}
    for name in ("ttft", "tpot", "e2e"):
        values = [getattr(r, name) * 1000 for r in ok if name != "tpot" or r.output_tokens > 1]
        latency[name] = {
            "mean": statistics.fmean(values) if values else 0.0,
            "p50": percentile(values, 50),
            "p99": percentile(values, 99),
        }
    per_adapter: dict[str, int] = {}
    for r in ok:
        per_adapter[r.model] = per_adapter.get(r.model, 0) + 1
    return Report(
        config=config,
        duration_s=duration,
        completed=len(ok),
        failed=len(results) - len(ok),
        request_throughput=len(ok) / duration if duration else 0.0,
        output_token_throughput=out_tokens / duration if duration else 0.0,
        total_token_throughput=all_tokens / duration if duration else 0.0,
        latency_ms=latency,
        per_adapter=per_adapter,
        results=results,
    )


def print_report(rep: Report) -> None:
    print(f"requests:            {rep.completed} ok, {rep.failed} failed in {rep.duration_s:.1f} s")
    print(f"request throughput:  {rep.request_throughput:.2f} req/s")
    print(f"output throughput:   {rep.output_token_throughput:.1f} tok/s")
    print(f"total throughput:    {rep.total_token_throughput:.1f} tok/s (prompt + output)")
    print(f"{'metric (ms)':<12}{'mean':>10}{'p50':>10}{'p99':>10}")
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E")):
        v = rep.latency_ms[name]
        print(f"{label:<12}{v['mean']:>10.1f}{v['p50']:>10.1f}{v['p99']:>10.1f}")
    errors = sorted({r.error for r in rep.results if not r.ok})
    for err in errors[:5]:
        print(f"error: {err}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--api-key", default=None, help="bearer key for --url")
    p.add_argument("--model", default=None, help="base model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random Llama (smoke test)")
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=PATH", help="adapter to serve (repeatable)"
    )
    p.add_argument("--num-adapters", type=int, default=4, help="adapters to create when no --lora is given")
    p.add_argument("--adapter-rank", type=int, default=8)
    p.add_argument(
        "--models", default=None, help="comma-separated model ids to request (default: all adapters)"
    )
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--prompt-words", type=int, default=48, help="prompts have between half this and this many words"
    )
    p.add_argument("--max-loras", type=int, default=4, help="device adapter slots of the started server")
    p.add_argument("--dtype", default="auto", help="dtype of the started server (auto, float32, bfloat16)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--port", type=int, default=0, help="port of the started server (default: a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def discover_models(url: str, api_key: str | None) -> tuple[str, list[str]]:
    """The server's base model id and its adapters' ids."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    base = next(m["id"] for m in data if not m.get("parent"))
    return base, [m["id"] for m in data if m.get("parent")]


def main(argv: list[str] | None = None) -> Report:
    """Run the benchmark; returns the report (also printed, and written to ``--out``)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_online_")))
            model, loras = prepare_model_and_adapters(args, work)
            url = stack.enter_context(launch_server(args, model, loras))
        base, adapters = discover_models(url, args.api_key)
        models = args.models.split(",") if args.models else (adapters or [base])
        logger.info("sending %d requests at %.2f/s over %s", args.num_requests, args.rate, models)
        results, duration = asyncio.run(run_load(args, url, models))
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "log_level")}
    config["models"] = models
    report = summarize(results, duration, config)
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(report), indent=2))
        logger.info("wrote %s", args.out)
    return report


if __name__ == "__main__":
    rep = main()
    raise SystemExit(1 if rep.failed else 0)
