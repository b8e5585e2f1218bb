"""Tests for loraserve.detokenize: incremental detokenization, stop strings and streaming."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from loraserve.detokenize import IncrementalDetokenizer, OutputText, find_stop, stop_holdback
from loraserve.sampling import SamplingParams

WORDS = [
    "hello", "world", "héllo", "wörld", "日本語", "🙂", "naïve", "café", "Ωmega", "the", "a", "of",
    "ok", "—", "数据", "テスト", "Привет", "𝔘𝔫𝔦", "e\u0301", "👩‍💻", ",", ".", "\n", "  ",
]  # fmt: skip
CORPUS = [" ".join(random.Random(i).choices(WORDS[:14], k=12)) for i in range(200)]


def _fast(tok: Any, **kw: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tokenizer of ``make_tiny_model`` checkpoints: byte-level, one token per byte."""
    from transformers import AutoTokenizer

    # The tokenizer writer alone: building the tiny model as well costs seconds per test run.
    from loraserve.testing import _tiny_tokenizer

    path: Path = tmp_path_factory.mktemp("tiny")
    _tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bpe_tok() -> Any:
    """GPT-2 style byte-level BPE with trained merges (tokens hold partial UTF-8 characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _fast(tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Llama-style SentencePiece BPE: "▁" word prefixes, byte fallback, leading-space strip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trained.train_from_iterator(CORPUS, trainer)
    out = tmp_path_factory.mktemp("sp")
    trained.model.save(str(out))
    vocab, merges = models.BPE.read_file(str(out / "vocab.json"), str(out / "merges.txt"))
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", " ", "\n"]) for _ in range(n))


def stream(tok: Any, prompt: list[int], output: list[int], skip: bool = True) -> tuple[list[str], str]:
    """Feed ``output`` one token at a time; return the deltas (the flush last) and the final text."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(t) for t in output]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


# ---------------------------------------------------------------- IncrementalDetokenizer


@pytest.mark.parametrize("name", ["tiny_tok", "bpe_tok"])
def test_byte_level_random_ids_match_full_decode(name: str, request: pytest.FixtureRequest) -> None:
    """Arbitrary id sequences (broken UTF-8, special tokens included) decode like decode(all)."""
    tok = request.getfixturevalue(name)
    rng = random.Random(0)
    vocab = len(tok)
    for trial in range(150):
        prompt = tok.encode(random_text(rng, rng.randint(0, 4)))
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        skip = trial % 3 != 0
        _, text = stream(tok, prompt, output, skip=skip)
        assert text == tok.decode(output, skip_special_tokens=skip)


@pytest.mark.parametrize("name", ["tiny_tok", "bpe_tok", "sp_tok"])
def test_streaming_valid_text(name: str, request: pytest.FixtureRequest) -> None:
    """Token sequences of real text: every delta is clean and text is emitted as soon as complete."""
    tok = request.getfixturevalue(name)
    rng = random.Random(1)
    specials = [tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens]
    for _ in range(60):
        prompt_text = random_text(rng, rng.randint(0, 4))
        full = tok.encode(prompt_text + " " + random_text(rng, rng.randint(1, 10)), add_special_tokens=False)
        prompt = tok.encode(prompt_text, add_special_tokens=False)
        if full[: len(prompt)] != prompt:  # the boundary merged across; not a continuation split
            continue
        output = full[len(prompt) :]
        for _ in range(rng.randint(0, 3)):  # skipped special tokens anywhere
            output.insert(rng.randrange(len(output) + 1), rng.choice(specials))
        prompt_text_dec = tok.decode(prompt, skip_special_tokens=True)
        expect = tok.decode(prompt + output, skip_special_tokens=True)[len(prompt_text_dec) :]
        assert "\ufffd" not in expect

        detok = IncrementalDetokenizer(tok, prompt)
        for i, t in enumerate(output, 1):
            delta = detok.add(t)
            assert "\ufffd" not in delta
            # Never emits what a later token changes; emits all text once it decodes cleanly
            # (a byte-fallback decode of an unfinished byte run is lossy as a whole, hence the
            # check on the whole string rather than on its end).
            assert expect.startswith(detok.text)
            so_far = tok.decode(prompt + output[:i], skip_special_tokens=True)[len(prompt_text_dec) :]
            if "\ufffd" not in so_far:
                assert detok.text == so_far
        assert detok.flush() == ""
        assert detok.text == expect
        if not prompt:
            assert expect == tok.decode(output, skip_special_tokens=True)


def test_sentencepiece_keeps_leading_space_of_continuation(sp_tok: Any) -> None:
    prompt = sp_tok.encode("hello", add_special_tokens=False)
    output = sp_tok.encode("hello world", add_special_tokens=False)[len(prompt) :]
    assert sp_tok.convert_ids_to_tokens(output)[0].startswith("▁")
    deltas, text = stream(sp_tok, prompt, output)
    assert text == " world" and deltas[0].startswith(" ")
    # Without a prompt the first token starts the text, as in a plain decode.
    assert stream(sp_tok, [], output)[1] == "world"


def test_multibyte_char_across_byte_tokens(tiny_tok: Any) -> None:
    ids = tiny_tok.encode("a🙂b", add_special_tokens=False)
    assert len(ids) == 6  # one token per byte
    deltas, text = stream(tiny_tok, [], ids)
    assert deltas == ["a", "", "", "", "🙂", "b", ""]
    # An incomplete character at the end is released by flush() as U+FFFD, like decode().
    deltas, text = stream(tiny_tok, [], ids[:3])
    assert deltas == ["a", "", "", "\ufffd"] and text == tiny_tok.decode(ids[:3])


# ---------------------------------------------------------------- stop strings


def ref_stop(text: str, stops: list[str], include: bool) -> tuple[int, str] | None:
    """Character-at-a-time reference: the first end position where any stop completes."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (end if include else end - len(stop)), stop
    return None


def test_find_stop_basic() -> None:
    text = "hello world"
    assert find_stop(text, 5, ["wor"], False) == (6, "wor")
    assert find_stop(text, 5, ["wor"], True) == (9, "wor")
    assert find_stop(text, 3, ["o wor"], False) == (4, "o wor")  # spans old and new text
    assert find_stop(text, 3, ["hello"], False) is None  # ended before the new text
    assert find_stop(text, 5, ["xyz"], False) is None
    # First end wins; among stops ending there, the longest.
    assert find_stop("abcd", 4, ["abcd", "bc"], False) == (1, "bc")
    assert find_stop("abcd", 4, ["cd", "bcd"], False) == (1, "bcd")


def test_find_stop_chunked_matches_char_reference() -> None:
    rng = random.Random(2)
    for _ in range(500):
        text = "".join(rng.choice("abcé日") for _ in range(rng.randint(0, 25)))
        stops = [
            "".join(rng.choice("abcé日") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        include = rng.random() < 0.5
        seen, got = 0, None
        while seen < len(text) and got is None:
            step = rng.randint(1, 5)
            seen = min(len(text), seen + step)
            got = find_stop(text[:seen], step if seen < len(text) else step, stops, include)
        assert got == ref_stop(text, stops, include), (text, stops)


def test_stop_holdback() -> None:
    assert stop_holdback("hello wo", ["world"]) == 2
    assert stop_holdback("hello w", ["xyz", "wor", "lo wx"]) == 4
    assert stop_holdback("abc", ["abc"]) == 0  # a full match is find_stop's business
    assert stop_holdback("", ["abc"]) == 0
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(2)]
        want = max(
            (k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])),
            default=0,
        )
        assert stop_holdback(text, stops) == want


# ---------------------------------------------------------------- OutputText


def run_output(tok: Any, text: str, params: SamplingParams) -> tuple[OutputText, list[str], str | None]:
    """Generate ``text`` token by token; returns the tracker, streamed deltas and the stop hit."""
    out = OutputText(tok, [], params)
    streamed, hit = [], None
    for t in tok.encode(text, add_special_tokens=False):
        hit = out.add(t)
        streamed.append(out.take_delta())
        if hit is not None:
            break
    if hit is None:
        hit = out.finish()
        streamed.append(out.take_delta())
    assert "".join(streamed) == out.text
    return out, streamed, hit


def test_output_text_stop_and_holdback(tiny_tok: Any) -> None:
    out, streamed, hit = run_output(tiny_tok, "Hi there STOP more", SamplingParams(stop=["STOP"]))
    assert hit == "STOP" and out.text == "Hi there " and out.finished
    # While "S", "ST", "STO" could still become the stop string, none of it was streamed.
    assert all("S" not in d for d in streamed)
    out, _, hit = run_output(
        tiny_tok, "Hi there STOP more", SamplingParams(stop="STOP", include_stop_str_in_output=True)
    )
    assert out.text == "Hi there STOP"
    # A held-back prefix that does not complete is released.
    out, streamed, hit = run_output(tiny_tok, "a STAR STO", SamplingParams(stop=["STOP"]))
    assert hit is None and out.text == "a STAR STO"
    assert "".join(streamed[:-1]) == "a STAR " and streamed[-1] == "STO"
    # Multi-byte stop strings over byte tokens.
    out, _, hit = run_output(tiny_tok, "x 日本語 y", SamplingParams(stop=["本語"]))
    assert hit == "本語" and out.text == "x 日"


def test_output_text_min_tokens(tiny_tok: Any) -> None:
    out, _, hit = run_output(tiny_tok, "ab!cd!ef", SamplingParams(stop=["!"], min_tokens=4))
    assert hit == "!" and out.text == "ab!cd"


def test_output_text_random_matches_reference(bpe_tok: Any) -> None:
    rng = random.Random(4)
    for _ in range(80):
        text = random_text(rng, rng.randint(1, 8))
        stops = [w for w in rng.sample(WORDS, 2) if w.strip()]
        include = rng.random() < 0.3
        out, _, hit = run_output(
            bpe_tok, text, SamplingParams(stop=stops, include_stop_str_in_output=include)
        )
        full = bpe_tok.decode(bpe_tok.encode(text, add_special_tokens=False))
        ref = ref_stop(full, stops, include)
        assert (out.text, hit) == ((full[: ref[0]], ref[1]) if ref else (full, None))
