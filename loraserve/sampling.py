"""Sampling parameters and the batched token sampler.

The engine runs :class:`Sampler` once per step on the last-position logits of every sequence in
the batch. Per step the sampler does one pass of batched tensor work (penalties, temperature,
top-k/top-p, min-p, an exponential race for the draw) and exactly one device-to-host transfer (the
packed results), so it works unchanged on CPU and CUDA logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Temperatures below this are treated as greedy: dividing logits by such a value would overflow
# float32 for ordinary logit magnitudes, and the distribution is a point mass anyway (vLLM does the
# same).
GREEDY_TEMPERATURE_EPS = 1e-5


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to sample one request's completion (vLLM-compatible field names and meanings).

    Construction validates every field and raises ``ValueError`` naming the field. ``stop`` is
    normalised to a list of strings and ``stop_token_ids`` to a list of ints.

    Fields:
        n: number of completions per prompt (the engine forks sequences; the sampler sees rows).
        temperature: logits are divided by it; ``0`` (or below 1e-5) means greedy argmax.
        top_p: nucleus sampling mass in (0, 1]; 1 = off.
        top_k: keep the k most likely tokens; 0 or -1 = off.
        min_p: drop tokens whose probability is below ``min_p`` times the top probability; 0 = off.
        seed: per-request seed; the engine builds a ``torch.Generator`` from it so that the request's
            samples do not depend on what else is in the batch. None = global RNG.
        max_tokens: maximum generated tokens; None = until the context window is full.
        min_tokens: EOS and ``stop_token_ids`` are masked, and stop strings are not checked, until
            this many tokens have been generated.
        stop: strings that end generation; the returned text is cut before the match (or after it
            with ``include_stop_str_in_output``).
        stop_token_ids: token ids that end generation, like EOS.
        ignore_eos: keep generating after EOS (EOS is still sampleable, it just does not stop).
        logprobs: number of top raw logprobs returned per generated token (plus the chosen one);
            0 = only the chosen token's; None = no logprobs.
        prompt_logprobs: not supported; must be None (the engine does not compute logits for
            prompt positions).
        presence_penalty, frequency_penalty: OpenAI penalties in [-2, 2] over the generated tokens.
        repetition_penalty: HF/vLLM multiplicative penalty (> 0, 1 = off) over prompt + output.
        skip_special_tokens: omit special tokens from the detokenized text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.stop is None:
            stops: list[str] = []
        elif isinstance(self.stop, str):
            stops = [self.stop]
        else:
            stops = list(self.stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = stops
        ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}"
            )
        self.stop_token_ids = ids
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")
        if self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported; it must be None")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    @property
    def stop_list(self) -> list[str]:
        """``stop`` as a list (it is normalised at construction; this property is typed so)."""
        return self.stop if isinstance(self.stop, list) else []

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0 or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS


@dataclass
class SampleRow:
    """One sequence in a sampling step.

    ``generator`` is the request's own RNG (built by the engine from ``params.seed``, on the
    logits' device) or None for the global RNG. ``eos_token_ids`` are masked together with
    ``params.stop_token_ids`` while ``len(output_ids) < params.min_tokens``.
    """

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class SampleResult:
    """The sampled token of one row.

    ``logprob`` is the log-softmax of the raw logits (before penalties, temperature and
    filtering) at ``token_id``, as vLLM reports by default. ``top_logprobs`` maps the
    ``params.logprobs`` highest raw-logprob tokens, in descending order, plus the chosen token
    (appended last when not among them) to their raw logprobs; None when ``params.logprobs`` is
    None.
    """

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


def _penalize(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Apply repetition/frequency/presence penalties and min_tokens masking.

    Returns ``logits`` itself when no row needs any of them, else a penalised copy. Token ids are
    gathered into flat index lists on the host and applied with one scatter per kind, so the cost
    is one pass over [B, V] per kind, independent of how many rows use it.
    """
    batch, vocab = logits.shape
    device = logits.device
    rep_rows: list[int] = []
    rep_toks: list[int] = []
    rep_vals = [1.0] * batch
    cnt_rows: list[int] = []
    cnt_toks: list[int] = []
    freq_vals = [0.0] * batch
    pres_vals = [0.0] * batch
    ban_rows: list[int] = []
    ban_toks: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            rep_vals[i] = p.repetition_penalty
            n = len(row.prompt_ids) + len(row.output_ids)
            rep_rows.extend([i] * n)
            rep_toks.extend(row.prompt_ids)
            rep_toks.extend(row.output_ids)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            freq_vals[i] = p.frequency_penalty
            pres_vals[i] = p.presence_penalty
            cnt_rows.extend([i] * len(row.output_ids))
            cnt_toks.extend(row.output_ids)
        if p.min_tokens and len(row.output_ids) < p.min_tokens:
            # Ids beyond the logits' width (e.g. an eos id of a padded vocab) cannot be sampled.
            banned = [t for t in row.eos_token_ids.union(p.stop_token_ids or ()) if t < vocab]
            ban_rows.extend([i] * len(banned))
            ban_toks.extend(banned)
    if not (rep_rows or cnt_rows or ban_rows):
        return logits
    out = logits.clone()

    def idx(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    if rep_rows:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        seen[idx(rep_rows), idx(rep_toks)] = True
        pen = torch.tensor(rep_vals, dtype=out.dtype, device=device).unsqueeze(1)
        penalized = torch.where(out > 0, out / pen, out * pen)
        out = torch.where(seen, penalized, out)
    if cnt_rows:
        counts = torch.zeros(batch, vocab, dtype=out.dtype, device=device)
        counts.index_put_(
            (idx(cnt_rows), idx(cnt_toks)), torch.ones(len(cnt_rows), dtype=out.dtype, device=device), True
        )
        freq = torch.tensor(freq_vals, dtype=out.dtype, device=device).unsqueeze(1)
        pres = torch.tensor(pres_vals, dtype=out.dtype, device=device).unsqueeze(1)
        out = out - freq * counts - pres * (counts > 0).to(out.dtype)
    if ban_rows:
        out[idx(ban_rows), idx(ban_toks)] = float("-inf")
    return out


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask [R, V] ``logits`` to each row's top-k (``top_k[r]`` = V when off) and then top-p.

    The sort is stable so that among equal logits the lowest token id ranks first, which makes
    top_k=1 and a tiny top_p pick exactly ``torch.argmax``. Top-p keeps the smallest prefix of the
    descending order whose mass reaches ``top_p`` (renormalised after top-k, as vLLM does): a
    token is dropped when the mass strictly before it is already >= top_p (``top_p[r]`` > 1 when
    off, so nothing is dropped by rounding).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    drop = rank >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop_orig = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(drop_orig, float("-inf"))


class Sampler:
    """Batched sampler: one call per engine step over all running sequences."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[SampleResult]:
        """Sample one token per row.

        ``logits``: [B, V] (any float dtype, any device) for the last position of each row; it is
        not modified. ``rows[i]`` describes row i. Order of operations: repetition penalty
        (prompt + output tokens), frequency/presence penalties (output tokens), min_tokens masking
        of EOS + stop_token_ids, then for non-greedy rows temperature, top-k, top-p, min-p and the
        draw. Greedy rows return ``argmax`` of the penalised logits (ties: lowest id).

        Draws use the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)`` per token, which
        samples ``p`` exactly and needs no normalisation): a row with a generator draws its V
        exponentials from it alone, so its tokens depend only on its seed, its logits and how many
        tokens it has drawn before, not on the batch. Rows without one share one draw from the
        global RNG of the logits' device.
        """
        batch, vocab = logits.shape
        if batch != len(rows):
            raise ValueError(f"logits has {batch} rows but {len(rows)} sample rows were given")
        device = logits.device
        logits = logits.float()
        # Raw logprobs as logit - logsumexp, evaluated only where needed (the chosen token and
        # the requested top-k), instead of materialising a [B, V] log_softmax.
        lse = torch.logsumexp(logits, dim=-1)
        penalized = _penalize(logits, rows)
        tokens = penalized.argmax(dim=-1)

        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand:
            rand_rows = [rows[i] for i in rand]
            rand_idx = torch.tensor(rand, dtype=torch.long, device=device)
            temps = torch.tensor(
                [r.params.temperature for r in rand_rows], dtype=torch.float32, device=device
            )
            x = penalized.index_select(0, rand_idx) / temps.unsqueeze(1)
            # Only rows that filter are sorted: a full-vocab sort is the costliest op here.
            filt = [j for j, r in enumerate(rand_rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0]
            if filt:
                k = [rand_rows[j].params.top_k for j in filt]
                p = [rand_rows[j].params.top_p for j in filt]
                filt_idx = torch.tensor(filt, dtype=torch.long, device=device)
                top_k = torch.tensor([v if 0 < v < vocab else vocab for v in k], device=device)
                top_p = torch.tensor([v if v < 1.0 else 2.0 for v in p], device=device)
                x[filt_idx] = _top_k_top_p(x.index_select(0, filt_idx), top_k, top_p)
            probs = x.softmax(dim=-1)
            min_p = [r.params.min_p for r in rand_rows]
            if any(m > 0 for m in min_p):
                min_p_t = torch.tensor(min_p, dtype=probs.dtype, device=device).unsqueeze(1)
                thresh = min_p_t * probs.amax(dim=-1, keepdim=True)
                probs = probs.masked_fill(probs < thresh, 0.0)
            noise = torch.empty_like(probs)
            unseeded = [j for j, r in enumerate(rand_rows) if r.generator is None]
            if len(unseeded) == len(rand_rows):
                noise.exponential_()
            else:
                for j, r in enumerate(rand_rows):
                    if r.generator is not None:
                        noise[j].exponential_(generator=r.generator)
                if unseeded:
                    noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_()
            # An exact 0 draw would turn a zero-probability token's 0/0 into NaN, which argmax
            # would pick.
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)
            tokens = tokens.index_copy(0, rand_idx, (probs / noise).argmax(dim=-1))

        chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse
        # Everything goes to the host in one float32 tensor: token ids are exact in float32 up
        # to 2**24, far above any vocabulary size.
        parts = [tokens.to(torch.float32), chosen]
        want_top = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        lp_rows = [i for i in want_top if rows[i].params.logprobs]
        k_max = min(vocab, max((rows[i].params.logprobs or 0 for i in lp_rows), default=0))
        if lp_rows:
            lp_idx = torch.tensor(lp_rows, dtype=torch.long, device=device)
            top_vals, top_ids = logits.index_select(0, lp_idx).topk(k_max, dim=-1)
            top_vals = top_vals - lse.index_select(0, lp_idx).unsqueeze(1)
            parts += [top_ids.to(torch.float32).flatten(), top_vals.flatten()]
        host = torch.cat(parts).tolist()

        # From here on the device is idle until the engine's next step: keep the per-row work lean.
        results = list(map(SampleResult, map(int, host[:batch]), host[batch : 2 * batch]))
        off = 2 * batch
        n_top = len(lp_rows) * k_max
        top_of: dict[int, tuple[list[float], list[float]]] = {}
        for j, i in enumerate(lp_rows):
            ids = host[off + j * k_max : off + (j + 1) * k_max]
            vals = host[off + n_top + j * k_max : off + n_top + (j + 1) * k_max]
            top_of[i] = (ids, vals)
        for i in want_top:
            res = results[i]
            ids, vals = top_of.get(i, ([], []))
            n = rows[i].params.logprobs
            top = {int(t): v for t, v in zip(ids[:n], vals[:n], strict=True)}
            top.setdefault(res.token_id, res.logprob)
            res.top_logprobs = top
        return results
