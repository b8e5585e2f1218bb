"""End-to-end tests of the OpenAI-compatible server: a real uvicorn server on a loopback port,
driven by the official ``openai`` client (and ``httpx`` for raw HTTP cases).

Every generation is compared with the offline API (``LLM.generate`` / ``LLM.chat``) on a
separate, identically configured ``LLM`` (the engine's own outputs are checked against
transformers + peft elsewhere). Everything runs on a tiny random Llama with real PEFT adapters.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from loraserve.llm import LLM
from loraserve.sampling import SamplingParams
from loraserve.server.api import OpenAIServer, create_app, resolve_adapter_path
from loraserve.testing import make_peft_adapter, make_tiny_model

API_KEY = "sk-test-user"
ADMIN_KEY = "sk-test-admin"
BASE = "tiny-llama"
ADAPTERS = [f"a{i}" for i in range(8)]
RANKS = [4, 8, 16, 8, 4, 16, 8, 4]
BODY_LIMIT = 256 * 1024
ROOT = Path(__file__).resolve().parents[1]
LLM_KW: dict[str, Any] = dict(max_loras=4, max_lora_rank=16, num_kv_blocks=512, max_num_seqs=64)


class ServerThread:
    """Serve ``app`` with uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Env:
    root: Path
    base: Path
    adapters: dict[str, Path]
    lora_root: Path
    outside: Path


@dataclass
class Served:
    url: str
    server: OpenAIServer

    def client(self, key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def post(self, path: str, body: Any, key: str | None = API_KEY, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{self.url}{path}", content=body, headers=headers, timeout=timeout)

    def get(self, path: str, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60)

    def engine_call(self, fn: Any) -> Any:
        """Run ``fn(engine)`` on the server's engine thread (the engine is not thread-safe)."""
        return asyncio.run(self.server.engine.call(fn))

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.engine_call(lambda e: e.has_unfinished()):
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.05)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("server")
    base = make_tiny_model(root / "base")
    adapters = {
        name: make_peft_adapter(base, root / name, r=r, seed=10 + i)
        for i, (name, r) in enumerate(zip(ADAPTERS, RANKS, strict=True))
    }
    lora_root = root / "lora_root"
    lora_root.mkdir()
    make_peft_adapter(base, lora_root / "rt", r=8, seed=99)
    make_peft_adapter(base, lora_root / "too_big", r=32, seed=98)  # above max_lora_rank
    outside = root / "outside"
    shutil.copytree(lora_root / "rt", outside / "ext")
    os.symlink(outside / "ext", lora_root / "escape")
    return Env(root, base, adapters, lora_root, outside)


@pytest.fixture(scope="module")
def ref(env: Env) -> LLM:
    """The offline reference: same model, adapters and engine settings as the server's."""
    llm = LLM(env.base, loras={k: str(v) for k, v in env.adapters.items()}, **LLM_KW)
    llm.add_lora("rt", env.lora_root / "rt")
    return llm


@pytest.fixture(scope="module")
def served(env: Env) -> Iterator[Served]:
    llm = LLM(env.base, loras={k: str(v) for k, v in env.adapters.items()}, **LLM_KW)
    app = create_app(
        llm,
        served_model_name=BASE,
        api_key=API_KEY,
        admin_api_key=ADMIN_KEY,
        allow_runtime_lora=True,
        lora_roots=(str(env.lora_root),),
        max_request_bytes=BODY_LIMIT,
    )
    with ServerThread(app) as st:
        yield Served(st.url, app.state.server)


def _lora(model: str) -> str | None:
    return None if model == BASE else model


# models, health ------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(served: Served, env: Env) -> None:
    models = served.client().models.list().data
    assert [m.id for m in models] == [BASE, *ADAPTERS]
    by_id = {m.id: m.model_dump() for m in models}
    assert by_id[BASE]["parent"] is None
    for name in ADAPTERS:
        assert by_id[name]["parent"] == BASE
        assert by_id[name]["root"] == str(env.adapters[name].resolve())
    assert served.client().models.retrieve("a3").id == "a3"


def test_health_version_metrics(served: Served) -> None:
    assert served.get("/health").status_code == 200
    assert served.get("/version").json()["version"]
    r = served.get("/metrics")
    assert r.status_code == 200 and "loraserve_kv_cache_usage_ratio" in r.text


# generation equals the offline API -----------------------------------------------------------
@pytest.mark.parametrize("model", [BASE, "a0", "a5"])
def test_completion_matches_offline(served: Served, ref: LLM, model: str) -> None:
    prompt = "The quick brown fox"
    r = served.client().completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    want = ref.generate(prompt, greedy(12), lora_request=_lora(model), use_tqdm=False)[0]
    assert r.model == model
    assert r.choices[0].text == want.outputs[0].text
    assert r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)


@pytest.mark.parametrize("model", [BASE, "a1", "a2"])
def test_streamed_chat_matches_offline(served: Served, ref: LLM, model: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    stream = served.client().chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    want = ref.chat(messages, greedy(16), lora_request=_lora(model), use_tqdm=False)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.outputs[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want.outputs[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        len(want.prompt_token_ids),
        len(want.outputs[0].token_ids),
    )


def test_streamed_completion_and_plain_chat(served: Served, ref: LLM) -> None:
    client = served.client()
    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model="a3", prompt="stream me", max_tokens=10, temperature=0, stream=True
        )
    ]
    want = ref.generate("stream me", greedy(10), lora_request="a3", use_tqdm=False)[0]
    assert "".join(parts) == want.outputs[0].text
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]}
    ]
    r = client.chat.completions.create(model="a4", messages=messages, max_tokens=9, temperature=0)
    want = ref.chat([{"role": "user", "content": "multipart"}], greedy(9), lora_request="a4", use_tqdm=False)[
        0
    ]
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.choices[0].message.role == "assistant"


def test_sampling_params_pass_through(served: Served, ref: LLM) -> None:
    """Seeded sampling, n, penalties, min_tokens and ignore_eos give what the offline API gives."""
    client = served.client()
    extra = {"top_k": 20, "repetition_penalty": 1.3, "min_tokens": 4, "ignore_eos": True}
    r = client.completions.create(
        model="a6", prompt="sample", max_tokens=10, temperature=0.9, top_p=0.9, seed=7, n=2,
        presence_penalty=0.5, frequency_penalty=0.3, extra_body=extra,
    )  # fmt: skip
    params = SamplingParams(
        n=2,
        temperature=0.9,
        top_p=0.9,
        seed=7,
        max_tokens=10,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        **extra,
    )
    want = ref.generate("sample", params, lora_request="a6", use_tqdm=False)[0]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in want.outputs]
    assert r.usage is not None and r.usage.completion_tokens == 20


def test_batch_prompts_and_token_ids(served: Served, ref: LLM) -> None:
    prompts = ["first prompt", "second"]
    r = served.client().completions.create(model="a7", prompt=prompts, max_tokens=6, temperature=0, n=2)
    want = ref.generate(prompts, greedy(6, n=2), lora_request="a7", use_tqdm=False)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [o.text for w in want for o in w.outputs]
    stream = served.client().completions.create(
        model="a7", prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True
    )
    texts = ["", "", "", ""]
    for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [o.text for w in want for o in w.outputs]
    chat = served.client().chat.completions.create(
        model="a7", messages=[{"role": "user", "content": "n"}], max_tokens=6, temperature=0, n=2, stream=True
    )
    texts = ["", ""]
    for chunk in chat:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    want_chat = ref.chat(
        [{"role": "user", "content": "n"}], greedy(6, n=2), lora_request="a7", use_tqdm=False
    )
    assert texts == [o.text for o in want_chat[0].outputs]
    ids = ref.tokenizer.encode("token ids")
    r = served.client().completions.create(model=BASE, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.generate([ids], greedy(6), use_tqdm=False)[0].outputs[0].text


def test_stop_strings_are_cut_in_stream_and_not(served: Served, ref: LLM) -> None:
    full = ref.generate("stop test", greedy(24), lora_request="a2", use_tqdm=False)[0].outputs[0].text
    stop = full[5:7]  # a stop string from the middle of the greedy output
    want = ref.generate("stop test", greedy(24, stop=[stop]), lora_request="a2", use_tqdm=False)[0].outputs[0]
    client = served.client()
    r = client.completions.create(model="a2", prompt="stop test", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="a2", prompt="stop test", max_tokens=24, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_shapes(served: Served, ref: LLM) -> None:
    client = served.client()
    params = greedy(5, logprobs=3, ignore_eos=True)
    want = ref.generate("logprobs", params, lora_request="a1", use_tqdm=False)[0].outputs[0]
    r = client.completions.create(
        model="a1",
        prompt="logprobs",
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert lp.token_logprobs == pytest.approx(
        [d[t] for t, d in zip(want.token_ids, want.logprobs, strict=True)]
    )
    # The top 3 plus the chosen token (token strings may collide: several bytes decode to U+FFFD).
    assert len(lp.tokens) == 5 and lp.top_logprobs and all(1 <= len(d) <= 4 for d in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    messages = [{"role": "user", "content": "chat logprobs"}]
    want = ref.chat(messages, greedy(5, logprobs=2, ignore_eos=True), lora_request="a1", use_tqdm=False)[0]
    want = want.outputs[0]
    for stream in (False, True):
        resp = client.chat.completions.create(
            model="a1", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
            stream=stream, extra_body={"ignore_eos": True},
        )  # fmt: skip
        if stream:
            content = [
                e for c in resp if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
            ]
        else:
            content = resp.choices[0].logprobs.content
        assert len(content) == 5
        assert [e.logprob for e in content] == pytest.approx(
            [d[t] for t, d in zip(want.token_ids, want.logprobs, strict=True)]
        )
        assert all(len(e.top_logprobs) == 2 for e in content)
        assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)


# runtime adapters ----------------------------------------------------------------------------
def test_runtime_load_use_unload(served: Served, ref: LLM, env: Env) -> None:
    body = {"lora_name": "rt", "lora_path": str(env.lora_root / "rt")}
    assert served.post("/v1/load_lora_adapter", body).status_code == 401  # user key is not admin
    r = served.post("/v1/load_lora_adapter", body, key=ADMIN_KEY)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["rank"] == 8
    assert served.post("/v1/load_lora_adapter", body, key=ADMIN_KEY).status_code == 400  # already loaded
    client = served.client()
    assert "rt" in [m.id for m in client.models.list().data]
    r = client.completions.create(model="rt", prompt="runtime", max_tokens=8, temperature=0)
    want = ref.generate("runtime", greedy(8), lora_request="rt", use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == want.text

    # Unload while a request is in flight: it finishes on the old weights, new ones get 404.
    params = dict(model="rt", prompt="in flight", max_tokens=200, temperature=0, stream=True)
    stream = client.completions.create(**params, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    r = served.post("/v1/unload_lora_adapter", {"lora_name": "rt"}, key=ADMIN_KEY)
    assert r.status_code == 200, r.text
    assert r.json()["in_flight"] >= 1
    chunks += list(stream)
    want = ref.generate("in flight", greedy(200, ignore_eos=True), lora_request="rt", use_tqdm=False)[0]
    assert "".join(c.choices[0].text for c in chunks) == want.outputs[0].text
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="rt", prompt="gone", max_tokens=4)
    assert err.value.status_code == 404 and err.value.body["code"] == 404
    assert "rt" not in [m.id for m in client.models.list().data]
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "rt"}, key=ADMIN_KEY).status_code == 404


@pytest.mark.parametrize(
    "path, reason",
    [
        ("{outside}/ext", "outside"),
        ("{root}/../outside/ext", "'..'"),
        ("{root}/escape", "outside"),
        ("escape", "outside"),
        ("https://example.com/adapter", "URL"),
        ("hf://org/adapter", "URL"),
    ],
)
def test_adapter_paths_outside_the_root_are_refused(served: Served, env: Env, path: str, reason: str) -> None:
    raw = path.format(outside=env.outside, root=env.lora_root)
    r = served.post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": raw}, key=ADMIN_KEY)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"] and r.json()["error"]["param"] == "lora_path"
    assert "evil" not in [m.id for m in served.client().models.list().data]


def test_resolve_adapter_path_accepts_relative_and_refuses_inner_symlinks(env: Env, tmp_path: Path) -> None:
    assert resolve_adapter_path("rt", [env.lora_root]) == (env.lora_root / "rt").resolve()
    assert (
        resolve_adapter_path(str(env.lora_root / "rt"), [env.lora_root]) == (env.lora_root / "rt").resolve()
    )
    sneaky = tmp_path / "root" / "sneaky"
    sneaky.mkdir(parents=True)
    os.symlink(env.outside / "ext" / "adapter_config.json", sneaky / "adapter_config.json")
    with pytest.raises(ValueError, match="symlink"):
        resolve_adapter_path(str(sneaky), [tmp_path / "root"])
    with pytest.raises(ValueError, match="--lora-root"):
        resolve_adapter_path(str(env.lora_root / "rt"), [])


def test_bad_adapter_is_a_400_and_nothing_else_changes(served: Served, env: Env) -> None:
    before = served.client().models.list().data
    for path in (env.lora_root / "too_big", env.lora_root / "missing"):
        r = served.post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)}, key=ADMIN_KEY)
        assert r.status_code == 400, r.text
        assert "bad" in r.json()["error"]["message"]
    assert served.client().models.list().data == before
    assert served.client().completions.create(model="a0", prompt="still fine", max_tokens=3).choices[0].text


def test_runtime_loading_is_off_by_default(env: Env, ref: LLM) -> None:
    # Refused before the engine is touched, so an app over the reference LLM (never started) will do.
    app = create_app(ref)
    body = {"lora_name": "rt2", "lora_path": str(env.lora_root / "rt")}

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/load_lora_adapter", json=body)

    r = asyncio.run(go())
    assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]


def test_adapters_listing_and_pinning(served: Served) -> None:
    assert served.get("/v1/adapters").status_code == 401  # management needs the admin key
    data = {a["name"]: a for a in served.get("/v1/adapters", key=ADMIN_KEY).json()["data"]}
    assert set(ADAPTERS) <= set(data)
    assert data["a2"]["rank"] == 16 and data["a2"]["size_bytes"] > 0
    assert data["a2"]["tier"] in ("device", "cpu", "disk")
    r = served.post("/v1/adapters/a7/pin", {}, key=ADMIN_KEY)
    assert r.status_code == 200 and r.json()["pinned"] and r.json()["tier"] == "device"
    r = served.post("/v1/adapters/a7/unpin", {}, key=ADMIN_KEY)
    assert r.status_code == 200 and not r.json()["pinned"]
    assert served.post("/v1/adapters/nope/pin", {}, key=ADMIN_KEY).status_code == 404
    used = served.get("/v1/adapters", key=ADMIN_KEY).json()["data"]
    assert any(a["requests_served"] > 0 and a["last_used"] for a in used)


def test_reset_prefix_cache(served: Served) -> None:
    """Served prompts leave their blocks in the prefix cache; the admin route forgets them."""
    prompt = {"model": "a2", "prompt": "The prefix cache keeps this prompt " * 4, "max_tokens": 2}
    assert served.post("/v1/completions", prompt).status_code == 200
    assert served.post("/reset_prefix_cache", {}).status_code == 401  # needs the admin key
    r = served.post("/reset_prefix_cache", {}, key=ADMIN_KEY)
    assert r.status_code == 200 and r.json()["blocks_dropped"] > 0
    assert served.post("/reset_prefix_cache", {}, key=ADMIN_KEY).json()["blocks_dropped"] == 0


# errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": "x" * 600}, "prompt"),
        ({"prompt": "x" * 500, "max_tokens": 100}, "max_tokens"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2, 100000]]}, "prompt"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": 5}, "stop"),
    ],
)
def test_bad_completion_values_are_400_naming_the_field(served: Served, body: dict, param: str) -> None:
    r = served.post("/v1/completions", {"model": BASE, "prompt": "hi", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "BadRequestError" and err["code"] == 400


def test_bad_chat_values_and_shapes(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x" * 600}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "x"}], top_logprobs=3
        )
    assert e.value.body["param"] == "top_logprobs"
    r = served.post("/v1/chat/completions", {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_malformed_json_unknown_model_and_oversized_body(served: Served) -> None:
    r = served.post("/v1/completions", b'{"model": "x", "prompt": ')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = served.post("/v1/completions", b"[1, 2]")
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError) as e:
        served.client().completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    err = e.value.body
    assert (
        set(err) >= {"message", "type", "code"} and err["code"] == 404 and "no-such-model" in err["message"]
    )
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    r = served.post("/v1/completions", {"model": BASE, "prompt": "y" * (BODY_LIMIT + 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert served.get("/v1/nothing-here").status_code == 404


def test_api_key_is_required_everywhere(served: Served) -> None:
    for key in (None, "wrong"):
        assert served.get("/v1/models", key=key).status_code == 401
        assert served.get("/health", key=key).status_code == 401
        assert served.get("/metrics", key=key).status_code == 401
        r = served.post("/v1/completions", {"model": BASE, "prompt": "hi"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    assert served.get("/v1/models", key=ADMIN_KEY).status_code == 200  # the admin key is a user key too


# disconnects, concurrency, metrics -----------------------------------------------------------
def test_client_disconnect_frees_kv_blocks(served: Served) -> None:
    total = served.engine_call(lambda e: e.blocks.num_blocks)
    aborted = metric(
        served.get("/metrics").text, "loraserve_requests_total", adapter="a3", finish_reason="abort"
    )
    body = {"model": "a3", "prompt": "disconnect me", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert served.engine_call(lambda e: e.blocks.num_free) < total  # it holds blocks now
    # A non-streaming request whose client gives up.
    with pytest.raises(httpx.ReadTimeout):
        served.post("/v1/completions", {**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 20
    while True:
        text = served.get("/metrics").text
        done = metric(text, "loraserve_requests_total", adapter="a3", finish_reason="abort") >= aborted + 2
        if done and metric(text, "loraserve_kv_cache_usage_ratio") == 0.0:
            break
        assert time.monotonic() < deadline, "the disconnected requests were not aborted"
        time.sleep(0.1)
    served.wait_idle()
    assert served.engine_call(lambda e: e.blocks.num_free) == total
    assert metric(text, "loraserve_num_requests_running") == 0


def test_64_concurrent_streams_over_8_adapters(served: Served, ref: LLM) -> None:
    jobs = [(ADAPTERS[i % 8], f"client {i} says hello", i % 2 == 0) for i in range(64)]
    prompts = [p for _, p, chat in jobs if not chat]
    convs = [[{"role": "user", "content": p}] for _, p, chat in jobs if chat]
    text_out = iter(
        ref.generate(prompts, greedy(12), lora_request=[a for a, _, c in jobs if not c], use_tqdm=False)
    )
    chat_out = iter(ref.chat(convs, greedy(12), lora_request=[a for a, _, c in jobs if c], use_tqdm=False))
    want = [next(chat_out if chat else text_out).outputs[0].text for _, _, chat in jobs]

    async def one(client: openai.AsyncOpenAI, model: str, prompt: str, chat: bool) -> str:
        if chat:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def run_all() -> list[str]:
        async with served.aclient() as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    assert asyncio.run(run_all()) == want
    served.wait_idle()
    text = served.get("/metrics").text
    for name in ADAPTERS:
        assert metric(text, "loraserve_time_to_first_token_seconds_count", adapter=name) >= 8
    assert metric(text, "loraserve_adapter_loads_total") >= 8  # 8 adapters through a 4-slot pool
    assert metric(text, "loraserve_kv_cache_usage_ratio") == 0.0
    assert metric(text, "loraserve_prompt_tokens_total", adapter=BASE) > 0
    assert sum(metric(text, "loraserve_adapters_resident", tier=t) for t in ("device", "cpu", "disk")) >= 8


# engine failures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fragile(env: Env) -> Iterator[Served]:
    """A server whose adapter 'victim' is only on disk (host cache of one) and whose files are gone;
    unregistered names are looked up in the lora root (resolver directory)."""
    victim = env.root / "victim"
    shutil.copytree(env.adapters["a0"], victim)
    llm = LLM(
        env.base,
        loras={"victim": str(victim), "a1": str(env.adapters["a1"])},
        lora_resolver_dirs=(str(env.lora_root),),
        **{**LLM_KW, "max_cpu_loras": 1},
    )
    (victim / "adapter_model.safetensors").unlink()
    app = create_app(llm, served_model_name=BASE)
    with ServerThread(app) as st:
        yield Served(st.url, app.state.server)


def test_engine_error_fails_only_that_request(fragile: Served, ref: LLM) -> None:
    """A real bad input: loading 'victim' raises inside a step. Only its requests get 500; a
    request running in the same batch finishes correctly, and later requests are served."""
    client = fragile.client()
    stream = client.completions.create(
        model=BASE,
        prompt="survivor",
        max_tokens=300,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [next(iter(stream))]
    for kwargs in ({}, {"stream": True}):
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="victim", prompt="boom", max_tokens=4, **kwargs)
        assert "victim" in e.value.body["message"] and e.value.status_code == 500
    assert fragile.engine_call(lambda e: len(e.requests)) == 1  # the survivor was running all along
    chunks += list(stream)
    want = ref.generate("survivor", greedy(300, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    assert "".join(c.choices[0].text for c in chunks) == want
    r = client.completions.create(model="a1", prompt="next one", max_tokens=6, temperature=0)
    assert (
        r.choices[0].text
        == ref.generate("next one", greedy(6), lora_request="a1", use_tqdm=False)[0].outputs[0].text
    )
    fragile.wait_idle()
    assert fragile.engine_call(lambda e: e.blocks.num_free == e.blocks.num_blocks)
    text = fragile.get("/metrics").text
    assert metric(text, "loraserve_engine_step_failures_total") >= 2
    assert metric(text, "loraserve_adapter_load_errors_total") >= 2
    assert metric(text, "loraserve_requests_total", adapter="victim", finish_reason="error") == 2


def test_resolver_directory_serves_unregistered_names(fragile: Served, ref: LLM) -> None:
    client = fragile.client()
    r = client.completions.create(model="rt", prompt="resolved", max_tokens=6, temperature=0)
    assert (
        r.choices[0].text
        == ref.generate("resolved", greedy(6), lora_request="rt", use_tqdm=False)[0].outputs[0].text
    )
    assert "rt" in [m.id for m in client.models.list().data]
    for name in ("escape", "nope", "../outside/ext", str(fragile.server.llm.engine.cfg.model.path)):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="too_big", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model" and "too_big" in e.value.body["message"]


def test_forward_failure_fails_the_batch_and_serving_continues(
    fragile: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No real input makes the forward pass raise, so one method is patched: ``runner.run`` raises
    when a batch holds the poison prompt. Its request gets 500; the next request works."""
    runner = fragile.server.llm.engine.runner
    real_run = runner.run
    poison = fragile.server.tokenizer.encode("POISON")

    def run(scheduled: Any, store: Any) -> Any:
        if any(item.seq.token_ids[: len(poison)] == poison for item in scheduled):
            raise RuntimeError("injected forward failure")
        return real_run(scheduled, store)

    monkeypatch.setattr(runner, "run", run)
    client = fragile.client()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=BASE, prompt="POISON pill", max_tokens=4)
    assert "injected forward failure" in e.value.body["message"]
    assert client.completions.create(model=BASE, prompt="healthy", max_tokens=4).choices[0].finish_reason
    fragile.wait_idle()
    assert fragile.engine_call(lambda e: e.blocks.num_free == e.blocks.num_blocks)
    assert fragile.get("/health").status_code == 200


# benchmark -------------------------------------------------------------------------------------
def test_bench_online_smoke(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online benchmark starts its own server (tiny model, two adapters) and reports."""
    spec = importlib.util.spec_from_file_location("bench_online", ROOT / "benchmarks" / "bench_online.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_online", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = [
        "--model",
        str(env.base),
        "--num-requests",
        "6",
        "--rate",
        "50",
        "--max-tokens",
        "4",
        "--out",
        str(out),
    ]
    argv += [
        "--lora",
        f"a0={env.adapters['a0']}",
        "--lora",
        f"a1={env.adapters['a1']}",
        "--log-level",
        "WARNING",
    ]
    report = bench.main(argv)
    assert report.completed == 6 and report.failed == 0
    data = json.loads(out.read_text())
    assert set(data["per_adapter"]) <= {"a0", "a1"} and sum(data["per_adapter"].values()) == 6
    assert data["output_token_throughput"] > 0
    for name in ("ttft", "tpot", "e2e"):
        assert 0 < data["latency_ms"][name]["p50"] <= data["latency_ms"][name]["p99"]
