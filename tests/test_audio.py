"""Speech features: WAV I/O errors, the mel filterbank, MFCCs against scipy's DCT."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import shared_file
from rnnkit.data.audio import (
    AudioError,
    FeatureConfig,
    FeatureExtractor,
    dct_matrix,
    mel_filterbank,
    read_wav,
    write_wav,
)


def _tone(hz: float, seconds: float = 0.5, rate: int = 8000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * hz * t)


def test_wav_round_trip(tmp_path) -> None:
    samples = _tone(440)
    write_wav(tmp_path / "tone.wav", samples, 8000)
    read, rate = read_wav(tmp_path / "tone.wav", expected_rate=8000)
    assert rate == 8000
    torch.testing.assert_close(read, samples, atol=1 / 32767, rtol=0)


def test_bad_audio_files_are_named(tmp_path) -> None:
    with pytest.raises(AudioError, match=r"missing\.wav: no such audio file"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("not audio at all")
    with pytest.raises(AudioError, match=r"text\.wav: not a readable PCM WAV"):
        read_wav(tmp_path / "text.wav")
    write_wav(tmp_path / "empty.wav", torch.zeros(0), 8000)
    with pytest.raises(AudioError, match=r"empty\.wav: the file holds no audio"):
        read_wav(tmp_path / "empty.wav")
    write_wav(tmp_path / "fast.wav", _tone(440), 16000)
    with pytest.raises(AudioError, match="sample rate is 16000 Hz but 8000 Hz is expected"):
        FeatureExtractor().from_file(tmp_path / "fast.wav")
    with pytest.raises(AudioError, match="shorter than one 25 ms analysis frame"):
        FeatureExtractor()(torch.zeros(100))


def test_filterbank_shape_and_peaks() -> None:
    filters = mel_filterbank(40, 256, 8000)
    assert filters.shape == (40, 129)
    assert filters.min() >= 0 and filters.max() <= 1
    peaks = filters.argmax(1)
    assert (peaks[1:] >= peaks[:-1]).all()  # centres rise with the filter index


def test_a_tone_lights_up_the_band_that_contains_it() -> None:
    extractor = FeatureExtractor(FeatureConfig(normalize=False))
    low, high = extractor(_tone(300)), extractor(_tone(3000))
    assert low.shape[1] == 40
    assert low.mean(0).argmax() < high.mean(0).argmax()
    hop = extractor.hop_length
    assert low.shape[0] == 1 + (4000 - extractor.n_fft) // hop


def test_mfcc_is_the_orthonormal_dct_of_log_mel() -> None:
    scipy_fft = pytest.importorskip("scipy.fft")
    log_mel = torch.randn(7, 40)
    expected = torch.from_numpy(scipy_fft.dct(log_mel.numpy(), type=2, norm="ortho", axis=1))
    torch.testing.assert_close(log_mel @ dct_matrix(40, 40), expected.float(), rtol=1e-5, atol=1e-5)
    mfcc = FeatureExtractor(FeatureConfig(num_mfcc=13))(_tone(500))
    assert mfcc.shape[1] == 13


def test_normalised_features_have_zero_mean_unit_variance() -> None:
    features = FeatureExtractor()(_tone(700) + 0.1 * torch.randn(4000))
    torch.testing.assert_close(features.mean(0), torch.zeros(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(features.std(0, unbiased=False), torch.ones(40), atol=1e-3, rtol=0)


def test_reads_a_real_fsdd_recording() -> None:
    path = shared_file("fsdd/recordings/0_george_0.wav")
    features = FeatureExtractor().from_file(path)
    assert features.shape[1] == 40 and features.shape[0] > 10
    assert torch.isfinite(features).all()
