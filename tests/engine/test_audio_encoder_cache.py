"""The speech runner's encoder side: each audio window encoded once, its keys and values kept while
it decodes, stacked per step in span order."""

import hashlib

import numpy as np
import pytest

from engine.attention import SequenceSpan
from engine.audio_encoder_cache import AudioEncoderCache
from protocol.engine_api import MediaInput

LAYERS, FRAMES, HEADS, DIM = 2, 3, 1, 2


class CountingSpeechModel:
    """Features are the samples; the encoding is their mean; layer l's keys are mean + l."""

    def __init__(self):
        self.windows_encoded = 0

    def input_features(self, samples):
        return samples[:1].expand(4, FRAMES)

    def encode(self, features):
        self.windows_encoded += features.shape[0]
        return features.mean(dim=1)[:, :FRAMES]

    def cross_kv(self, encoded):
        base = encoded[:, :, None, None].expand(-1, -1, HEADS, DIM)
        return [(base + layer, -(base + layer)) for layer in range(LAYERS)]


def window(value: float) -> MediaInput:
    data = np.full(16, value, dtype="<f4").tobytes()
    return MediaInput("audio", hashlib.sha256(data).hexdigest(), 0, 0, data, (16,))


def decode_step(*items):
    return [SequenceSpan([0], 5, [0], [item]) for item in items]


def test_each_window_is_encoded_once_and_stacked_in_span_order():
    model = CountingSpeechModel()
    cache = AudioEncoderCache(model)
    first, second = window(1.0), window(7.0)
    for _ in range(3):  # three decode steps of two sequences
        layers = cache.step_cross(decode_step(second, first))
    assert model.windows_encoded == 2
    assert len(layers) == LAYERS
    keys, values = layers[1]
    assert keys.shape == (2, FRAMES, HEADS, DIM)
    assert keys[:, 0, 0, 0].tolist() == [8.0, 2.0] and values[:, 0, 0, 0].tolist() == [-8.0, -2.0]


def test_more_running_windows_than_the_bound_are_all_kept():
    """A long file's windows run at once: none is encoded again while it decodes."""
    model = CountingSpeechModel()
    cache = AudioEncoderCache(model, max_cached_items=2)
    windows = [window(float(v)) for v in range(5)]
    for _ in range(4):
        cache.step_cross(decode_step(*windows))
    assert model.windows_encoded == 5


def test_a_span_without_exactly_one_audio_window_is_refused():
    cache = AudioEncoderCache(CountingSpeechModel())
    with pytest.raises(ValueError, match="exactly one audio window"):
        cache.step_cross([SequenceSpan([0], 0, [0], [])])
    with pytest.raises(ValueError, match="exactly one audio window"):
        cache.step_cross([SequenceSpan([0], 0, [0], [window(1.0), window(2.0)])])
