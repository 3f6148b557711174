"""Spoken digit strings: a recurrent acoustic model trained with CTC, no frame alignments.

Data: recordings named ``{digit}_{speaker}_{take}.wav`` (the Free Spoken Digit Dataset layout,
8 kHz mono). Utterances of ``min_digits``–``max_digits`` digits are built by concatenating
recordings of one speaker with short random silences, so the model must segment as well as
recognise. Splits:

* ``recording`` (FSDD's convention): takes 0–4 of every speaker and digit are held out;
* ``speaker``: every recording of ``held_out_speaker`` is held out (speaker-independent).

Metrics: digit error rate (edit distance / reference length) and sequence accuracy (exact match),
with greedy decoding. Labels: 0 is the CTC blank, digit d is label d + 1.

Every training batch is a pure function of (seed, batch index), so a resumed run sees the same
utterances as an uninterrupted one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.data.audio import FeatureConfig, FeatureExtractor, read_wav, write_wav
from rnnkit.decoding import decode_batch
from rnnkit.losses import ctc_loss
from rnnkit.metrics.scoring import align, error_rate
from rnnkit.models.acoustic import AcousticConfig, AcousticModel
from rnnkit.options import Options, option
from rnnkit.tasks.common import check_size, device_of, from_meta, load_task_model, per_sequence
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult

NAME = "speech"
BLANK = 0
FILE_PATTERN = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")
SHARED_FSDD = Path("../shared/data/fsdd/recordings")
SPLITS = ("recording", "speaker")
HELD_OUT_TAKES = 5  # FSDD: takes 0-4 of each speaker and digit form the test set
VALID_SEED_OFFSET = 7_919  # the held-out utterances are drawn from seed + this


@dataclass
class SpeechDataConfig(Options):
    recordings: str | None = option(None, "a folder of {digit}_{speaker}_{take}.wav (none: "
                                          "../shared/data/fsdd/recordings, else synthesised)",
                                    metavar="PATH")
    split: str = option("recording", "hold out recordings at random, or one speaker",
                        choices=SPLITS)
    held_out_speaker: str = option("theo", "the speaker held out with split=speaker")
    min_digits: int = option(1, "fewest digits per utterance", ge=1)
    max_digits: int = option(5, "most digits per utterance", ge=1)
    min_silence: float = option(0.05, "shortest silence (s) before, between and after digits",
                                ge=0)
    max_silence: float = option(0.30, "longest silence (s)", ge=0)
    noise: float = option(0.002, "amplitude of the background noise under the utterance", ge=0)
    valid_utterances: int = option(400, "validation utterances", ge=1)
    eval_batch_size: int = option(64, "utterances evaluated in parallel", ge=1)
    features: dict[str, Any] = option(help="how waveforms become feature frames",
                                      factory=lambda: asdict(FeatureConfig()),
                                      schema=FeatureConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.min_digits <= self.max_digits:
            raise ValueError(f"need min_digits <= max_digits, got {self.min_digits}, "
                             f"{self.max_digits}")
        if not self.min_silence <= self.max_silence:
            raise ValueError("need min_silence <= max_silence")


SECTIONS: dict[str, type] = {"data": SpeechDataConfig, "model": AcousticConfig,
                             "train": TrainConfig}


def default_config() -> dict[str, dict[str, Any]]:
    train = TrainConfig(steps=3000, batch_size=32, lr=2e-3, eval_every=250, clip_norm=5.0)
    return {"data": asdict(SpeechDataConfig()), "model": AcousticConfig().to_dict(),
            "train": train.to_dict()}


Recording = tuple[int, str, int]  # (digit, speaker, take)


def find_recordings(directory: Path) -> dict[Recording, Path]:
    """The FSDD-style recordings in ``directory``, keyed by (digit, speaker, take)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory of recordings")
    found = {}
    for path in sorted(directory.iterdir()):
        match = FILE_PATTERN.match(path.name)
        if match:
            found[(int(match[1]), match[2], int(match[3]))] = path
    if not found:
        raise FileNotFoundError(
            f"{directory} holds no recordings named {{digit}}_{{speaker}}_{{take}}.wav"
        )
    return found


def synthesise_recordings(directory: Path, rate: int = 8000, takes: int = 8) -> None:
    """Spoken digits from espeak-ng in several voices, speeds and pitches, as FSDD-style files."""
    espeak = shutil.which("espeak-ng") or shutil.which("espeak")
    if espeak is None:
        raise FileNotFoundError(
            "no speech recordings: pass --data DIR with files named {digit}_{speaker}_{take}.wav "
            "(e.g. the Free Spoken Digit Dataset), put the shared data sets at "
            f"{SHARED_FSDD}, or install espeak-ng (apt-get install espeak-ng) to synthesise digits"
        )
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    voices = {"us": "en-us", "gb": "en", "sc": "en-sc", "rp": "en-gb-x-rp"}
    directory.mkdir(parents=True, exist_ok=True)
    for speaker, voice in voices.items():
        for take in range(takes):
            speed, pitch = 130 + 12 * take, 35 + 5 * take
            for digit, word in enumerate(words):
                target = directory / f"{digit}_{speaker}_{take}.wav"
                if target.exists():
                    continue
                with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
                    subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch),
                                    "-w", raw.name, word], check=True, capture_output=True)
                    samples, source_rate = read_wav(raw.name)
                write_wav(target, _resample(samples, source_rate, rate), rate)


def _resample(samples: Tensor, source_rate: int, rate: int) -> Tensor:
    """Band-limited resampling by zero-padding or truncating the spectrum."""
    if source_rate == rate:
        return samples
    length = round(samples.numel() * rate / source_rate)
    spectrum = torch.fft.rfft(samples.double())
    kept = torch.zeros(length // 2 + 1, dtype=spectrum.dtype)
    count = min(kept.numel(), spectrum.numel())
    kept[:count] = spectrum[:count]
    return (torch.fft.irfft(kept, n=length) * length / samples.numel()).float()


def resolve_recordings(data: SpeechDataConfig) -> tuple[dict[Recording, Path], str]:
    if data.recordings:
        directory = Path(data.recordings)
        return find_recordings(directory), str(directory)
    if SHARED_FSDD.is_dir():
        return find_recordings(SHARED_FSDD), f"{SHARED_FSDD} (Free Spoken Digit Dataset)"
    cache = Path.home() / ".cache" / "rnnkit" / "espeak-digits"
    synthesise_recordings(cache)
    return find_recordings(cache), f"{cache} (digits synthesised by espeak-ng)"


def split_recordings(recordings: dict[Recording, Path], data: SpeechDataConfig
                     ) -> tuple[list[Recording], list[Recording]]:
    if data.split == "recording":
        held_out = [key for key in recordings if key[2] < HELD_OUT_TAKES]
    else:
        speakers = sorted({key[1] for key in recordings})
        if data.held_out_speaker not in speakers:
            raise ValueError(f"held_out_speaker {data.held_out_speaker!r} is not among the "
                             f"speakers {speakers}")
        held_out = [key for key in recordings if key[1] == data.held_out_speaker]
    held = set(held_out)
    return sorted(k for k in recordings if k not in held), sorted(held_out)


class UtteranceMaker:
    """Builds digit-string utterances from one speaker's recordings, reproducibly."""

    def __init__(self, keys: list[Recording], audio: dict[Recording, Tensor],
                 data: SpeechDataConfig, rate: int) -> None:
        self.data, self.rate, self.audio = data, rate, audio
        self.by_speaker_digit: dict[str, dict[int, list[Recording]]] = defaultdict(
            lambda: defaultdict(list))
        for key in keys:
            self.by_speaker_digit[key[1]][key[0]].append(key)
        # only speakers with every digit can say any digit string
        self.speakers = sorted(s for s, d in self.by_speaker_digit.items() if len(d) == 10)
        if not self.speakers:
            raise ValueError("no speaker has recordings of all ten digits in this split")

    def make(self, generator: torch.Generator) -> tuple[Tensor, list[int]]:
        data = self.data

        def pick(n: int) -> int:
            return int(torch.randint(n, (1,), generator=generator))

        speaker = self.speakers[pick(len(self.speakers))]
        count = data.min_digits + pick(data.max_digits - data.min_digits + 1)
        digits, pieces = [], []
        for _ in range(count):
            digit = pick(10)
            takes = self.by_speaker_digit[speaker][digit]
            digits.append(digit)
            pieces += [self._silence(generator), self.audio[takes[pick(len(takes))]]]
        pieces.append(self._silence(generator))
        samples = torch.cat(pieces)
        samples = samples + data.noise * torch.randn(samples.shape, generator=generator)
        return samples, digits

    def _silence(self, generator: torch.Generator) -> Tensor:
        span = self.data.max_silence - self.data.min_silence
        seconds = self.data.min_silence + span * float(torch.rand((), generator=generator))
        return torch.zeros(round(seconds * self.rate))


def collate(features: list[Tensor], digits: list[list[int]]) -> Batch:
    """Padded features (T, B, F) + lengths (1, B), and CTC targets (1, B, S) + target lengths
    (1, B): batch on dim 1 like every task's batch (ranks share it by rows)."""
    lengths = torch.tensor([f.shape[0] for f in features])
    padded = nn.utils.rnn.pad_sequence(features)  # (T, B, F)
    target_lengths = torch.tensor([len(d) for d in digits])
    targets = torch.zeros(len(digits), int(target_lengths.max()), dtype=torch.long)
    for row, labels in enumerate(digits):
        targets[row, :len(labels)] = torch.tensor(labels) + 1
    return Batch((padded, per_sequence(lengths)), (per_sequence(targets), per_sequence(target_lengths)))


def ctc_args(batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """features (T, B, F), lengths (B,), targets (B, S), target lengths (B,) of a batch."""
    (features, lengths), (targets, target_lengths) = batch.inputs, batch.targets
    return features, lengths[0], targets[0], target_lengths[0]


def labels_to_digits(labels: list[int]) -> list[int]:
    return [label - 1 for label in labels]


@torch.no_grad()
def recognise(model: nn.Module, features: list[Tensor], references: list[list[int]],
              batch_size: int, beam_width: int = 1
              ) -> tuple[list[list[int]], list[list[int]], float]:
    """(references, recognised digits, CTC loss per reference label) of utterances' features."""
    model.eval()
    device = device_of(model)
    hypotheses, total_loss = [], 0.0
    for start in range(0, len(features), batch_size):
        digits = references[start:start + batch_size]
        padded, lengths, targets, target_lengths = ctc_args(
            collate(features[start:start + batch_size], digits))
        log_probs, out_lengths = model(padded.to(device), lengths)
        log_probs, out_lengths = log_probs.cpu(), out_lengths.cpu()  # CTC and decoding on the CPU
        total_loss += float(ctc_loss(log_probs, targets, out_lengths, target_lengths,
                                     reduction="sum", zero_infinity=True))
        decoded = decode_batch(log_probs, out_lengths, blank=BLANK, beam_width=beam_width)
        hypotheses += [labels_to_digits(h.labels) for h in decoded]
    label_count = sum(len(r) for r in references)
    return list(references), hypotheses, total_loss / max(1, label_count)


def recognition_metrics(references: list[list[int]], hypotheses: list[list[int]], loss: float
                        ) -> dict[str, float]:
    """CTC loss, digit error rate and sequence accuracy (exact match)."""
    exact = sum(r == h for r, h in zip(references, hypotheses))
    return {"loss": loss, "der": error_rate(references, hypotheses),
            "seq_acc": exact / max(1, len(references))}


class SpeechTask:
    """The Trainer's view of digit-string recognition."""

    name = NAME

    def __init__(self, data: SpeechDataConfig, model_config: AcousticConfig, batch_size: int,
                 seed: int) -> None:
        self.data, self.model_config = data, model_config
        self.batch_size, self.seed = batch_size, seed
        self.features = FeatureExtractor(FeatureConfig(**data.features))
        rate = self.features.config.sample_rate
        recordings, self.source = resolve_recordings(data)
        audio = {key: read_wav(path, expected_rate=rate)[0] for key, path in recordings.items()}
        train_keys, valid_keys = split_recordings(recordings, data)
        self.train_maker = UtteranceMaker(train_keys, audio, data, rate)
        valid_maker = UtteranceMaker(valid_keys, audio, data, rate)
        generator = torch.Generator().manual_seed(seed + VALID_SEED_OFFSET)
        self.valid = [valid_maker.make(generator) for _ in range(data.valid_utterances)]
        self.valid_features = self.features.batch([samples for samples, _ in self.valid])
        self.counts = {"train recordings": len(train_keys), "held-out recordings": len(valid_keys)}

    def num_batches(self) -> int:
        return 1_000_000  # utterances are generated: every batch index is a new batch

    def batch(self, index: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        made = [self.train_maker.make(generator) for _ in range(self.batch_size)]
        return collate(self.features.batch([s for s, _ in made]), [d for _, d in made])

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        features, lengths, targets, target_lengths = ctc_args(batch)
        log_probs, out_lengths = model(features, lengths)
        loss = ctc_loss(log_probs, targets, out_lengths, target_lengths, blank=BLANK,
                        zero_infinity=True)
        # "mean" reduction: the mean over utterances of loss / target length
        return StepResult(loss, None, int(target_lengths.sum()), weight=float(targets.shape[0]))

    def predictions(self, model: nn.Module, beam_width: int = 1
                    ) -> tuple[list[list[int]], list[list[int]], float]:
        """(references, hypotheses, mean CTC loss) over the held-out utterances."""
        return recognise(model, self.valid_features, [d for _, d in self.valid],
                         self.data.eval_batch_size, beam_width)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return recognition_metrics(*self.predictions(model))

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data)}


def build(config: dict[str, dict[str, Any]]) -> tuple[SpeechTask, AcousticModel, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = SpeechDataConfig(**config["data"])
    train = TrainConfig.from_dict(config["train"])
    model_config = AcousticConfig.from_dict(config["model"])
    feature_dim = FeatureConfig(**data.features).dim
    if model_config.features != feature_dim:
        model_config.features = feature_dim
    task = SpeechTask(data, model_config, train.batch_size, train.seed)
    return task, AcousticModel(model_config), task.source


def load_model(path: str | Path | Checkpoint) -> tuple[AcousticModel, FeatureExtractor, Checkpoint]:
    """The trained acoustic model and its feature extractor from a run directory or checkpoint."""
    model, checkpoint, described = load_task_model(
        path, NAME, lambda m: AcousticModel(AcousticConfig.from_dict(m)), required=("data",))
    features = from_meta(checkpoint, "task.data.features",
                         lambda: FeatureConfig(**described["data"]["features"]))
    check_size(checkpoint, "task.data.features (feature size)", features.dim, "features",
               model.config.features)
    return model, FeatureExtractor(features), checkpoint


@torch.no_grad()
def transcribe(model: AcousticModel, extractor: FeatureExtractor, path: str | Path,
               beam_width: int = 8) -> str:
    """The digits spoken in a WAV file, as a string."""
    features = extractor.from_file(path)
    log_probs, _ = model(features.unsqueeze(1), torch.tensor([features.shape[0]]))
    hypothesis = decode_batch(log_probs, blank=BLANK, beam_width=beam_width)[0]
    return "".join(str(d) for d in labels_to_digits(hypothesis.labels))


def confusion_counts(references: list[list[int]], hypotheses: list[list[int]]
                     ) -> Tensor:
    """(11, 11) counts of (reference, hypothesis) digits; index 10 is deletion / insertion."""
    counts = torch.zeros(11, 11, dtype=torch.long)
    for reference, hypothesis in zip(references, hypotheses):
        for ref, hyp in align(reference, hypothesis):
            counts[ref if isinstance(ref, int) else 10, hyp if isinstance(hyp, int) else 10] += 1
    return counts


def plot_confusion(counts: Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(d) for d in range(10)] + ["∅"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(11), labels)
    ax.set_yticks(range(11), labels)
    ax.set_xlabel("recognised digit (∅: inserted nothing / deletion)")
    ax.set_ylabel("spoken digit (∅: insertion)")
    for i in range(11):
        for j in range(11):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_title(title)
    fig.colorbar(image)
    fig.tight_layout()
    from rnnkit.viz.curves import save_figure  # atomic, never through a symlink

    save_figure(fig, path, dpi=120)


def describe_data(task: SpeechTask) -> str:
    counts = ", ".join(f"{count} {what}" for what, count in task.counts.items())
    return f"{counts}; {len(task.valid)} held-out digit strings ({task.data.split} split)"


def report(task: SpeechTask, model: AcousticModel, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: a few transcriptions and a confusion matrix PNG, from the
    weights validation chose."""
    from rnnkit.tasks.common import chosen_weights

    which, _ = chosen_weights(model, out)
    print(f"held-out digit strings, {which}:")
    references, hypotheses, _ = task.predictions(model)
    for reference, hypothesis in list(zip(references, hypotheses))[:5]:
        mark = "ok" if reference == hypothesis else "  "
        print(f"{mark} spoken {''.join(map(str, reference)):>6}  recognised "
              f"{''.join(map(str, hypothesis))}")
    png = out / "confusion.png"
    plot_confusion(confusion_counts(references, hypotheses), png,
                   f"held-out digit strings ({task.data.split} split), greedy")
    print(f"confusion matrix: {png}")
