"""Whisper's input features: one audio window as the log-mel spectrogram its encoder reads.

The same computation as transformers' `WhisperFeatureExtractor` (its torch path, which it uses
whenever torch is installed): the samples padded with zeros or cut to `chunk_length` seconds, a
centred STFT (reflect padding, periodic Hann window of `n_fft`, hop `hop_length`) whose last frame
is dropped, power spectrum, Slaney-style mel filters from 0 to 8 kHz, log10 of at least 1e-10,
floored at the maximum minus 8, then (x + 4) / 4.

The filter bank is computed here from its formula, as transformers does even when a
preprocessor_config.json stores `mel_filters` (its constructor recomputes them), so we match
what transformers computes rather than what an old file says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.model_config import UnsupportedModelError

_MAX_FREQUENCY = 8000.0  # WhisperFeatureExtractor's filters always end here


@dataclass(frozen=True)
class FeatureSettings:
    """A preprocessor_config.json of `WhisperFeatureExtractor` (its defaults for keys left out)."""

    feature_size: int = 80  # mel bins
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 30  # seconds per window
    n_fft: int = 400

    @classmethod
    def from_hf(cls, config: dict[str, Any], num_mel_bins: int | None = None) -> FeatureSettings:
        """From a parsed preprocessor_config.json; `num_mel_bins` (the model's) fills a missing
        `feature_size` and must agree with a given one."""
        kind = config.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise UnsupportedModelError(
                f"feature extractor {kind!r} is not supported; supported: WhisperFeatureExtractor"
            )
        defaults = cls() if num_mel_bins is None else cls(feature_size=num_mel_bins)
        settings = cls(
            **{name: int(config.get(name, getattr(defaults, name))) for name in cls.__dataclass_fields__}
        )
        if num_mel_bins is not None and settings.feature_size != num_mel_bins:
            raise UnsupportedModelError(
                f"the feature extractor makes {settings.feature_size} mel bins; the model reads {num_mel_bins}"
            )
        if float(config.get("dither", 0.0) or 0.0) != 0.0:
            raise UnsupportedModelError(
                "a feature extractor with dither (random noise added) is not supported"
            )
        return settings

    @property
    def samples(self) -> int:
        """Samples per window (480000: 30 s at 16 kHz)."""
        return self.chunk_length * self.sampling_rate

    @property
    def frames(self) -> int:
        """Feature frames per window (3000)."""
        return self.samples // self.hop_length


@dataclass
class LogMelFeatures:
    """Samples of one window -> [feature_size, frames] float32, as `WhisperFeatureExtractor` computes them."""

    settings: FeatureSettings = field(default_factory=FeatureSettings)
    _filters: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        """float32 [n] at `sampling_rate` (any n: cut to, or padded with silence to, one window) ->
        float32 [feature_size, frames] on the samples' device."""
        if samples.dim() != 1:
            raise ValueError(f"expected mono samples [n], got shape {tuple(samples.shape)}")
        s = self.settings
        waveform = samples.to(torch.float32)[: s.samples]
        if waveform.shape[0] < s.samples:
            waveform = torch.nn.functional.pad(waveform, (0, s.samples - waveform.shape[0]))
        window = torch.hann_window(s.n_fft, device=waveform.device)
        stft = torch.stft(waveform, s.n_fft, s.hop_length, window=window, return_complex=True)
        magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
        mel = self._filter_bank(waveform.device).T @ magnitudes
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def _filter_bank(self, device: torch.device) -> torch.Tensor:
        """[n_fft // 2 + 1, feature_size] float32, computed once per device (never at build time, which
        may run on the meta device)."""
        filters = self._filters.get(device)
        if filters is None:
            s = self.settings
            bank = mel_filter_bank(1 + s.n_fft // 2, s.feature_size, _MAX_FREQUENCY, s.sampling_rate)
            filters = torch.from_numpy(bank).to(device=device, dtype=torch.float32)
            self._filters[device] = filters
        return filters


def mel_filter_bank(
    num_frequency_bins: int, num_mel_filters: int, max_frequency: float, sampling_rate: int
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters from 0 Hz to `max_frequency`, float64
    [num_frequency_bins, num_mel_filters] (transformers' `mel_filter_bank(..., norm="slaney",
    mel_scale="slaney")`, librosa's `filters.mel` transposed)."""
    mels = np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(max_frequency), num_mel_filters + 2)
    filter_freqs = _mel_to_hertz(mels)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    bank = np.maximum(np.zeros(1), np.minimum(down, up))
    bank *= np.expand_dims(2.0 / (filter_freqs[2 : num_mel_filters + 2] - filter_freqs[:num_mel_filters]), 0)
    return bank


# The Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above
_MIN_LOG_HERTZ, _MIN_LOG_MEL, _LOGSTEP = 1000.0, 15.0, 27.0 / np.log(6.4)


def _hertz_to_mel(freq: float) -> float:
    if freq >= _MIN_LOG_HERTZ:
        return float(_MIN_LOG_MEL + np.log(freq / _MIN_LOG_HERTZ) * _LOGSTEP)
    return 3.0 * freq / 200.0


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freqs = 200.0 * mels / 3.0
    log_region = mels >= _MIN_LOG_MEL
    freqs[log_region] = _MIN_LOG_HERTZ * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - _MIN_LOG_MEL))
    return freqs
