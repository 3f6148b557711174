"""Speech features: WAV reading, log-mel filterbanks and MFCCs computed with torch's STFT.

The defaults are the classic ones for speech recognition: 25 ms windows every 10 ms (Hann), a
mel filterbank on the HTK mel scale (mel = 2595·log10(1 + f/700)), log energies with a floor, and
MFCCs as the orthonormal DCT-II of the log-mel energies. Per-utterance normalisation subtracts
each feature's mean over time and divides by its standard deviation.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.options import Options, option
from rnnkit.options.files import file_problem


class AudioError(ValueError):
    """An audio file that cannot be used: unreadable, empty, or not in the expected format."""


def check_audio_path(path: str | Path) -> Path:
    """``path`` if it names a readable file, else :class:`AudioError` saying what it is."""
    path = Path(path)
    problem = file_problem(path)
    if problem == "does not exist":
        raise AudioError(f"{path}: no such audio file")
    if problem:
        raise AudioError(f"{path} {problem}; give a WAV file")
    return path


def read_wav(path: str | Path, expected_rate: int | None = None) -> tuple[Tensor, int]:
    """Reads a PCM WAV file as mono float32 samples in [-1, 1] and its sample rate.

    Multi-channel audio is averaged to mono. Raises :class:`AudioError` naming the file for a file
    that is missing, not a PCM WAV, empty, or (with ``expected_rate``) at another sample rate.
    """
    path = check_audio_path(path)
    try:
        with wave.open(str(path), "rb") as handle:
            rate = handle.getframerate()
            channels = handle.getnchannels()
            width = handle.getsampwidth()
            frames = handle.readframes(handle.getnframes())
    except FileNotFoundError:
        raise AudioError(f"{path}: no such audio file") from None
    except (wave.Error, EOFError) as error:
        raise AudioError(f"{path}: not a readable PCM WAV file ({error})") from None
    if width not in (1, 2, 4):
        raise AudioError(f"{path}: unsupported sample width of {width} bytes")
    if not frames:
        raise AudioError(f"{path}: the file holds no audio samples")
    if expected_rate is not None and rate != expected_rate:
        raise AudioError(
            f"{path}: sample rate is {rate} Hz but {expected_rate} Hz is expected; "
            "resample the file (e.g. `sox in.wav -r 8000 out.wav`)"
        )
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128) / 128
    else:
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(frames, dtype=dtype).astype(np.float32) / float(
            np.iinfo(dtype).max + 1
        )
    usable = len(samples) - len(samples) % channels
    samples = samples[:usable].reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(samples)), rate


def write_wav(path: str | Path, samples: Tensor, rate: int) -> None:
    """Writes mono float samples in [-1, 1] as 16-bit PCM."""
    pcm = (samples.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())


def hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(num_mels: int, n_fft: int, rate: int, low_hz: float = 20.0,
                   high_hz: float | None = None) -> Tensor:
    """(num_mels, n_fft // 2 + 1) triangular filters, equally spaced on the mel scale."""
    high_hz = high_hz or rate / 2
    if not 0 <= low_hz < high_hz <= rate / 2:
        raise ValueError(f"need 0 <= low_hz < high_hz <= {rate / 2} Hz, got {low_hz}, {high_hz}")
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(low_hz))),
                                     float(hz_to_mel(torch.tensor(high_hz))), num_mels + 2,
                                     dtype=torch.float64))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


def dct_matrix(num_coefficients: int, size: int) -> Tensor:
    """(size, num_coefficients) orthonormal DCT-II basis: ``x @ dct`` = scipy's dct(norm='ortho')."""
    n = torch.arange(size, dtype=torch.float64)
    k = torch.arange(num_coefficients, dtype=torch.float64)
    basis = torch.cos(math.pi / size * (n[:, None] + 0.5) * k[None, :]) * math.sqrt(2.0 / size)
    basis[:, 0] /= math.sqrt(2.0)
    return basis.float()


@dataclass(frozen=True)
class FeatureConfig(Options):
    """How waveforms become feature frames; stored in checkpoints so inference matches training."""

    sample_rate: int = option(8000, "sample rate (Hz) the recordings must have", ge=1)
    window_ms: float = option(25.0, "analysis window (ms)", gt=0)
    hop_ms: float = option(10.0, "hop between frames (ms)", gt=0)
    num_mels: int = option(40, "mel filters", ge=1)
    num_mfcc: int = option(0, "0: log-mel energies; > 0: that many MFCCs", ge=0)
    normalize: bool = option(True, "normalise each utterance's features to zero mean, unit "
                                   "variance")
    log_floor: float = option(1e-6, "floor under the energies before the log", gt=0)

    @property
    def dim(self) -> int:
        return self.num_mfcc or self.num_mels

    def to_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


class FeatureExtractor:
    """Waveform (samples,) → features (frames, dim), as configured."""

    def __init__(self, config: FeatureConfig = FeatureConfig()) -> None:
        self.config = config
        self.win_length = round(config.sample_rate * config.window_ms / 1000)
        self.hop_length = round(config.sample_rate * config.hop_ms / 1000)
        self.n_fft = 1 << (self.win_length - 1).bit_length()
        self.window = torch.hann_window(self.win_length)
        self.filters = mel_filterbank(config.num_mels, self.n_fft, config.sample_rate)
        self.dct = dct_matrix(config.num_mfcc, config.num_mels) if config.num_mfcc else None

    def num_frames(self, num_samples: int) -> int:
        return 1 + (num_samples - self.n_fft) // self.hop_length

    def __call__(self, samples: Tensor) -> Tensor:
        return self.batch([samples])[0]

    def batch(self, waveforms: list[Tensor]) -> list[Tensor]:
        """Features of several waveforms with one STFT and one filterbank GEMM for all of them."""
        for samples in waveforms:
            if samples.dim() != 1:
                raise AudioError(
                    f"expected mono samples (samples,), got shape {tuple(samples.shape)}")
            if samples.numel() < self.n_fft:  # the STFT frames are n_fft samples long
                raise AudioError(
                    f"audio of {samples.numel()} samples is shorter than one "
                    f"{self.config.window_ms:g} ms analysis frame ({self.n_fft} samples)"
                )
        padded = nn.utils.rnn.pad_sequence([w.float() for w in waveforms], batch_first=True)
        spectrum = torch.stft(padded, self.n_fft, self.hop_length, self.win_length, self.window,
                              center=False, return_complex=True)  # (B, bins, frames)
        power = spectrum.abs().pow(2).transpose(1, 2)  # (B, frames, bins)
        features = torch.log(power @ self.filters.t() + self.config.log_floor)
        if self.dct is not None:
            features = features @ self.dct
        results = []
        for row, samples in enumerate(waveforms):
            frames = features[row, : self.num_frames(samples.numel())]
            if self.config.normalize:
                frames = (frames - frames.mean(0)) / (frames.std(0, unbiased=False) + 1e-5)
            results.append(frames)
        return results

    def from_file(self, path: str | Path) -> Tensor:
        samples, _ = read_wav(path, expected_rate=self.config.sample_rate)
        return self(samples)
