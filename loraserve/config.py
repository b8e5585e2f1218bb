"""Frozen configuration: what the model is, how much cache, how many adapters, how to schedule."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ModelLoadError(ValueError):
    """The checkpoint cannot be served: the message names the file, field or architecture."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family checkpoint, read from its ``config.json``."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    name: str

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        """Read and check ``<path>/config.json`` (and ``generation_config.json`` for extra EOS ids)."""
        root = Path(path)
        cfg_path = root / "config.json"
        if not root.is_dir():
            raise ModelLoadError(f"model directory {root} does not exist")
        if not cfg_path.is_file():
            raise ModelLoadError(f"model directory {root} has no config.json")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or raw.get('model_type')!r} in {cfg_path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        eos = _as_tuple(raw.get("eos_token_id"))
        gen_path = root / "generation_config.json"
        if gen_path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                eos = tuple(
                    dict.fromkeys(eos + _as_tuple(json.loads(gen_path.read_text()).get("eos_token_id")))
                )
        rope_scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        rope_theta = raw.get("rope_theta")
        if rope_theta is None and isinstance(rope_scaling, dict):
            rope_theta = rope_scaling.get("rope_theta")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None,
            "default",
        ):
            rope_scaling = None
        return cls(
            path=str(root.resolve()),
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            eos_token_ids=eos,
            bos_token_id=raw.get("bos_token_id"),
            name=name or root.name,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """``module -> (in_features, out_features)`` for every projection an adapter may target."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def _as_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list) else (int(v),)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. ``num_blocks`` None sizes the cache from ``kv_cache_memory`` bytes."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int = 1 << 30
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter limits and tier sizes.

    ``max_loras``: adapters resident on the device tier at once (each in a pool sized for
    ``max_loras * max_lora_rank`` rank rows, so small-rank adapters pack more densely).
    ``max_cpu_loras``: adapters kept in host memory (LRU); the rest are re-read from disk.
    ``max_cpu_lora_bytes``: the host tier's bound in bytes (packed, model dtype); None: count only.
    ``lora_roots``: directories under which adapter paths given at request time must resolve.
    ``lora_resolver_dirs``: directories searched, in order, for ``<dir>/<name>`` when a request
    names an adapter that is not registered (registered lazily on first request).
    ``adapter_memory_fraction``: when set, ``CacheConfig.kv_cache_memory`` is one budget for KV and
    adapters and the adapter pool gets this fraction of it (``max_loras`` is then derived).
    ``prefetch_workers``: threads that read, validate and pack adapters off the engine thread
    (0: read synchronously on the engine thread).
    """

    enabled: bool = True
    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 64
    max_cpu_lora_bytes: int | None = None
    lora_roots: tuple[str, ...] = ()
    allow_runtime_paths: bool = True
    lora_resolver_dirs: tuple[str, ...] = ()
    adapter_memory_fraction: float | None = None
    prefetch_workers: int = 2


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    ``adapter_affinity``: admit waiting requests grouped by adapter (those of adapters already in
    the running batch first, then one adapter's requests together) instead of strictly in arrival
    order, so that a step reads fewer distinct adapters; any request is passed over at most
    ``adapter_wait_bound_steps`` times (``loraserve.engine.scheduler``). The default, 256, is where
    the anchor workload's schedule stops gaining (``benchmarks/sim_schedule.py``: 105 distinct
    adapters per step in arrival order, 75 with a bound of 64, 52 with 256, 44 with 512 at 2% more
    steps), with the same worst admission wait in that workload; a smaller bound trades adapters
    per step for a tighter guarantee under a hot stream.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    adapter_wait_bound_steps: int = 256
    adapter_affinity: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from."""

    model: ModelConfig
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    load_format: str = "auto"  # "dummy": random weights at the checkpoint's shapes (benchmarks)
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len or self.model.max_position_embeddings


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``"auto"``/None -> float32 on CPU and bfloat16 on CUDA; names like "bf16", "float16" accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or 'auto', got {dtype!r}")
    return table[dtype]
