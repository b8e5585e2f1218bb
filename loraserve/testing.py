"""Builders for tiny random checkpoints and real PEFT adapters, used by tests and benchmarks.

Everything here writes real files in the formats users ship (HF checkpoint directories with
safetensors and a tokenizer; PEFT adapter directories written by ``peft`` itself), so the code
under test reads exactly what it would read in production. ``peft`` and ``transformers`` are
imported lazily: they are test-time references, not runtime dependencies of the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_VOCAB = 256


def _tiny_tokenizer(out_dir: Path) -> None:
    """Write a byte-level BPE tokenizer with a ChatML template (no merges: one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out_dir)


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    tie_word_embeddings: bool = True,
    rope_scaling: dict[str, Any] | None = None,
    shard: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``arch`` ("llama", "mistral", "qwen2") checkpoint with a tokenizer.

    The weights are drawn with a larger std than HF's init so that logits are far from uniform and
    greedy decoding is decided by clear margins (ties would make token comparisons meaningless).
    """
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(_TINY_COMMON, vocab_size=TINY_VOCAB, tie_word_embeddings=tie_word_embeddings)
    kw.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kw, rope_scaling=rope_scaling)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**kw, sliding_window=None)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**kw, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5) * 1.5)
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    _tiny_tokenizer(out)
    return out


def make_peft_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: list[str] | str = LORA_TARGETS_ALL,
    seed: int = 1,
    std: float = 0.2,
    **lora_kwargs: Any,
) -> Path:
    """Create a PEFT LoRA adapter for ``base_dir`` with ``peft`` and random (non-zero) A and B.

    PEFT initialises B to zero, which would make every adapter a no-op; both matrices are
    re-drawn here so that each adapter visibly changes the model's outputs.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[-1] ** 0.5 * 4)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def write_adapter_config(adapter_dir: str | Path, **changes: Any) -> None:
    """Edit fields of an existing adapter_config.json (for tests of refusals)."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
