"""The engine's host-side fast paths compute exactly what the straightforward versions computed.

Each test checks one shortcut against a plain reference written here the simple way: the step
metadata the runner builds with numpy (ids, positions, KV slots, block tables, LoRA segments), the
decode-graph input buffers, the scheduler's lazy admission order, the block hash, the sampler's
live views of each sequence's tokens, and the engine reporting a non-streaming request once.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from loraserve import LLM, SamplingParams
from loraserve.config import SchedulerConfig
from loraserve.core import OutputIds, SeqStatus, Sequence
from loraserve.engine.cuda_graphs import DecodeGraphs, _Graph
from loraserve.engine.scheduler import ScheduledSeq, Scheduler
from loraserve.kvcache.block_manager import BlockManager, block_hash
from loraserve.lora.adapter import LORA_MODULES, LoRAModuleWeights, LoRAWeights
from loraserve.lora.store import AdapterStore
from loraserve.ops.lora import LoRASegments, max_rank_bucket
from loraserve.sampling import Sampler, SampleRow

VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama config only: the engines here draw random weights (``load_format="dummy"``)."""
    out = tmp_path_factory.mktemp("host") / "tiny"
    out.mkdir()
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def engine(model_dir: Path, **kw) -> LLM:
    return LLM(
        str(model_dir), device="cpu", dtype="float32", load_format="dummy", skip_tokenizer_init=True, **kw
    )


def random_adapter(llm: LLM, name: str, rank: int, seed: int) -> LoRAWeights:
    mcfg = llm.engine.cfg.model
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(mcfg.num_layers):
        for m in LORA_MODULES:
            fin, fout = mcfg.lora_shapes()[m]
            a = torch.randn(rank, fin, generator=gen) * fin**-0.5
            modules[(layer, m)] = LoRAModuleWeights(a=a, b=torch.randn(fout, rank, generator=gen), scale=2.0)
    return LoRAWeights(name=name, path=f"<{name}>", rank=rank, modules=modules, content_hash=f"h{seed}")


# references: the straightforward per-token versions -------------------------------------------
def reference_block_hash(parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.sha256(parent)
    h.update(len(tokens).to_bytes(4, "little"))
    for t in tokens:
        h.update(int(t).to_bytes(4, "little", signed=True))
    return h.digest()


def reference_metadata(batch: list[ScheduledSeq], store: AdapterStore | None, bs: int) -> dict:
    """What a step's forward must receive, built token by token."""
    ids, positions, slots, qlens, seq_lens, logits_idx = [], [], [], [], [], []
    segments: list[tuple[int, int, int, int]] = []
    for item in batch:
        seq = item.seq
        start, end = seq.num_computed, seq.num_computed + item.num_tokens
        t0 = len(ids)
        ids += seq.token_ids[start:end]
        positions += range(start, end)
        slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
        qlens.append(end - start)
        seq_lens.append(end)
        if seq.num_computed + item.num_tokens == seq.num_tokens:
            logits_idx.append(len(ids) - 1)
        if seq.adapter is not None and store is not None:
            row, rank = store.row(seq.adapter), seq.adapter.rank
            if segments and segments[-1][2] == row and segments[-1][1] == t0:
                segments[-1] = (segments[-1][0], len(ids), row, rank)
            else:
                segments.append((t0, len(ids), row, rank))
    width = max(len(item.seq.block_table) for item in batch)
    tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch]
    return dict(
        ids=ids,
        positions=positions,
        slots=slots,
        query_start=np.cumsum([0, *qlens]).tolist(),
        seq_lens=seq_lens,
        tables=tables,
        query_lens=qlens,
        logits_idx=logits_idx,
        segments=segments,
    )


def reference_graph_fill(
    bufs: dict[str, torch.Tensor], size: int, ids, positions, slots, seq_lens, tables, segments
) -> None:
    """The decode graphs' input contract: padding rows get slot -1, length 0 and empty segments."""
    batch, pad = len(ids), size - len(ids)
    bufs["input_ids"][:size] = torch.tensor(list(ids) + [0] * pad)
    bufs["positions"][:size] = torch.tensor(list(positions) + [0] * pad)
    bufs["slots"][:size] = torch.tensor(list(slots) + [-1] * pad)
    bufs["seq_lens"][:size] = torch.tensor(list(seq_lens) + [0] * pad, dtype=torch.int32)
    bufs["block_tables"][:batch, : tables.shape[1]] = torch.from_numpy(tables)
    if segments:
        seg = torch.zeros(4, size, dtype=torch.int32)
        for j, (start, end, row, rank) in enumerate(segments):
            seg[:, j] = torch.tensor([start, end - start, row, rank])
        bufs["segs"][:, :size] = seg


# tests ----------------------------------------------------------------------------------------
def test_block_hash_matches_per_token_hashing():
    rng = random.Random(0)
    for n in (0, 1, 7, 16, 64):
        tokens = [rng.randrange(-(2**31), 2**31) for _ in range(n)]
        parent = rng.randbytes(32)
        want = reference_block_hash(parent, tokens)
        assert block_hash(parent, tokens) == want
        assert block_hash(parent, tuple(tokens)) == want
        assert block_hash(parent, np.array(tokens, dtype=np.int64)) == want


def test_output_ids_view_follows_the_sequence():
    seq = Sequence("r", 0, [5, 6, 7], 2, SamplingParams(), None, None, None)
    view = OutputIds(seq)
    assert len(view) == 1 and list(view) == [7] and view[0] == 7 and view[-1] == 7
    seq.token_ids += [8, 9]
    assert len(view) == 3 and list(view) == [7, 8, 9] and view[1:] == [8, 9] and view.count(9) == 1


def test_runner_metadata_matches_per_token_reference(model_dir):
    """Prefill chunks, decode, prefix hits, preemption and LoRA segments: every step's forward gets
    the inputs the token-by-token construction gives."""
    llm = engine(
        model_dir,
        max_loras=3,
        max_lora_rank=16,
        max_num_seqs=12,
        max_num_batched_tokens=96,
        num_kv_blocks=40,
        block_size=8,
        prefetch_workers=0,
    )
    eng, runner = llm.engine, llm.engine.runner
    store = eng.store
    assert store is not None
    names = [
        store.register_weights(f"a{i}", random_adapter(llm, f"a{i}", (4, 8, 16)[i % 3], i)).name
        for i in range(5)
    ]
    rng = np.random.default_rng(0)
    shared = rng.integers(3, VOCAB, size=40).tolist()
    for i in range(30):
        prompt = (
            shared[: int(rng.integers(8, 40))]
            + rng.integers(3, VOCAB, size=int(rng.integers(1, 30))).tolist()
        )
        lora = None if i % 4 == 0 else names[i % len(names)]
        eng.add_request(
            f"r{i}",
            prompt,
            SamplingParams(temperature=0, max_tokens=int(rng.integers(2, 20))),
            eng.resolve_lora(lora),
        )

    expected: list[dict] = []
    cached: list[int] = []
    real_run, real_model = runner.run, runner.model

    def run(scheduled, st):
        cached.extend(item.seq.num_cached_prompt for item in scheduled)
        expected.append(reference_metadata(runner.order(scheduled, st), st, runner.block_size))
        return real_run(scheduled, st)

    def model(ids, positions, ctx, logits_idx):
        want, attn = expected[-1], ctx.attn
        assert ids.tolist() == want["ids"] and positions.tolist() == want["positions"]
        assert attn.slot_mapping.tolist() == want["slots"] and attn.slot_mapping.dtype == torch.long
        assert attn.query_start.tolist() == want["query_start"] and attn.query_start.dtype == torch.int32
        assert attn.seq_lens.tolist() == want["seq_lens"] and attn.seq_lens.dtype == torch.int32
        assert attn.block_tables.tolist() == want["tables"] and attn.block_tables.dtype == torch.int32
        assert attn.query_lens == want["query_lens"] and attn.seq_lens_host == want["seq_lens"]
        assert logits_idx.tolist() == want["logits_idx"] and logits_idx.dtype == torch.long
        built = LoRASegments.build(want["segments"], len(want["ids"]))
        lora = ctx.lora
        # The runner rounds the step's largest rank up to a power of two (few kernel variants).
        assert (lora.num_tokens, lora.segments, lora.max_rank) == (
            built.num_tokens,
            built.segments,
            max_rank_bucket(built.max_rank),
        )
        for field in ("seg_start", "seg_len", "seg_row", "seg_rank"):
            got, ref = getattr(lora, field), getattr(built, field)
            assert (got is None and ref is None) or (got.tolist() == ref.tolist() and got.dtype == ref.dtype)
        return real_model(ids, positions, ctx, logits_idx)

    runner.run, runner.model = run, model
    while eng.has_unfinished():
        eng.step()
    # The run covered decode-only steps, multi-token chunks, LoRA segments, preemption and prefix hits.
    assert any(len(e["ids"]) == len(e["seq_lens"]) for e in expected)
    assert any(max(e["query_lens"]) > 1 for e in expected)
    assert any(len(e["segments"]) > 1 for e in expected)
    assert eng.scheduler.num_preemptions > 0 and max(cached) > 0


def test_decode_graph_buffers_match_the_contract():
    """``DecodeGraphs.run`` fills exactly what the contract says (checked without CUDA: the graphs
    are stand-ins, the buffers are real), padding rows included, and leaves the rest alone."""
    max_batch, max_blocks = 64, 9
    graphs = DecodeGraphs(None, [], None, None, max_batch, max_blocks, 16, 16, torch.device("cpu"))  # type: ignore[arg-type]
    replayed: list[tuple[int, bool]] = []

    class Replay:
        def __init__(self, key: tuple[int, bool]) -> None:
            self.key = key

        def replay(self) -> None:
            replayed.append(self.key)

    for size in graphs.sizes:
        for with_lora in (False, True):
            graphs.graphs[(size, with_lora)] = _Graph(Replay((size, with_lora)), torch.randn(size, 7))  # type: ignore[arg-type]
    names = ("input_ids", "positions", "slots", "seq_lens", "block_tables", "segs")
    rng = np.random.default_rng(3)
    for batch, nseg in ((1, 0), (5, 2), (33, 0), (33, 5), (64, 64)):
        for name in names:
            getattr(graphs, name).fill_(777)  # garbage a previous step left
        expected = {name: getattr(graphs, name).clone() for name in names}
        ids = rng.integers(0, 1000, size=batch)
        positions = rng.integers(0, 500, size=batch)
        slots = rng.integers(0, 10_000, size=batch)
        seq_lens = positions + 1
        tables = rng.integers(0, 500, size=(batch, int(rng.integers(1, max_blocks + 1)))).astype(np.int32)
        cuts = (
            sorted(rng.choice(np.arange(1, batch), size=nseg - 1, replace=False).tolist()) if nseg > 1 else []
        )
        bounds = [0, *cuts, batch] if nseg else []
        segments = [(a, b, 16 * j, int(rng.integers(1, 17))) for j, (a, b) in enumerate(pairwise(bounds))]
        size = graphs.padded_size(batch)
        assert size is not None
        reference_graph_fill(expected, size, ids, positions, slots, seq_lens, tables, segments)
        logits = graphs.run(ids, positions, slots, seq_lens, tables, segments)
        assert replayed[-1] == (size, bool(segments))
        assert torch.equal(logits, graphs.graphs[(size, bool(segments))].logits[:batch])
        for name in names:
            assert torch.equal(getattr(graphs, name), expected[name]), name


def test_lazy_admission_order_matches_the_regrouping():
    """Due sequences first, then those of adapters already running, then the rest by adapter."""
    bound = 3
    rng = random.Random(5)
    adapters = [None, *(object() for _ in range(6))]
    for affinity in (True, False):
        cfg = SchedulerConfig(max_num_seqs=8, adapter_wait_bound_steps=bound, adapter_affinity=affinity)
        sched = Scheduler(cfg, BlockManager(64, 4), None)
        for _ in range(20):

            def seq(adapter: object) -> Sequence:
                s = Sequence("r", 0, [1, 2], 2, SamplingParams(), adapter, None, None)  # type: ignore[arg-type]
                s.waited_steps = rng.choice([0, 0, 1, bound, bound + 2])
                return s

            sched.running = [seq(rng.choice(adapters)) for _ in range(rng.randrange(4))]
            window = [seq(rng.choice(adapters)) for _ in range(rng.randrange(30))]
            want = list(enumerate(window))
            if affinity:
                active = {s.adapter for s in sched.running}
                due = [(p, s) for p, s in want if s.waited_steps >= bound]
                warm = [(p, s) for p, s in want if s.waited_steps < bound and s.adapter in active]
                groups: dict[object, list] = {}
                for p, s in want:
                    if s.waited_steps < bound and s.adapter not in active:
                        groups.setdefault(s.adapter, []).append((p, s))
                want = due + warm + [x for g in groups.values() for x in g]
            assert list(sched._admission_order(window)) == want


def test_sampler_rows_see_each_step_tokens(model_dir):
    """The rows cached per sequence give the sampler what fresh copies of the token lists would."""
    llm = engine(model_dir, enable_lora=False, max_num_seqs=8, max_num_batched_tokens=64)
    eng = llm.engine
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.4, max_tokens=12),
        SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5, max_tokens=12),
        SamplingParams(temperature=0, min_tokens=6, stop_token_ids=list(range(3, 200)), max_tokens=12),
        SamplingParams(temperature=0.9, seed=4, n=2, repetition_penalty=0.8, max_tokens=10, logprobs=2),
    ]
    rng = np.random.default_rng(1)
    for i, p in enumerate(params * 2):
        eng.add_request(f"r{i}", rng.integers(3, VOCAB, size=int(rng.integers(3, 40))).tolist(), p)
    real = eng.sampler
    checked = 0

    def sampler(logits: torch.Tensor, rows: list[SampleRow]):
        nonlocal checked
        seqs = {id(s.sample_row): s for req in eng.requests.values() for s in req.seqs}
        copies = []
        for row in rows:
            seq = seqs[id(row)]
            assert list(row.prompt_ids) == seq.token_ids[: seq.num_prompt_tokens]
            assert list(row.output_ids) == seq.output_ids and len(row.output_ids) == seq.num_output
            gen = None
            if row.generator is not None:  # the same draw from a copy of the generator's state
                gen = torch.Generator().set_state(row.generator.get_state())
            copies.append(
                SampleRow(row.params, list(row.prompt_ids), list(row.output_ids), gen, row.eos_token_ids)
            )
        want = Sampler()(logits, copies)
        got = real(logits, rows)
        assert [(r.token_id, r.logprob, r.top_logprobs) for r in got] == [
            (r.token_id, r.logprob, r.top_logprobs) for r in want
        ]
        checked += len(rows)
        return got

    eng.sampler = sampler  # type: ignore[assignment]
    while eng.has_unfinished():
        eng.step()
    assert checked > 50


def test_non_streaming_request_is_reported_once_when_all_sequences_finish(model_dir):
    llm = engine(model_dir, enable_lora=False, max_num_seqs=8)
    eng = llm.engine
    # Sampled tokens hit a stop id at different steps, so the two sequences finish apart.
    p = SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=40, stop_token_ids=list(range(0, VOCAB, 9)))
    eng.add_request("quiet", [5, 6, 7, 8], p, stream=False)
    eng.add_request("loud", [5, 6, 7, 8], p, stream=True)
    quiet = eng.requests["quiet"].seqs
    reported: dict[str, list] = {"quiet": [], "loud": []}
    apart = False  # a step ended with one of the quiet request's sequences finished, not both
    while eng.has_unfinished():
        for out in eng.step():
            reported[out.request_id].append(out)
        apart |= sum(s.status is SeqStatus.FINISHED for s in quiet) == 1
    assert apart
    assert len(reported["quiet"]) == 1 and reported["quiet"][0].finished
    assert all(c.finish_reason is not None for c in reported["quiet"][0].outputs)
    assert len(reported["loud"]) > 1 and reported["loud"][-1].finished


def test_step_stats_split_host_launch_from_the_wait(model_dir):
    """Each step records its shape and its host time: until the forward was launched, then until the
    sampled tokens arrived (on the CPU the forward runs inside the launch part)."""
    llm = engine(model_dir, enable_lora=False, max_num_seqs=8)
    eng = llm.engine
    eng.add_request("r", list(range(5, 40)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    shapes = []
    while eng.has_unfinished():
        start = time.perf_counter()
        eng.step()
        wall = time.perf_counter() - start
        st = eng.last_step
        shapes.append((st.num_seqs, st.num_tokens))
        assert st.launch_seconds > 0 and st.wait_seconds > 0
        assert st.launch_seconds + st.wait_seconds <= wall
    assert shapes == [(1, 35), (1, 1), (1, 1)]
