"""Llama, Mistral and Qwen2 (one family: GQA, RMSNorm, rotary, SiLU-gated MLP; Qwen2 adds qkv bias)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.config import ModelConfig, ModelLoadError
from loraserve.model.layers import (
    LoRALayerWeights,
    LoRALinear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    silu_and_mul,
)
from loraserve.ops import FusedOps, select_fused_ops
from loraserve.ops.attention import AttentionMeta
from loraserve.ops.lora import LoRASegments

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta, float], torch.Tensor]
StoreKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

# LoRA layer kinds: the fused projection each is applied on, and the PEFT module names of its slices.
LORA_LAYER_SLICES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class ForwardContext:
    """Everything a forward pass needs beyond token ids and positions, built once per step."""

    attn: AttentionMeta
    lora: LoRASegments | None
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    attention: AttentionFn
    store_kv: StoreKVFn


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        lora: dict[str, LoRALayerWeights] | None,
        dtype,
        device,
        fused: FusedOps | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        # Fused: rotates q and k in place in the qkv output (one kernel); torch: a rotated copy.
        self.apply_rotary = fused.rotary if fused is not None else apply_rotary
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = LoRALinear(
            cfg.hidden_size,
            [cfg.q_size, cfg.kv_size, cfg.kv_size],
            bias=cfg.qkv_bias,
            lora=lora and lora.get("qkv"),
            dtype=dtype,
            device=device,
        )
        self.o_proj = LoRALinear(
            cfg.q_size, [cfg.hidden_size], lora=lora and lora.get("o"), dtype=dtype, device=device
        )

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x, ctx.lora)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        heads = self.num_heads + self.num_kv_heads
        qk = self.apply_rotary(qkv[:, : q_size + kv_size].view(-1, heads, self.head_dim), *rope)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer]
        ctx.store_kv(k, v, k_cache, v_cache, ctx.attn.slot_mapping)
        out = ctx.attention(q, k_cache, v_cache, ctx.attn, self.scale)
        return self.o_proj(out.reshape(-1, q_size), ctx.lora)


class MLP(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        lora: dict[str, LoRALayerWeights] | None,
        dtype,
        device,
        fused: FusedOps | None = None,
    ) -> None:
        super().__init__()
        self.silu_and_mul = fused.silu_and_mul if fused is not None else silu_and_mul
        self.gate_up_proj = LoRALinear(
            cfg.hidden_size,
            [cfg.intermediate_size] * 2,
            lora=lora and lora.get("gate_up"),
            dtype=dtype,
            device=device,
        )
        self.down_proj = LoRALinear(
            cfg.intermediate_size,
            [cfg.hidden_size],
            lora=lora and lora.get("down"),
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor, lora: LoRASegments | None) -> torch.Tensor:
        return self.down_proj(self.silu_and_mul(self.gate_up_proj(x, lora)), lora)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer.

    Two forwards computing the same function: :meth:`forward` (the torch path, one residual stream)
    and :meth:`forward_fused` (with :class:`~loraserve.ops.FusedOps`: vLLM's layout, where each residual
    add is fused into the following RMSNorm and the stream is carried beside the layer output).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        lora: dict[str, LoRALayerWeights] | None,
        dtype,
        device,
        fused: FusedOps | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, lora, dtype, device, fused)
        self.mlp = MLP(cfg, lora, dtype, device, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, fused)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.lora)

    def forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_out, residual)``, whose sum is :meth:`forward`'s output.

        ``x``: the previous layer's MLP output, to be added to ``residual`` (in place); for the first
        layer the embeddings, with ``residual`` None. ``x`` is overwritten.
        """
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm.add_norm_(x, residual)
        h = self.post_attention_layernorm.add_norm_(self.self_attn(h, rope, ctx), residual)
        return self.mlp(h, ctx.lora), residual


class LlamaModel(nn.Module):
    """The decoder stack plus LM head. ``forward`` returns logits only for ``logits_indices``."""

    def __init__(
        self,
        cfg: ModelConfig,
        lora_layers: list[dict[str, LoRALayerWeights]] | None,
        dtype: torch.dtype,
        device: torch.device | str,
        max_positions: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        # GPU: fused Triton norm / activation / rotary kernels; CPU: the torch code (their reference).
        self.fused = select_fused_ops(torch.device(device))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, lora_layers[i] if lora_layers else None, dtype, device, self.fused)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, self.fused)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.lm_head: nn.Module | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """``input_ids``, ``positions``: ``[T]``; returns float32 logits ``[len(logits_indices), vocab]``."""
        if ctx.lora is not None:
            ctx.lora.begin_forward()
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions)
        if self.fused is None:
            for layer in self.layers:
                x = layer(x, rope, ctx)
            x = self.norm(x[logits_indices])
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer.forward_fused(x, residual, rope, ctx)
            # Only the sampled rows need the last residual add and the final norm.
            x = self.norm.add_norm_(x[logits_indices], residual[logits_indices])
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; error on a missing or misshapen tensor."""
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        params = dict(self.named_parameters())
        expected = _expected_hf_names(self.cfg)
        seen: set[str] = set()
        for hf_name, tensor in tensors:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            parts = name.split(".")
            target, offset_slice = name, None
            if len(parts) >= 2 and parts[-2] in fused:
                fused_name, idx = fused[parts[-2]]
                target = ".".join(parts[:-2] + [fused_name, parts[-1]])
                offset_slice = idx
            if target not in params:
                raise ModelLoadError(f"unexpected tensor {hf_name!r} in checkpoint {self.cfg.path}")
            param = params[target]
            dst = param.data
            if offset_slice is not None:
                layer = self.get_submodule(target.rsplit(".", 1)[0])
                sizes = layer.out_sizes
                start = sum(sizes[:offset_slice])
                dst = dst[start : start + sizes[offset_slice]]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, the config needs {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            seen.add(hf_name)
        missing = sorted(expected - seen)
        if missing:
            raise ModelLoadError(
                f"checkpoint {self.cfg.path} lacks {len(missing)} tensor(s), e.g. {missing[:3]}"
            )


def _expected_hf_names(cfg: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}self_attn.{m}.weight")
        if cfg.qkv_bias:
            names |= {f"{p}self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj")}
        for m in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}mlp.{m}.weight")
    return names
