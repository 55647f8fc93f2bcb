"""Speculative decoding with n-gram proposals (engine.spec_decode), from the proposer up to the engine.

The engine-level checks compare against the same engine without speculation: greedy output must be
identical (token for token, with the same finish reasons, stops and logprobs), and a sampled
request's tokens must keep their distribution (a two-sample chi-square test over many seeds).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2_contingency

from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.spec_decode.config import SpeculativeConfig, parse_speculative_config
from engine.spec_decode.ngram import NgramProposer, TokenHistory, lookup
from engine.spec_decode.rejection import greedy_accept, rejection_sample
from protocol.engine_api import Generate, SamplingParams, Tokens
from tests.engine.test_engine import finals, gen, outputs

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
REPEATING = [5, 17, 42, 99, 3, 250, 7] * 4


def history(tokens: list[int]) -> TokenHistory:
    h = TokenHistory()
    h.sync(tokens, [])
    return h


# ---- the proposer ----


def test_lookup_proposes_what_followed_the_most_recent_match_of_the_longest_suffix():
    tokens = [1, 2, 3, 10, 11, 12, 9, 2, 3, 20, 21, 1, 2, 3]
    # the 3-gram (1, 2, 3) occurred at 0: propose what followed it; (2, 3) alone would give 20, 21
    assert lookup(history(tokens), 3, 1, 3) == [10, 11, 12]
    assert lookup(history(tokens), 3, 1, 2) == [20, 21, 1]  # most recent (2, 3)
    assert lookup(history(tokens), 5, 1, 2) == [20, 21, 1, 2, 3]
    assert lookup(history([4, 5, 6, 7]), 3, 1, 3) == []  # nothing repeats
    assert lookup(history([1, 9, 9, 1]), 3, 2, 3) == []  # only a 1-gram matches, min is 2


def test_lookup_continues_a_short_period_and_skips_byte_matches_across_tokens():
    assert lookup(history([7, 8, 7, 8]), 5, 1, 2) == [7, 8, 7, 8, 7]
    assert lookup(history([3, 3]), 4, 1, 1) == [3, 3, 3, 3]
    # 256 is bytes 00 01 00 00 and 1 is 01 00 00 00: the byte pattern of [1] occurs inside [256, 0]
    # at an offset that is not a token boundary, and must not count as an occurrence of token 1
    assert lookup(history([256, 0, 5, 1]), 2, 1, 1) == []
    assert lookup(history([1, 6, 256, 0, 5, 1]), 2, 1, 1) == [6, 256]


def test_proposer_follows_a_growing_sequence_and_respects_the_limit():
    class Seq:  # the attributes of a scheduler Sequence the proposer reads
        prompt_token_ids = [1, 2, 3, 4, 5, 1, 2]
        output_token_ids: list[int] = []

    seq = Seq()
    proposer = NgramProposer(3, 1, 2)
    assert proposer.propose(seq, 10) == [3, 4, 5]
    seq.output_token_ids = [3, 4]
    assert proposer.propose(seq, 10) == [5, 1, 2]
    assert proposer.propose(seq, 1) == [5]
    assert proposer.propose(seq, 0) == []


def test_draft_length_pays_for_its_rows():
    from engine.spec_decode.speculator import best_draft_length

    # rows as costly as on a CPU's quantized GEMV (each extra row 40% of a one-row step)
    assert best_draft_length(4, 0.95, 1.0, 0.4) == 4
    assert best_draft_length(4, 0.3, 1.0, 0.4) == 0  # mostly rejected: no draft at all
    assert best_draft_length(4, 0.95, 1.0, 0.01) == 4  # rows nearly free (a GPU)
    assert best_draft_length(4, 0.5, 1.0, 0.01) == 4
    assert 0 < best_draft_length(8, 0.7, 1.0, 0.2) < 8
    # among 4 sequences an extra row costs a quarter of the step, but yields tokens for one of them
    assert best_draft_length(4, 0.6, 4.0, 1.0, others=3) == 0


class DecodingSeq:
    """What the speculator reads of a scheduler Sequence that is decoding."""

    def __init__(self, seq_id: str, prompt: list[int], **params) -> None:
        self.seq_id, self.prompt_token_ids, self.output_token_ids = seq_id, prompt, []
        self.params = SamplingParams(max_tokens=200, **params)
        self.prefill_only = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_computed_tokens(self) -> int:
        return self.num_tokens - 1

    def token_ids(self, start: int, stop: int) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids][start:stop]


def test_seeded_sequence_drafts_by_its_own_acceptance_alone():
    """A seeded sampled sequence whose drafts keep failing stops drafting, one that copies its
    context keeps drafting, and neither depends on how many others decode beside it."""
    from engine.spec_decode.speculator import Speculator

    def draft_lengths(others: int, copies: bool) -> list[int]:
        speculator = Speculator(SpeculativeConfig(**SPEC), max_model_len=4096)
        for rows in (1, 1, 5, 5, 9, 9):  # a cost line that makes drafting look cheap or dear
            speculator.observe(rows, 0.01 + 0.01 * rows)
        seq = DecodingSeq("seeded", REPEATING, temperature=1.0, seed=7)
        crowd = [DecodingSeq(f"o{i}", REPEATING, temperature=1.0) for i in range(others)]
        lengths = []
        for _ in range(40):
            draft = speculator.propose([seq, *crowd], lambda s: s.params.max_tokens).get("seeded", ())
            lengths.append(len(draft))
            (first, *_) = NgramProposer(4, 1, 3).propose(seq, 4)
            # the sampler either follows the context (the proposal's first token) or draws another
            # token of the context, so that proposals keep coming and keep failing
            seq.output_token_ids.append(first if copies else next(t for t in REPEATING if t != first))
        return lengths

    rejected = draft_lengths(others=0, copies=False)
    assert rejected[0] > 0 and sum(rejected[-20:]) == 0  # tried, then given up
    assert draft_lengths(others=8, copies=False) == rejected
    copied = draft_lengths(others=0, copies=True)
    assert min(copied[1:]) > 0 and copied == draft_lengths(others=8, copies=True)


# ---- the config ----


def test_speculative_config_parses_vllm_shape_and_refuses_bad_settings():
    config = parse_speculative_config(
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'
    )
    assert config == SpeculativeConfig("ngram", 3, 5, 5)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}) == SpeculativeConfig(
        "ngram", 2, 4, 2
    )
    assert parse_speculative_config(None) is None and parse_speculative_config("") is None
    for bad, message in [
        ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method 'eagle'"),
        (
            {"method": "ngram", "num_speculative_tokens": 0},
            "num_speculative_tokens must be an integer of at least 1",
        ),
        ({"method": "ngram"}, 'num_speculative_tokens" is required'),
        ({"num_speculative_tokens": 2}, '"method" is required'),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "prompt_lookup_min (4) is greater than prompt_lookup_max (2)",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "unknown key(s) 'model'"),
        ("{not json", "not valid JSON"),
        ("[1]", "must be a JSON object"),
    ]:
        with pytest.raises(ValueError) as error:
            parse_speculative_config(bad)
        assert message in str(error.value)


# ---- the rejection sampler ----


def test_greedy_accept_takes_the_matching_prefix_then_the_model_token():
    assert greedy_accept([4, 5, 6], [4, 5]) == (2, 6)
    assert greedy_accept([4, 9, 6], [4, 5]) == (1, 9)
    assert greedy_accept([8, 5, 6], [4, 5]) == (0, 8)


def _emitted_histograms(probs: torch.Tensor, draft: list[int], draws: int, sampler) -> list[Counter]:
    generator = torch.Generator().manual_seed(1)
    first, second = Counter(), Counter()
    for _ in range(draws):
        accepted, token = sampler(probs, draft, generator)
        tokens = [*draft[:accepted], token]
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    return [first, second]


def test_rejection_sampling_emits_the_target_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    draft = [1, 3]
    draws = 20000
    first, _ = _emitted_histograms(probs, draft, draws, rejection_sample)
    expected = probs[0] * draws
    observed = torch.tensor([first[t] for t in range(4)], dtype=torch.float32)
    assert observed[3] == 0  # a token of probability 0 is never emitted
    chi2 = float((((observed - expected) ** 2)[:3] / expected[:3]).sum())
    assert chi2 < 16.3  # chi-square, 2 degrees of freedom, p = 0.0003

    def accept_always(p, d, g):  # a biased verifier the same test must catch
        return len(d), int(torch.argmax(p[len(d)]))

    biased, _ = _emitted_histograms(probs, draft, draws, accept_always)
    observed = torch.tensor([biased[t] for t in range(3)], dtype=torch.float32)
    assert float((((observed - expected[:3]) ** 2) / expected[:3]).sum()) > 16.3


# ---- the engine, tiny random Llama ----


@pytest.fixture(scope="module")
def plain(tiny_llama: Path) -> Engine:
    return Engine(EngineConfig(model=str(tiny_llama), progress=False))


@pytest.fixture(scope="module")
def speculative(tiny_llama: Path) -> Engine:
    return Engine(EngineConfig(model=str(tiny_llama), progress=False, speculative_config=SPEC))


def run(engine: Engine, *commands: Generate) -> list:
    return engine.generate_sync(list(commands))


def test_greedy_output_is_identical_and_drafts_are_counted(plain, speculative):
    before = speculative.core.stats()
    commands = [gen("a", REPEATING, max_tokens=40, temperature=0.0), gen("b", max_tokens=24, temperature=0.0)]
    ours, theirs = run(speculative, *commands), run(plain, *commands)
    assert outputs(ours) == outputs(theirs)
    after = speculative.core.stats()
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    drafted = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    per_pos = [
        a - b
        for a, b in zip(
            after.spec_decode_num_accepted_tokens_per_pos,
            before.spec_decode_num_accepted_tokens_per_pos or (0,) * 4,
            strict=True,
        )
    ]
    assert drafts > 0 and 0 < accepted < drafted <= 4 * drafts
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    # fewer steps: a Tokens event per sample and step, and some carry several tokens
    assert len(ours) < len(theirs) == 64
    assert after.generation_tokens_total - before.generation_tokens_total == 64
    assert plain.core.stats().spec_decode_num_drafts == 0


def test_stops_inside_an_accepted_draft_drop_the_tokens_after_them(plain, speculative):
    (reference,) = outputs(run(plain, gen("r", REPEATING, max_tokens=40, temperature=0.0))).values()
    stop = reference[20]  # a token the greedy output reaches after drafts were accepted
    commands = [
        gen("stop", REPEATING, max_tokens=40, temperature=0.0, stop_token_ids=[stop]),
        gen("min", REPEATING, max_tokens=40, temperature=0.0, stop_token_ids=[stop], min_tokens=22),
        gen("len", REPEATING, max_tokens=13, temperature=0.0, logprobs=2),
    ]
    ours, theirs = run(speculative, *commands), run(plain, *commands)
    assert outputs(ours) == outputs(theirs)
    for key, event in finals(theirs).items():
        mine = finals(ours)[key]
        assert (mine.finish_reason, mine.stop_reason) == (event.finish_reason, event.stop_reason)
    assert finals(ours)["stop", 0].stop_reason == stop
    # logprobs: the raw logprob at each token's own row, as plain decoding reports them
    mine = [lp for e in ours if isinstance(e, Tokens) and e.request_id == "len" for lp in e.logprobs]
    ref = [lp for e in theirs if isinstance(e, Tokens) and e.request_id == "len" for lp in e.logprobs]
    assert [e.token_id for e in mine] == [e.token_id for e in ref] and len(mine) == 13
    for a, b in zip(mine, ref, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.rank == b.rank
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_rejected_drafts_leave_the_cache_consistent_for_later_prefix_hits(tiny_llama, plain):
    """A request that reuses a speculative run's output as its prompt hits the prefix cache on blocks
    the drafted decodes filled: they must hold exactly the keys and values of the accepted tokens."""
    engine = Engine(
        EngineConfig(model=str(tiny_llama), progress=False, speculative_config=SPEC, block_size=4)
    )
    first = outputs(run(engine, gen("a", REPEATING, max_tokens=40, temperature=0.0)))["a", 0]
    assert (
        engine.core.stats().spec_decode_num_accepted_tokens < engine.core.stats().spec_decode_num_draft_tokens
    )
    follow = gen("b", REPEATING + first, max_tokens=12, temperature=0.0)
    hits_before = engine.core.stats().prefix_cache_hits
    ours = outputs(run(engine, follow))
    assert engine.core.stats().prefix_cache_hits - hits_before >= len(REPEATING) + len(first) - 4
    assert ours == outputs(run(plain, follow))


def test_sampled_tokens_keep_their_distribution_over_many_seeds(plain, speculative):
    """Tokens 2-6 of 400 seeded requests (token 1 comes from the prefill, not verification), with and
    without speculation: a chi-square test of homogeneity per position. top_k=4 keeps few categories,
    so each cell is well filled and a wrong acceptance rule shows (the rejection sampler's own test
    shows the same statistic catches an always-accepting verifier). The prompt holds the model's own
    greedy continuation, so samples often repeat it and drafts are both accepted and rejected."""
    (greedy,) = outputs(run(plain, gen("g", REPEATING, max_tokens=24, temperature=0.0))).values()
    prompt = REPEATING + greedy

    def histograms(engine: Engine) -> list[Counter]:
        commands = [
            gen(f"s{seed}", prompt, max_tokens=6, temperature=1.0, top_k=4, seed=seed) for seed in range(400)
        ]
        counts = [Counter() for _ in range(5)]
        for tokens in outputs(run(engine, *commands)).values():
            for position, token in enumerate(tokens[1:]):
                counts[position][token] += 1
        return counts

    before = speculative.core.stats()
    ours, theirs = histograms(speculative), histograms(plain)
    after = speculative.core.stats()
    drafted = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    assert drafted > 1000 and 0.05 * drafted < accepted < 0.95 * drafted  # both branches exercised
    for mine, ref in zip(ours, theirs, strict=True):
        categories = sorted(set(mine) | set(ref))
        table = [[mine[c] for c in categories], [ref[c] for c in categories]]
        assert chi2_contingency(table).pvalue > 0.001, table


# ---- the real model: SmolLM2-135M ----

SMOLLM_PROMPTS = [
    "Repeat the following text exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    "Copy this list: apples, oranges, pears, plums, grapes, cherries, lemons, limes.",
    "Rewrite this code with the variable renamed to total:\ndef add(a, b):\n    result = a + b\n    return result",
    "Say 'hello world' five times.",
    "Repeat after me: one two three four five six seven eight nine ten.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "List two benefits of exercise.",
    "What does CPU stand for?",
    "Is a tomato a fruit or a vegetable?",
    "Describe the color blue to someone who cannot see.",
    "Tell me a fun fact about octopuses.",
    "Fix the typo and repeat the sentence: The cat sat on the the mat and looked at the door.",
    "Count from 1 to 15, separated by commas.",
]


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/engine/test_smollm2_batching.py
    yield load_model(resolve_model(DEFAULT_MODEL), dtype="float32", progress=False)
    torch.set_num_threads(threads)


def smollm_engine(loaded: LoadedModel, **config) -> Engine:
    return Engine(
        EngineConfig(
            model=DEFAULT_MODEL,
            dtype="float32",
            progress=False,
            max_model_len=512,
            kv_cache_memory="64MiB",
            **config,
        ),
        loaded=loaded,
    )


def chat_ids(rendered) -> list[int]:
    return list(
        rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    )


def test_smollm2_greedy_output_is_identical_on_20_prompts(smollm, monkeypatch):
    """All 20 prompts in one batch, drafted in full whatever the load (the load limits raised, and
    the cost rule that would shorten drafts in a batch this big switched off)."""
    monkeypatch.setattr(
        "engine.spec_decode.speculator.best_draft_length", lambda available, *_, **__: available
    )
    tokenizer = smollm.tokenizer
    prompts = [
        tuple(
            chat_ids(
                tokenizer.hf.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            )
        )
        for t in SMOLLM_PROMPTS
    ]
    commands = [
        Generate(f"p{i}", prompt, SamplingParams(temperature=0.0, max_tokens=48))
        for i, prompt in enumerate(prompts)
    ]
    spec = smollm_engine(smollm, speculative_config={**SPEC, "max_decoding_seqs": 32, "max_step_rows": 256})
    ours, theirs = (
        outputs(spec.generate_sync(commands)),
        outputs(smollm_engine(smollm).generate_sync(commands)),
    )
    stats = spec.core.stats()
    assert stats.spec_decode_num_accepted_tokens > 100
    assert ours == theirs


# ---- the flag ----


def test_speculative_config_flag_reaches_the_engine_config_and_bad_values_fail_early(tmp_path, capsys):
    from sansllm.args import parse_serve_args
    from sansllm.assemble import ModelLoadError, engine_config_for, load_engines

    flag = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    args = parse_serve_args(["SmolLM2-135M-Instruct", "--speculative-config", flag])
    config = engine_config_for(args.models[0], args, EngineConfig)
    assert config.speculative_config == SpeculativeConfig("ngram", 3, 4, 2)
    # the same from a config file, where it is a mapping
    (tmp_path / "c.yaml").write_text("speculative-config:\n  method: ngram\n  num_speculative_tokens: 2\n")
    args = parse_serve_args(["SmolLM2-135M-Instruct", "--config", str(tmp_path / "c.yaml")])
    assert (
        engine_config_for(args.models[0], args, EngineConfig).speculative_config.num_speculative_tokens == 2
    )
    # refused before any weights load, with the reason
    args = parse_serve_args(["SmolLM2-135M-Instruct", "--speculative-config", '{"method": "eagle"}'])
    with pytest.raises(ModelLoadError, match="unknown method 'eagle'"):
        load_engines(args, load=lambda configs: pytest.fail("loaded"), config_cls=EngineConfig)
    with pytest.raises(SystemExit):
        parse_serve_args(["--speculative-config", "{oops"])
    assert "invalid JSON" in capsys.readouterr().err
