"""Requests as the engine sees them (``Sequence``) and as users get them back (``RequestOutput``)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

import torch

if TYPE_CHECKING:
    from loraserve.detokenize import OutputText
    from loraserve.lora.store import AdapterEntry
    from loraserve.sampling import SampleRow, SamplingParams


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's adapter handle: a name, an integer id (informational here) and a PEFT directory."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str | None = None

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str | None:
        return self.lora_path


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated sequence (a request with ``n > 1`` owns ``n`` of them).

    ``token_ids`` holds prompt and output tokens; ``num_computed`` counts the leading tokens whose
    K/V are in the cache; ``block_table`` lists the KV blocks; ``block_hashes`` the chained hashes of
    the full blocks published to the prefix cache so far. ``sample_row`` is the sampler's view of
    the sequence, built once by the engine (its output ids are an :class:`OutputIds` view).
    """

    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    adapter: AdapterEntry | None
    generator: torch.Generator | None
    detok: OutputText | None
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    num_cached_prompt: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    text: str = ""
    holds_adapter: bool = False
    first_token_time: float | None = None
    waited_steps: int = 0
    sample_row: SampleRow | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def adapter_hash(self) -> str | None:
        return self.adapter.content_hash if self.adapter is not None else None


class OutputIds(SequenceABC[int]):
    """A live, read-only view of a sequence's generated token ids (``token_ids[num_prompt_tokens:]``).

    The sampler needs them only for penalties and ``min_tokens``; a view that follows the sequence
    as it grows spares every step a copy of every sequence's tokens.
    """

    __slots__ = ("_seq",)

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __len__(self) -> int:
        return len(self._seq.token_ids) - self._seq.num_prompt_tokens

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        return self._seq.output_ids[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._seq.output_ids)


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions, like vLLM's.

    ``logprobs``: per generated token, a dict ``token_id -> logprob`` (the chosen token plus the
    ``SamplingParams.logprobs`` most likely ones), or None when not asked.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step (streaming) or at the end (offline), shaped like vLLM's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_name: str | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
