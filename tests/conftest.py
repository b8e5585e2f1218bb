"""Session fixtures: tiny random checkpoints and real PEFT adapters, plus a transformers+peft oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loraserve.testing import make_peft_adapter, make_tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without CUDA and ``slow`` tests unless asked (``-m slow`` or LORASERVE_SLOW=1)."""
    run_slow = os.environ.get("LORASERVE_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with -m slow or LORASERVE_SLOW=1"))


# The adapter mix every correctness test uses: different ranks, rsLoRA, a subset of modules, alpha != r.
ADAPTER_SPECS: dict[str, dict] = {
    "a8": dict(r=8, lora_alpha=16, seed=11),
    "rs4": dict(r=4, lora_alpha=8, use_rslora=True, seed=12),
    "qv16": dict(r=16, lora_alpha=7, target_modules=["q_proj", "v_proj"], seed=13),
    "mlp2": dict(r=2, lora_alpha=5, target_modules=["gate_proj", "up_proj", "down_proj"], seed=14),
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def _model_with_adapters(root: Path, arch: str, **kw) -> dict[str, Path]:
    base = make_tiny_model(root / arch, arch=arch, **kw)
    out = {"base": base}
    for name, spec in ADAPTER_SPECS.items():
        out[name] = make_peft_adapter(base, root / f"{arch}-{name}", **spec)
    return out


@pytest.fixture(scope="session")
def llama(tiny_root) -> dict[str, Path]:
    """Tiny Llama: GQA (4 heads, 2 KV heads), tied embeddings, plus the adapter mix."""
    return _model_with_adapters(tiny_root, "llama")


@pytest.fixture(scope="session")
def mistral(tiny_root) -> dict[str, Path]:
    return _model_with_adapters(tiny_root, "mistral", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def qwen2(tiny_root) -> dict[str, Path]:
    """Tiny Qwen2: qkv bias."""
    return _model_with_adapters(tiny_root, "qwen2", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def llama3_sharded(tiny_root) -> dict[str, Path]:
    """Llama with llama3 rope scaling, untied LM head, sharded safetensors with an index."""
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    base = make_tiny_model(
        tiny_root / "llama3",
        arch="llama",
        rope_scaling=scaling,
        tie_word_embeddings=False,
        shard=True,
        rope_theta=500.0,
    )
    return {"base": base, "a8": make_peft_adapter(base, tiny_root / "llama3-a8", r=8, lora_alpha=16, seed=21)}
