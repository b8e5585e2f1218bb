"""The oracle: transformers + peft greedy generation with raw logits, one prompt at a time."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=64)
def _model(base: str, adapter: str | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@lru_cache(maxsize=4096)
def _greedy(
    base: str, adapter: str | None, prompt: tuple[int, ...], max_new: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    model = _model(base, adapter)
    # A plain argmax loop: generate()'s min_new_tokens would mask EOS, which the engine (ignore_eos) may pick.
    ids = list(prompt)
    tokens: list[int] = []
    logprobs: list[float] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(logits.argmax())
            tokens.append(tok)
            logprobs.append(torch.log_softmax(logits, -1)[tok].item())
            ids.append(tok)
    return tuple(tokens), tuple(logprobs)


def peft_greedy(
    base: Path, adapter: Path | None, prompt: list[int], max_new: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their raw logprobs from transformers (+ peft when ``adapter`` is given)."""
    tokens, lps = _greedy(str(base), str(adapter) if adapter else None, tuple(prompt), max_new)
    return list(tokens), list(lps)


def clear_reference_cache() -> None:
    _model.cache_clear()
    _greedy.cache_clear()
