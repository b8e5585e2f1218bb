"""Drive an :class:`LLMEngine` from one background thread and stream its outputs to asyncio tasks.

The engine is not thread-safe, so every engine call (``add_request``, ``abort``, adapter
management, ``step``, reading its state) runs on the engine thread: callers enqueue commands,
which the thread runs between steps, and get results back through asyncio futures resolved with
``loop.call_soon_threadsafe``. When nothing is running the thread sleeps on an event that every
new command sets.

Failure isolation: if ``step()`` raises, only the requests implicated in that step are failed
(their streams raise :class:`RequestFailed`, their KV blocks and adapter references are freed by
aborting them) and the loop goes on serving the others; see :meth:`AsyncEngine._implicated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loraserve.core import RequestOutput, SeqStatus
from loraserve.engine.engine import LLMEngine
from loraserve.lora.adapter import AdapterError
from loraserve.lora.store import AdapterEntry, AdapterNotFound
from loraserve.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down or crashed); nothing more can be served."""


class RequestFailed(RuntimeError):
    """An engine step that ran this request raised; the request was aborted, others go on."""


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class _Command:
    """A function to run on the engine thread; its result goes to ``future`` (on ``loop``) if any."""

    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None

    def run(self, engine: LLMEngine) -> None:
        try:
            result = self.fn(engine)
        except Exception as e:
            if self.future is None:
                logger.exception("engine command failed")
            self.resolve(None, e)
        else:
            self.resolve(result, None)

    def resolve(self, result: Any, exc: BaseException | None) -> None:
        if self.loop is None or self.future is None:
            return
        # A closed event loop raises RuntimeError: its caller is gone and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set_future, self.future, result, exc)


def _set_future(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the awaiting task was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _put_all(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class AsyncEngine:
    """An asyncio front for :class:`LLMEngine`: per-request output streams, one engine thread.

    ``start()`` launches the thread (``call`` and ``generate`` start it on first use);
    ``shutdown()`` stops it and fails whatever is still pending with :class:`EngineDeadError`.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.num_step_failures = 0
        self._commands: deque[_Command] = deque()  # append/popleft are atomic: no lock needed
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        # request id -> stream; touched on the engine thread only.
        self._streams: dict[str, _Stream] = {}

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._start_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name="loraserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; pending requests fail."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        """False once the engine thread has stopped or crashed."""
        return self._dead is None and not self._stopping

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running: {self._dead or 'shut down'}")

    # API -------------------------------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps and return its result (or raise)."""
        self._check_alive()
        self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._enqueue(_Command(fn, loop, fut))
        if self._dead is not None:
            # The thread died between the check above and the enqueue: nobody else will run it.
            self._drain_commands(self._dead)
        return await fut

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; unknown or finished ids are ignored)."""
        if self.is_alive:
            self._enqueue(_Command(lambda engine: self._abort_now(request_id)))

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterEntry | str | None = None,
        prompt: str | None = None,
        stream: bool = True,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Add a request and yield its outputs until one is ``finished``.

        ``adapter``: None for the base model, an entry, or the name of an adapter (looked up on the
        engine thread among the registered ones, then in ``lora_resolver_dirs``; a name is never
        taken as a path). Outputs are cumulative,
        so when the consumer falls behind, intermediate ones are skipped. Raises what
        ``add_request`` raises (ValueError, :class:`AdapterNotFound`), :class:`RequestFailed` when
        a step fails the request, :class:`EngineDeadError` when the engine stops. Closing or
        cancelling the iterator early aborts the request, freeing its KV blocks and adapter.
        ``stream=False`` yields only the finished output (the engine then skips per-token
        detokenization).
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)

        def add(engine: LLMEngine) -> None:
            entry = self._lookup_adapter(engine, adapter)
            engine.add_request(request_id, prompt_ids, params, entry, prompt=prompt, stream=stream)
            self._streams[request_id] = stream

        try:
            await self.call(add)
        except asyncio.CancelledError:
            # The add may still run after we stop waiting; commands run in order, so this follows it.
            self.abort(request_id)
            raise
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                while isinstance(item, RequestOutput) and not item.finished and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped the request
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    # engine thread ---------------------------------------------------------------------------
    def _enqueue(self, cmd: _Command) -> None:
        self._commands.append(cmd)
        self._wake.set()

    @staticmethod
    def _lookup_adapter(engine: LLMEngine, adapter: AdapterEntry | str | None) -> AdapterEntry | None:
        if adapter is None or isinstance(adapter, AdapterEntry):
            return adapter
        # Registered names, or names the operator's resolver directories hold; never a path.
        entry = engine.store.resolve(adapter) if engine.store is not None else None
        if entry is None:
            raise AdapterNotFound(f"no adapter named {adapter!r} is registered")
        return entry

    def _abort_now(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _main(self) -> None:
        try:
            while not self._stopping:
                # Clear before looking for work: a command enqueued after this point sets the
                # event again, so the wait below cannot miss it.
                self._wake.clear()
                self._run_commands()
                if self._stopping:
                    break
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                self._step()
        except BaseException as e:
            logger.exception("the engine thread crashed")
            self._dead = e
        finally:
            self._fail_everything()

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.popleft()
            except IndexError:
                return
            cmd.run(self.engine)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._fail_step(exc)
            return
        items: list[tuple[str, _Stream, RequestOutput | BaseException]] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # added without a stream, or aborted after this step began
                continue
            if out.finished:
                del self._streams[out.request_id]
            items.append((out.request_id, stream, out))
        self._dispatch(items)

    def _dispatch(self, items: list[tuple[str, _Stream, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams: one ``call_soon_threadsafe`` per event loop per step."""
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[str, _Stream, RequestOutput | BaseException]]
        ] = {}
        for item in items:
            by_loop.setdefault(item[1].loop, []).append(item)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(stream, x) for _, stream, x in group])
            except RuntimeError:
                # The consumers' loop is closed: nobody will read these, so stop generating them.
                for rid, _, _ in group:
                    self._abort_now(rid)

    def _fail_step(self, exc: Exception) -> None:
        self.num_step_failures += 1
        victims = self._implicated(exc)
        logger.error(
            "engine step failed: %r; failing %d request(s) and continuing", exc, len(victims), exc_info=exc
        )
        for rid in victims:
            try:
                self.engine.abort(rid)
            except Exception:
                logger.exception("aborting request %s after a failed step also failed", rid)
        # A request the failed step finished (and dropped) before raising will never get its
        # final output: fail its stream too rather than leave the client waiting.
        lost = [rid for rid in self._streams if rid not in self.engine.requests]
        items: list[tuple[str, _Stream, RequestOutput | BaseException]] = []
        for rid in victims.union(lost):
            stream = self._streams.pop(rid, None)
            if stream is not None:
                items.append(
                    (rid, stream, RequestFailed(f"the engine failed while running this request: {exc}"))
                )
        self._dispatch(items)

    def _implicated(self, exc: Exception) -> set[str]:
        """The requests a failed step must fail.

        * Sequences admitted by the failed step before it raised hold KV blocks and adapter
          references but never reached the running list (their state cannot be resumed).
        * An :class:`AdapterError` is raised by scheduling when a queued adapter's read failed
          (files deleted or changed), before anything runs: the requests of that adapter fail and
          the running ones are innocent.
        * Anything else (the forward pass, sampling) failed the running batch.

        When nothing can be pinned down, every request fails: retrying a step that keeps
        raising with the same requests would spin forever.
        """
        sched = self.engine.scheduler
        ids = {s.request_id for s in sched.waiting if s.status is SeqStatus.RUNNING}
        broken = self._broken_adapters(exc) if isinstance(exc, AdapterError) else set()
        if broken:
            ids |= {
                rid for rid, req in self.engine.requests.items() if any(s.adapter in broken for s in req.seqs)
            }
        else:
            ids |= {s.request_id for s in sched.running}
        return ids or set(self.engine.requests)

    def _broken_adapters(self, exc: AdapterError) -> set[AdapterEntry]:
        """Adapters of live requests named by ``exc``'s message (the store's load errors all say
        ``adapter 'NAME'``)."""
        message = str(exc)
        entries = {
            s.adapter for req in self.engine.requests.values() for s in req.seqs if s.adapter is not None
        }
        return {e for e in entries if f"adapter {e.name!r}" in message}

    def _drain_commands(self, exc: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.popleft()
            except IndexError:
                return
            cmd.resolve(None, exc)

    def _fail_everything(self) -> None:
        err = self._dead or EngineDeadError("the engine was shut down")
        dead = EngineDeadError(f"the engine stopped: {err}")
        self._dead = dead
        self._drain_commands(dead)
        items: list[tuple[str, _Stream, RequestOutput | BaseException]] = [
            (rid, stream, EngineDeadError(str(dead))) for rid, stream in self._streams.items()
        ]
        self._streams.clear()
        self._dispatch(items)
