"""The music pipeline: a MIDI primer (or nothing) in, a generated chorale (MIDI) out; NLL per
time step of a .mat split or of MIDI files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rnnkit.pipelines.base import InputError, Pipeline, Result, shown
from rnnkit.tasks import music
from rnnkit.tasks.midi import MidiError, read_midi, write_midi


@dataclass
class Music(Result):
    primer: str  # the primer file, or "" for none
    steps: int  # generated time steps (quarter notes)
    notes: int  # notes struck in the generated part
    midi: str | None  # the file written (None when no ``out`` was given)
    roll: Tensor  # (primer steps + steps, pitches) 0/1 piano roll

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        del out["roll"]  # a MIDI file is the useful form; the roll is in Python only
        return out

    def __str__(self) -> str:
        where = f" → {self.midi}" if self.midi else ""
        after = f" after {self.primer}" if self.primer else ""
        return f"{self.steps} steps, {self.notes} notes{after}{where}"


class MusicPipeline(Pipeline):
    """Input: a MIDI primer file, or None / "" for none (the music starts from silence).
    Result: :class:`Music`. Options: ``steps``, ``temperature``, ``seed``, ``out`` (MIDI file to
    write; with several inputs ``name-1.mid``, ``name-2.mid``, ...)."""

    task = music.NAME
    options: ClassVar[dict[str, Any]] = {"steps": 64, "temperature": 1.0, "seed": None, "out": None}

    def _load(self) -> nn.Module:
        model, _ = music.load_model(self.checkpoint)
        self.data = music.MusicDataConfig(**self.described["data"])
        return model

    def _is_single(self, inputs: Any) -> bool:
        return inputs is None or not isinstance(inputs, (list, tuple))

    def _predict(self, batch: list[Any], first_index: int, total: int, **options: Any
                 ) -> list[Result]:
        pitches = self.module.config.pitches
        results: list[Result] = []
        for i, primer_path in enumerate(batch):
            index = first_index + i + 1
            if primer_path is None or primer_path == "":
                primer, name = torch.zeros(1, pitches), ""  # one silent frame to start from
            elif isinstance(primer_path, (str, Path)):
                try:
                    primer, name = read_midi(primer_path, pitches), str(primer_path)
                except MidiError as error:
                    raise InputError(str(error)) from None
                if primer.shape[0] == 0:
                    raise InputError(f"{primer_path}: the MIDI file holds no notes to start from")
            else:
                raise InputError(f"input {index} ({shown(primer_path)}): give a MIDI file or nothing")
            # input i samples from seed + i, as the language models do
            seed = options["seed"] + index - 1 if options["seed"] is not None else torch.seed() % 2**62
            roll = music.generate(self.module, primer, int(options["steps"]),  # type: ignore[arg-type]
                                  float(options["temperature"]), seed=int(seed))
            if not name:
                roll = roll[1:]  # the silent starting frame is not part of the music
            generated = roll[-int(options["steps"]):] if options["steps"] else roll[:0]
            notes = int(((generated[1:] > 0) & (generated[:-1] == 0)).sum() + (generated[:1] > 0).sum())
            midi = None
            if options["out"]:
                target = Path(options["out"])
                if total > 1:
                    target = target.with_name(f"{target.stem}-{index}{target.suffix or '.mid'}")
                midi = str(write_midi(target, roll))
            results.append(Music(name, int(options["steps"]), notes, midi, roll))
        return results

    def evaluate(self, path: str | Path, batch_size: int | None = None, split: str = "test"
                 ) -> dict[str, float]:
        """NLL per predicted time step (nats, summed over keys) of the ``split`` of a .mat file
        (Boulanger-Lewandowski's layout, as training reads it), of a MIDI file, or of every
        MIDI file in a folder (read one step per quarter note)."""
        path = Path(path)
        if path.suffix.lower() == ".mat":
            if split not in music.SPLITS:
                raise ValueError(f"split must be one of {', '.join(music.SPLITS)}, got {split!r}")
            rolls = music.load_rolls(path)[split]
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".mid", ".midi")
                           ) if path.is_dir() else [path]
            if not files:
                raise ValueError(f"{path} holds no .mid files")
            pitches = self.module.config.pitches
            rolls = [read_midi(f, pitches) for f in files]
            short = [f for f, r in zip(files, rolls) if r.shape[0] < 2]
            if short:
                raise ValueError(f"{short[0]}: fewer than two time steps of music to predict")
        nll = music.rolls_nll(self.module, rolls, batch_size or self.data.eval_batch_size)
        return {"loss": nll, "examples": float(len(rolls)),
                "steps": float(sum(r.shape[0] - 1 for r in rolls))}

    def describe_metrics(self, metrics: dict[str, float]) -> str:
        return (f"NLL {metrics['loss']:.4f} nats per time step ({int(metrics['examples'])} "
                f"sequences, {int(metrics['steps']):,} predicted steps)")
