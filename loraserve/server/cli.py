"""The ``loraserve`` command line: ``generate`` (one completion, printed) and ``serve`` (HTTP server)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that builds an engine."""
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=PATH", help="register an adapter (repeatable)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--max-loras", type=int, default=8, help="adapters resident on the device at once")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-cpu-loras", type=int, default=64, help="adapters cached in host memory")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-adapter-affinity",
        dest="adapter_affinity",
        action="store_false",
        help="admit queued requests in arrival order instead of grouped by adapter",
    )
    p.add_argument(
        "--adapter-wait-bound-steps",
        type=int,
        default=256,
        help="most admission rounds a queued request can be passed over (adapter grouping or loads)",
    )


def parse_loras(items: Sequence[str]) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}``; a bare path is named after its directory."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = name
            name = name.rstrip("/").rsplit("/", 1)[-1]
        if not name or not path:
            raise SystemExit(f"--lora expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def build_llm(args: argparse.Namespace, **extra):
    """An ``LLM`` from parsed engine arguments."""
    from loraserve.llm import LLM

    return LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        loras=parse_loras(args.lora),
        seed=args.seed,
        adapter_affinity=args.adapter_affinity,
        adapter_wait_bound_steps=args.adapter_wait_bound_steps,
        **extra,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from loraserve.lora.adapter import AdapterError
    from loraserve.lora.store import AdapterNotFound
    from loraserve.sampling import SamplingParams

    llm = build_llm(args)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.sample_seed
    )
    try:
        if args.raw:
            outs = llm.generate(args.prompt, params, lora_request=args.adapter, use_tqdm=False)
        else:
            outs = llm.chat(
                [{"role": "user", "content": args.prompt}], params, lora_request=args.adapter, use_tqdm=False
            )
    except (AdapterError, AdapterNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(outs[0].outputs[0].text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server until interrupted."""
    import uvicorn

    from loraserve.server.api import ServerConfig, create_app

    if args.allow_runtime_lora and not args.lora_root:
        logging.getLogger(__name__).warning(
            "--allow-runtime-lora without --lora-root: every runtime load will be refused"
        )
    llm = build_llm(args, lora_roots=tuple(args.lora_root), lora_resolver_dirs=tuple(args.lora_resolver_dir))
    config = ServerConfig(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        admin_api_key=args.admin_api_key,
        allow_runtime_lora=args.allow_runtime_lora,
        lora_roots=tuple(args.lora_root),
        max_request_bytes=args.max_request_bytes,
    )
    app = create_app(llm, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Serve one base model with many LoRA adapters."
    )
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one completion and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--adapter", default=None, help="registered adapter name or adapter directory (default: base)"
    )
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--served-model-name",
        default=None,
        help="the base model's id in the API (default: its directory name)",
    )
    srv.add_argument(
        "--api-key",
        default=os.environ.get("LORASERVE_API_KEY"),
        help="required as 'Authorization: Bearer KEY' on every route (default: $LORASERVE_API_KEY)",
    )
    srv.add_argument(
        "--admin-api-key",
        default=os.environ.get("LORASERVE_ADMIN_API_KEY"),
        help="required on the adapter management routes (default: $LORASERVE_ADMIN_API_KEY)",
    )
    srv.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    srv.add_argument(
        "--lora-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory runtime adapter paths must resolve under (repeatable)",
    )
    srv.add_argument(
        "--lora-resolver-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="serve unregistered adapter names found as DIR/NAME, registered on first use (repeatable)",
    )
    srv.add_argument(
        "--max-request-bytes", type=int, default=8 * 1024 * 1024, help="larger request bodies get 413"
    )
    srv.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
