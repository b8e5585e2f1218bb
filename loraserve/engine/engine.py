"""The synchronous engine: ``add_request`` / ``step`` / ``abort``, shared by the offline API and the server."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.config import EngineConfig
from loraserve.core import CompletionOutput, LoRARequest, OutputIds, RequestOutput, SeqStatus, Sequence
from loraserve.detokenize import OutputText
from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import ScheduledSeq, Scheduler
from loraserve.kvcache.block_manager import BlockManager
from loraserve.lora.adapter import AdapterError
from loraserve.lora.pool import apply_memory_budget, kv_block_bytes
from loraserve.lora.store import AdapterEntry, AdapterNotFound, AdapterStore
from loraserve.sampling import Sampler, SampleRow, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    lora_name: str | None
    stream: bool = True
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class StepStats:
    """Counters of the last step, for metrics and benchmarks."""

    num_tokens: int = 0
    num_seqs: int = 0
    num_adapters: int = 0
    adapter_bytes: int = 0
    # Host time from the step's start until its forward was launched (on a GPU the kernels run
    # asynchronously), then until the sampled tokens were on the host. A GPU step whose wait is
    # near zero was bound by the host's launches; one whose wait is long, by the GPU.
    launch_seconds: float = 0.0
    wait_seconds: float = 0.0


class LLMEngine:
    """One base model, many adapters, continuous batching. Not thread-safe: one caller drives ``step``."""

    def __init__(self, cfg: EngineConfig, tokenizer) -> None:
        cfg = apply_memory_budget(cfg)  # LoRAConfig.adapter_memory_fraction: split one budget
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.runner = ModelRunner(cfg)
        self.blocks = BlockManager(
            self.runner.num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching
        )
        self.store = (
            AdapterStore(cfg.model, cfg.lora, self.runner.pool, cfg.dtype)
            if self.runner.pool is not None
            else None
        )
        self.scheduler = Scheduler(cfg.scheduler, self.blocks, self.store)
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self.last_step = StepStats()
        self.finished_listeners: list[Callable[[RequestOutput], None]] = []
        self._eos = frozenset(cfg.model.eos_token_ids)
        self._max_model_len = cfg.max_model_len  # resolved once: it is read for every sampled token

    # adapters -------------------------------------------------------------------------------
    def add_lora(self, name: str, path: str | Path, pinned: bool = False, lazy: bool = False) -> AdapterEntry:
        """Register (or re-register) an adapter; raises AdapterError and changes nothing if refused.

        ``lazy``: read only the config and tensor header now; the weights are read and validated
        in the background before the first request on them runs (see ``AdapterStore.register``).
        """
        if self.store is None:
            raise AdapterError(f"adapter {name!r}: LoRA is disabled on this engine (enable_lora=False)")
        return self.store.register(name, path, pinned=pinned, lazy=lazy)

    def remove_lora(self, name: str) -> None:
        self._require_store().remove(name)

    def pin_lora(self, name: str, pinned: bool = True) -> AdapterEntry:
        return self._require_store().set_pinned(name, pinned)

    def list_loras(self) -> list[AdapterEntry]:
        return self.store.list() if self.store is not None else []

    def preload_lora(self, name: str, tier: str = "gpu") -> AdapterEntry:
        """Load an adapter into ``tier`` ("gpu"/"device" or "cpu") now; see ``AdapterStore.preload``."""
        return self._require_store().preload(name, tier)

    def evict_lora(self, name: str, tier: str = "gpu") -> AdapterEntry:
        """Drop an adapter from ``tier`` ("gpu": off the device; "cpu": down to disk); see ``AdapterStore.evict``."""
        return self._require_store().evict(name, tier)

    def adapter_info(self, name: str) -> dict[str, Any]:
        """One adapter's tier, bytes per tier, state and hit/miss/load/eviction counters."""
        return self._require_store().info(name)

    def lora_stats(self) -> dict[str, Any]:
        """Adapters and bytes per tier, the KV cache's bytes, the device budget split and the counters."""
        block = kv_block_bytes(self.cfg)
        kv_total = self.blocks.num_blocks * block
        kv = {
            "blocks_total": self.blocks.num_blocks,
            "blocks_free": self.blocks.num_free,
            "block_bytes": block,
            "bytes": kv_total,
            "bytes_used": (self.blocks.num_blocks - self.blocks.num_free) * block,
        }
        pool_bytes = self.store.pool.nbytes if self.store is not None else 0
        budget = {
            "adapter_memory_fraction": self.cfg.lora.adapter_memory_fraction,
            "bytes": pool_bytes + kv_total,
            "adapter_pool_bytes": pool_bytes,
            "kv_bytes": kv_total,
        }
        stats = self.store.stats_dict() if self.store is not None else {"tiers": {}, "counters": {}}
        return {**stats, "kv": kv, "budget": budget}

    def resolve_lora(self, lora: LoRARequest | str | None) -> AdapterEntry | None:
        """Map a request's adapter reference to a registered entry.

        A ``LoRARequest`` or string names a registered adapter; an unregistered one with a path (a
        ``LoRARequest.lora_path``, or a string that is an existing directory) is registered on the
        fly under that name, as vLLM does.
        """
        if lora is None:
            return None
        store = self._require_store()
        if isinstance(lora, LoRARequest):
            name, path = lora.lora_name, lora.lora_path
        else:
            name, path = lora, (lora if Path(lora).is_dir() else None)
        if name in store.by_name:
            entry = store.by_name[name]
            if path is None or Path(path).resolve() == Path(entry.path):
                return entry
        if path is None:
            resolved = store.resolve(name)  # LoRAConfig.lora_resolver_dirs, registered lazily
            if resolved is not None:
                return resolved
            raise AdapterNotFound(f"no adapter named {name!r} is registered and no path was given")
        self._check_allowed(path)
        return store.register(name, path)

    def _check_allowed(self, path: str | Path) -> None:
        roots = self.cfg.lora.lora_roots
        if not self.cfg.lora.allow_runtime_paths:
            raise AdapterError(f"adapter path {path}: loading adapters by path at request time is disabled")
        if not roots:
            return
        real = Path(path).resolve()
        if not any(real.is_relative_to(Path(r).resolve()) for r in roots):
            raise AdapterError(
                f"adapter path {path} resolves to {real}, outside the allowed roots {list(roots)}"
            )

    def _require_store(self) -> AdapterStore:
        if self.store is None:
            raise AdapterError("LoRA is disabled on this engine (enable_lora=False)")
        return self.store

    # requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterEntry | None = None,
        prompt: str | None = None,
        stream: bool = True,
    ) -> None:
        """Queue a request. Raises ValueError for a prompt that cannot fit the context or the cache.

        ``stream``: report the request after every step that advances it (with incremental text);
        False reports it once, finished, and detokenizes once at the end unless stop strings need
        the text as it grows (the offline API's setting: no per-token decode on the hot path).
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        max_len = self.cfg.max_model_len
        if len(prompt_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {max_len} tokens "
                "and at least one must be left to generate"
            )
        vocab = self.cfg.model.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if self.blocks.blocks_needed(len(prompt_ids) + 1) > self.blocks.num_blocks:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the KV cache")
        if adapter is not None and adapter.removed:
            raise AdapterNotFound(f"adapter {adapter.name!r} was removed")
        seqs = []
        incremental = self.tokenizer is not None and (stream or bool(params.stop_list))
        prompt_tuple = tuple(prompt_ids)  # the sampler's copy: immutable, shared by the n sequences
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(
                request_id=request_id,
                index=i,
                token_ids=list(prompt_ids),
                num_prompt_tokens=len(prompt_ids),
                params=params,
                adapter=adapter,
                generator=gen,
                detok=OutputText(self.tokenizer, prompt_ids, params) if incremental else None,
            )
            seq.sample_row = SampleRow(params, prompt_tuple, OutputIds(seq), gen, self._eos)
            seqs.append(seq)
        self.requests[request_id] = _Request(
            request_id, prompt, list(prompt_ids), seqs, adapter.name if adapter is not None else None, stream
        )
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now, freeing its KV blocks and adapter reference. False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unused blocks (vLLM's ``reset_prefix_cache``), e.g. between
        benchmark runs; returns how many blocks were forgotten."""
        return self.blocks.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and forward pass; return the outputs of requests that advanced."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        batch, logits = self.runner.run(scheduled, self.store)
        launched = time.perf_counter()
        sampling = [item.seq for item in batch if item.samples]
        self.scheduler.on_step_done(scheduled)
        results = self.sampler(logits, [seq.sample_row for seq in sampling]) if sampling else []
        self._record_stats(scheduled, launched - start, time.perf_counter() - launched)
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        requests = self.requests
        for seq, res in zip(sampling, results, strict=True):
            if seq.status is SeqStatus.FINISHED:
                continue
            token = res.token_id
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.token_logprobs.append(res.logprob)
            if res.top_logprobs is not None:
                seq.logprobs.append(res.top_logprobs)
            self._check_finish(seq, token)
            req = requests.get(seq.request_id)
            # A request that does not stream is reported only once all its sequences finished:
            # one that none finished in this step is left out here rather than checked below.
            if req is not None and (req.stream or seq.status is SeqStatus.FINISHED):
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if not req.stream and not all(s.status is SeqStatus.FINISHED for s in req.seqs):
                continue
            out = self._output(req)
            if out.finished:
                del requests[req.request_id]
                for listener in self.finished_listeners:
                    listener(out)
            outputs.append(out)
        return outputs

    def _check_finish(self, seq: Sequence, token: int) -> None:
        p = seq.params
        reason: str | None = None
        stop_reason: int | str | None = None
        detok = seq.detok
        # The sampler masks EOS and stop ids until min_tokens, so a sampled one always counts.
        is_eos = not p.ignore_eos and token in self._eos
        stop_ids = p.stop_token_ids
        is_stop_id = stop_ids is not None and token in stop_ids
        if is_eos or is_stop_id:
            reason, stop_reason = "stop", (token if is_stop_id else None)
            if detok is not None and p.include_stop_str_in_output:
                detok.add(token)
        elif detok is not None:
            hit = detok.add(token)
            if hit is not None:
                reason, stop_reason = "stop", hit
        if reason is None:
            num_tokens = len(seq.token_ids)
            if (
                p.max_tokens is not None and num_tokens - seq.num_prompt_tokens >= p.max_tokens
            ) or num_tokens >= self._max_model_len:
                reason = "length"
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            if detok is not None:
                detok.finish()
            self.scheduler.finish(seq)

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=self._text(seq),
                    token_ids=list(seq.output_ids),
                    cumulative_logprob=float(sum(seq.token_logprobs)),
                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        first = min((s.first_token_time for s in req.seqs if s.first_token_time), default=None)
        metrics = {"arrival": req.arrival}
        if first is not None:
            metrics["first_token"] = first
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=outs,
            finished=all(s.status is SeqStatus.FINISHED for s in req.seqs),
            lora_name=req.lora_name,
            num_cached_tokens=max(s.num_cached_prompt for s in req.seqs),
            metrics=metrics,
        )

    def _text(self, seq: Sequence) -> str:
        if seq.detok is not None:
            return seq.detok.text
        if self.tokenizer is None or not seq.finished:
            return ""
        ids = seq.output_ids
        # A final EOS / stop token's text is not part of the output (vLLM's default).
        if seq.finish_reason == "stop" and ids and not seq.params.include_stop_str_in_output:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _record_stats(
        self, scheduled: list[ScheduledSeq], launch_seconds: float, wait_seconds: float
    ) -> None:
        adapters = {item.seq.adapter for item in scheduled if item.seq.adapter is not None}
        self.last_step = StepStats(
            num_tokens=sum(item.num_tokens for item in scheduled),
            num_seqs=len(scheduled),
            num_adapters=len(adapters),
            adapter_bytes=sum(a.packed_nbytes or a.nbytes for a in adapters),
            launch_seconds=launch_seconds,
            wait_seconds=wait_seconds,
        )
