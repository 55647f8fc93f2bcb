"""Engine `TokenLogprobs` -> the three logprob shapes of the API (chat, completions, prompt).

Token strings are the decode of each id on its own, special tokens included (vLLM does the same),
or `token_id:<id>` with `return_tokens_as_token_ids`; `bytes` are that string's UTF-8 bytes. Values
are clamped to >= -9999.0 because JSON has no -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.engine_api import TokenLogprobs
from protocol.responses import (
    ChatCompletionLogProb,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
    Logprob,
    PromptLogprobs,
    clamp_logprob,
)
from protocol.tokenizer import Tokenizer


class TokenNames:
    """How token ids are spelled in logprobs; caches the per-id decode for one request."""

    def __init__(self, tokenizer: Tokenizer, as_token_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._as_token_ids = as_token_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        name = self._cache.get(token_id)
        if name is None:
            if self._as_token_ids:
                name = f"token_id:{token_id}"
            else:
                name = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = name
        return name


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _top(entry: TokenLogprobs, top_n: int) -> tuple[tuple[int, float], ...]:
    """The first `top_n` alternatives; -1 means all the engine sent (the whole vocabulary)."""
    return entry.top if top_n < 0 else entry.top[:top_n]


def chat_logprobs(
    entries: Sequence[TokenLogprobs], top_n: int, names: TokenNames
) -> list[ChatCompletionLogProbsContent]:
    """`choices[].logprobs.content` of a chat response or chunk."""
    content = []
    for entry in entries:
        token = names(entry.token_id)
        alternatives = []
        for token_id, logprob in _top(entry, top_n):
            alt = names(token_id)
            alternatives.append(
                ChatCompletionLogProb(token=alt, logprob=clamp_logprob(logprob), bytes=_utf8(alt))
            )
        content.append(
            ChatCompletionLogProbsContent(
                token=token,
                logprob=clamp_logprob(entry.logprob),
                bytes=_utf8(token),
                top_logprobs=alternatives,
            )
        )
    return content


class CompletionLogprobsBuilder:
    """Accumulates completions-style logprobs for one choice; `take()` returns what is new.

    `text_offset` counts the characters of the token strings before each token, across the whole
    choice (echoed prompt included), so stream chunks and the full response agree.
    `top_logprobs` holds the sampled token plus the top `top_n`, as vLLM reports them.
    """

    def __init__(self, top_n: int, names: TokenNames) -> None:
        self._top_n = top_n
        self._names = names
        self._offset = 0
        self._pending = CompletionLogProbs()

    def add(self, token_id: int, entry: TokenLogprobs | None) -> None:
        """One token; `entry` None for a position without logprobs (the first prompt token)."""
        token = self._names(token_id)
        pending = self._pending
        pending.text_offset.append(self._offset)
        pending.tokens.append(token)
        self._offset += len(token)
        if entry is None:
            pending.token_logprobs.append(None)
            pending.top_logprobs.append(None)
            return
        pending.token_logprobs.append(clamp_logprob(entry.logprob))
        top = {token: clamp_logprob(entry.logprob)}
        for alt_id, logprob in _top(entry, self._top_n):
            top.setdefault(self._names(alt_id), clamp_logprob(logprob))
        pending.top_logprobs.append(top)

    def take(self) -> CompletionLogProbs:
        taken, self._pending = self._pending, CompletionLogProbs()
        return taken


def prompt_logprobs(
    prompt_token_ids: Sequence[int],
    entries: Sequence[TokenLogprobs | None],
    names: TokenNames,
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per position None or {token_id: {logprob, rank, decoded_token}}."""
    result: PromptLogprobs = []
    for token_id, entry in zip(prompt_token_ids, entries, strict=False):
        if entry is None:
            result.append(None)
            continue
        position = {
            token_id: Logprob(
                logprob=clamp_logprob(entry.logprob), rank=entry.rank, decoded_token=names(token_id)
            )
        }
        for rank, (alt_id, logprob) in enumerate(entry.top, start=1):
            position.setdefault(
                alt_id, Logprob(logprob=clamp_logprob(logprob), rank=rank, decoded_token=names(alt_id))
            )
        result.append(position)
    return result
