"""Checkpoint loading errors, linear rope scaling against transformers, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraserve import LLM, SamplingParams
from loraserve.config import ModelConfig, ModelLoadError
from loraserve.testing import make_tiny_model
from tests.reference import peft_greedy


def test_unsupported_architecture_is_named(tmp_path):
    base = make_tiny_model(tmp_path / "m")
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        ModelConfig.from_dir(base)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nowhere")
    base = make_tiny_model(tmp_path / "m")
    (base / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(base), device="cpu")
    (base / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(base), device="cpu")


def test_linear_rope_scaling_matches_transformers(tmp_path):
    base = make_tiny_model(tmp_path / "lin", rope_scaling={"rope_type": "linear", "factor": 4.0})
    llm = LLM(str(base), device="cpu", dtype="float32", enable_lora=False, block_size=4, num_kv_blocks=64)
    prompt = [7, 19, 200, 45, 3, 99, 120, 8, 64, 31]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == peft_greedy(base, None, prompt, 8)[0]


def test_cli_generate_prints_the_offline_completion(llama):
    args = [
        "--model",
        str(llama["base"]),
        "--lora",
        f"a8={llama['a8']}",
        "--device",
        "cpu",
        "--max-tokens",
        "6",
    ]
    prompt = "hello"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve.server.cli",
            "generate",
            *args,
            "--adapter",
            "a8",
            "--prompt",
            prompt,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    llm = LLM(str(llama["base"]), device="cpu", loras={"a8": str(llama["a8"])})
    expected = (
        llm.chat(
            [{"role": "user", "content": prompt}],
            SamplingParams(temperature=0, max_tokens=6),
            lora_request="a8",
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    assert proc.stdout.rstrip("\n") == expected
