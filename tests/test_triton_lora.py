"""Triton multi-LoRA kernels against the torch reference (:mod:`loraserve.ops.lora`).

Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported) at small sizes; with CUDA the ``gpu`` tests also run them at Llama sizes. bf16 works under
the interpreter only because the kernels upcast dot operands there (see ``triton_lora._INTERPRET``).
"""

from __future__ import annotations

import math
import os
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from loraserve.ops import triton_lora  # noqa: E402
from loraserve.ops.lora import LoRASegments, lora_apply, lora_expand, lora_shrink  # noqa: E402
from loraserve.ops.triton_lora import (  # noqa: E402
    MAX_DECODE_RANK,
    DecodeExpandConfig,
    DecodeShrinkConfig,
    ExpandConfig,
    ShrinkConfig,
    _decode_tile,
    _shrink_kernel,
    expand_config,
    lora_apply_triton,
    lora_expand_triton,
    lora_shrink_triton,
    shrink_config,
    tiled_expand_config,
    tiled_shrink_config,
)

_INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"
if not torch.cuda.is_available() and not _INTERPRETED:
    pytest.skip(
        "no CUDA, and triton_lora was imported before TRITON_INTERPRET was set", allow_module_level=True
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per dtype. The reference rounds t and the expand product to the model dtype where the
# kernels keep fp32 until the final store, so low precision differs by an ulp or two of |y| ~ 3.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (6e-2, 2e-2)}

RANKS = [4, 5, 8, 16, 33, 64, 128]


@dataclass
class Case:
    x: torch.Tensor
    a: torch.Tensor
    b: list[torch.Tensor]
    y: torch.Tensor
    meta: LoRASegments
    covered: torch.Tensor  # [T] bool: token belongs to a segment


def _assignment(pattern: str, num_tokens: int, rng: random.Random) -> list[int | None]:
    """Adapter id (or None for the base model) of each token, adapters' tokens contiguous."""
    if pattern == "distinct":
        return list(range(num_tokens))
    if pattern == "spread256":
        # min(T, 256) distinct adapters, equal contiguous runs.
        num_adapters = min(num_tokens, 256)
        return [i * num_adapters // num_tokens for i in range(num_tokens)]
    if pattern == "identical":
        return [0] * num_tokens
    if pattern == "base_only":
        return [None] * num_tokens
    if pattern == "uniform":
        per = max(1, num_tokens // 4)
        return [min(i // per, 3) for i in range(num_tokens)]
    if pattern == "zipf":
        weights = [1 / (k + 1) ** 1.2 for k in range(8)]
        ids = sorted(rng.choices(range(8), weights=weights, k=num_tokens))
        return list(ids)
    if pattern == "mixed_step":
        # An eager step of decode rows (1-3 tokens of many adapters, base rows between) and prefill
        # chunks (17-40 tokens), interleaved as the runner orders them (by pool row).
        out = []
        adapter = 0
        while len(out) < num_tokens:
            run = rng.randint(17, 40) if rng.random() < 0.15 else rng.randint(1, 3)
            out += [adapter if rng.random() < 0.85 else None] * run
            adapter += 1
        return out[:num_tokens]
    if pattern in ("base_mixed", "padded", "decode"):
        # Base tokens between and after adapter runs (the runner puts them last; the ops do not care).
        # "decode": runs of 1-3 tokens (one decode step, or a few speculative tokens, per sequence).
        longest, p_adapter = (3, 0.8) if pattern == "decode" else (6, 0.7)
        out: list[int | None] = []
        adapter = 0
        while len(out) < num_tokens:
            run = rng.randint(1, longest)
            out += [adapter if rng.random() < p_adapter else None] * run
            adapter += 1
        return out[:num_tokens]
    raise ValueError(pattern)


def make_case(
    pattern: str,
    num_tokens: int,
    in_features: int,
    outs: list[int],
    dtype: torch.dtype,
    seed: int,
    *,
    pad_to: int = 0,
    fixed_max_rank: int = 0,
    rank_choices: Sequence[int] = RANKS,
    device: str = DEVICE,
) -> Case:
    """Random pool with mixed-rank adapters at scattered rows, and a step's segments over it.

    ``pad_to``: pad the segment tensors with zero-length entries (also one in the middle) up to this
    capacity, as a CUDA-graph runner does; ``fixed_max_rank``: use this ``max_rank`` instead of the batch's;
    ``rank_choices``: the ranks adapters draw from.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    assign = _assignment(pattern, num_tokens, rng)
    adapters = sorted({i for i in assign if i is not None})
    ranks = {ad: rng.choice(rank_choices) for ad in adapters}
    rows: dict[int, int] = {}
    next_row = 3  # rows 0..2 and the gaps between adapters belong to nobody
    for ad in rng.sample(adapters, len(adapters)):
        rows[ad] = next_row
        next_row += ranks[ad] + rng.randint(0, 3)
    pool_rows = next_row + 2
    num_slices = len(outs)

    segments: list[tuple[int, int, int, int]] = []
    i = 0
    while i < num_tokens:
        j = i
        while j < num_tokens and assign[j] == assign[i]:
            j += 1
        if assign[i] is not None:
            ad = assign[i]
            segments.append((i, j, rows[ad], ranks[ad]))
        i = j

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    # Scaled so that t and the LoRA delta are O(1), like y.
    x = randn(num_tokens, in_features)
    a = randn(pool_rows, num_slices, in_features, scale=1 / math.sqrt(in_features))
    max_rank = max((s[3] for s in segments), default=1)
    b = [randn(pool_rows, o, scale=1 / math.sqrt(max_rank)) for o in outs]
    y = randn(num_tokens, sum(outs))

    meta = LoRASegments.build(segments, num_tokens, device=device)
    if pad_to:
        padded = list(segments)
        pads = pad_to - len(padded)
        assert pads >= 2
        # Zero-length entries carry junk rows/ranks: the kernels must never read them.
        padded.insert(len(padded) // 2, (0, 0, pool_rows + 100, 128))
        padded += [(num_tokens, num_tokens, 0, 128)] * (pads - 1)
        tens = torch.tensor(padded, dtype=torch.int32).T.contiguous().to(device)
        meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank = (
            tens[0],
            tens[1] - tens[0],
            tens[2],
            tens[3],
        )
    if fixed_max_rank:
        meta.max_rank = fixed_max_rank
    covered = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for start, end, _, _ in segments:
        covered[start:end] = True
    return Case(x, a, b, y, meta, covered)


def _check_t(t: torch.Tensor, ref: torch.Tensor, case: Case, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert t.shape == ref.shape and t.dtype == torch.float32
    torch.testing.assert_close(t, ref, atol=atol, rtol=rtol)
    defined = torch.zeros_like(t, dtype=torch.bool)
    for start, end, _, rank in case.meta.segments:
        defined[:, start:end, :rank] = True
    assert (t[~defined] == 0).all(), "t must be exactly 0 on base rows and past each segment's rank"


def _check_y(y: torch.Tensor, ref: torch.Tensor, case: Case, y0: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=rtol)
    assert torch.equal(y[~case.covered], y0[~case.covered]), "base tokens must be untouched"


def _run_all(
    case: Case,
    dtype: torch.dtype,
    shrink_cfg: ShrinkConfig | DecodeShrinkConfig | None = None,
    expand_cfg: ExpandConfig | DecodeExpandConfig | None = None,
) -> None:
    """Shrink and expand (on the reference t) with the given configs, then apply with the defaults,
    each against the reference."""
    t_ref = lora_shrink(case.x, case.a, case.meta)
    _check_t(lora_shrink_triton(case.x, case.a, case.meta, shrink_cfg), t_ref, case, dtype)

    y_ref = case.y.clone()
    lora_expand(y_ref, t_ref, case.b, case.meta)
    y = case.y.clone()
    lora_expand_triton(y, t_ref, case.b, case.meta, expand_cfg)
    _check_y(y, y_ref, case, case.y, dtype)

    y_ref = case.y.clone()
    lora_apply(y_ref, case.x, case.a, case.b, case.meta)
    y = case.y.clone()
    lora_apply_triton(y, case.x, case.a, case.b, case.meta)
    _check_y(y, y_ref, case, case.y, dtype)


# Each pattern cycles through S = 1, 2, 3 (unequal outs), odd token counts and `in` sizes that are and
# are not multiples of the K tile.
PATTERNS = [
    ("distinct", 37, 64, [48]),
    ("uniform", 40, 96, [64, 16]),
    ("zipf", 33, 64, [64, 32, 32]),
    ("identical", 23, 80, [40]),
    ("base_mixed", 29, 64, [32, 48]),
    ("padded", 19, 64, [64, 16, 16]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1


def _tiled_configs(case: Case) -> tuple[ShrinkConfig, ExpandConfig]:
    """The tiled kernels' heuristic configs for ``case``, also where the default is the decode kernels."""
    assert case.meta.seg_len is not None
    num_tokens, in_features = case.x.shape
    num_segs = case.meta.seg_len.numel()
    max_rank = case.meta.max_rank
    shrink = tiled_shrink_config(
        num_tokens, num_segs, in_features, case.a.shape[1], max_rank, case.x.element_size(), _num_sms()
    )
    return shrink, tiled_expand_config(num_tokens, num_segs, max_rank)


def _default_shrink_config(case: Case) -> ShrinkConfig | DecodeShrinkConfig:
    """The shrink config the heuristic picks for ``case``."""
    assert case.meta.seg_len is not None
    num_tokens, in_features = case.x.shape
    return shrink_config(
        num_tokens,
        case.meta.seg_len.numel(),
        in_features,
        case.a.shape[1],
        case.meta.max_rank,
        case.x.element_size(),
        _num_sms(),
    )


def _pattern_case(
    pattern: str, num_tokens: int, in_features: int, outs: list[int], dtype: torch.dtype
) -> Case:
    padded = pattern == "padded"
    return make_case(
        pattern,
        num_tokens,
        in_features,
        outs,
        dtype,
        seed=zlib.crc32(f"{pattern}-{dtype}".encode()),
        pad_to=num_tokens + 2 if padded else 0,
        fixed_max_rank=128 if padded else 0,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    ("pattern", "num_tokens", "in_features", "outs"), PATTERNS, ids=[p[0] for p in PATTERNS]
)
def test_kernels_match_reference(
    pattern: str, num_tokens: int, in_features: int, outs: list[int], dtype: torch.dtype
) -> None:
    """The default kernels: decode for every pattern but ``identical`` (23 tokens in one segment)."""
    _run_all(_pattern_case(pattern, num_tokens, in_features, outs, dtype), dtype)


@pytest.mark.parametrize(
    ("pattern", "num_tokens", "in_features", "outs"), PATTERNS, ids=[p[0] for p in PATTERNS]
)
def test_tiled_kernels_match_reference(
    pattern: str, num_tokens: int, in_features: int, outs: list[int]
) -> None:
    """The tiled kernels at the tile sizes their heuristic picks for the batch, also for decode-like
    batches (16-token tiles); bf16 exercises the interpreter upcast."""
    dtype = torch.bfloat16
    case = _pattern_case(pattern, num_tokens, in_features, outs, dtype)
    _run_all(case, dtype, *_tiled_configs(case))


# Rank mixes of the decode tests: every rank chunk of the decode expand (16/32/64/128), full and partial.
DECODE_RANKS = [1, 4, 16, 17, 33, 64, 100, 128]
# (T, in, outs, max_rank, dtype): S = 1, 2, 3; widths that are and are not multiples of the column
# tiles; K that is and is not a multiple of the K step; each dtype once.
DECODE_SHAPES = [
    (31, 72, [200], 64, torch.float32),
    (28, 96, [136, 40], 128, torch.bfloat16),
    (33, 64, [300, 64, 48], 64, torch.float16),
]
# Forced decode configs. "one_per_tile": the smallest grid (one program per possible tile, so the active
# tiles get 1-3 programs each): programs loop over several column tiles (across slices) and, for large
# ranks, several fused-column tiles with full K. "many": each tile gets several programs (K splits
# with atomics, runs of one column tile, idle programs), with the smallest K step and B tile.
DECODE_CONFIGS: dict[str, tuple[DecodeShrinkConfig, DecodeExpandConfig]] = {
    "one_per_tile": (DecodeShrinkConfig(programs=1, block_k=32), DecodeExpandConfig(programs=1)),
    "many": (DecodeShrinkConfig(programs=96, block_k=16), DecodeExpandConfig(programs=96, b_tile=2048)),
}


def _decode_case(
    num_tokens: int, in_features: int, outs: list[int], max_rank: int, dtype: torch.dtype
) -> Case:
    """A decode batch as a CUDA graph captures it: runs of 1-3 tokens of distinct adapters with base
    tokens between, segment tensors padded to ``N_cap = T`` with zero-length entries, ``max_rank``
    fixed above most adapters' ranks."""
    case = make_case(
        "decode",
        num_tokens,
        in_features,
        outs,
        dtype,
        seed=zlib.crc32(f"decode-{num_tokens}-{dtype}".encode()),
        pad_to=num_tokens,
        fixed_max_rank=max_rank,
        rank_choices=[r for r in DECODE_RANKS if r <= max_rank],
    )
    assert isinstance(_default_shrink_config(case), DecodeShrinkConfig)
    return case


@pytest.mark.parametrize("configs", ["default", *DECODE_CONFIGS])
@pytest.mark.parametrize(
    ("num_tokens", "in_features", "outs", "max_rank", "dtype"), DECODE_SHAPES, ids=["S1", "S2", "S3"]
)
def test_decode_kernels(
    num_tokens: int, in_features: int, outs: list[int], max_rank: int, dtype: torch.dtype, configs: str
) -> None:
    """The decode kernels with the default configs and with forced work splits."""
    case = _decode_case(num_tokens, in_features, outs, max_rank, dtype)
    _run_all(case, dtype, *DECODE_CONFIGS.get(configs, (None, None)))


@pytest.mark.parametrize("configs", ["default", *DECODE_CONFIGS])
def test_decode_kernels_long_segment(configs: str) -> None:
    """A graph batch where one adapter has most tokens: the decode kernels cut it into 16-token tiles."""
    dtype = torch.float32
    case = make_case(
        "identical", 40, 64, [96, 40], dtype, seed=5, pad_to=40, fixed_max_rank=64, rank_choices=[33]
    )
    assert isinstance(_default_shrink_config(case), DecodeShrinkConfig)
    _run_all(case, dtype, *DECODE_CONFIGS.get(configs, (None, None)))


@triton.jit
def _decode_tile_probe(
    seg_len_ptr, seg_rank_ptr, num_segs, out_ptr, BLOCK_SEG: tl.constexpr, SLICES: tl.constexpr
):
    seg, m0, q, share = _decode_tile(seg_len_ptr, seg_rank_ptr, num_segs, 16, BLOCK_SEG, SLICES)
    out = out_ptr + tl.program_id(0) * 4
    tl.store(out, seg)
    tl.store(out + 1, m0)
    tl.store(out + 2, q)
    tl.store(out + 3, share)


@pytest.mark.parametrize("slices", [0, 1, 3])
def test_decode_programs_cover_tiles_by_work(slices: int) -> None:
    """The decode kernels' program map: every 16-token tile of every segment gets programs ``0..share-1``
    exactly once, a tile that streams more weight bytes (higher rank) gets at least as many, and the
    shares fit the grid. ``slices`` > 0: the shrink's weights (fused column tiles); 0: the expand's."""
    lens = [1, 3, 20, 2, 40, 1, 0, 0]  # two zero-length padding entries, as CUDA graphs pass them
    ranks = [8, 64, 16, 33, 4, 128, 0, 0]
    seg_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    seg_rank = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    grid = 60
    out = torch.full((grid, 4), -1, dtype=torch.int32, device=DEVICE)
    _decode_tile_probe[(grid,)](seg_len, seg_rank, len(lens), out, BLOCK_SEG=16, SLICES=slices)
    share_of: dict[tuple[int, int], int] = {}
    seen: dict[tuple[int, int], list[int]] = {}
    for seg, m0, q, share in out.tolist():
        if seg >= len(lens):
            continue
        assert share_of.setdefault((seg, m0), share) == share
        seen.setdefault((seg, m0), []).append(q)
    tiles = {(s, m0) for s, n in enumerate(lens) for m0 in range(0, n, 16)}
    assert set(seen) == tiles
    for key, qs in seen.items():
        assert sorted(qs) == list(range(share_of[key]))
    assert sum(share_of.values()) <= grid
    by_rank = sorted((ranks[s], share) for (s, _), share in share_of.items())
    assert [share for _, share in by_rank] == sorted(share for _, share in by_rank)
    assert share_of[(5, 0)] > share_of[(0, 0)]  # rank 128 over rank 8


# (T, in, outs, dtype): S = 1, 2, 3, each dtype once.
MIXED_SHAPES = [
    (97, 64, [80], torch.float32),
    (120, 96, [72, 40], torch.bfloat16),
    (90, 64, [64, 32, 48], torch.float16),
]


@pytest.mark.parametrize(("num_tokens", "in_features", "outs", "dtype"), MIXED_SHAPES, ids=["S1", "S2", "S3"])
def test_mixed_step_matches_reference(
    num_tokens: int, in_features: int, outs: list[int], dtype: torch.dtype
) -> None:
    """An eager mixed step (decode rows of many adapters beside prefill chunks, base rows between) on the
    kernels the heuristic picks for it and on the tiled ones."""
    case = make_case(
        "mixed_step", num_tokens, in_features, outs, dtype, seed=zlib.crc32(f"mixed-{dtype}".encode())
    )
    _run_all(case, dtype)
    _run_all(case, dtype, *_tiled_configs(case))


def test_launch_plans_cover_every_parameter() -> None:
    """A step plans each layer shape's launches once; each plan's per-layer tensors plus its prepared
    arguments are exactly the kernel's parameters (the direct launcher passes them positionally)."""
    for pattern in ("mixed_step", "decode"):  # tiled and decode kernels
        case = make_case(pattern, 90, 64, [64, 32, 48], torch.float32, seed=4)
        y = case.y.clone()
        lora_apply_triton(y, case.x, case.a, case.b, case.meta)
        lora_apply_triton(y, case.x, case.a, case.b, case.meta)
        (shrink, expand), *others = case.meta.op_cache.values()
        assert not others
        for launch, num_head in ((shrink, 3), (expand, 5)):
            assert num_head + len(launch.values) == len(launch.kernel.arg_names)


def test_config_selection() -> None:
    """Decode kernels for <= 16 tokens per segment (padded N) and max_rank <= 128, tiled otherwise."""
    assert isinstance(shrink_config(64, 64, 4096, 3, 64, 2, 132), DecodeShrinkConfig)
    assert isinstance(expand_config(64, 64, 64, 2, 132), DecodeExpandConfig)
    assert isinstance(shrink_config(2048, 4, 4096, 3, 64, 2, 132), ShrinkConfig)
    assert isinstance(expand_config(2048, 4, 64, 2, 132), ExpandConfig)
    assert isinstance(expand_config(64, 64, 2 * MAX_DECODE_RANK, 2, 132), ExpandConfig)
    with pytest.raises(ValueError, match="b_tile"):
        DecodeExpandConfig(programs=8, b_tile=1000)
    # LORASERVE_LORA_KERNELS forces a family where the ranks allow the decode kernels.
    for family, prefill, decode in (
        ("decode", DecodeShrinkConfig, DecodeShrinkConfig),
        ("tiled", ShrinkConfig, ShrinkConfig),
    ):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(triton_lora, "KERNEL_FAMILY", family)
            shrink_config.cache_clear()
            assert isinstance(shrink_config(2048, 4, 4096, 3, 64, 2, 132), prefill)
            assert isinstance(shrink_config(64, 64, 4096, 3, 64, 2, 132), decode)
            assert isinstance(shrink_config(64, 64, 4096, 3, 2 * MAX_DECODE_RANK, 2, 132), ShrinkConfig)
    shrink_config.cache_clear()
    case = make_case("decode", 12, 32, [16], torch.float32, seed=3, fixed_max_rank=2 * MAX_DECODE_RANK)
    t = lora_shrink(case.x, case.a, case.meta)
    with pytest.raises(ValueError, match="max_rank"):
        lora_expand_triton(case.y, t, case.b, case.meta, DecodeExpandConfig(programs=8))


@pytest.mark.parametrize(
    ("shrink_cfg", "expand_cfg"),
    [
        # split-K with atomics, several column blocks per adapter, rank loop of several chunks.
        (ShrinkConfig(16, 16, 32, 2), ExpandConfig(16, 16, 16)),
        # multi-tile segments (32/64-token tiles), 3-way split of an uneven K.
        (ShrinkConfig(32, 64, 32, 3), ExpandConfig(32, 32, 32)),
        (ShrinkConfig(64, 128, 64, 1, num_warps=8), ExpandConfig(64, 64, 64, num_warps=8)),
    ],
    ids=["split_k", "tiles32", "tiles64"],
)
def test_forced_configs(shrink_cfg: ShrinkConfig, expand_cfg: ExpandConfig) -> None:
    dtype = torch.float32
    case = make_case("zipf", 40, 96, [48, 24, 40], dtype, seed=7)
    t_ref = lora_shrink(case.x, case.a, case.meta)
    _check_t(lora_shrink_triton(case.x, case.a, case.meta, shrink_cfg), t_ref, case, dtype)
    y_ref, y = case.y.clone(), case.y.clone()
    lora_expand(y_ref, t_ref, case.b, case.meta)
    lora_expand_triton(y, t_ref, case.b, case.meta, expand_cfg)
    _check_y(y, y_ref, case, case.y, dtype)


def test_base_only_and_all_padding() -> None:
    """No adapter in the step: nothing changes, with or without (all zero-length) segment tensors."""
    case = make_case("base_only", 9, 32, [16, 16], torch.float32, seed=1)
    assert case.meta.seg_len is None
    y = case.y.clone()
    lora_apply_triton(y, case.x, case.a, case.b, case.meta)
    assert torch.equal(y, case.y)
    assert not lora_shrink_triton(case.x, case.a, case.meta).any()

    graph = make_case("base_only", 9, 32, [16, 16], torch.float32, seed=1, pad_to=4, fixed_max_rank=16)
    t = lora_shrink_triton(graph.x, graph.a, graph.meta)
    assert t.shape == (2, 9, 16) and not t.any()
    lora_apply_triton(y, graph.x, graph.a, graph.b, graph.meta)
    assert torch.equal(y, case.y)


def test_forward_scratch() -> None:
    """Layers take their t from one per-forward workspace, in call order, zeroed once per forward;
    past its end they allocate their own."""
    dtype = torch.float32
    layers = [make_case("base_mixed", 29, 64, outs, dtype, seed=3) for outs in ([32, 16, 16], [24])]
    meta = layers[0].meta
    planes = 3 * 29 * meta.max_rank
    meta.scratch = torch.full((planes + 29 * meta.max_rank,), float("nan"), device=DEVICE)
    for _ in range(2):  # a second forward reuses the same parts
        meta.begin_forward()
        for case in layers:
            y_ref, y = case.y.clone(), case.y.clone()
            lora_apply(y_ref, case.x, case.a, case.b, meta)
            lora_apply_triton(y, case.x, case.a, case.b, meta)
            _check_y(y, y_ref, case, case.y, dtype)
        assert meta._scratch_at == meta.scratch.numel()
        assert meta.scratch.any() and not meta.scratch.isnan().any()
    t = meta.zeroed_t(1, 29, torch.device(DEVICE))  # used up: a fresh tensor
    assert t.data_ptr() != meta.scratch.data_ptr() and not t.any()


def test_warm_up_runs_every_shape_and_leaves_pools() -> None:
    """The start-up warm-up: 3 batch shapes x the rank buckets up to the engine's max rank, per layer kind."""
    gen = torch.Generator().manual_seed(0)
    layers = {
        "qkv": (
            torch.randn(48, 3, 32, generator=gen),
            [torch.randn(48, 16, generator=gen) for _ in range(3)],
        ),
        "o": (torch.randn(48, 1, 16, generator=gen), [torch.randn(48, 32, generator=gen)]),
    }
    layers = {k: (a.to(DEVICE), [b_s.to(DEVICE) for b_s in b]) for k, (a, b) in layers.items()}
    before = {k: (a.clone(), [b_s.clone() for b_s in b]) for k, (a, b) in layers.items()}
    assert triton_lora.warm_up(layers, max_lora_rank=24, dtype=torch.float32) == 3 * 2 * 2
    for k, (a, b) in layers.items():
        assert torch.equal(a, before[k][0]) and all(map(torch.equal, b, before[k][1]))


def test_rejects_bad_layouts() -> None:
    case = make_case("identical", 4, 32, [16, 16], torch.float32, seed=2)
    with pytest.raises(ValueError, match="contiguous"):
        lora_shrink_triton(case.x, case.a.transpose(0, 1).contiguous().transpose(0, 1), case.meta)
    with pytest.raises(ValueError, match="contiguous"):
        lora_shrink_triton(case.x, case.a.transpose(1, 2).contiguous().transpose(1, 2), case.meta)
    t = lora_shrink(case.x, case.a, case.meta)
    with pytest.raises(ValueError, match="slices"):
        lora_expand_triton(case.y, t, case.b * 4, case.meta)


# --------------------------------------------------------------------------------------------- GPU

LAYERS = {
    # name: (in, outs)
    "qkv_llama3_8b": (4096, [4096, 1024, 1024]),
    "qkv_llama2_7b": (4096, [4096, 4096, 4096]),
    "o_proj": (4096, [4096]),
    "gate_up_llama2_7b": (4096, [11008, 11008]),
    "gate_up_llama3_8b": (4096, [14336, 14336]),
    "down_llama2_7b": (11008, [4096]),
    "down_llama3_8b": (14336, [4096]),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("pattern", "num_tokens"),
    [
        ("spread256", 1),
        ("spread256", 7),
        ("spread256", 256),
        ("spread256", 2048),
        ("mixed_step", 300),
        ("mixed_step", 2500),
    ],
)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_gpu_llama_sizes(layer: str, pattern: str, num_tokens: int) -> None:
    """min(T, 256) distinct mixed-rank adapters (one token each up to T = 256, 8 each at 2048), and mixed
    eager steps (decode rows of many adapters beside prefill chunks)."""
    in_features, outs = LAYERS[layer]
    dtype = torch.bfloat16
    case = make_case(pattern, num_tokens, in_features, outs, dtype, seed=num_tokens)
    _run_all(case, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("pattern", "num_tokens"), [("uniform", 2048), ("zipf", 300), ("spread256", 256)])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_gpu_tiled_llama_sizes(layer: str, pattern: str, num_tokens: int) -> None:
    """The tiled kernels: prefill batches (their default: 512 and ~40 tokens per segment) and, forced,
    a decode batch."""
    in_features, outs = LAYERS[layer]
    dtype = torch.bfloat16
    case = make_case(pattern, num_tokens, in_features, outs, dtype, seed=num_tokens)
    _run_all(case, dtype, *_tiled_configs(case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer", ["qkv_llama3_8b", "down_llama2_7b"])
def test_gpu_direct_launch_matches_jit_entry(layer: str) -> None:
    """The direct launcher (a variant's second call) computes what Triton's entry point does (to rounding:
    split-K atomics sum in any order), and keys variants apart (a misaligned x is another variant)."""
    in_features, outs = LAYERS[layer]
    dtype = torch.bfloat16
    case = make_case("mixed_step", 600, in_features, outs, dtype, seed=21)
    y_ref = case.y.clone()
    lora_apply(y_ref, case.x, case.a, case.b, case.meta)
    for fast in (False, True, True):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(triton_lora, "FAST_LAUNCH", fast)
            y = case.y.clone()
            lora_apply_triton(y, case.x, case.a, case.b, case.meta)
            _check_y(y, y_ref, case, case.y, dtype)
    # x one element in: not 16-byte aligned, so neither the same key nor the same variant.
    x_off = torch.empty(case.x.numel() + 1, dtype=dtype, device=DEVICE)[1:].view_as(case.x)
    x_off.copy_(case.x)
    y = case.y.clone()
    lora_apply_triton(y, x_off, case.a, case.b, case.meta)
    lora_apply_triton(y, x_off, case.a, case.b, case.meta)
    lora_apply(y_ref, case.x, case.a, case.b, case.meta)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2 * atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("configs", ["default", *DECODE_CONFIGS])
@pytest.mark.parametrize("num_tokens", [64, 256])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_gpu_decode_graph_sizes(layer: str, num_tokens: int, configs: str) -> None:
    """Decode batches as the engine's CUDA graphs see them (N_cap = T, max_rank 64) at Llama sizes."""
    in_features, outs = LAYERS[layer]
    dtype = torch.bfloat16
    case = _decode_case(num_tokens, in_features, outs, 64, dtype)
    _run_all(case, dtype, *DECODE_CONFIGS.get(configs, (None, None)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_gpu_padded_graph_metadata(dtype: torch.dtype) -> None:
    """CUDA-graph style metadata (capacity 256, max_rank 128) at a real qkv shape, every dtype."""
    case = make_case("padded", 200, 4096, [4096, 1024, 1024], dtype, seed=3, pad_to=256, fixed_max_rank=128)
    _run_all(case, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_replay() -> None:
    """Capture lora_apply_triton once, then replay with different segments copied into the same tensors."""
    dtype = torch.bfloat16
    cap, num_tokens, max_rank = 64, 48, 128
    # "distinct": 48 adapters of rank >= 4, so the pool has more than max_rank rows.
    first = make_case(
        "distinct", num_tokens, 4096, [4096, 1024, 1024], dtype, seed=11, pad_to=cap, fixed_max_rank=max_rank
    )
    meta, x, a, b = first.meta, first.x, first.a, first.b
    y = first.y.clone()
    lora_apply_triton(y, x, a, b, meta)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_apply_triton(y, x, a, b, meta)
    for seed in (12, 13):
        step = make_case("base_mixed", num_tokens, 4096, [4096, 1024, 1024], dtype, seed=seed)
        # Same pool as the capture: map the new step's rows into it.
        segs = [(s, e, r % (a.shape[0] - max_rank), k) for s, e, r, k in step.meta.segments]
        step_meta = LoRASegments.build(segs, num_tokens, device=DEVICE)
        step_meta.max_rank = max_rank
        for name in ("seg_start", "seg_len", "seg_row", "seg_rank"):
            src = getattr(step_meta, name)
            dst = getattr(meta, name)
            dst.zero_()
            dst[: src.numel()].copy_(src)
        x.copy_(step.x)
        y.copy_(step.y)
        graph.replay()
        y_ref = step.y.clone()
        lora_apply(y_ref, x, a, b, step_meta)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
