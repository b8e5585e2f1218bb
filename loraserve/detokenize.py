"""Incremental detokenization and stop strings.

Decoding a growing token list from scratch every step is quadratic, and decoding each new token
alone is wrong: a character can span several byte tokens, and some decoders render a token
differently depending on the token before it (SentencePiece's leading space). The
:class:`IncrementalDetokenizer` decodes a small sliding window instead (vLLM's prefix/read
offsets), emitting text only once the window no longer ends in an incomplete character.

Stop strings are handled on top: :func:`find_stop` looks for a stop string that ends in the newly
added text, and :func:`stop_holdback` says how much of the text's tail must not be streamed yet
because it may turn out to be the start of a stop string. :class:`OutputText` combines the three
for one sequence, which is what the engine needs per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraserve.sampling import SamplingParams

# Prompt tokens decoded as context before the first output token, so that the first output token
# is rendered as a continuation (e.g. keeps its SentencePiece leading space) and characters split
# across the prompt/output boundary are not mangled. vLLM uses the same value.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas.

    ``tokenizer`` is a fast HF tokenizer (``PreTrainedTokenizerFast`` / transformers 5
    ``TokenizersBackend``); its Rust ``backend_tokenizer`` does the decoding, without the
    ``clean_up_tokenization_spaces`` post-processing (which is not incremental; transformers skips it
    for BPE tokenizers anyway). ``prompt_ids`` only provide left context.

    Invariant: the concatenation of all :meth:`add` deltas plus the final :meth:`flush` equals the
    text of the output tokens as a continuation of the prompt, i.e.
    ``decode(prompt + output)[len(decode(prompt)):]`` when the prompt decodes to complete
    characters (SentencePiece output keeps the leading space that a bare ``decode(output)``
    strips). For byte-level BPE that is ``decode(output)`` for any ids, broken UTF-8 included;
    with SentencePiece byte fallback, invalid byte runs can differ from a whole-sequence decode
    (which replaces a whole run once any byte of it is invalid).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip_special = skip_special_tokens
        # The window: self._ids[:self._read] was already emitted (it is the context that
        # self._prefix_text renders); self._ids[self._read:] is still pending. Tokens before the
        # window are dropped, so the window stays a few tokens long.
        self._ids: list[int] = list(prompt_ids[max(0, len(prompt_ids) - PROMPT_CONTEXT_TOKENS) :])
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special)

    def _advance(self, new_text: str) -> str:
        """Emit ``new_text`` past the prefix and slide the window so the emitted tokens become it."""
        delta = new_text[len(self._prefix_text) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated token and return the text it completes (possibly "").

        Text is held back while the window's decode ends in U+FFFD, i.e. in a character whose
        remaining bytes are still to come, so no delta contains a replacement character that the
        final text does not have.
        """
        self._ids.append(token_id)
        new_text = self._decode(self._ids)
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
            return self._advance(new_text)
        return ""

    def flush(self) -> str:
        """Return the held-back text at the end of the sequence (invalid bytes as U+FFFD)."""
        new_text = self._decode(self._ids)
        if len(new_text) > len(self._prefix_text):
            return self._advance(new_text)
        return ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returned deltas)."""
        return self._text


def find_stop(text: str, new_chars: int, stops: Sequence[str], include_stop: bool) -> tuple[int, str] | None:
    """Find a stop string that ends within the last ``new_chars`` characters of ``text``.

    Only the tail that can hold such a match is searched (the text before it was checked on
    earlier steps). When several stop strings match, the one that ends first wins (generation
    would have stopped there had the text arrived a character at a time), and among those the
    longest. Returns ``(keep, stop)``: ``text[:keep]`` is the output text, cut before the match,
    or after it when ``include_stop``; None when no stop string ends in the new text.
    """
    best: tuple[int, int, str] | None = None  # (end, -len, stop)
    for stop in stops:
        start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if start < 0:
            continue
        cand = (start + len(stop), -len(stop), stop)
        if best is None or cand[:2] < best[:2]:
            best = cand
    if best is None:
        return None
    end, neg_len, stop = best
    return (end if include_stop else end + neg_len), stop


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Number of trailing characters of ``text`` that are a proper prefix of some stop string.

    Those characters must not be streamed yet: the next tokens may complete the stop string, and
    then they are cut from the output (vLLM holds them back the same way).
    """
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


class OutputText:
    """The text of one generated sequence: detokenization, stop strings and streaming deltas.

    Per step the engine calls :meth:`add` with the sampled token (for a token that ends the
    sequence as EOS or a ``stop_token_ids`` member, only when its text should appear, which vLLM
    does only with ``include_stop_str_in_output``), ends the sequence when it returns a stop
    string, calls :meth:`finish` once the sequence is done for any reason, and streams
    :meth:`take_delta`.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self._stops = params.stop_list
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._text = ""
        self._sent = 0
        self._finished = False
        self.stop_reason: str | None = None

    def _extend(self, delta: str) -> str | None:
        self._text += delta
        if self._stops and delta and self._num_tokens >= self._min_tokens:
            hit = find_stop(self._text, len(delta), self._stops, self._include_stop)
            if hit is not None:
                keep, self.stop_reason = hit
                self._text = self._text[:keep]
                self._finished = True
        return self.stop_reason

    def add(self, token_id: int) -> str | None:
        """Add a generated token; return the stop string it completed (the text is then cut and
        the sequence is finished), else None. Stop strings are not checked before ``min_tokens``
        tokens were added.
        """
        if self._finished:
            raise RuntimeError("add() after the sequence finished")
        self._num_tokens += 1
        return self._extend(self._detok.add(token_id))

    def finish(self) -> str | None:
        """Mark the sequence finished and emit held-back text (an incomplete character at the
        end, as U+FFFD). Returns the stop string if that text completed one, else the stop string
        already found (or None).
        """
        if not self._finished:
            self._finished = True
            self._extend(self._detok.flush())
        return self.stop_reason

    def take_delta(self) -> str:
        """Return the text not streamed before. Until the sequence finishes, a tail that may
        still become a stop string is held back.
        """
        end = len(self._text)
        if not self._finished:
            end -= stop_holdback(self._text, self._stops)
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    @property
    def text(self) -> str:
        """The output text so far, cut at the stop string if one was found (held-back stop
        prefixes included; incomplete characters excluded until :meth:`finish`)."""
        return self._text

    @property
    def finished(self) -> bool:
        """True after a stop string was found or :meth:`finish` was called."""
        return self._finished
