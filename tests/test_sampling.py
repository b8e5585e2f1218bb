"""Tests for loraserve.sampling: parameter validation and the batched sampler."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from loraserve.sampling import Sampler, SampleRow, SamplingParams, _penalize


def rows_for(params: list[SamplingParams], **kw: object) -> list[SampleRow]:
    return [SampleRow(params=p, prompt_ids=[], output_ids=[], **kw) for p in params]  # type: ignore[arg-type]


def seeded(p: SamplingParams, seed: int) -> SampleRow:
    return SampleRow(params=p, prompt_ids=[], output_ids=[], generator=torch.Generator().manual_seed(seed))


def chi2_threshold(dof: int, z: float = 3.29) -> float:
    """Upper chi-square quantile (z=3.29: p ~ 5e-4) by the Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(tokens: list[int], probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of observed token counts against ``probs`` (zero-prob tokens excluded)."""
    n = len(tokens)
    counts = Counter(tokens)
    support = [t for t in range(len(probs)) if probs[t] > 0]
    assert set(counts) <= set(support), "sampled a token of probability 0"
    stat = sum((counts.get(t, 0) - n * float(probs[t])) ** 2 / (n * float(probs[t])) for t in support)
    return stat, len(support) - 1


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.1),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [-3]),
        ("logprobs", -1),
        ("prompt_logprobs", 1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
    ],
)
def test_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_min_tokens_above_max_tokens_rejected() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    SamplingParams(max_tokens=None, min_tokens=100)


def test_normalisation_and_defaults() -> None:
    p = SamplingParams(stop="###", top_k=-1, temperature=0)
    assert p.stop == ["###"] and p.stop_list == ["###"]
    assert p.stop_token_ids == []
    assert p.greedy
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams().stop == [] and not SamplingParams().greedy


# ---------------------------------------------------------------- greedy and filters


def logits_with_ties(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 3
    # Duplicate each row's maximum at a higher and a lower index: argmax must take the lowest.
    for i in range(batch):
        m = int(x[i].argmax())
        x[i, (m + 7) % vocab] = x[i, m]
        x[i, (m * 3 + 1) % vocab] = x[i, m]
    return x


def test_greedy_is_argmax_with_ties() -> None:
    x = logits_with_ties(16, 500, seed=0)
    res = Sampler()(x, rows_for([SamplingParams(temperature=0)] * 16))
    assert [r.token_id for r in res] == x.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=0.8, top_p=1e-7),
        SamplingParams(temperature=2.0, top_k=5, top_p=1e-7),
        SamplingParams(temperature=1.0, min_p=1.0),
    ],
    ids=["top_k=1", "top_p tiny", "top_k+top_p", "min_p=1"],
)
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    x = logits_with_ties(16, 300, seed=1)
    if params.min_p == 1.0:
        # min_p keeps every token tied with the maximum; without ties it is exactly greedy.
        x = torch.randn(16, 300, generator=torch.Generator().manual_seed(2))
    rows = rows_for([params] * 8) + [seeded(params, s) for s in range(8)]
    res = Sampler()(x, rows)
    assert [r.token_id for r in res] == x.argmax(dim=-1).tolist()


def test_input_logits_not_modified() -> None:
    x = torch.randn(3, 50)
    before = x.clone()
    p = SamplingParams(temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.5, frequency_penalty=1.0)
    rows = [SampleRow(params=p, prompt_ids=[1, 2], output_ids=[3, 3]) for _ in range(3)]
    Sampler()(x, rows)
    assert torch.equal(x, before)


# ---------------------------------------------------------------- randomness


def test_seeded_reproducible_and_batch_independent() -> None:
    vocab = 200
    g = torch.Generator().manual_seed(5)
    target = torch.randn(vocab, generator=g)
    others = torch.randn(6, vocab, generator=g)
    p = SamplingParams(temperature=1.5, seed=1234)

    def run(batch_of: int, position: int, other_params: list[SamplingParams]) -> list[int]:
        gen = torch.Generator().manual_seed(1234)
        out = []
        for _ in range(30):
            rows: list[SampleRow] = []
            logits = []
            for j in range(batch_of):
                if j == position:
                    rows.append(SampleRow(params=p, prompt_ids=[], output_ids=[], generator=gen))
                    logits.append(target)
                else:
                    k = j % len(other_params)
                    other_gen = torch.Generator().manual_seed(99 + j) if k % 2 else None
                    rows.append(SampleRow(other_params[k], [], [], other_gen))
                    logits.append(others[j % len(others)])
            res = Sampler()(torch.stack(logits), rows)
            out.append(res[position].token_id)
        return out

    alone = run(1, 0, [p])
    mixed = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=4, min_p=0.1),
        SamplingParams(temperature=1.2, frequency_penalty=0.5),
    ]
    assert run(1, 0, [p]) == alone
    assert run(5, 2, mixed) == alone
    assert run(7, 6, mixed[1:]) == alone
    assert len(set(alone)) > 5, "temperature 1.5 over 200 tokens should not repeat this much"


def test_unseeded_rows_follow_global_rng() -> None:
    x = torch.randn(4, 100).repeat(8, 1)
    rows = rows_for([SamplingParams(temperature=1.0)] * 32)
    torch.manual_seed(7)
    a = [r.token_id for r in Sampler()(x, rows)]
    torch.manual_seed(7)
    b = [r.token_id for r in Sampler()(x, rows)]
    assert a == b


def sample_many(logits: torch.Tensor, p: SamplingParams, n: int, per_row_generators: bool) -> list[int]:
    """Draw ``n`` tokens for one logits row, vectorised as ``n`` identical rows."""
    x = logits.unsqueeze(0).expand(n, -1)
    if per_row_generators:
        rows = [seeded(p, 1000 + i) for i in range(n)]
    else:
        torch.manual_seed(0)
        rows = rows_for([p] * n)
    return [r.token_id for r in Sampler()(x, rows)]


def expected_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Reference target distribution, computed per token without sorting tricks."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda t: -float(probs[t]))
    keep = order[:top_k] if top_k > 0 else order
    kept_mass = sum(float(probs[t]) for t in keep)
    nucleus, mass = [], 0.0
    for t in keep:
        if mass >= top_p * kept_mass:
            break
        nucleus.append(t)
        mass += float(probs[t])
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus]
    return out / out.sum()


@pytest.mark.parametrize("per_row_generators", [False, True], ids=["global-rng", "per-row-generators"])
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 4, 1.0), (1.0, 0, 0.7), (1.3, 6, 0.8)],
)
def test_sample_frequencies_match_distribution(
    temperature: float, top_k: int, top_p: float, per_row_generators: bool
) -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -1.5, -3.0])
    n = 3000 if per_row_generators else 8000
    tokens = sample_many(
        logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), n, per_row_generators
    )
    stat, dof = chi2_stat(tokens, expected_probs(logits, temperature, top_k, top_p))
    assert stat < chi2_threshold(dof), (stat, dof)


def test_min_p_filters_and_keeps_proportions() -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.09, 0.06, 0.05])
    logits = probs.log()
    min_p = 0.3  # threshold 0.12: keeps tokens 0, 1, 2
    tokens = sample_many(logits, SamplingParams(temperature=1.0, min_p=min_p), 8000, False)
    allowed = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    stat, dof = chi2_stat(tokens, allowed / allowed.sum())
    assert dof == 2
    assert stat < chi2_threshold(dof), stat


# ---------------------------------------------------------------- penalties and min_tokens


def ref_penalize(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """Straightforward per-token reference for the penalties and min_tokens masking."""
    p = row.params
    x = logits.clone().double()
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt_ids) | set(row.output_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(row.output_ids).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    if len(row.output_ids) < p.min_tokens:
        for t in row.eos_token_ids | set(p.stop_token_ids or []):
            x[t] = float("-inf")
    return x.float()


def random_penalty_rows(vocab: int, count: int, seed: int) -> list[SampleRow]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    def pick(options: list[float]) -> float:
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    rows = []
    for _ in range(count):
        p = SamplingParams(
            temperature=0,
            repetition_penalty=pick([1.0, 1.3, 0.8, 2.0]),
            frequency_penalty=pick([0.0, 0.5, -0.7, 2.0]),
            presence_penalty=pick([0.0, 1.0, -1.5]),
            min_tokens=pick([0, 0, 5]),  # type: ignore[arg-type]
            stop_token_ids=[int(t) for t in ids(2)],
        )
        rows.append(
            SampleRow(
                params=p,
                prompt_ids=ids(int(torch.randint(0, 30, (1,), generator=g))),
                output_ids=ids(int(torch.randint(0, 12, (1,), generator=g))),
                eos_token_ids=frozenset({2}),
            )
        )
    return rows


def test_penalties_match_reference() -> None:
    vocab = 40
    rows = random_penalty_rows(vocab, 64, seed=3)
    x = torch.randn(64, vocab, generator=torch.Generator().manual_seed(4)) * 2
    got = _penalize(x, rows)
    want = torch.stack([ref_penalize(x[i], r) for i, r in enumerate(rows)])
    assert torch.allclose(got, want, atol=1e-5)
    # End to end: greedy picks the reference argmax; logprobs stay the raw ones.
    res = Sampler()(x, rows)
    assert [r.token_id for r in res] == want.argmax(dim=-1).tolist()
    raw = torch.log_softmax(x, dim=-1)
    assert [r.logprob for r in res] == pytest.approx(
        [float(raw[i, r.token_id]) for i, r in enumerate(res)], abs=1e-6
    )


def test_penalties_change_choice() -> None:
    x = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    plain = SamplingParams(temperature=0)
    assert Sampler()(x, [SampleRow(plain, [], [0])])[0].token_id == 0
    for p in [
        SamplingParams(temperature=0, repetition_penalty=1.2),
        SamplingParams(temperature=0, frequency_penalty=0.2),
        SamplingParams(temperature=0, presence_penalty=0.2),
    ]:
        assert Sampler()(x, [SampleRow(p, [], [0])])[0].token_id == 1
    # Repetition penalty covers the prompt; frequency/presence penalties do not.
    assert (
        Sampler()(x, [SampleRow(SamplingParams(temperature=0, repetition_penalty=1.2), [0], [])])[0].token_id
        == 1
    )
    assert (
        Sampler()(x, [SampleRow(SamplingParams(temperature=0, presence_penalty=1.0), [0], [])])[0].token_id
        == 0
    )


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    vocab = 30
    x = torch.zeros(1, vocab)
    x[0, 2] = 20.0  # eos
    x[0, 7] = 19.0  # stop token id
    x[0, 11] = 5.0
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    eos = frozenset({2})
    sampler = Sampler()
    assert sampler(x, [SampleRow(p, [1], [5, 5], None, eos)])[0].token_id == 11
    assert sampler(x, [SampleRow(p, [1], [5, 5, 5], None, eos)])[0].token_id == 2
    # Sampled rows never draw a masked token even though it holds nearly all the mass.
    sampled = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[7])
    torch.manual_seed(0)
    rows = [SampleRow(sampled, [], [4], None, eos) for _ in range(2000)]
    drawn = {r.token_id for r in sampler(x.expand(2000, -1), rows)}
    assert not drawn & {2, 7}


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_sorted() -> None:
    vocab = 64
    x = torch.randn(5, vocab, generator=torch.Generator().manual_seed(8)) * 2
    params = [
        SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5, top_k=10),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=None),
        SamplingParams(temperature=2.0, logprobs=3, top_p=0.5),
        SamplingParams(temperature=0, logprobs=vocab + 5),
    ]
    rows = [SampleRow(p, [1, 2, 3], [4, 4]) for p in params]
    torch.manual_seed(1)
    res = Sampler()(x, rows)
    raw = torch.log_softmax(x, dim=-1)
    for i, (p, r) in enumerate(zip(params, res, strict=True)):
        assert r.logprob == pytest.approx(float(raw[i, r.token_id]), abs=1e-6)
        if p.logprobs is None:
            assert r.top_logprobs is None
            continue
        assert r.top_logprobs is not None
        k = min(p.logprobs, vocab)
        expect_ids = raw[i].argsort(descending=True)[:k].tolist()
        items = list(r.top_logprobs.items())
        assert [t for t, _ in items[:k]] == expect_ids
        values = [v for _, v in items]
        assert values == sorted(values, reverse=True)
        for t, v in items:
            assert v == pytest.approx(float(raw[i, t]), abs=1e-6)
        assert r.token_id in r.top_logprobs
        assert len(items) == k + (r.token_id not in expect_ids)
