"""Incremental detokenization gives the same text as decoding everything at once."""

import random

import pytest

from protocol.detokenizer import IncrementalDetokenizer
from protocol.testing import ByteTokenizer

TOKENIZER = ByteTokenizer()
SAMPLES = ["hello world", "naïve café", "€100 → ¥", "日本語のテキスト", "emoji 🙂🚀 end", "mixed ä€🙂x"]


def stream(ids, chunks, prompt=(), tokenizer=TOKENIZER, **kw):
    detok = IncrementalDetokenizer(tokenizer, prompt, **kw)
    pieces, pos = [], 0
    for size in chunks:
        pieces.append(detok.push(ids[pos : pos + size]))
        pos += size
    pieces.append(detok.push(ids[pos:]))
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("text", SAMPLES)
def test_one_token_at_a_time_reassembles_the_text(text):
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    pieces, detok = stream(ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert detok.text == text
    assert "\ufffd" not in "".join(pieces)


def test_multibyte_character_is_held_back_until_complete():
    detok = IncrementalDetokenizer(TOKENIZER)
    euro = "€".encode()
    assert detok.push([euro[0]]) == ""
    assert detok.push([euro[1]]) == ""
    assert detok.push([euro[2]]) == "€"
    assert detok.text == "€"


def test_incomplete_tail_is_flushed_as_replacement_char():
    detok = IncrementalDetokenizer(TOKENIZER)
    assert detok.push([ord("a")]) == "a"
    assert detok.push([0xE2, 0x82]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == TOKENIZER.decode([ord("a"), 0xE2, 0x82])


def test_prompt_gives_context_but_is_not_emitted():
    prompt = TOKENIZER.encode("The answer is", add_special_tokens=False)
    pieces, detok = stream(TOKENIZER.encode(" 42", add_special_tokens=False), [1, 1, 1], prompt=prompt)
    assert "".join(pieces) == " 42"


def test_prompt_ending_mid_character_does_not_swallow_output():
    prompt = [ord("x"), 0xE2]
    pieces, _ = stream([0x82, 0xAC, ord("!")], [1, 1, 1], prompt=prompt)
    assert "".join(pieces) == TOKENIZER.decode([0x82, 0xAC, ord("!")])


def test_special_tokens_are_skipped_or_kept():
    ids = [ord("h"), ord("i"), min(TOKENIZER.eos_token_ids)]
    assert "".join(stream(ids, [1, 1, 1])[0]) == "hi"
    kept = "".join(stream(ids, [1, 1, 1], skip_special_tokens=False)[0])
    assert kept == TOKENIZER.decode(ids, skip_special_tokens=False)
    assert kept != "hi"


def test_random_sequences_match_a_full_decode():
    rng = random.Random(1234)
    special = sorted(TOKENIZER.all_special_ids)
    for _ in range(400):
        text = "".join(rng.choice("ab é€🙂日") for _ in range(rng.randint(0, 12)))
        ids = TOKENIZER.encode(text, add_special_tokens=False)
        for _ in range(rng.randint(0, 3)):  # stray bytes and special tokens anywhere
            ids.insert(rng.randint(0, len(ids)), rng.choice([*special, 0x80, 0xC3, 0xF0, rng.randrange(256)]))
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(rng.randint(1, 4))
        skip = rng.random() < 0.5
        pieces, detok = stream(ids, chunks, skip_special_tokens=skip)
        expected = TOKENIZER.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == expected, (ids, chunks)
        assert detok.text == expected


def test_cost_per_token_stays_constant():
    """Each push decodes a short window, not the whole sequence."""

    class CountingTokenizer(ByteTokenizer):
        longest = 0

        def decode(self, token_ids, skip_special_tokens=True):
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    tok = CountingTokenizer()
    ids = tok.encode("x€" * 500, add_special_tokens=False)
    pieces, _ = stream(ids, [1] * len(ids), tokenizer=tok)
    assert "".join(pieces) == "x€" * 500
    assert CountingTokenizer.longest <= 8
