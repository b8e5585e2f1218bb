"""Paged attention and KV-cache writes (torch implementation: the CPU path and the oracle for Triton).

KV cache layout, per layer: ``k_cache``, ``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``
(indexing order; the storage may be head-major, see :func:`loraserve.ops.kv_cache_layout`).
A token at position ``p`` of a sequence lives in block ``block_table[p // block_size]`` at offset
``p % block_size``; its flat *slot* is ``block * block_size + offset``.

A step is a flat batch of ``T`` new tokens from ``B`` sequences, sequence ``b`` owning tokens
``query_start[b] : query_start[b + 1]``. Those are the last ``q_len_b`` positions of a context of
``seq_lens[b]`` tokens (``ctx_start_b = seq_lens[b] - q_len_b`` tokens were cached before: an earlier
chunk, earlier decode steps, or a prefix-cache hit). Query ``i`` of sequence ``b`` sits at position
``ctx_start_b + i`` and attends causally to keys ``0 .. ctx_start_b + i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    """Per-step attention metadata, shared by every layer.

    Attributes:
        slot_mapping: ``[T]`` int64 flat KV slot of each new token.
        query_start: ``[B + 1]`` int32 prefix sums of the query lengths.
        seq_lens: ``[B]`` int32 context length of each sequence including this step's tokens.
        block_tables: ``[B, max_blocks]`` int32 (padded with 0).
        query_lens: host copy of the query lengths.
        seq_lens_host: host copy of ``seq_lens``.
        block_size: tokens per KV block.
    """

    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    seq_lens_host: list[int]
    block_size: int
    _torch_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    def padded_views(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Index tensors for the padded torch path, built once per step and reused by all layers.

        * ``q_index`` ``[B, Q]``: flat token index of each padded query slot (``T`` for padding).
        * ``key_blocks`` ``[B, nb]``: the blocks to gather per sequence.
        * ``mask`` ``[B, 1, Q, nb * block_size]`` bool: causal + length mask.
        """
        if self._torch_cache:
            return self._torch_cache
        num_tokens = int(sum(self.query_lens))
        bsz, qmax = self.num_seqs, self.max_query_len
        nblocks = -(-self.max_seq_len // self.block_size)
        q_index = torch.full((bsz, qmax), num_tokens, dtype=torch.long)
        qpos = torch.zeros(bsz, qmax, dtype=torch.long)
        start = 0
        for b, (ql, sl) in enumerate(zip(self.query_lens, self.seq_lens_host, strict=True)):
            q_index[b, :ql] = torch.arange(start, start + ql)
            qpos[b] = torch.arange(sl - ql, sl - ql + qmax)
            start += ql
        kpos = torch.arange(nblocks * self.block_size)
        seq_lens = torch.tensor(self.seq_lens_host, dtype=torch.long)
        mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < seq_lens[:, None, None])
        self._torch_cache.update(
            q_index=q_index.to(device),
            key_blocks=self.block_tables[:, :nblocks].long().to(device),
            mask=mask.unsqueeze(1).to(device),
        )
        return self._torch_cache


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's keys/values into the paged cache.

    ``k``, ``v``: ``[T, num_kv_heads, head_dim]``; caches ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    ``slot_mapping``: ``[T]`` int64. ``k_cache.view(-1, H, D)[slot_mapping[i]] = k[i]``. The caches
    may be strided views (the head-major CUDA layout): those take an indexed write instead.
    """
    heads, dim = k.shape[1], k.shape[2]
    if k_cache.is_contiguous():
        k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float
) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's paged context.

    Args:
        q: ``[T, num_heads, head_dim]``; ``num_heads`` a multiple of ``num_kv_heads`` (GQA).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, this step's K/V already stored.
        meta: the step's :class:`AttentionMeta`.
        scale: softmax scale (usually ``head_dim ** -0.5``).
    Returns:
        ``[T, num_heads, head_dim]``, in ``q``'s dtype.

    The torch path pads the batch to ``[B, max_query_len]`` x ``[B, max_seq_len]`` and runs one
    SDPA call, which beats a Python loop over sequences on CPU for the batch sizes served here.
    """
    views = meta.padded_views(q.device)
    num_tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    bsz, qmax = views["q_index"].shape
    decode = qmax == 1 and num_tokens == bsz  # token b is sequence b's query: no padding to do
    q_pad = q.unsqueeze(1) if decode else torch.cat([q, q.new_zeros(1, heads, dim)])[views["q_index"]]
    keys = k_cache[views["key_blocks"]].flatten(1, 2)  # [B, K, KVH, D]
    values = v_cache[views["key_blocks"]].flatten(1, 2)
    if q.dtype == torch.float32:
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=views["mask"],
            scale=scale,
            enable_gqa=heads != kv_heads,
        ).transpose(1, 2)  # [B, Q, H, D]
    else:
        out = _grouped_attention_fp32(q_pad, keys, values, views["mask"], scale)
    if decode:
        return out.reshape(num_tokens, heads, dim)
    result = q.new_empty(num_tokens + 1, heads, dim)
    result[views["q_index"].flatten()] = out.reshape(bsz * qmax, heads, dim)
    return result[:num_tokens]


def _grouped_attention_fp32(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked attention in float32 with each KV head's query group stacked as rows of one matmul.

    ``q`` ``[B, Q, H, D]``, ``keys``/``values`` ``[B, K, KVH, D]``, ``mask`` ``[B, 1, Q, K]`` ->
    ``[B, Q, H, D]`` in ``q``'s dtype. CPUs without native bf16/fp16 matmul run SDPA on half
    types several times slower than this (measured 4-5x on the CI machine), so half-precision
    CPU engines take this path; float32 engines keep SDPA.
    """
    bsz, qlen, heads, dim = q.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    qg = (
        q.float()
        .view(bsz, qlen, kv_heads, group, dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(bsz, kv_heads, group * qlen, dim)
    )
    scores = (qg @ keys.float().permute(0, 2, 3, 1)) * scale  # [B, KVH, G*Q, K]
    rows_mask = mask.expand(bsz, 1, qlen, mask.shape[-1]).repeat(1, 1, group, 1)  # row g*Q + i -> query i
    scores = scores.masked_fill(~rows_mask, float("-inf"))
    out = scores.softmax(-1) @ values.float().transpose(1, 2)  # [B, KVH, G*Q, D]
    return (
        out.view(bsz, kv_heads, group, qlen, dim)
        .permute(0, 3, 1, 2, 4)
        .reshape(bsz, qlen, heads, dim)
        .to(q.dtype)
    )
