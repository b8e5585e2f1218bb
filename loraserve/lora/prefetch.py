"""Disk -> host adapter reads off the engine thread.

Reading an adapter (safetensors parse, validation, hashing, packing into pool layout) takes
milliseconds for small adapters and tens of milliseconds for 7B-sized ones, so the store never
does it inside a step: it hands the read to a :class:`HostLoader`, whose worker threads only
compute (they touch no store state), and collects finished reads between steps with
:meth:`HostLoader.harvest`. Each read splits its byte-level work (file reads, hashing, byte moves)
over I/O threads shared by all readers (``loraserve.lora.adapter.in_io_threads``), so one read
uses several cores and concurrent reads share them.

Ordering: the store submits reads in queue order and keeps at most ``2 * workers`` in flight, so
the executor's FIFO never holds more than one round of work ahead of a more urgent adapter that
becomes known later; that bounded queue is the priority mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

from loraserve.lora.pool import PackedAdapter

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class ReadResult:
    """What a read produced: the adapter's identity and shape, and its packed host copy."""

    content_hash: str
    rank: int
    nbytes: int
    target_modules: frozenset[str]
    packed: PackedAdapter
    # Time the read itself took on its worker (excludes the wait for a free worker).
    seconds: float = 0.0


ReadFn = Callable[[str, str], ReadResult]
"""``read(path, name)``: read, validate and pack one adapter; raises AdapterError when refused."""


class HostLoader(Generic[K]):
    """A small pool of reader threads keyed by the caller's adapter handle.

    ``workers=0`` reads synchronously inside :meth:`submit` (deterministic; for tests and for
    engines that must not start threads).
    """

    def __init__(self, read: ReadFn, workers: int) -> None:
        self._read = read
        self.workers = workers
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-read") if workers > 0 else None
        )
        self._futures: dict[K, Future[ReadResult]] = {}

    @property
    def max_in_flight(self) -> int:
        """Reads kept submitted at once (see the module docstring on ordering)."""
        return max(1, 2 * self.workers)

    @property
    def num_in_flight(self) -> int:
        return len(self._futures)

    def is_reading(self, key: K) -> bool:
        return key in self._futures

    def submit(self, key: K, path: str, name: str) -> None:
        """Start reading ``path`` for ``key`` (no-op if a read for ``key`` is already in flight)."""
        if key in self._futures:
            return
        if self._pool is None:
            fut: Future[ReadResult] = Future()
            try:
                fut.set_result(self._read(path, name))
            except Exception as e:  # delivered through harvest like a worker's failure
                fut.set_exception(e)
            self._futures[key] = fut
            return
        self._futures[key] = self._pool.submit(self._read, path, name)

    def harvest(self) -> list[tuple[K, ReadResult | Exception]]:
        """Finished reads (results or the exception they raised), removed from the in-flight set."""
        out: list[tuple[K, ReadResult | Exception]] = []
        for key, fut in list(self._futures.items()):
            if not fut.done():
                continue
            del self._futures[key]
            exc = fut.exception()
            out.append((key, exc if isinstance(exc, Exception) else fut.result()))
        return out

    def read_now(self, key: K, path: str, name: str) -> ReadResult:
        """Read synchronously, reusing a read already in flight for ``key``; raises its error."""
        fut = self._futures.pop(key, None)
        if fut is not None:
            return fut.result()
        return self._read(path, name)

    def wait_any(self, timeout: float) -> bool:
        """Block until some read finishes or ``timeout`` passes; True if one is done."""
        if not self._futures:
            return False
        done, _ = wait(list(self._futures.values()), timeout=timeout, return_when=FIRST_COMPLETED)
        return bool(done)

    def shutdown(self) -> None:
        """Stop the worker threads (reads in flight finish; their results are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._futures.clear()
