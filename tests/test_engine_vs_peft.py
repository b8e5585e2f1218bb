"""End to end against transformers + peft: mixed-adapter batches give the same greedy tokens and logprobs."""

from __future__ import annotations

import random

import pytest

from loraserve import LLM, LoRARequest, SamplingParams
from tests.reference import peft_greedy

LOGPROB_TOL = 1e-4
MAX_NEW = 10


def make_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 250) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def mixed_loras(n: int) -> list[str | None]:
    cycle = [None, "a8", "rs4", "qv16", "mlp2", "a8", None, "qv16", "rs4"]
    return [cycle[i % len(cycle)] for i in range(n)]


def build(paths, **kw) -> LLM:
    kw.setdefault("max_loras", 4)
    kw.setdefault("max_lora_rank", 16)
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 512)
    loras = {k: str(v) for k, v in paths.items() if k != "base"}
    return LLM(str(paths["base"]), device="cpu", dtype="float32", loras=loras, **kw)


def check_against_peft(paths, prompts, loras, outputs, max_new=MAX_NEW) -> None:
    for prompt, lora, out in zip(prompts, loras, outputs, strict=True):
        ref_tokens, ref_lps = peft_greedy(paths["base"], paths[lora] if lora else None, prompt, max_new)
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens, f"adapter {lora}: prompt {prompt}"
        got = [lp[t] for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)]
        worst = max(abs(a - b) for a, b in zip(got, ref_lps, strict=True))
        assert worst < LOGPROB_TOL, f"adapter {lora}: logprob diff {worst}"


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "llama3_sharded"])
def test_mixed_batch_matches_peft(family, request):
    paths = request.getfixturevalue(family)
    llm = build(paths)
    prompts = make_prompts(10, seed=1)
    names = [k for k in paths if k != "base"]
    loras = [None if n is None or n not in names else n for n in mixed_loras(len(prompts))]
    if family == "llama3_sharded":
        loras = [None if i % 2 else "a8" for i in range(len(prompts))]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    check_against_peft(paths, prompts, loras, outs)


def test_requests_arriving_at_different_steps(llama):
    llm = build(llama)
    engine = llm.engine
    prompts = make_prompts(9, seed=2)
    loras = mixed_loras(9)
    done = {}
    for i, (p, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(str(i), p, GREEDY, engine.resolve_lora(lora))
        for _ in range(i % 3 + 1):  # a few steps between arrivals: new requests join a running batch
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    check_against_peft(llama, prompts, loras, [done[str(i)] for i in range(9)])


def test_prefix_cache_hits_give_same_outputs(llama):
    llm = build(llama)
    shared = make_prompts(1, seed=3, lo=20, hi=21)[0]
    prompts = [shared + tail for tail in make_prompts(8, seed=4, lo=1, hi=6)]
    loras = mixed_loras(8)
    first = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    second = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    assert all(o.num_cached_tokens >= 16 for o in second), [o.num_cached_tokens for o in second]
    check_against_peft(llama, prompts, loras, first)
    check_against_peft(llama, prompts, loras, second)
    # After a reset nothing is reused, and the outputs are unchanged.
    assert llm.reset_prefix_cache() > 0
    third = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    assert all(o.num_cached_tokens == 0 for o in third), [o.num_cached_tokens for o in third]
    assert [o.outputs[0].token_ids for o in third] == [o.outputs[0].token_ids for o in first]


def test_chunked_prefill_and_preemption(llama):
    # 24 blocks of 4 tokens cannot hold 8 sequences of ~40 tokens: the scheduler must preempt.
    llm = build(llama, num_kv_blocks=24, max_num_batched_tokens=16)
    prompts = make_prompts(8, seed=5, lo=20, hi=30)
    loras = mixed_loras(8)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    assert llm.engine.scheduler.num_preemptions > 0
    check_against_peft(llama, prompts, loras, outs)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_base_rows_beside_a_full_adapter_pool(llama):
    """Every device slot taken by adapters must not leak an adapter into base-model rows."""
    llm = build(llama, max_loras=1, max_lora_rank=16)  # 16 rank rows: a8 + rs4 + mlp2 take 14
    prompts = make_prompts(8, seed=6)
    loras = ["a8", None, "rs4", None, "mlp2", None, "a8", None]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    check_against_peft(llama, prompts, loras, outs)


def test_more_adapters_than_device_slots(llama):
    """Four adapters over a pool that holds two at a time: requests wait, swap, and stay correct."""
    llm = build(llama, max_loras=1, max_lora_rank=16)
    prompts = make_prompts(8, seed=7)
    loras = mixed_loras(8)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False
    )
    check_against_peft(llama, prompts, loras, outs)
    assert llm.engine.store.stats.device_evictions > 0


def test_lora_request_forms(llama):
    llm = build(llama)
    prompt = make_prompts(1, seed=8)[0]
    by_name = llm.generate({"prompt_token_ids": prompt}, GREEDY, lora_request="a8", use_tqdm=False)
    by_request = llm.generate(
        [prompt], GREEDY, lora_request=LoRARequest("a8", 1, str(llama["a8"])), use_tqdm=False
    )
    by_path = llm.generate([prompt], GREEDY, lora_request=str(llama["rs4"]), use_tqdm=False)
    assert by_name[0].outputs[0].token_ids == by_request[0].outputs[0].token_ids
    check_against_peft(llama, [prompt], ["a8"], by_name)
    check_against_peft(llama, [prompt], ["rs4"], by_path)


def test_prefix_cache_isolation_between_adapters(llama, tiny_root):
    """One prompt under X, Y and the base model, then X re-registered with other weights."""
    from loraserve.testing import make_peft_adapter

    llm = build(llama)
    prompt = make_prompts(1, seed=9, lo=30, hi=31)[0]
    paths = dict(llama)
    llm.add_lora("X", paths["a8"])
    llm.add_lora("Y", paths["rs4"])
    for _ in range(2):  # the second round is served from the prefix cache
        for name, ref in (("X", "a8"), ("Y", "rs4"), (None, None)):
            out = llm.generate([prompt], GREEDY, lora_request=name, use_tqdm=False)
            check_against_peft(paths, [prompt], [ref], out)
    llm.remove_lora("X")
    other = make_peft_adapter(paths["base"], tiny_root / "llama-X-v2", r=8, lora_alpha=16, seed=99)
    llm.add_lora("X", other)
    paths["X2"] = other
    out = llm.generate([prompt], GREEDY, lora_request="X", use_tqdm=False)
    assert out[0].num_cached_tokens == 0  # new weights: no KV of the old X may be reused
    check_against_peft(paths, [prompt], ["X2"], out)


def test_adapter_registered_from_tensors(llama):
    """``register_weights`` (adapters built in memory, as the GPU benchmarks do) serves like a path."""
    from loraserve.lora.adapter import load_adapter

    llm = build(llama)
    store = llm.engine.store
    weights = load_adapter(llama["rs4"], store.spec, 16, name="mem")
    entry = store.register_weights("mem", weights)
    assert entry.content_hash == store.get("rs4").content_hash and entry.tier(store) == "cpu"
    prompt = make_prompts(1, seed=10)[0]
    out = llm.generate([prompt], GREEDY, lora_request="mem", use_tqdm=False)
    check_against_peft(llama, [prompt], ["rs4"], out)
