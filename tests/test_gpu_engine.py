"""On CUDA: the Triton + CUDA-graph engine against transformers + peft on the GPU (small model)."""

from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams
from loraserve.testing import make_peft_adapter, make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    # head_dim 64 (the Triton kernels need a power of two), GQA 8:2, two adapter ranks and a subset.
    base = make_tiny_model(
        root / "base",
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
    )
    adapters = {
        "r8": make_peft_adapter(base, root / "r8", r=8, lora_alpha=16, seed=1, std=0.05),
        "r32": make_peft_adapter(base, root / "r32", r=32, lora_alpha=16, seed=2, std=0.05, use_rslora=True),
        "qv": make_peft_adapter(
            base, root / "qv", r=16, lora_alpha=32, seed=3, std=0.05, target_modules=["q_proj", "v_proj"]
        ),
    }
    return base, adapters


def _reference(base, adapter, prompt, max_new, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).cuda()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).cuda()
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
            tok = int(logits.argmax())
            lps.append(torch.log_softmax(logits, -1)[tok].item())
            ids.append(tok)
    return ids[len(prompt) :], lps


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 0.15)])
@pytest.mark.parametrize(
    "eager,lengths",
    [(True, (3, 60)), (False, (3, 60)), (True, (200, 400))],
    ids=["eager", "graphs", "eager-long"],
)
def test_gpu_mixed_batch_matches_peft(gpu_model, dtype, tol, eager, lengths):
    """``lengths``: prompt lengths; the long ones make prefill steps of long segments (tiled kernels)."""
    base, adapters = gpu_model
    llm = LLM(
        str(base),
        device="cuda",
        dtype=dtype,
        max_loras=4,
        max_lora_rank=32,
        block_size=16,
        loras={k: str(v) for k, v in adapters.items()},
        max_num_seqs=16,
        enforce_eager=eager,
    )
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(5, 250, (int(n),), generator=g).tolist()
        for n in torch.randint(*lengths, (10,), generator=g)
    ]
    loras = [None, "r8", "r32", "qv", "r8", None, "qv", "r32", None, "r8"]
    max_new = 8
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=0),
        lora_request=loras,
        use_tqdm=False,
    )
    for p, lora, out in zip(prompts, loras, outs, strict=True):
        ref_ids, ref_lps = _reference(base, adapters[lora] if lora else None, p, max_new, dtype)
        comp = out.outputs[0]
        got_lps = [lp[t] for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)]
        if dtype == torch.float32:
            assert comp.token_ids == ref_ids, (lora, p)
        else:  # bf16 rounding differs between kernels: the first token must agree, logprobs stay close
            assert comp.token_ids[0] == ref_ids[0], (lora, p)
        n = next((i for i, (a, b) in enumerate(zip(comp.token_ids, ref_ids, strict=True)) if a != b), max_new)
        assert n == 0 or max(abs(a - b) for a, b in zip(got_lps[:n], ref_lps[:n], strict=True)) < tol
