"""A deterministic prompt set: varied lengths cut from fixed text, optionally behind a shared prefix.

Prompts are text first (the serving benchmark sends text) and carry the token ids the model's own
tokenizer gives for that text, so every backend in a run sees exactly the same tokens. Nothing is
random except through the seeded `random.Random` passed around, so a command line reproduces a run.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

Encode = Callable[[str], list[int]]

# Written for this benchmark (no licence questions): plain prose with ordinary vocabulary, so token
# counts per word look like a real prompt's.
CORPUS = """\
The harbour town woke slowly in the winter months. Fishing boats left before dawn and came back in
the early afternoon, and the market by the quay sold what they brought until the light failed. A
baker on the corner opened at five, and the smell of bread drifted down the narrow streets towards
the water. Children walked to the school on the hill in small groups, carrying their books in
canvas bags, and the teacher rang a brass bell at nine exactly. In the library, an old clerk kept a
ledger of every book that was borrowed, written in a careful hand, and he could tell you who had
read a novel twenty years ago and whether they had returned it on time. The lighthouse keeper
climbed the spiral stairs each evening to light the lamp, and he wrote the weather in a notebook:
wind from the west, a light swell, visibility good, rain expected later in the night. When storms
came, the whole town gathered in the church hall and waited, sharing soup and stories, until the
boats were safely home. Engineers who visited to repair the harbour wall said the stones had been
laid three centuries ago by builders who understood the sea better than any modern survey. They
measured the tides for a month, drew careful plans, and replaced only the stones that had cracked,
so that the wall would look the same to the people who had walked along it all their lives. A
young woman opened a workshop that repaired clocks and radios; she learned the trade from manuals
she found in the library and from a retired sailor who had fixed instruments on cargo ships. Her
window displayed a dozen clocks, each set to a different city, and visitors liked to guess which
one was correct. In spring the hills turned green, the ferries ran twice a day, and tourists
arrived with maps and cameras, asking the way to the castle ruins and the beach beyond the cliffs.
The town council met on the first Monday of each month to discuss the budget, the state of the
roads, and complaints about the noise from the summer festival. Minutes were typed by the clerk,
pinned to the notice board outside the town hall, and read with great interest by everyone who
passed. A scientist studying seabirds rented a room above the bakery and spent her days on the
cliffs with binoculars, counting puffins and recording their nests in a waterproof notebook. She
explained to anyone who asked that the birds returned to the same burrow every year, and that
their numbers told a story about the health of the fish in the bay. The fishermen, who had their
own opinions about the fish, listened politely and then argued for hours in the harbour tavern.
"""

SYSTEM_TEXT = """\
You are a careful and friendly assistant for a small public library. Answer questions about books,
opening hours, membership, events, and local history. Be concise, accurate and polite. If you do
not know an answer, say so plainly and suggest who at the library might help. Never invent titles,
authors, dates or prices. When a visitor asks for a recommendation, ask one short question about
what they enjoyed recently, then suggest at most three books with a sentence on each. The library
opens from nine in the morning until six in the evening on weekdays, and from ten until four on
Saturdays; it is closed on Sundays and public holidays. Membership is free for residents of the
county and costs a small annual fee for visitors. Members may borrow up to twelve items at a time
for three weeks, and may renew twice unless another member has reserved the item. Late returns are
charged a small daily fine, which is waived for children and for members over seventy. The
reading room on the first floor is quiet; the children's corner on the ground floor has story
time every Wednesday and Saturday morning. The local history collection, including maps, parish
records and photographs of the harbour, may be consulted by appointment with the archivist. Study
rooms can be booked for up to two hours a day. Computers and printers are available; printing
costs a few pence per page. The library runs a book club on the last Thursday of each month, a
writing group on Tuesday evenings, and a repair café for small electrical items on the first
Saturday of the month. Accessibility: the building has step-free access, a lift, large-print
books, audiobooks, and a hearing loop at the front desk. Lost property is kept for one month.
Donations of books in good condition are welcome, but textbooks older than ten years cannot be
accepted. For questions about fines, reservations or accounts, direct visitors to the front desk
or the online catalogue. For questions outside the library's services, answer briefly if you can
and remind the visitor that you are the library's assistant. Keep every answer under one hundred
and fifty words unless the visitor asks for more detail. Use plain language and avoid jargon.
Format lists with simple dashes. Do not use emoji. Always be patient, and thank visitors for
using the library. If a question is about safety or an emergency, tell the visitor to contact the
staff at the front desk immediately or to call the emergency services.
"""

_WORDS = CORPUS.split()


class BenchPrompt(msgspec.Struct, frozen=True):
    """One request of a benchmark: what to send and how many tokens to ask back."""

    text: str
    token_ids: tuple[int, ...]
    output_len: int


def _text_of_at_least(encode: Encode, words: list[str], start: int, num_tokens: int) -> str:
    """The shortest run of words (wrapping around `words`) from `start` that encodes to >= num_tokens.

    Words are added in strides sized from the tokens-per-word seen so far, then trimmed back one
    at a time: a handful of encode calls per prompt instead of one per word.
    """
    taken: list[str] = []
    count = 0
    tokens_per_word = 2.0  # a first guess on the high side; refined after each encode
    while count < num_tokens:
        stride = max(1, int(0.9 * (num_tokens - count) / tokens_per_word))
        first = start + len(taken)
        taken.extend(words[(first + i) % len(words)] for i in range(stride))
        count = len(encode(" ".join(taken)))
        tokens_per_word = max(count / len(taken), 0.1)
    while len(taken) > 1 and len(encode(" ".join(taken[:-1]))) >= num_tokens:
        taken.pop()
    return " ".join(taken)


def shared_system_prompt(encode: Encode, num_tokens: int = 500, salt: str = "") -> str:
    """A ~num_tokens system prompt ending in a paragraph break.

    `salt` is put in front, so a salted prompt shares no leading tokens with the plain one: the
    serving benchmark uses salted copies to time requests whose prefix is not cached.
    """
    words = (salt.split() if salt else []) + SYSTEM_TEXT.split()
    return _text_of_at_least(encode, words, 0, num_tokens) + "\n\n"


def make_prompts(
    encode: Encode,
    num_prompts: int,
    input_len: tuple[int, int] = (64, 256),
    output_len: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> list[BenchPrompt]:
    """`num_prompts` prompts with lengths drawn uniformly from the inclusive ranges given.

    Each prompt starts at a different word of the corpus, so distinct prompts share no prefix.
    """
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        text = _text_of_at_least(encode, _WORDS, rng.randrange(len(_WORDS)), rng.randint(*input_len))
        output = rng.randint(*output_len)
        prompts.append(BenchPrompt(text=text, token_ids=tuple(encode(text)), output_len=output))
    return prompts


def with_prefix(encode: Encode, prompt: BenchPrompt, prefix: str) -> BenchPrompt:
    """The same request behind `prefix` (a system prompt), tokenized as a whole like a server would."""
    text = prefix + prompt.text
    return BenchPrompt(text=text, token_ids=tuple(encode(text)), output_len=prompt.output_len)


def warmup_prompt(encode: Encode, num_tokens: int) -> BenchPrompt:
    """A prompt as long as the longest benchmarked one, sharing no prefix with any of them.

    Warming up on a realistic length pays the one-off costs of large prefill shapes before timing.
    """
    text = shared_system_prompt(encode, num_tokens, salt="Warm up before timing.")
    return BenchPrompt(text=text, token_ids=tuple(encode(text)), output_len=4)


def parse_range(value: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64,256' or '64-256' -> (64, 256). For argparse."""
    parts = value.replace("-", ",").split(",")
    low, high = (int(parts[0]), int(parts[-1]))
    if low < 1 or high < low:
        raise ValueError(f"bad range {value!r}: need 1 <= low <= high")
    return low, high
