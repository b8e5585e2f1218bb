"""Fused Triton norm / activation / rotary kernels against the model's torch code (:mod:`loraserve.model.layers`).

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported) at small sizes,
and a tiny model runs its fused (GPU) decoder path on the CPU against its torch path. ``gpu``-marked tests
run Llama-2-7B shapes and CUDA-graph capture and skip without a device.

Inputs are rounded to the tested dtype and both sides see the same rounded values. The interpreter's
fp32 -> bf16 cast truncates where the GPU rounds to nearest even, so interpreted bf16 results may be a
couple of ulps off the reference; on the GPU, half-precision outputs must match torch bit for bit except
for rare last-ulp flips where fp32 sums in another order round differently.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.model import llama  # noqa: E402
from loraserve.model.layers import RotaryEmbedding, apply_rotary, rms_norm, silu_and_mul  # noqa: E402
from loraserve.ops.triton_fused import (  # noqa: E402
    TRITON_FUSED_OPS,
    _rms_norm_kernel,
    fused_add_rms_norm_triton,
    rms_norm_triton,
    rotary_triton,
    silu_and_mul_triton,
)

_INTERPRETED = type(_rms_norm_kernel).__name__ == "InterpretedFunction"
if not torch.cuda.is_available() and not _INTERPRETED:
    pytest.skip(
        "no CUDA, and triton_fused was imported before TRITON_INTERPRET was set", allow_module_level=True
    )

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (atol, rtol): two ulps of the dtype (bf16: the interpreter's truncating casts, see the module docstring).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
TOKENS = [1, 3, 17]
EPS = 1e-5


def rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


def norm_weight(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    return rand(hidden, dtype=dtype, seed=99, scale=0.5) + 1


def check(out: torch.Tensor, ref: torch.Tensor, exact_fraction: float = 0.0) -> None:
    """``out`` matches ``ref`` within two ulps and, for ``exact_fraction``, bit for bit at that fraction."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    if exact_fraction:
        assert (out == ref).float().mean().item() >= exact_fraction


def rope_tables(head_dim: int, num_tokens: int, scaling: dict | None = None, seed: int = 0):
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, scaling, DEVICE)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    return rotary.tables(positions)


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [96, 160, 64])
def test_rms_norm(dtype, num_tokens, hidden):
    x = rand(num_tokens, hidden, dtype=dtype, seed=num_tokens, scale=3.0)
    w = norm_weight(hidden, dtype)
    out = rms_norm_triton(x, w, EPS)
    assert out.is_contiguous()
    check(out, rms_norm(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [96, 160])
def test_fused_add_rms_norm(dtype, num_tokens, hidden):
    x = rand(num_tokens, hidden, dtype=dtype, seed=1)
    residual = rand(num_tokens, hidden, dtype=dtype, seed=2, scale=4.0)
    w = norm_weight(hidden, dtype)
    ref_residual = x + residual
    ref = rms_norm(ref_residual, w, EPS)
    out = fused_add_rms_norm_triton(x, residual, w, EPS)
    assert out.data_ptr() == x.data_ptr()
    check(residual, ref_residual)
    check(x, ref)


def test_norms_take_strided_rows():
    """Row-strided views (e.g. a projection output with spare columns) are read and written in place."""
    dtype, hidden = torch.float16, 96
    wide_x = rand(5, hidden + 32, dtype=dtype, seed=3)
    wide_res = rand(5, hidden + 8, dtype=dtype, seed=4)
    x, residual = wide_x[:, :hidden], wide_res[:, 8:]
    w = norm_weight(hidden, dtype)
    check(rms_norm_triton(x, w, EPS), rms_norm(x, w, EPS))
    spare_x, spare_res = wide_x[:, hidden:].clone(), wide_res[:, :8].clone()
    ref_residual = x + residual
    ref = rms_norm(ref_residual, w, EPS)
    fused_add_rms_norm_triton(x, residual, w, EPS)
    check(residual, ref_residual)
    check(x, ref)
    assert torch.equal(wide_x[:, hidden:], spare_x) and torch.equal(wide_res[:, :8], spare_res)


# ------------------------------------------------------------------------------------------- SiLU and mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("inter", [96, 160, 1500])  # 1500: two column blocks, the second one partial
def test_silu_and_mul(dtype, num_tokens, inter):
    gate_up = rand(num_tokens, 2 * inter, dtype=dtype, seed=inter, scale=3.0)
    out = silu_and_mul_triton(gate_up)
    assert out.is_contiguous()
    check(out, silu_and_mul(gate_up))


def test_silu_and_mul_strided_rows():
    gate_up = rand(7, 2 * 96 + 10, dtype=torch.float16, seed=5, scale=3.0)[:, : 2 * 96]
    check(silu_and_mul_triton(gate_up), silu_and_mul(gate_up))


# ------------------------------------------------------------------------------------------------- rotary

ROPE_SCALINGS = {
    "none": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=256,
    ),
}


def check_rotary(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, scaling=None, exact=0.0):
    """Rotate q and k in place in a fused qkv output; v and the other columns stay untouched."""
    qkv = rand(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=num_tokens)
    cos, sin = rope_tables(head_dim, num_tokens, scaling)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(num_tokens, heads + kv_heads, head_dim)
    ref = apply_rotary(qk, cos, sin)
    v = qkv[:, (heads + kv_heads) * head_dim :].clone()
    out = rotary_triton(qk, cos, sin)
    assert out is qk
    check(qk, ref, exact)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 3, 32), (5, 1, 80)])
def test_rotary(dtype, num_tokens, heads, kv_heads, head_dim):
    check_rotary(num_tokens, heads, kv_heads, head_dim, dtype)


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_rotary_scaled_tables(scaling):
    check_rotary(9, 4, 2, 64, torch.float32, ROPE_SCALINGS[scaling])


# --------------------------------------------------------------------------------- the model's fused path


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter run of the fused decoder path")
@pytest.mark.parametrize("family", ["llama", "qwen2", "llama3_sharded"])
def test_fused_decoder_path_matches_torch_path(family, request, monkeypatch):
    """The fused layer structure (residual carried beside the output, in-place rotary) on a tiny model,
    with mixed adapters, prefill and decode: same greedy tokens and logprobs as the torch path."""
    paths = request.getfixturevalue(family)
    loras = {k: str(v) for k, v in paths.items() if k != "base"}
    names = [None, *loras]
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 250) for _ in range(rng.randrange(3, 20))] for _ in range(5)]
    requests = [names[i % len(names)] for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)

    def run():
        llm = LLM(
            str(paths["base"]),
            device="cpu",
            dtype="float32",
            loras=loras,
            max_loras=4,
            max_lora_rank=16,
            block_size=4,
            num_kv_blocks=256,
        )
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, lora_request=requests, use_tqdm=False
        )
        return llm, [o.outputs[0] for o in outs]

    torch_llm, expected = run()
    assert torch_llm.engine.runner.model.fused is None
    # Build the next model with the Triton ops although the device is the CPU (they run interpreted).
    monkeypatch.setattr(llama, "select_fused_ops", lambda device: TRITON_FUSED_OPS)
    fused_llm, got = run()
    assert fused_llm.engine.runner.model.fused is TRITON_FUSED_OPS
    for want, have in zip(expected, got, strict=True):
        assert have.token_ids == want.token_ids
        for lp_w, lp_h, tok in zip(want.logprobs, have.logprobs, want.token_ids, strict=True):
            assert abs(lp_w[tok] - lp_h[tok]) < 3e-5  # fp32 noise: ~3e-6


# -------------------------------------------------------------------------------------------- GPU sizes

gpu = pytest.mark.gpu

# Llama-2-7B: hidden 4096, intermediate 11008, 32 heads (and a GQA variant with 8 KV heads) of 128.
GPU_TOKENS = [1, 64, 257, 4096]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_gpu_norms(dtype, num_tokens):
    hidden = 4096
    x = rand(num_tokens, hidden, dtype=dtype, seed=1)
    residual = rand(num_tokens, hidden, dtype=dtype, seed=2, scale=4.0)
    w = norm_weight(hidden, dtype)
    check(rms_norm_triton(x, w, EPS), rms_norm(x, w, EPS), exact_fraction=0.99)
    ref_residual = x + residual
    ref = rms_norm(ref_residual, w, EPS)
    fused_add_rms_norm_triton(x, residual, w, EPS)
    assert torch.equal(residual, ref_residual)
    check(x, ref, exact_fraction=0.99)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_gpu_silu_and_mul(dtype, num_tokens):
    gate_up = rand(num_tokens, 2 * 11008, dtype=dtype, seed=3, scale=3.0)
    check(silu_and_mul_triton(gate_up), silu_and_mul(gate_up), exact_fraction=0.99)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
@pytest.mark.parametrize("kv_heads", [32, 8])
def test_gpu_rotary(dtype, num_tokens, kv_heads):
    check_rotary(num_tokens, 32, kv_heads, 128, dtype, ROPE_SCALINGS["llama3"], exact=0.99)


@gpu
def test_gpu_fp32():
    """fp32 at the real sizes (the GPU engine tests run fp32 models too)."""
    x = rand(64, 4096, dtype=torch.float32, seed=1)
    w = norm_weight(4096, torch.float32)
    check(rms_norm_triton(x, w, EPS), rms_norm(x, w, EPS))
    gate_up = rand(64, 2 * 11008, dtype=torch.float32, seed=3, scale=3.0)
    check(silu_and_mul_triton(gate_up), silu_and_mul(gate_up))
    check_rotary(64, 32, 8, 128, torch.float32)


@gpu
def test_gpu_ops_replay_in_a_cuda_graph():
    """One captured graph of all four ops gives the reference results for new inputs on replay."""
    dtype, tokens, hidden, inter, heads, head_dim = torch.bfloat16, 64, 4096, 11008, 32, 128
    x = torch.empty(tokens, hidden, dtype=dtype, device=DEVICE)
    residual = torch.empty_like(x)
    gate_up = torch.empty(tokens, 2 * inter, dtype=dtype, device=DEVICE)
    qkv = torch.empty(tokens, 3 * heads * head_dim, dtype=dtype, device=DEVICE)
    cos, sin = rope_tables(head_dim, tokens)
    w = norm_weight(hidden, dtype)
    qk = qkv[:, : 2 * heads * head_dim].view(tokens, 2 * heads, head_dim)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        normed = rms_norm_triton(x, w, EPS)
        fused_add_rms_norm_triton(x, residual, w, EPS)
        rotary_triton(qk, cos, sin)
        return normed, silu_and_mul_triton(gate_up)

    def fill(seed: int) -> None:
        x.copy_(rand(tokens, hidden, dtype=dtype, seed=seed))
        residual.copy_(rand(tokens, hidden, dtype=dtype, seed=seed + 1))
        gate_up.copy_(rand(tokens, 2 * inter, dtype=dtype, seed=seed + 2))
        qkv.copy_(rand(*qkv.shape, dtype=dtype, seed=seed + 3))

    fill(0)
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, act = step()
    fill(10)
    ref_normed = rms_norm(x, w, EPS)
    ref_residual = x + residual
    ref_x = rms_norm(ref_residual, w, EPS)
    ref_qk = apply_rotary(qk, cos, sin)
    ref_act = silu_and_mul(gate_up)
    graph.replay()
    torch.cuda.synchronize()
    check(normed, ref_normed)
    assert torch.equal(residual, ref_residual)
    check(x, ref_x)
    check(qk, ref_qk)
    check(act, ref_act)
