"""A refused adapter gets a clear error and changes nothing: the engine keeps serving everyone else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve import LLM, SamplingParams
from loraserve.lora.adapter import AdapterError
from loraserve.testing import make_peft_adapter, make_tiny_model, write_adapter_config
from tests.reference import peft_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = [11, 42, 97, 150, 7, 64, 33]


@pytest.fixture(scope="module")
def served(llama):
    llm = LLM(
        str(llama["base"]),
        device="cpu",
        dtype="float32",
        max_loras=2,
        max_lora_rank=16,
        loras={"a8": str(llama["a8"])},
    )
    return llm


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(adapter: Path, fn) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _nan(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")


def _inf(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("inf")


def _huge(tensors):
    """Finite in the file, but not once B is scaled (rs4's scale is 4) in the serving float32."""
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = 3e38


def _make_bad(kind: str, llama: dict[str, Path], root: Path) -> Path:
    base = llama["base"]
    if kind == "other_base_model":
        other = make_tiny_model(root / "other-base", hidden_size=32, intermediate_size=64)
        return make_peft_adapter(other, root / kind, r=4)
    if kind == "rank_too_high":
        return make_peft_adapter(base, root / kind, r=32, lora_alpha=32)
    bad = _copy(llama["rs4"], root / kind)
    if kind == "dora":
        write_adapter_config(bad, use_dora=True)
    elif kind == "modules_to_save":
        write_adapter_config(bad, modules_to_save=["lm_head"])
    elif kind == "bias":
        write_adapter_config(bad, bias="all")
    elif kind == "embedding_target":
        write_adapter_config(bad, target_modules=["q_proj", "embed_tokens"])
    elif kind == "lm_head_target":
        write_adapter_config(bad, target_modules=["q_proj", "lm_head"])
    elif kind == "missing_weights":
        (bad / "adapter_model.safetensors").unlink()
    elif kind == "missing_config":
        (bad / "adapter_config.json").unlink()
    elif kind == "corrupt_weights":
        data = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_config":
        (bad / "adapter_config.json").write_text("{not json")
    elif kind == "nan_weights":
        _edit_tensors(bad, _nan)
    elif kind == "inf_weights":
        _edit_tensors(bad, _inf)
    elif kind == "overflow_once_scaled":
        _edit_tensors(bad, _huge)
    else:
        raise AssertionError(kind)
    return bad


CASES = {
    "other_base_model": "different model",
    "rank_too_high": "max_lora_rank",
    "dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "bias": "bias",
    "embedding_target": "embed_tokens",
    "lm_head_target": "lm_head",
    "missing_weights": "adapter_model",
    "missing_config": "adapter_config.json",
    "corrupt_weights": "adapter_model.safetensors",
    "corrupt_config": "adapter_config.json",
    "nan_weights": "NaN",
    "inf_weights": "Inf",
    "overflow_once_scaled": "overflows float32 once scaled by 4",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_refused_adapter_leaves_engine_serving(kind, served, llama, tmp_path):
    bad = _make_bad(kind, llama, tmp_path)
    before = [(e.name, e.content_hash) for e in served.list_loras()]
    with pytest.raises(AdapterError) as err:
        served.add_lora("bad", bad)
    message = str(err.value)
    assert "'bad'" in message and CASES[kind].lower() in message.lower(), message
    assert [(e.name, e.content_hash) for e in served.list_loras()] == before
    # The same adapter named in a request is refused the same way, and the next requests are served.
    with pytest.raises(AdapterError):
        served.generate([PROMPT], GREEDY, lora_request=str(bad), use_tqdm=False)
    outs = served.generate([PROMPT, PROMPT], GREEDY, lora_request=["a8", None], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == peft_greedy(llama["base"], llama["a8"], PROMPT, 6)[0]
    assert outs[1].outputs[0].token_ids == peft_greedy(llama["base"], None, PROMPT, 6)[0]
    assert served.engine.blocks.num_free == served.engine.blocks.num_blocks
    assert not torch.isnan(served.engine.runner.pool.a["qkv"]).any()
