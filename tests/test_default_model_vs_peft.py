"""The default model (SmolLM2-135M-Instruct, converted from the shipped GGUF) against transformers + peft."""

from __future__ import annotations

import pytest

from loraserve import LLM, SamplingParams
from loraserve.model.default_model import ensure_default_model
from loraserve.testing import make_peft_adapter
from tests.reference import peft_greedy

MAX_NEW = 8


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> dict:
    base = ensure_default_model()
    root = tmp_path_factory.mktemp("smol")
    return {
        "base": base,
        "r8": make_peft_adapter(base, root / "r8", r=8, lora_alpha=16, seed=1, std=0.05),
        "rs4": make_peft_adapter(base, root / "rs4", r=4, lora_alpha=8, use_rslora=True, seed=2, std=0.05),
        "qv16": make_peft_adapter(
            base, root / "qv16", r=16, lora_alpha=7, target_modules=["q_proj", "v_proj"], seed=3, std=0.05
        ),
    }


def test_default_model_mixed_batch_matches_peft(smol):
    llm = LLM(
        None,
        device="cpu",
        dtype="float32",
        max_loras=4,
        max_lora_rank=16,
        loras={k: str(v) for k, v in smol.items() if k != "base"},
    )
    assert llm.engine.cfg.model.num_layers == 30
    questions = [
        "What is the capital of France?",
        "Name three colours.",
        "Why is the sky blue?",
        "Write a haiku about rain.",
        "What is 12 times 7?",
        "Tell me a fun fact about cats.",
        "How do plants make food?",
        "Say hello in Spanish.",
    ]
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    loras = [None, "r8", "rs4", "qv16", "r8", None, "qv16", "rs4"]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, lora_request=loras, use_tqdm=False
    )
    for prompt, lora, out in zip(prompts, loras, outs, strict=True):
        ref_tokens, ref_lps = peft_greedy(smol["base"], smol[lora] if lora else None, prompt, MAX_NEW)
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens, lora
        got = [lp[t] for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)]
        assert max(abs(a - b) for a, b in zip(got, ref_lps, strict=True)) < 1e-4, lora
