"""Our Whisper (engine.models.whisper), loaded from tiny random HF folders, gives transformers' results.

- features: `input_features` equals `WhisperFeatureExtractor` for short, full, too long (cut) and
  silent audio, 80 and 128 mel bins;
- encoder output equals `model.encoder`; decoder logits over prompts (one span, chunks, several
  spans with different audio in one flat batch) equal transformers' forward;
- greedy decoding run our way (the decoder on a paged KV cache, the audio encoded once per
  sequence, Whisper's rules as a logits processor, all sequences in one batch) gives `generate`'s
  tokens, with and without timestamps, English-only and multilingual, with a previous-text prompt;
- the rules processor equals transformers' three processors on random histories and scores;
- the loader's `SpeechSpec` and decoding settings, and its errors.

Tolerances, all float32: features 1e-4 (observed 0: the same torch ops in the same order);
encoder output 1e-4 on values of magnitude ~3 (observed 0: the same ops again); logits 1e-4 on
values of magnitude 3 to 6 (observed 1e-6 to 4e-6: the paged attention's summation order differs
from SDPA's); greedy tokens and the rules processor's output exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, WhisperFeatureExtractor
from transformers import WhisperForConditionalGeneration as HFWhisper
from transformers.generation.logits_process import (
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    WhisperTimeStampLogitsProcessor,
)

from engine.attention import PagedKVCache, SequenceSpan, build_step
from engine.loader import LoadedModel, load_model
from engine.model_config import ModelConfig, UnsupportedModelError
from engine.model_files import resolve_model
from engine.models.whisper import CrossInputs, WhisperForConditionalGeneration
from engine.processors.base import Admission, LogitsPipeline, RowRef
from engine.processors.whisper import WhisperRules, whisper_rules
from engine.whisper_features import FeatureSettings, LogMelFeatures
from protocol.engine_api import SamplingParams
from protocol.media.spec import SpeechSpec
from tests.engine.tiny_whisper import LANGUAGES, TIMESTAMPS, build_whisper

FEATURE_ATOL, ENCODER_ATOL, LOGITS_ATOL = 1e-4, 1e-4, 1e-4
RATE = 16000


# ---- audio ----


def tone(seconds: float, freq: float) -> np.ndarray:
    """A tone that swells and fades twice a second."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * math.pi * freq * t) * np.abs(np.sin(2 * math.pi * t))).astype(np.float32)


def chirp(seconds: float) -> np.ndarray:
    """A rising sweep, gated on and off."""
    t = np.arange(int(seconds * RATE)) / RATE
    sweep = np.sin(2 * math.pi * (200 + 600 * t / seconds) * t)
    return (0.5 * sweep * (np.sin(2 * math.pi * 2 * t) > 0)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.2).astype(np.float32)


AUDIO = {
    "tone": tone(4.0, 440.0),
    "chirp": chirp(7.5),
    "noise": noise(9.0),
    "silence": np.zeros(RATE, dtype=np.float32),
}


# ---- the models ----


@dataclass
class Pair:
    folder: Path
    ours: LoadedModel
    hf: HFWhisper

    @property
    def model(self) -> WhisperForConditionalGeneration:
        assert isinstance(self.ours.model, WhisperForConditionalGeneration)
        return self.ours.model

    @property
    def speech(self) -> SpeechSpec:
        assert self.ours.speech is not None
        return self.ours.speech

    def features(self, *audio: np.ndarray) -> torch.Tensor:
        return torch.stack([self.model.input_features(torch.from_numpy(a)) for a in audio])

    def prompt(self, timestamps: bool, language: str | None = None, task: str = "transcribe") -> list[int]:
        """The decoder prompt of one window, as the core builds it: `<|startoftranscript|>`, then
        (multilingual models only) the language and the task, then `<|notimestamps|>` unless timestamps."""
        s = self.speech
        ids = [s.start_of_transcript]
        if s.languages:
            task_id = s.transcribe if task == "transcribe" else s.translate
            assert task_id is not None
            ids += [s.languages[language or "en"], task_id]
        return ids if timestamps else [*ids, s.no_timestamps]


def load(folder: Path) -> LoadedModel:
    return load_model(resolve_model(str(folder)), dtype="float32", progress=False)


def pair(folder: Path) -> Pair:
    return Pair(folder, load(folder), HFWhisper.from_pretrained(folder, dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def english(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return pair(build_whisper(tmp_path_factory.mktemp("whisper") / "tiny-en", seed=0))


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return pair(build_whisper(tmp_path_factory.mktemp("whisper") / "tiny", seed=1, multilingual=True))


@pytest.fixture(params=["english", "multilingual"])
def both(request: pytest.FixtureRequest) -> Pair:
    return request.getfixturevalue(request.param)


class SpeechRunner:
    """Drives our model as the engine's runner does: each sequence's audio encoded once and its
    cross-attention keys/values kept; the decoder spans of a step in one flat batch over a paged
    KV cache, each sequence in its own run of blocks."""

    def __init__(self, model: WhisperForConditionalGeneration, max_seqs: int = 4, block_size: int = 16):
        param = next(model.parameters())
        self.model = model
        self.blocks_per_seq = -(-model.config.max_position_embeddings // block_size)
        self.cache = PagedKVCache(
            model.config, self.blocks_per_seq * max_seqs, block_size, param.dtype, param.device
        )
        self.tokens: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}
        self.cross: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: str, prompt: list[int], features: torch.Tensor) -> None:
        """A sequence: its decoder prompt and its window's features [mels, frames]."""
        self.tokens[key] = list(prompt)
        self.lengths[key] = 0
        with torch.inference_mode():
            layers = self.model.cross_kv(self.model.encode(features[None]))
        self.cross[key] = [(k[0], v[0]) for k, v in layers]

    def step(self, steps: Sequence[tuple[str, int]]) -> torch.Tensor:
        """Logits of the next `n` tokens of each (sequence, n), all in one flat batch."""
        spans, keys = [], [key for key, _ in steps]
        for key, n in steps:
            start = self.lengths[key]
            first = list(self.tokens).index(key) * self.blocks_per_seq
            spans.append(
                SequenceSpan(
                    self.tokens[key][start : start + n], start, range(first, first + self.blocks_per_seq)
                )
            )
            self.lengths[key] = start + n
        inputs = build_step(self.cache, spans)
        layers = len(self.model.decoder.layers)
        kv = [
            (
                torch.stack([self.cross[k][i][0] for k in keys]),
                torch.stack([self.cross[k][i][1] for k in keys]),
            )
            for i in range(layers)
        ]
        with torch.inference_mode():
            hidden = self.model(
                inputs.input_ids, inputs.positions, inputs.meta, CrossInputs(kv, [n for _, n in steps])
            )
            return self.model.compute_logits(hidden)


def hf_logits(hf: HFWhisper, features: torch.Tensor, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_features=features[None], decoder_input_ids=torch.tensor([ids])).logits[0]


# ---- features and encoder ----


@pytest.mark.parametrize(
    "audio",
    [
        np.zeros(0, dtype=np.float32),
        noise(0.01, seed=1),
        tone(3.3, 300.0),
        noise(30.0, seed=2),  # exactly one window
        chirp(45.0),  # cut to 30 s
        np.zeros(5 * RATE, dtype=np.float32),  # silence: every bin at the floor
        np.ones(2 * RATE, dtype=np.float32),  # a constant (clipping-loud) signal
    ],
    ids=["empty", "10ms", "3.3s", "30s", "45s", "silence", "constant"],
)
@pytest.mark.parametrize("mels", [80, 128])
def test_features_equal_the_feature_extractor(audio: np.ndarray, mels: int):
    expected = WhisperFeatureExtractor(feature_size=mels)(audio, sampling_rate=RATE, return_tensors="pt")
    ours = LogMelFeatures(FeatureSettings(feature_size=mels))(torch.from_numpy(audio))
    assert ours.dtype == torch.float32 and ours.shape == (mels, 3000)
    torch.testing.assert_close(ours, expected.input_features[0], atol=FEATURE_ATOL, rtol=0)


def test_features_refuse_more_than_one_channel(english: Pair):
    with pytest.raises(ValueError, match="mono"):
        english.model.input_features(torch.zeros(2, RATE))


def test_encoder_equals_transformers(both: Pair):
    features = both.features(AUDIO["tone"], AUDIO["noise"], AUDIO["silence"])
    with torch.inference_mode():
        ours = both.model.encode(features)
        expected = both.hf.model.encoder(features).last_hidden_state
    assert ours.shape == (3, 1500, 64)
    torch.testing.assert_close(ours, expected, atol=ENCODER_ATOL, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 0.1  # different audio, different frames


def test_encoder_refuses_features_of_another_length(english: Pair):
    with pytest.raises(ValueError, match="3000"):
        english.model.encode(torch.zeros(1, 80, 2999))


def test_cross_keys_and_values_have_the_runner_s_shape(both: Pair):
    with torch.inference_mode():
        layers = both.model.cross_kv(both.model.encode(both.features(AUDIO["tone"], AUDIO["chirp"])))
    assert len(layers) == 2
    for keys, values in layers:
        assert keys.shape == values.shape == (2, 1500, 4, 16)


# ---- decoder logits ----


def test_prompt_logits_equal_transformers(both: Pair):
    audio = AUDIO["chirp"]
    ids = [
        *both.prompt(timestamps=False),
        *both.ours.tokenizer.encode(" hello world", add_special_tokens=False),
    ]
    runner = SpeechRunner(both.model)
    runner.add("a", ids, both.features(audio)[0])
    ours = runner.step([("a", len(ids))])
    expected = hf_logits(both.hf, both.features(audio)[0], ids)
    torch.testing.assert_close(ours, expected, atol=LOGITS_ATOL, rtol=0)
    assert expected.abs().max() > 2  # logits with a spread, so the tolerance means something
    # the audio matters
    other = hf_logits(both.hf, both.features(AUDIO["noise"])[0], ids)
    assert (other - expected).abs().max() > 100 * LOGITS_ATOL


def test_chunks_and_spans_with_different_audio_in_one_batch(both: Pair):
    """Three sequences with their own audio, prefilled in chunks of different lengths beside each
    other and then decoded together: each row sees only its own audio and its own cache."""
    text = both.ours.tokenizer.encode(" the quick brown fox jumps", add_special_tokens=False)
    prompts = {
        "tone": [*both.prompt(timestamps=False), *text],
        "noise": [*both.prompt(timestamps=True), *text[:3]],
        "silence": [*both.prompt(timestamps=False), *text[2:]],
    }
    features = {name: both.features(AUDIO[name])[0] for name in prompts}
    runner = SpeechRunner(both.model)
    for name, ids in prompts.items():
        runner.add(name, ids, features[name])
    chunks = [[("tone", 3), ("noise", 2)], [("tone", 2), ("noise", 1), ("silence", 4)], [("silence", 1)]]
    got: dict[str, list[torch.Tensor]] = {name: [] for name in prompts}
    for step in chunks:
        logits = runner.step(step)
        start = 0
        for name, n in step:
            got[name].append(logits[start : start + n])
            start += n
    rest = [(name, len(ids) - runner.lengths[name]) for name, ids in prompts.items()]
    logits = runner.step(rest)
    start = 0
    for name, n in rest:
        got[name].append(logits[start : start + n])
        start += n
    for name, ids in prompts.items():
        expected = hf_logits(both.hf, features[name], ids)
        torch.testing.assert_close(torch.cat(got[name]), expected, atol=LOGITS_ATOL, rtol=0)


def test_the_decoder_needs_the_audio(english: Pair):
    runner = SpeechRunner(english.model)
    inputs = build_step(runner.cache, [SequenceSpan([1, 2], 0, range(runner.blocks_per_seq))])
    with pytest.raises(ValueError, match="needs the audio"):
        english.model(inputs.input_ids, inputs.positions, inputs.meta)


# ---- greedy decoding with Whisper's rules ----


@dataclass(frozen=True)
class Job:
    audio: str
    timestamps: bool
    language: str | None = None
    task: str = "transcribe"
    previous: str | None = None  # text before <|startofprev|>'s prompt (transformers' prompt_ids)


JOBS = {
    "english": [
        Job("tone", False),
        Job("chirp", True),
        Job("noise", True),
        Job("silence", False),
        Job("chirp", False, previous="hello world"),
        Job("tone", True, previous="one two three"),
    ],
    "multilingual": [
        Job("tone", False, "en"),
        Job("chirp", True, "de"),
        Job("noise", True, "fr", "translate"),
        Job("silence", False, "ja", "translate"),
        Job("chirp", False, "es", previous="hello world"),
        Job("tone", True, "en", "translate", previous="one two three"),
    ],
}
NEW_TOKENS = 24


def expected_tokens(p: Pair, job: Job) -> tuple[list[int], list[int]]:
    """(decoder prompt, generated tokens up to and with <|endoftext|>) from transformers' generate."""
    features = p.features(AUDIO[job.audio])
    kwargs = {"language": job.language, "task": job.task} if job.language else {}
    if job.previous is not None:
        kwargs["prompt_ids"] = p.ours.tokenizer.hf.get_prompt_ids(job.previous, return_tensors="pt")
    with torch.inference_mode():
        out = p.hf.generate(
            features,
            return_timestamps=job.timestamps,
            max_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            force_unique_generate_call=True,
            **kwargs,
        )
    sequence = out.sequences[0].tolist()
    prompt_length = len(previous_ids(p, job)) + len(p.prompt(job.timestamps, job.language, job.task))
    generated = sequence[prompt_length:]
    eos = p.speech.end_of_text
    return sequence[:prompt_length], generated[: generated.index(eos) + 1] if eos in generated else generated


def previous_ids(p: Pair, job: Job) -> list[int]:
    """`<|startofprev|>` and the previous text, as the core writes it (a leading space, as transformers)."""
    if job.previous is None:
        return []
    assert p.speech.start_of_prev is not None
    return [p.speech.start_of_prev, *p.ours.tokenizer.encode(" " + job.previous, add_special_tokens=False)]


def our_greedy(p: Pair, prompts: list[list[int]], audio: list[str]) -> list[list[int]]:
    """Greedy tokens of every sequence, all decoded in one batch with Whisper's rules applied the
    way the sampler applies logits processors."""
    assert p.ours.decoding is not None
    runner = SpeechRunner(p.model, max_seqs=len(prompts))
    pipeline = LogitsPipeline([WhisperRules(p.ours.decoding)])
    keys = [str(i) for i in range(len(prompts))]
    eos = p.speech.end_of_text
    for key, prompt, name in zip(keys, prompts, audio, strict=True):
        runner.add(key, prompt, p.features(AUDIO[name])[0])
        pipeline.admit(key, Admission(SamplingParams(temperature=0.0), prompt, {eos}))
    outputs: dict[str, list[int]] = {key: [] for key in keys}
    live = list(keys)
    steps = [(key, len(runner.tokens[key])) for key in live]
    while live:
        logits = runner.step(steps)
        last = torch.tensor(list(np.cumsum([n for _, n in steps]) - 1))
        rows = logits[last]
        pipeline.apply(rows, [RowRef(key) for key in live])
        for key, token in zip(list(live), rows.argmax(dim=-1).tolist(), strict=True):
            outputs[key].append(token)
            pipeline.accept(key, [token])
            runner.tokens[key].append(token)
            if token == eos or len(outputs[key]) == NEW_TOKENS:
                live.remove(key)
                pipeline.release(key)
        steps = [(key, 1) for key in live]
    return [outputs[key] for key in keys]


@pytest.mark.parametrize("which", ["english", "multilingual"])
def test_greedy_tokens_equal_generate(which: str, request: pytest.FixtureRequest):
    """Six windows of one model decoded in one batch (different audio, prompts with and without
    timestamps, languages, tasks and previous text) give, each, what `generate` gives for it alone."""
    p: Pair = request.getfixturevalue(which)
    jobs = JOBS[which]
    prompts = [[*previous_ids(p, job), *p.prompt(job.timestamps, job.language, job.task)] for job in jobs]
    expected = [expected_tokens(p, job) for job in jobs]
    for prompt, (hf_prompt, _) in zip(prompts, expected, strict=True):
        assert prompt == hf_prompt  # our prompt layout is transformers'
    ours = our_greedy(p, prompts, [job.audio for job in jobs])
    assert ours == [tokens for _, tokens in expected]
    begin = p.speech.timestamp_begin
    for job, tokens in zip(jobs, ours, strict=True):
        stamps = [t for t in tokens if t >= begin]
        assert len(set(tokens)) >= 3  # real output, not one token repeated
        if job.timestamps:
            assert tokens[0] >= begin and len(stamps) >= 4  # the timestamp rules were exercised
            assert stamps == sorted(stamps)
    assert len({tuple(tokens) for tokens in ours}) == len(jobs)
    assert len({t for tokens in ours for t in tokens if t < p.speech.end_of_text}) >= 8


# ---- the rules processor against transformers' processors ----


def hf_processors(generation: GenerationConfig, begin_index: int, timestamps: bool) -> list:
    processors: list = [
        SuppressTokensAtBeginLogitsProcessor(generation.begin_suppress_tokens, begin_index),
        SuppressTokensLogitsProcessor(generation.suppress_tokens),
    ]
    if timestamps:
        processors.append(WhisperTimeStampLogitsProcessor(generation, begin_index))
    return processors


@pytest.mark.parametrize("max_initial", [50, 3, None])
def test_rules_equal_transformers_processors(english: Pair, max_initial: int | None):
    """Random outputs (text, timestamps in and out of pairs, going back, the end) and random scores
    (some rows with one text token far ahead, so the sum-of-probabilities rule goes both ways), in
    one batch; each row checked alone through transformers' processors in `generate`'s order.
    Half the rows hold part of their output as a speculative draft, not yet accepted."""
    raw = json.loads((english.folder / "generation_config.json").read_text())
    raw["max_initial_timestamp_index"] = max_initial
    generation = GenerationConfig(**raw)
    assert english.ours.decoding is not None
    from dataclasses import replace

    decoding = replace(english.ours.decoding, max_initial_timestamp_index=max_initial)
    s = english.speech
    rng = np.random.default_rng(0 if max_initial is None else max_initial)
    vocab = english.model.config.vocab_size
    rows, refs, expected = [], [], []
    rules = WhisperRules(decoding)
    for i in range(64):
        timestamps = i % 4 != 3
        prompt = [s.start_of_transcript] if timestamps else [s.start_of_transcript, s.no_timestamps]
        history: list[int] = []
        for _ in range(int(rng.integers(0, 7))):
            kind = rng.random()
            if kind < 0.45:
                history.append(int(rng.integers(s.timestamp_begin, s.timestamp_begin + 60)))
            elif kind < 0.95:
                history.append(int(rng.integers(0, s.end_of_text)))
            else:
                history.append(s.end_of_text)
        scores = torch.from_numpy(rng.standard_normal(vocab).astype(np.float32)) * float(rng.uniform(1, 6))
        if i % 3 == 0:
            scores[int(rng.integers(0, s.end_of_text))] += 15.0
        draft = tuple(history[len(history) // 2 :]) if i % 2 else ()
        key = f"seq{i}"
        rules.admit(key, Admission(SamplingParams(), prompt, {s.end_of_text}))
        if len(history) > len(draft):
            rules.accept(key, history[: len(history) - len(draft)])
        refs.append(RowRef(key, draft))
        rows.append(scores)
        want = scores[None].clone()
        input_ids = torch.tensor([prompt + history])
        for processor in hf_processors(generation, len(prompt), timestamps):
            want = processor(input_ids, want)
        expected.append(want[0])
    logits = torch.stack(rows)
    rules.apply(logits, list(range(len(rows))), refs)
    expected_logits = torch.stack(expected)
    assert torch.equal(torch.isinf(logits), torch.isinf(expected_logits))
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)
    forced = torch.isinf(expected_logits[:, : s.timestamp_begin]).all(dim=-1)
    assert 0 < int(forced.sum()) < len(rows)  # some rows must take a timestamp, some not


def test_rules_only_touch_their_rows_and_follow_forks(english: Pair):
    assert english.ours.decoding is not None
    rules = WhisperRules(english.ours.decoding)
    s = english.speech
    rules.admit("a", Admission(SamplingParams(), [s.start_of_transcript], {s.end_of_text}))
    rules.accept("a", [s.timestamp_begin + 2, 5])
    rules.fork("a", "b")
    rules.accept("b", [s.timestamp_begin + 9])  # a lone timestamp: b must close the pair or end
    logits = torch.zeros(3, english.model.config.vocab_size)
    rules.apply(logits, [0, 2], [RowRef("a"), RowRef("b")])
    assert torch.equal(logits[1], torch.zeros_like(logits[1]))  # not ours
    b = logits[2]
    assert (
        torch.isinf(b[: s.end_of_text]).all()
        and torch.isinf(b[s.timestamp_begin : s.timestamp_begin + 9]).all()
    )
    assert torch.isfinite(b[s.timestamp_begin + 9 :]).all()
    a = logits[0]
    assert torch.isinf(a[s.timestamp_begin : s.timestamp_begin + 3]).all()  # never back, nor the same again
    rules.release("a")
    rules.release("b")


# ---- loading ----


def test_the_loader_describes_an_english_only_model(english: Pair, tiny_llama: Path):
    loaded, tokenizer = english.ours, english.ours.tokenizer
    assert (
        loaded.spec is not None and loaded.spec.kind == "decoder" and loaded.spec.tasks == {"transcription"}
    )
    config = loaded.config
    assert isinstance(config, ModelConfig) and config is english.model.config
    assert (config.architecture, config.num_hidden_layers, config.num_attention_heads) == (
        "WhisperForConditionalGeneration",
        2,
        4,
    )
    assert (config.num_key_value_heads, config.head_dim, config.hidden_size) == (4, 16, 64)
    assert config.max_position_embeddings == 64 and config.vocab_size == len(tokenizer.hf)
    ids = tokenizer.hf.convert_tokens_to_ids
    assert english.speech == SpeechSpec(
        sample_rate=RATE,
        window_seconds=30.0,
        max_target_tokens=64,
        start_of_transcript=ids("<|startoftranscript|>"),
        transcribe=ids("<|transcribe|>"),
        translate=None,
        no_timestamps=ids("<|notimestamps|>"),
        start_of_prev=ids("<|startofprev|>"),
        timestamp_begin=ids("<|0.00|>"),
        end_of_text=ids("<|endoftext|>"),
        languages={},
    )
    assert english.speech.timestamp_begin + TIMESTAMPS == config.vocab_size
    assert english.speech.end_of_text in tokenizer.eos_token_ids
    raw = json.loads((english.folder / "generation_config.json").read_text())
    decoding = loaded.decoding
    assert decoding is not None
    assert decoding.suppress_tokens == tuple(raw["suppress_tokens"])
    assert decoding.begin_suppress_tokens == tuple(raw["begin_suppress_tokens"])
    assert decoding.max_initial_timestamp_index == 50
    assert isinstance(whisper_rules(loaded), WhisperRules)
    assert whisper_rules(load(tiny_llama)) is None


def test_the_loader_describes_a_multilingual_model(multilingual: Pair):
    speech, ids = multilingual.speech, multilingual.ours.tokenizer.hf.convert_tokens_to_ids
    assert speech.languages == {code: ids(f"<|{code}|>") for code in LANGUAGES}
    assert speech.translate == ids("<|translate|>") and speech.transcribe == ids("<|transcribe|>")
    assert list(speech.languages.values()) == list(range(speech.start_of_transcript + 1, speech.translate))


@pytest.fixture
def copy(english: Pair, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(english.folder, folder)
    return folder


def edit_weights(folder: Path, drop: str | None = None, **extra: torch.Tensor) -> None:
    tensors = load_file(folder / "model.safetensors")
    if drop is not None:
        del tensors[drop]
    tensors.update(extra)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "tensor",
    [
        "model.decoder.layers.1.fc1.weight",
        "model.decoder.layers.0.self_attn.v_proj.bias",
        "model.encoder.conv1.bias",
    ],
)
def test_a_missing_tensor_is_named(copy: Path, tensor: str):
    edit_weights(copy, drop=tensor)
    with pytest.raises(ValueError, match=f"checkpoint lacks tensors for: {tensor.replace('.', '[.]')}"):
        load(copy)


def test_an_unknown_or_misshapen_tensor_is_refused(copy: Path):
    edit_weights(copy, **{"model.decoder.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="'model.decoder.layers.0.extra.weight' has no place"):
        load(copy)
    edit_weights(
        copy, drop="model.decoder.layers.0.extra.weight", **{"model.encoder.conv2.bias": torch.zeros(3)}
    )
    with pytest.raises(ValueError, match=r"'model.encoder.conv2.bias' has shape \(3,\), expected \(64,\)"):
        load(copy)


def test_absent_encoder_positions_are_the_sinusoids(english: Pair, copy: Path):
    edit_weights(copy, drop="model.encoder.embed_positions.weight")
    model = load(copy).model
    assert isinstance(model, WhisperForConditionalGeneration)
    features = english.features(AUDIO["tone"])
    with torch.inference_mode():
        torch.testing.assert_close(model.encode(features), english.model.encode(features), atol=1e-6, rtol=0)


def test_a_k_projection_bias_is_taken_and_changes_nothing(english: Pair, copy: Path):
    """Some converters store zeros (or anything) as the k projections' bias; attention ignores it."""
    biases = {
        f"model.decoder.layers.{i}.{part}.k_proj.bias": torch.randn(64)
        for i in range(2)
        for part in ("self_attn", "encoder_attn")
    }
    edit_weights(copy, **biases)
    model = load(copy).model
    assert isinstance(model, WhisperForConditionalGeneration)
    ids = english.prompt(timestamps=False) + [50, 60, 70]
    features = english.features(AUDIO["chirp"])[0]
    runs = []
    for m in (model, english.model):
        runner = SpeechRunner(m)
        runner.add("a", ids, features)
        runs.append(runner.step([("a", len(ids))]))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)


def test_models_that_cannot_run_are_refused(copy: Path):
    with pytest.raises(UnsupportedModelError, match="cannot serve embeddings"):
        load_model(resolve_model(str(copy)), dtype="float32", progress=False, convert="embed")
    edit_json(copy / "preprocessor_config.json", feature_size=128)
    with pytest.raises(UnsupportedModelError, match="makes 128 mel bins; the model reads 80"):
        load(copy)
    edit_json(copy / "preprocessor_config.json", feature_size=80, chunk_length=20)
    with pytest.raises(UnsupportedModelError, match=r"\[80, 2000\] features; the encoder takes \[80, 3000\]"):
        load(copy)
    edit_json(copy / "preprocessor_config.json", chunk_length=30)
    edit_json(copy / "generation_config.json", is_multilingual=True)
    with pytest.raises(UnsupportedModelError, match="needs lang_to_id"):
        load(copy)
    edit_json(copy / "generation_config.json", is_multilingual=False, no_timestamps_token_id=5000)
    with pytest.raises(UnsupportedModelError, match="outside the model's vocabulary"):
        load(copy)


@pytest.mark.parametrize("dtype,storage", [("bfloat16", None), ("float32", torch.bfloat16)])
def test_packed_weights_run_close_to_float32(english: Pair, dtype: str, storage: torch.dtype | None):
    """The serving setup (`pack_weights` after loading): bfloat16 weights, or float32 math on
    bfloat16-stored projections as on CPUs without bfloat16 instructions. Tolerance 0.15 on logits
    of magnitude ~6 (observed 0.076 and 0.023: bfloat16 keeps 8 bits of mantissa)."""
    loaded = load_model(resolve_model(str(english.folder)), dtype=dtype, progress=False)
    model = loaded.model
    assert isinstance(model, WhisperForConditionalGeneration)
    model.pack_weights(storage)
    ids = english.prompt(timestamps=True) + [50, 60, 70]
    features = english.features(AUDIO["noise"])[0]
    runner = SpeechRunner(model)
    runner.add("a", ids, features)
    ours = runner.step([("a", len(ids))])
    torch.testing.assert_close(ours, hf_logits(english.hf, features, ids), atol=0.15, rtol=0)
