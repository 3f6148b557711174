"""The speech pipeline: WAV files in, the digits heard out; digit error rate of a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rnnkit.data.audio import read_wav
from rnnkit.decoding import decode_batch
from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import speech


@dataclass
class Transcription(Result):
    path: str
    digits: str  # the digits heard, e.g. "4071"
    log_prob: float  # log P_ctc(digits | audio) (greedy: of the best path)
    frames: list[int]  # the feature frame at which each digit starts

    def __str__(self) -> str:
        return self.digits


class SpeechPipeline(Pipeline):
    """Input: a WAV file (PCM, at the model's sample rate, 8 kHz for FSDD). Result:
    :class:`Transcription`. Option: ``beam`` width of the CTC prefix beam search (1: greedy)."""

    task = speech.NAME
    options: ClassVar[dict[str, Any]] = {"beam": 8}

    def _load(self) -> nn.Module:
        model, self.extractor, _ = speech.load_model(self.checkpoint)
        self.data = speech.SpeechDataConfig(**self.described["data"])
        return model

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        features = []
        for i, path in enumerate(batch):
            if not isinstance(path, (str, Path)) or not str(path).strip():
                raise InputError(f"input {first_index + i + 1} ({shown(path)}): give a WAV file")
            if Path(path).is_dir():
                raise InputError(f"{path} is a directory, not a WAV file")
            features.append(self.extractor.from_file(path))  # AudioError names a bad file
        lengths = torch.tensor([f.shape[0] for f in features])
        padded = torch.nn.utils.rnn.pad_sequence(features).to(self.device)  # (T, B, F)
        log_probs, out_lengths = self.module(padded, lengths)
        log_probs, out_lengths = log_probs.cpu(), out_lengths.cpu()  # decoding runs on the CPU
        decoded = decode_batch(log_probs, out_lengths, blank=speech.BLANK,
                               beam_width=int(options["beam"]))
        return [Transcription(str(path), "".join(map(str, speech.labels_to_digits(h.labels))),
                              float(h.log_prob), list(h.timesteps))
                for path, h in zip(batch, decoded)]

    def evaluate(self, path: str | Path, batch_size: int | None = None, utterances: int | None = None,
                 seed: int | None = None) -> dict[str, float]:
        """CTC loss, digit error rate and sequence accuracy (greedy, as validation decodes) of
        digit strings built from a folder of ``{digit}_{speaker}_{take}.wav`` recordings the way
        validation builds them (``valid_utterances`` of them, from the run's seed: the held-out
        recordings of the run give its validation numbers)."""
        data = self.data
        rate = self.extractor.config.sample_rate
        recordings = speech.find_recordings(Path(path))
        audio = {key: read_wav(p, expected_rate=rate)[0] for key, p in recordings.items()}
        maker = speech.UtteranceMaker(sorted(recordings), audio, data, rate)
        if seed is None:
            seed = int(self.checkpoint.meta.get("train_config", {}).get("seed", 0))
        generator = torch.Generator().manual_seed(seed + speech.VALID_SEED_OFFSET)
        made = [maker.make(generator) for _ in range(utterances or data.valid_utterances)]
        features = self.extractor.batch([samples for samples, _ in made])
        result = speech.recognise(self.module, features, [d for _, d in made],
                                  batch_size or data.eval_batch_size)
        return {**speech.recognition_metrics(*result), "examples": float(len(made))}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        return (f"digit error rate {100 * metrics['der']:.2f}%, sequence accuracy "
                f"{100 * metrics['seq_acc']:.2f}%, CTC loss {metrics['loss']:.4f} per digit "
                f"({int(metrics['examples'])} digit strings)")

    def parse(self, line: str) -> Any:
        if not line.strip():
            raise InputError("an empty line: give a WAV file")
        return line
