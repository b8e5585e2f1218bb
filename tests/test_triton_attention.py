"""Triton paged attention / KV store against the torch reference in :mod:`loraserve.ops.attention`.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` at small sizes; ``gpu``-marked tests run the
real model shapes and CUDA-graph capture and skip without a device. Caches start as NaN so any read of a
slot that the sequence does not own (block-table padding, the tail of a last block, another sequence's
blocks) shows up in the output; the reference gets the same caches with NaN replaced by 0 because its
padded SDPA multiplies masked values by a zero weight.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from loraserve.ops.attention import AttentionMeta, paged_attention, store_kv  # noqa: E402
from loraserve.ops.triton_attention import (  # noqa: E402
    KernelConfig,
    decode_num_splits,
    paged_attention_triton,
    store_kv_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# Small tiles make the interpreter walk several query blocks and key tiles even at these tiny sizes.
SMALL_TILES = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)


class Case:
    """A step: ``specs`` = ``[(q_len, seq_len), ...]``, with caches holding each sequence's context."""

    def __init__(
        self,
        specs: list[tuple[int, int]],
        heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int = 16,
        seed: int = 0,
        fused_qkv: bool = False,
        head_major: bool = False,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        nblocks = [-(-sl // block_size) for _, sl in specs]
        pool = sum(nblocks) + 7  # spare blocks stay NaN
        perm = torch.randperm(pool, generator=gen)
        max_blocks = max(nblocks) + 2  # extra padded columns (0) that must never be read
        tables = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
        ctx_slots, new_slots, used = [], [], 0
        for b, (q_len, seq_len) in enumerate(specs):
            blocks = perm[used : used + nblocks[b]]
            used += nblocks[b]
            tables[b, : nblocks[b]] = blocks.to(torch.int32)
            pos = torch.arange(seq_len)
            slots = blocks[pos // block_size] * block_size + pos % block_size
            ctx_slots.append(slots[: seq_len - q_len])
            new_slots.append(slots[seq_len - q_len :])
        ctx = torch.cat(ctx_slots)
        num_tokens = sum(q for q, _ in specs)
        query_start = [0]
        for q_len, _ in specs:
            query_start.append(query_start[-1] + q_len)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype)

        self.k_cache = torch.full((pool, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
        self.v_cache = self.k_cache.clone()
        self.k_cache.view(-1, kv_heads, head_dim)[ctx] = rand(len(ctx), kv_heads, head_dim)
        self.v_cache.view(-1, kv_heads, head_dim)[ctx] = rand(len(ctx), kv_heads, head_dim)
        if fused_qkv:  # q, k, v as strided views of one projection output, as the model produces them
            qkv = rand(num_tokens, heads + 2 * kv_heads, head_dim).to(DEVICE)
            self.q, self.k, self.v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        else:
            self.q = rand(num_tokens, heads, head_dim).to(DEVICE)
            self.k = rand(num_tokens, kv_heads, head_dim).to(DEVICE)
            self.v = rand(num_tokens, kv_heads, head_dim).to(DEVICE)
        self.k_cache, self.v_cache = self.k_cache.to(DEVICE), self.v_cache.to(DEVICE)
        if head_major:  # the engine's CUDA storage: [blocks, kv_heads, block_size, D], same indexing
            self.k_cache = self.k_cache.transpose(1, 2).contiguous().transpose(1, 2)
            self.v_cache = self.v_cache.transpose(1, 2).contiguous().transpose(1, 2)
        self.meta = AttentionMeta(
            slot_mapping=torch.cat(new_slots).to(DEVICE),
            query_start=torch.tensor(query_start, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor([s for _, s in specs], dtype=torch.int32, device=DEVICE),
            block_tables=tables.to(DEVICE),
            query_lens=[q for q, _ in specs],
            seq_lens_host=[s for _, s in specs],
            block_size=block_size,
        )
        self.scale = head_dim**-0.5

    def run(self, **kwargs: object) -> torch.Tensor:
        store_kv_triton(self.k, self.v, self.k_cache, self.v_cache, self.meta.slot_mapping)
        return paged_attention_triton(self.q, self.k_cache, self.v_cache, self.meta, self.scale, **kwargs)

    def reference(self) -> torch.Tensor:
        """fp32 torch reference on the same (rounded) inputs, with this step's K/V stored by ``store_kv``."""
        k_cache = torch.nan_to_num(self.k_cache.float())
        v_cache = torch.nan_to_num(self.v_cache.float())
        store_kv(self.k.float(), self.v.float(), k_cache, v_cache, self.meta.slot_mapping)
        return paged_attention(self.q.float(), k_cache, v_cache, self.meta, self.scale)


def check(case: Case, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    tol = TOL[case.q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


SPECS = {
    # decode: seq_len 1, exactly one and several blocks, block boundary +-1
    "decode": [(1, 37), (1, 16), (1, 1), (1, 100), (1, 64), (1, 17)],
    "prefill": [(40, 40), (16, 16), (3, 3), (33, 33)],
    # chunked prefill / prefix-cache hits: queries after a cached context, at and off block boundaries
    "chunk": [(20, 52), (17, 33), (5, 85), (16, 48)],
    "mixed": [(1, 50), (30, 30), (1, 17), (12, 60), (1, 32), (7, 16)],
}
GQA = [(4, 4), (6, 2), (8, 2)]  # ratios 1, 3, 4


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
@pytest.mark.parametrize("heads,kv_heads", GQA, ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_paged_attention_matches_reference(kind: str, heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    case = Case(SPECS[kind], heads, kv_heads, 64, dtype, seed=list(SPECS).index(kind))
    check(case, case.run(), case.reference())


@pytest.mark.parametrize("kind", ["decode", "chunk", "mixed"])
def test_small_tiles_and_block_size_32(kind: str) -> None:
    """Several query blocks per sequence and key tiles that straddle 32-token blocks."""
    case = Case(SPECS[kind], 6, 2, 64, HALF, block_size=32, seed=1)
    ref = case.reference()
    check(case, case.run(config=SMALL_TILES), ref)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_head_dim_128_fused_qkv(kind: str) -> None:
    case = Case(SPECS[kind], 8, 2, 128, torch.float32, seed=2, fused_qkv=True)
    check(case, case.run(), case.reference())


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_decode_split_k(num_splits: int, heads: int, kv_heads: int) -> None:
    """Flash-decoding: any split count, including splits left empty by short sequences."""
    case = Case(SPECS["decode"], heads, kv_heads, 64, torch.float32, seed=3)
    check(case, case.run(num_splits=num_splits, config=SMALL_TILES), case.reference())


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_m", [1, 2, 8, 16])
def test_mha_decode_heads_per_program(block_m: int, num_splits: int) -> None:
    """Without GQA a decode program takes several heads (``block_m``, at most ``num_heads``)."""
    case = Case(SPECS["decode"], 8, 8, 64, HALF, seed=6)
    config = KernelConfig(block_m=block_m, block_n=16, num_warps=4, num_stages=2)
    check(case, case.run(num_splits=num_splits, config=config), case.reference())


@pytest.mark.parametrize("config", [None, SMALL_TILES, KernelConfig(1, 16, 4, 2, head_major=True)], ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_head_major_cache_layout(kind: str, heads: int, kv_heads: int, config: KernelConfig | None) -> None:
    """Head-major cache storage (the CUDA engine's) and the heads-first decode grid give the same
    results; the torch reference stores into the strided view too."""
    if config is not None and config.head_major and heads != kv_heads:
        pytest.skip("head_major only orders the decode grid without GQA")
    case = Case(SPECS[kind], heads, kv_heads, 32, HALF, seed=5, head_major=True)
    assert not case.k_cache.is_contiguous() and case.k_cache.stride(2) == 16 * 32
    check(case, case.run(config=config), case.reference())


def test_decode_num_splits_heuristic() -> None:
    assert decode_num_splits(1, 8, 1, DEVICE) == 1  # nothing to split
    assert decode_num_splits(1, 1, 4096, DEVICE) > 1  # one long sequence: split to fill the GPU
    assert decode_num_splits(4096, 8, 4096, DEVICE) == 1  # plenty of (seq, head) programs already


def pad_decode(case: Case, pad_to: int) -> AttentionMeta:
    """CUDA-graph padding: dummy sequences with query_len 1, seq_len 0, slot -1, garbage block tables."""
    meta, extra = case.meta, pad_to - case.meta.num_seqs
    dev = meta.seq_lens.device
    garbage = torch.randint(0, 10**6, (extra, meta.block_tables.shape[1]), dtype=torch.int32, device=dev)
    return AttentionMeta(
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((extra,), -1, dtype=torch.int64, device=dev)]),
        query_start=torch.arange(pad_to + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.cat([meta.seq_lens, torch.zeros(extra, dtype=torch.int32, device=dev)]),
        block_tables=torch.cat([meta.block_tables, garbage]),
        query_lens=[1] * pad_to,
        seq_lens_host=meta.seq_lens_host + [0] * extra,
        block_size=meta.block_size,
    )


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_cuda_graph_padding(num_splits: int) -> None:
    case = Case(SPECS["decode"], 8, 2, 64, torch.float32, seed=4)
    ref = case.reference()
    real = case.meta.num_seqs
    meta = pad_decode(case, real + 3)
    q = torch.cat([case.q, torch.randn(3, *case.q.shape[1:], device=DEVICE)])
    k = torch.cat([case.k, torch.randn(3, *case.k.shape[1:], device=DEVICE)])
    v = torch.cat([case.v, torch.randn(3, *case.v.shape[1:], device=DEVICE)])
    before = case.k_cache.clone()
    store_kv_triton(k, v, case.k_cache, case.v_cache, meta.slot_mapping)
    written = before.isnan() & ~case.k_cache.isnan()
    assert int(written.sum()) == real * k.shape[1] * k.shape[2]  # only the real tokens' slots
    out = paged_attention_triton(q, case.k_cache, case.v_cache, meta, case.scale, num_splits=num_splits)
    torch.testing.assert_close(out[:real], ref, atol=2e-4, rtol=2e-4)
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))


@pytest.mark.parametrize("head_major", [False, True], ids=["nhd", "hnd"])
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_store_kv_matches_reference_and_skips_padding(dtype: torch.dtype, head_major: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    num_tokens, kv_heads, head_dim, blocks, block_size = 9, 3, 64, 6, 16
    slots = torch.randperm(blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    kv = torch.randn(num_tokens, 2 * kv_heads, head_dim, generator=gen).to(DEVICE)  # fp32 source
    k, v = kv.split([kv_heads, kv_heads], dim=1)  # strided views
    shape = (
        (blocks, kv_heads, block_size, head_dim) if head_major else (blocks, block_size, kv_heads, head_dim)
    )
    k_cache = torch.zeros(shape, dtype=dtype, device=DEVICE)
    if head_major:
        k_cache = k_cache.transpose(1, 2)
    v_cache = torch.zeros_like(k_cache)  # keeps the strides
    store_kv_triton(k, v, k_cache, v_cache, slots.to(DEVICE))
    # The reference writes into plain token-major caches: the values must land at the same indices.
    k_ref = torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_ref = torch.zeros_like(k_ref)
    keep = slots >= 0
    store_kv(k[keep], v[keep], k_ref, v_ref, slots[keep].to(DEVICE))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    if head_major:  # the torch op's strided-view path agrees too
        k_view, v_view = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        store_kv(k[keep], v[keep], k_view, v_view, slots[keep].to(DEVICE))
        assert not k_view.is_contiguous() and torch.equal(k_view, k_ref) and torch.equal(v_view, v_ref)


def test_empty_step() -> None:
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    meta = AttentionMeta(
        slot_mapping=empty.long(),
        query_start=torch.zeros(1, dtype=torch.int32, device=DEVICE),
        seq_lens=empty,
        block_tables=torch.zeros(0, 1, dtype=torch.int32, device=DEVICE),
        query_lens=[],
        seq_lens_host=[],
        block_size=16,
    )
    cache = torch.zeros(2, 16, 4, 64, device=DEVICE)
    q = torch.zeros(0, 4, 64, device=DEVICE)
    store_kv_triton(q, q, cache, cache, meta.slot_mapping)
    assert paged_attention_triton(q, cache, cache, meta, 0.125).shape == (0, 4, 64)


# ----------------------------------------------------------------------------------- GPU, real sizes


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_major", [False, True], ids=["nhd", "hnd"])
@pytest.mark.parametrize("kv_heads", [32, 8], ids=["llama2", "llama3"])
def test_gpu_decode_batch_256(kv_heads: int, head_major: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    seq_lens = torch.randint(1, 1025, (256,), generator=gen).tolist()
    case = Case([(1, s) for s in seq_lens], 32, kv_heads, 128, torch.bfloat16, seed=6, head_major=head_major)
    check(case, case.run(), case.reference())
    if kv_heads == 32:
        grid = KernelConfig(1, 64, 4, 2, head_major=True)
        check(case, case.run(config=grid), case.reference())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_gpu_decode_long_context_few_seqs(num_splits: int | None) -> None:
    case = Case([(1, 4000), (1, 1), (1, 2049)], 32, 8, 128, torch.bfloat16, seed=7)
    check(case, case.run(num_splits=num_splits), case.reference())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_prefill_2048_tokens(dtype: torch.dtype, head_dim: int) -> None:
    """2048 new tokens: whole prompts, chunks after cached context, and decode tokens in one step."""
    specs = [(512, 512), (700, 700), (300, 1000), (500, 777)] + [(1, 300 + 20 * i) for i in range(36)]
    case = Case(specs, 32, 8, head_dim, dtype, seed=8)
    check(case, case.run(), case.reference())


@gpu
@pytest.mark.gpu
def test_gpu_block_size_32_mha_prefill() -> None:
    case = Case([(1000, 1048), (1000, 1000), (48, 48)], 32, 32, 128, torch.bfloat16, block_size=32, seed=9)
    check(case, case.run(), case.reference())


@gpu
@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replay() -> None:
    """Capture once at a padded batch size with a fixed split count, replay with new lengths and tables."""
    pad_to, heads, kv_heads, head_dim = 32, 32, 8, 128
    splits = decode_num_splits(pad_to, kv_heads, 4096, DEVICE)
    first = Case([(1, s) for s in (5, 300, 17)], heads, kv_heads, head_dim, torch.bfloat16, seed=10)
    meta = pad_decode(first, pad_to)
    static = {
        "q": torch.zeros(pad_to, heads, head_dim, dtype=torch.bfloat16, device=DEVICE),
        "k_cache": torch.zeros(4096, 16, kv_heads, head_dim, dtype=torch.bfloat16, device=DEVICE),
        "v_cache": torch.zeros(4096, 16, kv_heads, head_dim, dtype=torch.bfloat16, device=DEVICE),
        "seq_lens": meta.seq_lens.clone(),
        "block_tables": torch.zeros(pad_to, 4096 // 16, dtype=torch.int32, device=DEVICE),
    }
    graph_meta = AttentionMeta(
        slot_mapping=meta.slot_mapping,
        query_start=meta.query_start,
        seq_lens=static["seq_lens"],
        block_tables=static["block_tables"],
        query_lens=meta.query_lens,
        seq_lens_host=meta.seq_lens_host,
        block_size=16,
    )

    def step() -> torch.Tensor:
        return paged_attention_triton(
            static["q"], static["k_cache"], static["v_cache"], graph_meta, head_dim**-0.5, num_splits=splits
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed, lens in [(11, (1, 2000, 64, 4000)), (12, (700,) * 20)]:
        case = Case([(1, s) for s in lens], heads, kv_heads, head_dim, torch.bfloat16, seed=seed)
        ref = case.reference()
        store_kv_triton(case.k, case.v, case.k_cache, case.v_cache, case.meta.slot_mapping)
        padded = pad_decode(case, pad_to)
        n, nb = case.meta.num_seqs, case.meta.block_tables.shape[1]
        static["q"].zero_()
        static["q"][:n] = case.q
        static["k_cache"][: case.k_cache.shape[0]] = case.k_cache
        static["v_cache"][: case.v_cache.shape[0]] = case.v_cache
        static["seq_lens"].copy_(padded.seq_lens)
        static["block_tables"].zero_()
        static["block_tables"][:n, :nb] = case.meta.block_tables
        graph.replay()
        torch.testing.assert_close(out[:n].float(), ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
        assert torch.equal(out[n:], torch.zeros_like(out[n:]))
