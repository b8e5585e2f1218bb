"""Tests of ``loraserve.lora.adapter``: loading real peft-written adapters and refusing bad ones.

Every accepted adapter is compared with what ``peft`` itself builds from the same directory
(which modules get LoRA, their A/B and their scaling), so the config semantics (regex targets,
layers_to_transform, rank/alpha patterns, rsLoRA) are checked against the reference rather than
against a re-statement of it.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.config import ModelConfig
from loraserve.lora import adapter as adapter_module
from loraserve.lora import pool as pool_module
from loraserve.lora.adapter import (
    LORA_MODULES,
    AdapterError,
    LoRAModelSpec,
    LoRAWeights,
    load_adapter,
    read_adapter,
)
from loraserve.lora.pool import kind_shapes, pack_adapter, pack_adapter_on_device
from loraserve.model.llama import LORA_LAYER_SLICES
from loraserve.testing import make_peft_adapter, make_tiny_model, write_adapter_config

ST = "adapter_model.safetensors"
_PARENT = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in LORA_MODULES}
_PEFT_KEY = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def spec_from_hf_config(base_dir: Path) -> LoRAModelSpec:
    """The projections of a Llama-family checkpoint, read from its config.json."""
    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim
    shapes = {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return LoRAModelSpec(num_layers=cfg["num_hidden_layers"], shapes=shapes, base_model_name=str(base_dir))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model and peft adapters of every supported flavour, written once."""
    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_model(root / "base")
    out = {"base": base}
    out["plain"] = make_peft_adapter(base, root / "plain", r=8, lora_alpha=16)
    out["rslora"] = make_peft_adapter(
        base, root / "rslora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True
    )
    out["patterns"] = make_peft_adapter(
        base,
        root / "patterns",
        r=8,
        lora_alpha=16,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2, r"layers\.1\.mlp\.(up|gate)_proj": 6},
        alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_proj": 3},
        seed=2,
    )
    out["regex"] = make_peft_adapter(
        base, root / "regex", target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj", seed=3
    )
    out["layers"] = make_peft_adapter(
        base,
        root / "layers",
        target_modules=["q_proj", "o_proj", "down_proj"],
        layers_to_transform=[1],
        seed=4,
    )
    out["layers_pattern"] = make_peft_adapter(
        base,
        root / "layers_pattern",
        target_modules=["v_proj", "up_proj"],
        layers_to_transform=0,
        layers_pattern="layers",
        seed=5,
    )
    out["exclude"] = make_peft_adapter(
        base,
        root / "exclude",
        target_modules=["q_proj", "up_proj"],
        exclude_modules=r".*layers\.0\.self_attn\.q_proj",
        seed=7,
    )
    out["subset"] = make_peft_adapter(
        base, root / "subset", r=2, lora_alpha=4, target_modules=["k_proj"], seed=6
    )
    # The legacy pickled format: the same state dict, written with torch.save as old peft did.
    out["bin"] = root / "bin"
    shutil.copytree(out["plain"], out["bin"])
    torch.save(load_file(out["bin"] / ST), out["bin"] / "adapter_model.bin")
    (out["bin"] / ST).unlink()
    return out


@pytest.fixture(scope="module")
def spec(env: dict[str, Path]) -> LoRAModelSpec:
    s = spec_from_hf_config(env["base"])
    # The tiny model of loraserve.testing: hidden 64, intermediate 128, 4 heads, 2 kv heads of 16.
    assert s.num_layers == 2
    assert (
        s.shapes["q_proj"] == (64, 64)
        and s.shapes["k_proj"] == (64, 32)
        and s.shapes["down_proj"] == (128, 64)
    )
    return s


def peft_reference(
    base: Path, adapter: Path
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """What peft builds from the adapter: (layer, module) -> (A, B, scaling) for every LoRA module."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    ref = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "scaling") and "default" in getattr(module, "lora_A", {}):
            match = _PEFT_KEY.search(name)
            assert match, name
            ref[(int(match.group(1)), match.group(2))] = (
                module.lora_A["default"].weight.detach(),
                module.lora_B["default"].weight.detach(),
                module.scaling["default"],
            )
    return ref


def check_against_file_and_peft(w: LoRAWeights, adapter: Path, base: Path) -> None:
    """Every module equals the file's tensors (as float32) and peft's loaded module, scale included."""
    file_tensors = load_file(adapter / ST)
    assert len(file_tensors) == 2 * len(w.modules)
    ref = peft_reference(base, adapter)
    assert set(w.modules) == set(ref)
    for (layer, module), mw in w.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
        assert mw.a.dtype == torch.float32 and mw.b.dtype == torch.float32
        assert mw.a.is_contiguous() and mw.b.is_contiguous()
        assert torch.equal(mw.a, file_tensors[f"{prefix}.lora_A.weight"].float())
        assert torch.equal(mw.b, file_tensors[f"{prefix}.lora_B.weight"].float())
        ref_a, ref_b, ref_scale = ref[(layer, module)]
        assert torch.equal(mw.a, ref_a) and torch.equal(mw.b, ref_b)
        assert mw.scale == ref_scale, (layer, module)
    assert w.rank == max(mw.a.shape[0] for mw in w.modules.values())
    assert w.nbytes == sum(t.numel() * 4 for t in file_tensors.values())
    assert w.target_modules == frozenset(m for _, m in w.modules)
    assert w.path == str(adapter.resolve())


# --- accepted adapters -------------------------------------------------------------------------


def test_plain(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["plain"], spec, max_rank=64, name="plain")
    assert w.name == "plain" and w.rank == 8
    assert set(w.modules) == {(i, m) for i in range(2) for m in LORA_MODULES}
    assert all(mw.scale == 2.0 for mw in w.modules.values())
    check_against_file_and_peft(w, env["plain"], env["base"])


def test_name_defaults_to_directory(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    assert load_adapter(str(env["plain"]), spec, max_rank=8).name == "plain"


def test_rslora(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["rslora"], spec, max_rank=64)
    assert w.target_modules == {"q_proj", "v_proj"}
    assert all(mw.scale == 8 / 2.0 for mw in w.modules.values())  # alpha / sqrt(r)
    check_against_file_and_peft(w, env["rslora"], env["base"])


def test_rank_and_alpha_patterns(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["patterns"], spec, max_rank=64)
    ranks = {k: mw.rank for k, mw in w.modules.items()}
    assert ranks[(0, "q_proj")] == ranks[(1, "q_proj")] == 4
    assert ranks[(1, "down_proj")] == 2 and ranks[(0, "down_proj")] == 8
    assert ranks[(1, "up_proj")] == ranks[(1, "gate_proj")] == 6 and ranks[(0, "up_proj")] == 8
    assert w.modules[(0, "v_proj")].scale == 32 / 8 and w.modules[(0, "o_proj")].scale == 3 / 8
    assert w.modules[(1, "o_proj")].scale == 16 / 8
    assert w.rank == 8
    check_against_file_and_peft(w, env["patterns"], env["base"])


def test_regex_target_modules(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["regex"], spec, max_rank=64)
    assert set(w.modules) == {(1, "q_proj"), (1, "k_proj")}
    check_against_file_and_peft(w, env["regex"], env["base"])


def test_layers_to_transform(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["layers"], spec, max_rank=64)
    assert set(w.modules) == {(1, "q_proj"), (1, "o_proj"), (1, "down_proj")}
    check_against_file_and_peft(w, env["layers"], env["base"])


def test_layers_to_transform_int_with_layers_pattern(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["layers_pattern"], spec, max_rank=64)
    assert set(w.modules) == {(0, "v_proj"), (0, "up_proj")}
    check_against_file_and_peft(w, env["layers_pattern"], env["base"])


def test_exclude_modules(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["exclude"], spec, max_rank=64)
    assert set(w.modules) == {(1, "q_proj"), (0, "up_proj"), (1, "up_proj")}
    check_against_file_and_peft(w, env["exclude"], env["base"])


def test_subset_of_modules(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    w = load_adapter(env["subset"], spec, max_rank=2)
    assert w.target_modules == {"k_proj"} and w.rank == 2
    check_against_file_and_peft(w, env["subset"], env["base"])


def test_bin_format(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    from_bin = load_adapter(env["bin"], spec, max_rank=64)
    from_st = load_adapter(env["plain"], spec, max_rank=64)
    assert set(from_bin.modules) == set(from_st.modules)
    for k, mw in from_st.modules.items():
        assert torch.equal(from_bin.modules[k].a, mw.a) and torch.equal(from_bin.modules[k].b, mw.b)
        assert from_bin.modules[k].scale == mw.scale
    assert from_bin.content_hash == from_st.content_hash


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_disk(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, dtype: torch.dtype
) -> None:
    d = copy_adapter(env["subset"], tmp_path)
    tensors = {k: v.to(dtype) for k, v in load_file(d / ST).items()}
    save_file(tensors, d / ST)
    w = load_adapter(d, spec, max_rank=8)
    for (layer, module), mw in w.modules.items():
        key = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_A.weight"
        assert mw.a.dtype == torch.float32 and torch.equal(mw.a, tensors[key].float())
    assert w.content_hash != load_adapter(env["subset"], spec, max_rank=8).content_hash


def test_tensor_name_variants(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    """Keys without ``base_model.model.`` and with ``.default.`` load the same weights, same hash."""
    d = copy_adapter(env["plain"], tmp_path)
    tensors = load_file(d / ST)
    renamed = {
        k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A.default.weight"): v
        for k, v in tensors.items()
    }
    save_file(renamed, d / ST)
    w = load_adapter(d, spec, max_rank=8)
    ref = load_adapter(env["plain"], spec, max_rank=8)
    assert all(
        torch.equal(w.modules[k].a, mw.a) and torch.equal(w.modules[k].b, mw.b)
        for k, mw in ref.modules.items()
    )
    assert w.content_hash == ref.content_hash


def test_all_linear_shorthand(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, target_modules="all-linear")
    assert load_adapter(d, spec, 8).content_hash == load_adapter(env["plain"], spec, 8).content_hash


def test_unknown_config_keys_are_ignored(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["subset"], tmp_path)
    write_adapter_config(d, some_future_field={"x": 1}, lora_dropout=0.3, fan_in_fan_out=False)
    assert load_adapter(d, spec, max_rank=8).content_hash == load_adapter(env["subset"], spec, 8).content_hash


# --- content hash ------------------------------------------------------------------------------


def copy_adapter(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_hash_is_stable_and_ignores_name_and_path(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path
) -> None:
    a = load_adapter(env["plain"], spec, max_rank=64, name="one")
    b = load_adapter(env["plain"], spec, max_rank=64, name="two")
    c = load_adapter(copy_adapter(env["plain"], tmp_path, "elsewhere"), spec, max_rank=64)
    assert a.content_hash == b.content_hash == c.content_hash
    assert re.fullmatch(r"[0-9a-f]{64}", a.content_hash)
    assert a.content_hash != load_adapter(env["patterns"], spec, max_rank=64).content_hash


def test_hash_changes_with_one_weight_byte(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    tensors = load_file(d / ST)
    key = sorted(tensors)[5]
    raw = tensors[key].view(torch.uint8).reshape(-1)
    raw[7] ^= 1  # one bit of one float, still finite
    save_file(tensors, d / ST)
    assert load_adapter(d, spec, 64).content_hash != load_adapter(env["plain"], spec, 64).content_hash


def test_hash_changes_with_rank(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    """Truncating every module to rank 4 (and saying so in the config) is a different adapter."""
    d = copy_adapter(env["plain"], tmp_path)
    tensors = load_file(d / ST)
    cut = {k: (v[:4].clone() if ".lora_A." in k else v[:, :4].clone()) for k, v in tensors.items()}
    save_file(cut, d / ST)
    write_adapter_config(d, r=4)
    w = load_adapter(d, spec, 64)
    assert w.rank == 4 and w.content_hash != load_adapter(env["plain"], spec, 64).content_hash


@pytest.mark.parametrize(
    "changes",
    [
        {"lora_alpha": 17},
        {"use_rslora": True},
        {"target_modules": ["k_proj", "q_proj"]},  # targets a module that has no weights: allowed
        {"alpha_pattern": {"k_proj": 3}},
    ],
)
def test_hash_changes_with_config(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, changes: dict[str, object]
) -> None:
    d = copy_adapter(env["subset"], tmp_path)
    write_adapter_config(d, **changes)
    assert load_adapter(d, spec, 8).content_hash != load_adapter(env["subset"], spec, 8).content_hash


def test_hash_ignores_target_list_order(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["rslora"], tmp_path)
    write_adapter_config(d, target_modules=["v_proj", "q_proj"])
    e = copy_adapter(env["rslora"], tmp_path, "other")
    write_adapter_config(e, target_modules=["q_proj", "v_proj"])
    assert load_adapter(d, spec, 8).content_hash == load_adapter(e, spec, 8).content_hash


# --- refusals ----------------------------------------------------------------------------------


def refused(path: Path, spec: LoRAModelSpec, *fragments: str, max_rank: int = 64) -> AdapterError:
    """Load must fail with AdapterError naming the adapter and containing every fragment."""
    with pytest.raises(AdapterError) as info:
        load_adapter(path, spec, max_rank=max_rank, name="bad")
    msg = str(info.value)
    assert "adapter 'bad'" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return info.value


def edit_tensors(d: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(d / ST)
    fn(tensors)
    save_file(tensors, d / ST)


def test_refuses_missing_dir(spec: LoRAModelSpec, tmp_path: Path) -> None:
    refused(tmp_path / "nope", spec, "does not exist", str(tmp_path / "nope"))


def test_refuses_file_instead_of_dir(spec: LoRAModelSpec, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    refused(tmp_path / "f", spec, "not a directory")


def test_refuses_missing_config(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    (d / "adapter_config.json").unlink()
    refused(d, spec, "missing adapter_config.json")


def test_refuses_missing_weights(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    (d / ST).unlink()
    refused(d, spec, "no weights file", "adapter_model.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe garbage"])
def test_refuses_unparsable_config(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, text: str
) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    (d / "adapter_config.json").write_bytes(text.encode("latin-1"))
    refused(d, spec, "adapter_config.json")


@pytest.mark.parametrize("changes", [{"r": "eight"}, {"lora_alpha": None}, {"target_modules": 3}, {"r": 0}])
def test_refuses_malformed_config_fields(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, changes: dict[str, object]
) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, **changes)
    refused(d, spec, next(iter(changes)))


def test_refuses_truncated_safetensors(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    data = (d / ST).read_bytes()
    (d / ST).write_bytes(data[: len(data) // 2])
    err = refused(d, spec, "cannot read adapter_model.safetensors")
    assert err.__cause__ is not None


def test_refuses_garbage_safetensors(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    (d / ST).write_bytes(b"\x00garbage" * 100)
    refused(d, spec, "cannot read adapter_model.safetensors")


def test_refuses_garbage_bin(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["bin"], tmp_path)
    (d / "adapter_model.bin").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    err = refused(d, spec, "cannot read adapter_model.bin")
    assert err.__cause__ is not None


def test_refuses_non_tensor_bin(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["bin"], tmp_path)
    torch.save([1, 2, 3], d / "adapter_model.bin")
    refused(d, spec, "mapping of names to tensors")


def test_refuses_other_peft_type(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, peft_type="IA3")
    refused(d, spec, "peft_type='IA3'", "LoRA adapters only")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ],
)
def test_refuses_unsupported_features(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, changes: dict[str, object], fragment: str
) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, **changes)
    refused(d, spec, fragment, "not supported")


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [
        (["q_proj", "embed_tokens"], "'embed_tokens'"),
        (["lm_head", "q_proj"], "'lm_head'"),
        (["q_proj", "fc1"], "'fc1'"),
        (r".*(q_proj|lm_head)", "lm_head"),
    ],
)
def test_refuses_unsupported_targets(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, targets: object, fragment: str
) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, target_modules=targets)
    refused(d, spec, fragment, "not supported (yet)")


def test_refuses_embedding_lora_tensor(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    edit_tensors(
        d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 256)})
    )
    refused(d, spec, "embedding", "not supported (yet)")


def test_refuses_lm_head_lora_tensor(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}))
    refused(d, spec, "lm_head", "not supported (yet)")


def test_refuses_dora_magnitude_tensor(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    edit_tensors(d, lambda t: t.update({key: torch.ones(64)}))
    refused(d, spec, "DoRA", key)


def test_refuses_saved_base_weights(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    edit_tensors(d, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}))
    refused(d, spec, "model.norm.weight", "not a LoRA A/B weight")


def test_refuses_layer_beyond_base_model(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    one_layer = LoRAModelSpec(num_layers=1, shapes=spec.shapes)
    refused(env["plain"], one_layer, "layers.1.", "only 1 layers")


def test_refuses_module_base_model_lacks(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    no_gate = LoRAModelSpec(num_layers=2, shapes={k: v for k, v in spec.shapes.items() if k != "gate_proj"})
    refused(env["plain"], no_gate, "base model has no gate_proj")


@pytest.mark.parametrize(("module", "shape"), [("q_proj", (32, 64)), ("down_proj", (128, 96))])
def test_refuses_shape_mismatch(
    env: dict[str, Path], spec: LoRAModelSpec, module: str, shape: tuple[int, int]
) -> None:
    other = LoRAModelSpec(num_layers=2, shapes={**spec.shapes, module: shape})
    refused(env["plain"], other, f"layers.0.{_PARENT[module]}.{module}", f"{shape[0]} -> {shape[1]}")


def test_refuses_ab_rank_mismatch(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    edit_tensors(d, lambda t: t.update({key: t[key][:, :4].clone()}))
    refused(d, spec, "A/B rank mismatch", "layers.1.mlp.up_proj")


def test_refuses_config_rank_disagreement(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, r=16)
    refused(d, spec, "rank 8", "r=16", "disagree")


def test_refuses_rank_above_max(env: dict[str, Path], spec: LoRAModelSpec) -> None:
    refused(env["plain"], spec, "rank 8 of layers.0.self_attn.q_proj exceeds max_lora_rank=4", max_rank=4)


def test_refuses_untargeted_weights(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, target_modules=["q_proj"])
    refused(d, spec, "does not target", "peft would ignore")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, bad: float) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][3, 5] = bad

    edit_tensors(d, poison)
    refused(d, spec, "NaN or Inf", key)


def test_refuses_fp32_overflow(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["subset"], tmp_path)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"

    def widen(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].double()
        t[key][0, 0] = 1e300

    edit_tensors(d, widen)
    refused(d, spec, "NaN or Inf", key)


def test_refuses_no_lora_tensors(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    save_file({}, d / ST)
    refused(d, spec, "no LoRA tensors")


def test_refuses_half_pair(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    edit_tensors(d, lambda t: t.pop("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"))
    refused(d, spec, "layers.0.mlp.down_proj has no lora_B")


def test_refuses_duplicate_tensor(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(d, lambda t: t.update({key.replace(".weight", ".default.weight"): t[key].clone()}))
    refused(d, spec, "both lora_A of layers.0.self_attn.q_proj")


def test_refuses_integer_tensor(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["subset"], tmp_path)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(d, lambda t: t.update({key: t[key].to(torch.int8)}))
    refused(d, spec, "dtype torch.int8")


@pytest.mark.parametrize(
    ("changes", "bad"),
    [
        ({"rank_pattern": {"q_proj(": 4}}, "q_proj("),
        ({"alpha_pattern": {"(?i)q_proj": 4}}, "(?i)q_proj"),  # valid alone, not where peft embeds it
        ({"target_modules": "*q_proj"}, "*q_proj"),
        ({"layers_to_transform": [0], "layers_pattern": "lay[ers"}, "lay[ers"),
    ],
)
def test_refuses_invalid_regex(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, changes: dict[str, object], bad: str
) -> None:
    d = copy_adapter(env["plain"], tmp_path)
    write_adapter_config(d, **changes)
    err = refused(d, spec, "invalid regular expression", bad)
    assert isinstance(err.__cause__, re.error)


def test_refuses_regex_with_layers_to_transform(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path
) -> None:
    d = copy_adapter(env["regex"], tmp_path)
    write_adapter_config(d, layers_to_transform=[1])
    refused(d, spec, "cannot be used with a regex")


# --- the serving read path: one read, packing from the file's bytes, parallel I/O ----------------


def write_raw_safetensors(
    path: Path, tensors: list[tuple[str, str, list[int], bytes]], **edit: object
) -> None:
    """A safetensors file written by hand, tensors in the given order (``edit`` overrides header fields)."""
    header: dict[str, object] = {}
    offset = 0
    for key, dtype, shape, data in tensors:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header.update(edit)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(t[3] for t in tensors))


def float32_pack(w: LoRAWeights, cfg: ModelConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    """The pool layout computed the plain way: float32 zeros, each module written in, one final cast."""
    out = []
    for kind, (in_f, outs) in kind_shapes(cfg).items():
        mods = LORA_LAYER_SLICES[kind]
        a = torch.zeros(cfg.num_layers, w.rank, len(mods), in_f)
        bs = [torch.zeros(cfg.num_layers, w.rank, o) for o in outs]
        for (layer, name), m in w.modules.items():
            if name in mods:
                s, rank = mods.index(name), m.a.shape[0]
                a[layer, :rank, s] = m.a
                bs[s][layer, :rank] = (m.b * m.scale).T
        out += [a.to(dtype), *(b.to(dtype) for b in bs)]
    return out


def stored_as(d: Path, file_dtype: object) -> Path:
    """Rewrite the adapter at ``d`` with its tensors in ``file_dtype``; ``"mixed"``: every other
    tensor in bfloat16, the rest float32 (the per-tensor path of pack_adapter)."""
    tensors = load_file(d / ST)
    for i, key in enumerate(sorted(tensors)):
        to = (torch.bfloat16 if i % 2 else torch.float32) if file_dtype == "mixed" else file_dtype
        tensors[key] = tensors[key].to(to)
    save_file(tensors, d / ST)
    return d


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, "mixed"])
@pytest.mark.parametrize("adapter", ["patterns", "layers", "plain", "subset"])
def test_packing_from_file_bytes_equals_float32_packing(
    env: dict[str, Path],
    spec: LoRAModelSpec,
    tmp_path: Path,
    adapter: str,
    file_dtype: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the file's dtype, packing straight from its bytes gives bit for bit what float32
    weights give (scale in float32, one rounding), with zero rows for rank patterns and absent modules."""
    d = stored_as(copy_adapter(env[adapter], tmp_path), file_dtype)
    cfg = ModelConfig.from_dir(env["base"])
    stored = read_adapter(d, spec, max_rank=64)
    reference = load_adapter(d, spec, max_rank=64)
    assert stored.content_hash == reference.content_hash and stored.nbytes == reference.nbytes
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed = pack_adapter(stored, cfg, dtype)
        expected = float32_pack(reference, cfg, dtype)
        assert packed.rank == reference.rank
        assert all(torch.equal(p, e) for p, e in zip(packed.tensors(), expected, strict=True)), dtype
        from_fp32 = pack_adapter(reference, cfg, dtype)
        assert all(torch.equal(p, e) for p, e in zip(from_fp32.tensors(), expected, strict=True)), dtype
        # The CUDA read path's steps (one gather per module type), here on the CPU. Adapters whose
        # module types each cover every layer at one rank, in one file dtype, must take it.
        with monkeypatch.context() as m:
            if adapter in ("plain", "subset") and file_dtype != "mixed":
                m.setattr(pool_module, "pack_adapter", None)  # calling the host path would fail
            gathered = pack_adapter_on_device(stored, cfg, dtype, None)
        assert all(torch.equal(p, e) for p, e in zip(gathered.tensors(), expected, strict=True)), dtype


@pytest.mark.gpu
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16, "mixed"])
@pytest.mark.parametrize("adapter", ["plain", "patterns"])
def test_device_packing_equals_host_packing(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, adapter: str, file_dtype: object
) -> None:
    """Packing on the GPU (the store's read path on CUDA) gives bit for bit the host packing."""
    d = stored_as(copy_adapter(env[adapter], tmp_path), file_dtype)
    cfg = ModelConfig.from_dir(env["base"])
    stored = read_adapter(d, spec, max_rank=64, pin=True)
    stream = torch.cuda.Stream()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = pack_adapter(stored, cfg, dtype).tensors()
        got = pack_adapter_on_device(stored, cfg, dtype, stream)
        assert all(t.device.type == "cpu" and t.is_pinned() for t in got.tensors())
        assert all(torch.equal(p, q) for p, q in zip(got.tensors(), want, strict=True)), dtype


def test_parallel_read_and_hash_equal_inline(
    env: dict[str, Path], spec: LoRAModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting the read, the hash and the byte moves over the I/O threads changes nothing."""
    cfg = ModelConfig.from_dir(env["base"])
    inline = read_adapter(env["patterns"], spec, max_rank=64)
    inline_packed = pack_adapter(inline, cfg, torch.float32)
    monkeypatch.setattr(adapter_module, "_PARALLEL_GRAIN", 1)
    monkeypatch.setattr(adapter_module, "_IO_THREADS", 5)
    split = read_adapter(env["patterns"], spec, max_rank=64)
    assert split.content_hash == inline.content_hash
    for loc, m in inline.modules.items():
        assert torch.equal(split.modules[loc].a, m.a) and torch.equal(split.modules[loc].b, m.b)
    split_packed = pack_adapter(split, cfg, torch.float32)
    assert all(
        torch.equal(p, q) for p, q in zip(split_packed.tensors(), inline_packed.tensors(), strict=True)
    )


def test_header_checks_come_before_reading_weights(
    env: dict[str, Path], spec: LoRAModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reads(*args: object) -> int:
        raise AssertionError("weights read before the header was validated")

    monkeypatch.setattr(adapter_module.os, "preadv", no_reads)
    refused(env["plain"], spec, "exceeds max_lora_rank=4", max_rank=4)
    other = LoRAModelSpec(num_layers=2, shapes={**spec.shapes, "q_proj": (32, 64)})
    refused(env["plain"], other, "different model")


def test_misaligned_tensor_data(tmp_path: Path) -> None:
    """Other writers need not align tensor data; such a tensor is copied rather than viewed."""
    d = tmp_path / "odd"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]})
    )
    a = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float16)  # 6 bytes: B starts at byte 6
    b = torch.tensor([[3.0], [-1.0], [0.5], [2.0], [7.0]], dtype=torch.float32)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    write_raw_safetensors(
        d / ST,
        [
            (f"{prefix}.lora_A.weight", "F16", [1, 3], a.numpy().tobytes()),
            (f"{prefix}.lora_B.weight", "F32", [5, 1], b.numpy().tobytes()),
        ],
    )
    spec = LoRAModelSpec(num_layers=1, shapes={"q_proj": (3, 5)})
    w = load_adapter(d, spec, max_rank=4)
    assert torch.equal(w.modules[(0, "q_proj")].a, a.float()) and torch.equal(w.modules[(0, "q_proj")].b, b)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ({"offsets": [0, 10]}, "needs 512 bytes but its data_offsets span 10"),
        ({"offsets": [512, 1024]}, "starts at data byte 512"),
        ({"shape": "x"}, "malformed header entry"),
        ({"header": [1, 2]}, "not a JSON object"),
        ({"header_len": 1 << 40}, "runs past the end of the file"),
        ({"extra_data": b"\0" * 16}, "describes 1536 bytes of tensor data but the file holds 1552"),
    ],
)
def test_refuses_malformed_safetensors_header(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, edit: dict[str, object], fragment: str
) -> None:
    d = copy_adapter(
        env["subset"], tmp_path
    )  # k_proj of 2 layers, rank 2: A [2, 64] and B [32, 2], 1536 bytes in all
    tensors = load_file(d / ST)
    first = sorted(tensors)[0]
    entries = [(k, "F32", list(v.shape), v.numpy().tobytes()) for k, v in sorted(tensors.items())]
    write_raw_safetensors(d / ST, entries)
    raw = (d / ST).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    if "offsets" in edit:
        header[first]["data_offsets"] = edit["offsets"]
    if "shape" in edit:
        header[first]["shape"] = edit["shape"]
    if "header" in edit:
        header = edit["header"]
    data += edit.get("extra_data", b"")  # type: ignore[operator]
    text = json.dumps(header).encode()
    length = edit.get("header_len", len(text))
    (d / ST).write_bytes(int(length).to_bytes(8, "little") + text + data)  # type: ignore[call-overload]
    err = refused(d, spec, "cannot read adapter_model.safetensors", fragment)
    assert err.__cause__ is not None


def test_refuses_dtype_torch_lacks(env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path) -> None:
    d = copy_adapter(env["subset"], tmp_path)
    tensors = load_file(d / ST)
    entries = [
        (k, "F8_E8M0" if i == 0 else "F32", list(v.shape), v.numpy().tobytes())
        for i, (k, v) in enumerate(sorted(tensors.items()))
    ]
    write_raw_safetensors(d / ST, entries)
    refused(d, spec, "has dtype F8_E8M0", "only float32")


@pytest.mark.parametrize("value", [7e4, 4e4])  # above float16's max; only once scaled by 2
def test_packing_refuses_overflow_of_the_serving_dtype(
    env: dict[str, Path], spec: LoRAModelSpec, tmp_path: Path, value: float
) -> None:
    """Finite in the file (and float32), but not in float16: refused when packed, naming the tensor."""
    d = copy_adapter(env["subset"], tmp_path)  # scale 2
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"

    def big(t: dict[str, torch.Tensor]) -> None:
        t[key][3, 1] = value

    edit_tensors(d, big)
    stored = read_adapter(d, spec, max_rank=8, name="bad")
    cfg = ModelConfig.from_dir(env["base"])
    for pack in (pack_adapter, functools.partial(pack_adapter_on_device, stream=None)):
        pack(stored, cfg, torch.bfloat16)  # fits bfloat16
        with pytest.raises(AdapterError, match="overflows float16 once scaled by 2") as info:
            pack(stored, cfg, torch.float16)
        assert key in str(info.value) and "adapter 'bad'" in str(info.value)
