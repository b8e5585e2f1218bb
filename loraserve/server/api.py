"""The OpenAI-compatible HTTP server (FastAPI) over an :class:`AsyncEngine`.

Routes:

* ``POST /v1/completions``, ``POST /v1/chat/completions``: streaming (SSE) or not; the ``model``
  field names the base model (its served name) or a registered adapter.
* ``GET /v1/models`` (+ ``/v1/models/{id}``): the base model and every adapter (``parent`` = base).
* ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's routes; loading needs
  ``allow_runtime_lora`` and a path under one of ``lora_roots``), ``GET /v1/adapters``,
  ``POST /v1/adapters/{name}/pin`` and ``/unpin``: management, behind ``admin_api_key`` when set.
* ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /version``.

Every route needs ``api_key`` (``Authorization: Bearer``) when one is set. Errors use OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraserve import __version__
from loraserve.core import CompletionOutput, RequestOutput
from loraserve.detokenize import stop_holdback
from loraserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailed
from loraserve.engine.engine import LLMEngine
from loraserve.llm import LLM
from loraserve.lora.adapter import AdapterError
from loraserve.lora.store import AdapterEntry, AdapterNotFound
from loraserve.sampling import SamplingParams
from loraserve.server.metrics import EngineSnapshot, ServerMetrics
from loraserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    error_body,
)

logger = logging.getLogger(__name__)

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
# "scheme:" prefixes (http:, https:, s3:, hf:, file:...): adapters are local directories only.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclass(frozen=True)
class ServerConfig:
    """Server options (the engine's are the ``LLM``'s).

    ``served_model_name``: the base model's id in the API (default: its directory name).
    ``api_key``: needed by every route when set. ``admin_api_key``: needed by the management
    routes when set (it also passes the ``api_key`` check). ``allow_runtime_lora``: enable
    ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. ``lora_roots``: directories that
    runtime adapter paths must resolve under (symlinks followed). ``max_request_bytes``: larger
    bodies get 413. ``max_n``: the largest ``n``; ``max_logprobs``: the largest ``logprobs`` /
    ``top_logprobs``; ``max_prompts``: prompts per completions request.
    """

    served_model_name: str | None = None
    api_key: str | None = None
    admin_api_key: str | None = None
    allow_runtime_lora: bool = False
    lora_roots: tuple[str, ...] = ()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_n: int = 16
    max_logprobs: int = 20
    max_prompts: int = 64


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


class APIError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def resolve_adapter_path(raw: str, roots: Sequence[str | Path]) -> Path:
    """Resolve a runtime adapter path, refusing anything that could leave ``roots``.

    Refused (ValueError with the reason): no roots configured, URLs and other ``scheme:`` paths,
    ``..`` components, and paths (or files inside the adapter directory) that resolve, after
    symlinks, outside every root. A relative path is looked up under each root in turn. Returns
    the resolved directory (it may not exist; loading then fails with a clear AdapterError).
    """
    if not roots:
        raise ValueError("runtime adapter loading needs at least one --lora-root to load adapters from")
    if "://" in raw or _SCHEME.match(raw):
        raise ValueError(
            f"adapter path {raw!r}: URLs are not accepted, give a local directory under a --lora-root"
        )
    if "\x00" in raw:
        raise ValueError("adapter path contains a NUL byte")
    path = Path(raw)
    if ".." in path.parts:
        raise ValueError(f"adapter path {raw!r}: '..' components are not allowed")
    real_roots = [Path(r).resolve() for r in roots]
    candidates = [path] if path.is_absolute() else [root / path for root in real_roots]
    resolved = [c.resolve() for c in candidates]
    inside = [r for r in resolved if any(r.is_relative_to(root) for root in real_roots)]
    if not inside:
        raise ValueError(
            f"adapter path {raw!r} resolves to {resolved[0]}, outside the allowed --lora-root directories"
        )
    real = next((r for r in inside if r.is_dir()), inside[0])
    if real.is_dir():
        for child in real.iterdir():
            target = child.resolve()
            if not any(target.is_relative_to(root) for root in real_roots):
                raise ValueError(
                    f"adapter path {raw!r}: {child.name} is a symlink to {target}, outside the allowed roots"
                )
    return real


@dataclass(eq=False)
class _Job:
    """One engine request (one prompt with its ``n`` sequences) of an HTTP request."""

    request_id: str
    prompt_text: str | None
    prompt_ids: list[int]
    arrival: float
    first_token: float | None = None
    last: RequestOutput | None = None
    final: RequestOutput | None = None
    recorded: bool = False

    def observe(self, out: RequestOutput) -> None:
        # The engine stamps the first token with time.monotonic(), the clock of ``arrival``;
        # non-streaming requests are only reported once finished, so observation time won't do.
        if self.first_token is None:
            self.first_token = out.metrics.get("first_token")
        self.last = out
        if out.finished:
            self.final = out


@dataclass
class _ChoiceState:
    """What has been streamed of one choice."""

    chars: int = 0
    tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False


@dataclass
class _Call:
    """What the completions and chat handlers share once their request is parsed."""

    kind: str  # "completion" or "chat"
    response_id: str
    model: str
    adapter: str | None
    params: SamplingParams
    jobs: list[_Job]
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class _SSEResponse(StreamingResponse):
    """A streaming response that always closes its body iterator.

    Starlette cancels the sending task when the client disconnects but leaves the body generator
    suspended; closing it here runs its cleanup (aborting the engine requests) at once instead of
    whenever the garbage collector gets to it.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """Request handling for one ``LLM``; :func:`create_app` wires it into FastAPI."""

    def __init__(self, llm: LLM, config: ServerConfig) -> None:
        if llm.tokenizer is None:
            raise ValueError("the server needs the model's tokenizer (do not use skip_tokenizer_init)")
        self.llm = llm
        self.config = config
        self.tokenizer = llm.tokenizer
        self.engine = AsyncEngine(llm.engine)
        self.metrics = ServerMetrics()
        cfg = llm.engine.cfg
        self.model_name = config.served_model_name or cfg.model.name
        self.model_root = cfg.model.path
        self.max_model_len = cfg.max_model_len
        self.vocab_size = cfg.model.vocab_size
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._metrics_lock = asyncio.Lock()
        store = llm.engine.store
        if store is not None and self.model_name in store.by_name:
            raise ValueError(f"an adapter is registered under the base model's name {self.model_name!r}")

    # auth ------------------------------------------------------------------------------------
    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    @staticmethod
    def _matches(token: str | None, key: str | None) -> bool:
        return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())

    async def check_api_key(self, request: Request) -> None:
        """Every route: the API key (or the admin key) when an API key is set."""
        cfg = self.config
        if cfg.api_key is None:
            return
        token = self._bearer(request)
        if not (self._matches(token, cfg.api_key) or self._matches(token, cfg.admin_api_key)):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")

    async def check_admin_key(self, request: Request) -> None:
        """Management routes: the admin key when one is set."""
        key = self.config.admin_api_key
        if key is not None and not self._matches(self._bearer(request), key):
            raise APIError(
                401, "this route needs the admin API key (send 'Authorization: Bearer <admin key>')"
            )

    # parsing ---------------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None

    async def _parse(self, request: Request, model: type[B]) -> B:
        obj = await self._read_json(request)
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            errors = e.errors()
            message = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in errors[:4])
            param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
            raise APIError(400, message, param) from None

    def _resolve_model(self, name: str | None) -> str | None:
        """None for the base model, else the adapter name; 404 for unknown models.

        Reading the registry from the event loop is a benign race: the engine thread looks the
        name up again when the request is added (and answers 404 if it was unloaded in between).
        With resolver directories configured, an unregistered name is left to that lookup.
        """
        if name is None or name == self.model_name:
            return None
        store = self.llm.engine.store
        if store is not None and (name in store.by_name or store.resolver):
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "model")

    def _check_limits(self, n: int, logprobs: int | None, logprobs_field: str) -> None:
        if n > self.config.max_n:
            raise APIError(400, f"n must be <= {self.config.max_n}, got {n}", "n")
        if logprobs is not None and logprobs > self.config.max_logprobs:
            raise APIError(
                400, f"{logprobs_field} must be <= {self.config.max_logprobs}, got {logprobs}", logprobs_field
            )

    def _check_prompt(self, ids: list[int], max_tokens: int | None, field_name: str) -> None:
        if not ids:
            raise APIError(400, f"{field_name}: the prompt is empty", field_name)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError(400, f"{field_name}: token ids must be in [0, {self.vocab_size})", field_name)
        if len(ids) >= self.max_model_len:
            raise APIError(
                400,
                f"{field_name}: the prompt has {len(ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens (one must be left to generate)",
                field_name,
            )
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"max_tokens: this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(ids) + max_tokens} were requested ({len(ids)} in the prompt, {max_tokens} to generate)",
                "max_tokens",
            )

    @staticmethod
    def _sampling(
        body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        try:
            return body.to_sampling_params(max_tokens, logprobs)
        except ValueError as e:
            word = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), word if word in type(body).model_fields else None) from None

    def _encode(self, text: str) -> list[int]:
        # The same encoding as the offline API (LLM.generate / LLM.chat), so outputs agree.
        return self.tokenizer.encode(text, add_special_tokens=True)

    # completions -----------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        arrival = time.monotonic()
        body = await self._parse(request, CompletionRequest)
        adapter = self._resolve_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be omitted)", "best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(
                400, "echo with logprobs is not supported (prompt logprobs are not computed)", "echo"
            )
        self._check_limits(body.n, body.logprobs, "logprobs")
        prompts = self._completion_prompts(body.prompt)
        params = self._sampling(body, body.max_tokens, body.logprobs)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for i, (text, ids) in enumerate(prompts):
            self._check_prompt(ids, body.max_tokens, "prompt")
            jobs.append(_Job(f"{response_id}-{i}", text, ids, arrival))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = _Call(
            "completion",
            response_id,
            body.model or self.model_name,
            adapter,
            params,
            jobs,
            body.stream,
            include_usage,
            echo=body.echo,
            logprobs=body.logprobs,
        )
        return await self._serve(request, call)

    def _completion_prompts(self, prompt: Any) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt: at least one prompt is needed", "prompt")
        if len(items) > self.config.max_prompts:
            raise APIError(400, f"prompt: at most {self.config.max_prompts} prompts per request", "prompt")
        return [(p, self._encode(p)) if isinstance(p, str) else (None, list(p)) for p in items]

    # chat ------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        arrival = time.monotonic()
        body = await self._parse(request, ChatCompletionRequest)
        adapter = self._resolve_model(body.model)
        if body.tools:
            raise APIError(400, "tools are not supported", "tools")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self._check_limits(body.n, logprobs, "top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = self.llm.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # a template that raises on this conversation (jinja errors)
            raise APIError(400, f"messages: the chat template failed: {e}", "messages") from None
        ids = self._encode(text)
        self._check_prompt(ids, max_tokens, "messages")
        params = self._sampling(body, max_tokens, logprobs)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = _Call(
            "chat",
            response_id,
            body.model or self.model_name,
            adapter,
            params,
            [_Job(response_id, text, ids, arrival)],
            body.stream,
            include_usage,
            logprobs=logprobs,
        )
        return await self._serve(request, call)

    # generation ------------------------------------------------------------------------------
    async def _serve(self, request: Request, call: _Call) -> Response:
        outputs = self._outputs(call)
        try:
            if not call.stream:
                await self._until_disconnect(request, self._drain(outputs, call))
                return JSONResponse(self._full_response(call))
            # Wait for the first output before answering, so that a request the engine refuses
            # or fails at once gets a real error status instead of a 200 with an error event.
            first = await self._until_disconnect(request, anext(outputs))
        except _ClientGone:
            self._finish_jobs(call, "abort")
            return Response(status_code=499)  # nobody reads it: the client is gone
        except Exception as e:
            await outputs.aclose()
            self._finish_jobs(call, "error")
            raise self._api_error(e, call) from None
        return _SSEResponse(
            self._stream(call, first, outputs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _api_error(self, e: Exception, call: _Call) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, AdapterNotFound):
            return APIError(404, f"The model `{call.model}` does not exist.", "model")
        if isinstance(e, EngineDeadError):
            return APIError(503, str(e))
        if isinstance(e, RequestFailed):
            return APIError(500, str(e))
        if isinstance(e, AdapterError):  # a resolver directory's adapter that does not load
            return APIError(400, str(e), "model")
        if isinstance(e, ValueError):
            return APIError(400, str(e), "prompt" if call.kind == "completion" else "messages")
        logger.exception("request %s failed", call.response_id, exc_info=e)
        return APIError(500, f"internal error: {e}")

    async def _until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Await ``work``; if the client disconnects first, cancel it (which aborts its engine
        requests) and raise :class:`_ClientGone`."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                # Let the cancellation unwind the generators (and abort) before anyone closes them.
                await asyncio.wait({task})
        if task.cancelled():
            raise _ClientGone
        return task.result()

    @staticmethod
    async def _wait_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            # The body was fully read; servers answer further receives only on disconnect, but do
            # not spin if one returns empty body messages.
            await asyncio.sleep(0.05)

    async def _outputs(self, call: _Call) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Outputs of all the call's jobs as ``(job index, output)``, interleaved as they come."""
        gens = [
            self.engine.generate(
                job.request_id, job.prompt_ids, call.params, call.adapter, job.prompt_text, call.stream
            )
            for job in call.jobs
        ]
        if len(gens) == 1:
            try:
                async for out in gens[0]:
                    call.jobs[0].observe(out)
                    yield 0, out
            finally:
                await gens[0].aclose()
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    call.jobs[i].observe(item)
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def _drain(self, outputs: AsyncGenerator[tuple[int, RequestOutput], None], call: _Call) -> None:
        async for _ in outputs:
            pass
        self._finish_jobs(call, None)

    def _finish_jobs(self, call: _Call, reason: str | None) -> None:
        """Record the metrics of the call's jobs not recorded yet; ``reason`` is the finish reason
        of those that did not finish ("abort", "error").

        Unfinished jobs are aborted too: their generators normally did it already, this is the
        backstop for one that was never started."""
        label = call.adapter or self.model_name
        now = time.monotonic()
        for job in call.jobs:
            if job.recorded:
                continue
            job.recorded = True
            outs = job.last.outputs if job.last is not None else []
            if job.final is None:
                self.engine.abort(job.request_id)
                finish = reason or "abort"
            else:
                finish = next((o.finish_reason for o in outs if o.finish_reason), "stop")
            ttft = job.first_token - job.arrival if job.first_token is not None else None
            self.metrics.request_finished(
                label,
                finish,
                len(job.prompt_ids),
                sum(len(o.token_ids) for o in outs),
                ttft,
                now - job.arrival,
                max((len(o.token_ids) for o in outs), default=0),
            )

    def _usage(self, call: _Call) -> dict[str, int]:
        prompt = sum(len(job.prompt_ids) for job in call.jobs)
        completion = sum(len(o.token_ids) for job in call.jobs if job.final for o in job.final.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # response shapes -------------------------------------------------------------------------
    def _token_str(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _completion_logprobs(
        self, ids: list[int], lps: list[dict[int, float]], state: _ChoiceState
    ) -> dict[str, Any]:
        """OpenAI's legacy shape; ``top_logprobs`` holds the top ``logprobs`` tokens plus the
        chosen one, as vLLM returns it."""
        tokens, offsets = [], []
        for t in ids:
            s = self._token_str(t)
            tokens.append(s)
            offsets.append(state.text_offset)
            state.text_offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.get(t) for t, lp in zip(ids, lps, strict=True)],
            "top_logprobs": [{self._token_str(k): v for k, v in lp.items()} for lp in lps],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, ids: list[int], lps: list[dict[int, float]], top: int) -> dict[str, Any]:
        """OpenAI's chat shape. ``bytes`` is the UTF-8 of the token's decoded text (a token holding
        part of a character decodes to U+FFFD)."""

        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self._token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = []
        for t, lp in zip(ids, lps, strict=True):
            item = entry(t, lp[t])
            # The engine puts the top tokens first and the chosen one after them when it is not among them.
            item["top_logprobs"] = [entry(k, v) for k, v in list(lp.items())[:top]]
            content.append(item)
        return {"content": content}

    def _full_response(self, call: _Call) -> dict[str, Any]:
        choices = []
        n = call.params.n
        for i, job in enumerate(call.jobs):
            assert job.final is not None
            for o in sorted(job.final.outputs, key=lambda o: o.index):
                lps = o.logprobs if call.logprobs is not None and o.logprobs is not None else None
                if call.kind == "completion":
                    text = (self._prompt_text(job) + o.text) if call.echo else o.text
                    choices.append(
                        {
                            "index": i * n + o.index,
                            "text": text,
                            "logprobs": self._completion_logprobs(o.token_ids, lps, _ChoiceState())
                            if lps is not None
                            else None,
                            "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason,
                        }
                    )
                else:
                    choices.append(
                        {
                            "index": o.index,
                            "message": {"role": "assistant", "content": o.text},
                            "logprobs": self._chat_logprobs(o.token_ids, lps, call.logprobs or 0)
                            if lps is not None
                            else None,
                            "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason,
                        }
                    )
        return {
            "id": call.response_id,
            "object": "text_completion" if call.kind == "completion" else "chat.completion",
            "created": call.created,
            "model": call.model,
            "choices": choices,
            "usage": self._usage(call),
        }

    def _prompt_text(self, job: _Job) -> str:
        if job.prompt_text is not None:
            return job.prompt_text
        return self.tokenizer.decode(job.prompt_ids, skip_special_tokens=False)

    # streaming -------------------------------------------------------------------------------
    async def _stream(
        self,
        call: _Call,
        first: tuple[int, RequestOutput],
        outputs: AsyncGenerator[tuple[int, RequestOutput], None],
    ) -> AsyncIterator[str]:
        states: dict[tuple[int, int], _ChoiceState] = {}
        base = {
            "id": call.response_id,
            "object": "text_completion" if call.kind == "completion" else "chat.completion.chunk",
            "created": call.created,
            "model": call.model,
        }
        if call.include_usage:
            base["usage"] = None
        outcome: str | None = "abort"
        try:
            if call.kind == "chat":
                for i in range(call.params.n):
                    choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}  # fmt: skip
                    yield _sse({**base, "choices": [choice]})
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                i, out = item
                for o in out.outputs:
                    choice = self._stream_choice(call, i, o, states.setdefault((i, o.index), _ChoiceState()))
                    if choice is not None:
                        yield _sse({**base, "choices": [choice]})
                item = await anext(outputs, None)
            outcome = None
            if call.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage(call)})
        except (RequestFailed, EngineDeadError, AdapterNotFound, ValueError) as e:
            outcome = "error"
            err = self._api_error(e, call)
            yield _sse(error_body(err.status, err.message, err.param))
        finally:
            await outputs.aclose()
            self._finish_jobs(call, outcome)
        yield "data: [DONE]\n\n"

    def _stream_choice(
        self, call: _Call, job_index: int, o: CompletionOutput, st: _ChoiceState
    ) -> dict | None:
        """The chunk's choice for one cumulative output, or None when there is nothing new to send."""
        if st.done:
            return None
        finished = o.finish_reason is not None
        text = o.text
        # A tail that may still become a stop string is held back until it is decided.
        end = len(text) if finished else len(text) - stop_holdback(text, call.params.stop_list)
        delta = text[st.chars : end] if end > st.chars else ""
        st.chars = max(st.chars, end)
        new_ids = o.token_ids[st.tokens :]
        new_lps = o.logprobs[st.tokens :] if call.logprobs is not None and o.logprobs is not None else None
        st.tokens = len(o.token_ids)
        st.done = finished
        if not (delta or finished or (new_lps and new_ids)):
            return None
        if call.kind == "completion":
            if call.echo and not st.started:
                delta = self._prompt_text(call.jobs[job_index]) + delta
            st.started = True
            return {
                "index": job_index * call.params.n + o.index,
                "text": delta,
                "logprobs": self._completion_logprobs(new_ids, new_lps, st) if new_lps is not None else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
        return {
            "index": o.index,
            "delta": {"content": delta} if delta or not finished else {},
            "logprobs": self._chat_logprobs(new_ids, new_lps, call.logprobs or 0)
            if new_lps is not None
            else None,
            "finish_reason": o.finish_reason,
            "stop_reason": o.stop_reason,
        }

    # models and adapters ---------------------------------------------------------------------
    def _model_card(self, model_id: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "loraserve",
            "root": root,
            "parent": parent,
            "max_model_len": self.max_model_len,
        }

    async def _model_cards(self) -> list[dict[str, Any]]:
        adapters = await self.engine.call(lambda e: [(a.name, a.path) for a in e.list_loras()])
        cards = [self._model_card(self.model_name, self.model_root, None)]
        cards += [self._model_card(name, path, self.model_name) for name, path in adapters]
        return cards

    async def list_models(self) -> dict[str, Any]:
        """``GET /v1/models``: the base model, then every adapter with ``parent`` = the base."""
        return {"object": "list", "data": await self._model_cards()}

    async def get_model(self, model: str) -> dict[str, Any]:
        """``GET /v1/models/{model}``."""
        for card in await self._model_cards():
            if card["id"] == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    @staticmethod
    def describe_adapter(engine: LLMEngine, entry: AdapterEntry) -> dict[str, Any]:
        """An adapter's management view (engine thread only: the tier reads the store)."""
        assert engine.store is not None
        return {
            "name": entry.name,
            "path": entry.path,
            "rank": entry.rank,
            "size_bytes": entry.nbytes,
            "tier": entry.tier(engine.store),
            "pinned": entry.pinned,
            "in_flight": entry.in_flight,
            "requests_served": entry.requests_served,
            "last_used": entry.last_used or None,
            "content_hash": entry.content_hash,
            "target_modules": sorted(entry.target_modules),
        }

    async def list_adapters(self) -> dict[str, Any]:
        """``GET /v1/adapters``."""
        data = await self.engine.call(lambda e: [self.describe_adapter(e, a) for a in e.list_loras()])
        return {"object": "list", "data": data}

    async def pin(self, name: str) -> dict[str, Any]:
        """``POST /v1/adapters/{name}/pin``: load onto the device and never evict."""
        return await self._set_pinned(name, True)

    async def unpin(self, name: str) -> dict[str, Any]:
        """``POST /v1/adapters/{name}/unpin``."""
        return await self._set_pinned(name, False)

    async def _set_pinned(self, name: str, pinned: bool) -> dict[str, Any]:
        try:
            return await self.engine.call(lambda e: self.describe_adapter(e, e.pin_lora(name, pinned)))
        except AdapterNotFound:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "name") from None
        except AdapterError as e:
            raise APIError(400, str(e), "name") from None
        except RuntimeError as e:  # every device row is pinned or in use
            raise APIError(409, str(e), "name") from None

    async def load_adapter(self, request: Request) -> dict[str, Any]:
        """``POST /v1/load_lora_adapter``: register an adapter from a directory under a lora root."""
        if not self.config.allow_runtime_lora:
            raise APIError(
                403, "runtime adapter loading is disabled; start the server with --allow-runtime-lora"
            )
        body = await self._parse(request, LoadLoRAAdapterRequest)
        name = body.lora_name
        if name == self.model_name:
            raise APIError(400, f"lora_name {name!r} is the base model's name", "lora_name")
        try:
            path = resolve_adapter_path(body.lora_path, self.config.lora_roots)
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from None

        def load(engine: LLMEngine) -> dict[str, Any]:
            if engine.store is not None and name in engine.store.by_name and not body.load_inplace:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
            return self.describe_adapter(engine, engine.add_lora(name, path))

        try:
            info = await self.engine.call(load)
        except AdapterError as e:
            raise APIError(400, str(e), "lora_path") from None
        logger.info("loaded adapter %s from %s", name, path)
        return {
            "status": "ok",
            "message": f"Success: LoRA adapter '{name}' added successfully.",
            "adapter": info,
        }

    async def unload_adapter(self, request: Request) -> dict[str, Any]:
        """``POST /v1/unload_lora_adapter``: requests in flight finish, new ones get 404. The answer's
        ``in_flight`` counts the sequences still running on the adapter."""
        if not self.config.allow_runtime_lora:
            raise APIError(
                403, "runtime adapter loading is disabled; start the server with --allow-runtime-lora"
            )
        body = await self._parse(request, UnloadLoRAAdapterRequest)
        name = body.lora_name

        def unload(engine: LLMEngine) -> int:
            entry = engine.store.get(name) if engine.store is not None else None
            if entry is None:
                raise AdapterNotFound(name)
            in_flight = entry.in_flight
            engine.remove_lora(name)
            return in_flight

        try:
            in_flight = await self.engine.call(unload)
        except AdapterNotFound:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name") from None
        logger.info("unloaded adapter %s (%d sequence(s) still finishing on it)", name, in_flight)
        return {
            "status": "ok",
            "message": f"Success: LoRA adapter '{name}' removed successfully.",
            "in_flight": in_flight,
        }

    # ops ---------------------------------------------------------------------------------------
    async def health(self) -> Response:
        """``GET /health``: 200 while the engine thread runs, else 503."""
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    async def render_metrics(self) -> Response:
        """``GET /metrics``: Prometheus text; engine gauges are read on the engine thread now."""
        async with self._metrics_lock:  # the load-latency cursor must not be read twice
            seen = self.metrics.load_seconds_seen
            snap = await self.engine.call(lambda e: EngineSnapshot.capture(e, seen))
            self.metrics.update_engine(snap, self.engine.num_step_failures)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def reset_prefix_cache(self) -> dict[str, int]:
        """``POST /reset_prefix_cache`` (admin, as vLLM's): forget the cached prompt KV that no
        running request uses, e.g. between benchmark runs; returns the number of blocks dropped."""
        return {"blocks_dropped": await self.engine.call(lambda e: e.reset_prefix_cache())}

    async def version(self) -> dict[str, str]:
        """``GET /version``."""
        return {"version": __version__}


def create_app(llm: LLM, config: ServerConfig | None = None, **overrides: Any) -> FastAPI:
    """The FastAPI app serving ``llm``. ``overrides`` replace fields of ``config``.

    The engine thread starts with the app's lifespan (or on the first request) and stops with it;
    from then on it owns ``llm.engine``: do not call ``llm.generate`` meanwhile. ``app.state.server``
    is the :class:`OpenAIServer` (its ``engine`` and ``metrics``).
    """
    cfg = replace(config or ServerConfig(), **overrides)
    server = OpenAIServer(llm, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The start-up heap (model, kernels, graphs, tokenizer) lives as long as the server: out of
        # the collector's view, full collections while serving scan only what serving allocates
        # (one took 245 ms in an H200 benchmark run, a stall of every running request), as vLLM does.
        gc.collect()
        gc.freeze()
        server.engine.start()
        yield
        server.engine.shutdown()
        gc.unfreeze()

    # The interactive docs are plain Starlette routes that the API-key dependency does not cover.
    docs = {} if cfg.api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="loraserve",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(server.check_api_key)],
        **docs,
    )
    app.state.server = server
    admin = [Depends(server.check_admin_key)]
    route: Callable[..., Any] = app.add_api_route
    route("/v1/completions", server.completions, methods=["POST"])
    route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    route("/v1/models", server.list_models, methods=["GET"])
    route("/v1/models/{model:path}", server.get_model, methods=["GET"])
    route("/v1/load_lora_adapter", server.load_adapter, methods=["POST"], dependencies=admin)
    route("/v1/unload_lora_adapter", server.unload_adapter, methods=["POST"], dependencies=admin)
    route("/v1/adapters", server.list_adapters, methods=["GET"], dependencies=admin)
    route("/v1/adapters/{name:path}/pin", server.pin, methods=["POST"], dependencies=admin)
    route("/v1/adapters/{name:path}/unpin", server.unpin, methods=["POST"], dependencies=admin)
    route("/reset_prefix_cache", server.reset_prefix_cache, methods=["POST"], dependencies=admin)
    route("/health", server.health, methods=["GET"])
    route("/metrics", server.render_metrics, methods=["GET"])
    route("/version", server.version, methods=["GET"])

    def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        param = str(errors[0]["loc"][-1]) if errors and errors[0].get("loc") else None
        return error_response(400, "; ".join(str(e.get("msg")) for e in errors[:4]), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {exc}")

    return app
