"""Polyphonic music: an RNN over 88-key piano rolls, one Bernoulli per key (JSB Chorales).

Data: a ``.mat`` file with ``traindata``, ``validdata`` and ``testdata``, each a cell array of
(T, 88) 0/1 matrices (Boulanger-Lewandowski et al. 2012's split; by default
``../shared/data/polyphonic/JSB_Chorales.mat``). Each chorale is one training sequence; frame
t + 1 is predicted from frames ≤ t.

Metric: negative log-likelihood per time step (nats, summed over the 88 keys, averaged over all
predicted frames of the split), as those papers report it. The validation split steers the
schedule; :meth:`MusicTask.nll` reports any split. :func:`generate` continues a primer and
:mod:`rnnkit.tasks.midi` writes the result as a MIDI file and a piano-roll picture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.models.classifier import valid_mask
from rnnkit.models.generator import FrameGenerator, GeneratorConfig, frame_nll
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.options import Options, option
from rnnkit.tasks.common import (
    EpochPlan,
    device_of,
    load_task_model,
    per_sequence,
    require_full_bptt,
    shared_path,
)
from rnnkit.train.checkpoint import Checkpoint
from rnnkit.train.config import TrainConfig
from rnnkit.train.task import Batch, StepResult

NAME = "music"
PITCHES = 88
SPLITS = {"train": "traindata", "valid": "validdata", "test": "testdata"}
PRIMER_STEPS, SAMPLE_STEPS = 8, 64  # the end-of-run sample: a test chorale's opening, continued


@dataclass
class MusicDataConfig(Options):
    path: str | None = option(None, "a .mat file of piano rolls (none: "
                                    "../shared/data/polyphonic/JSB_Chorales.mat)", metavar="PATH")
    eval_batch_size: int = option(64, "sequences evaluated in parallel", ge=1)


SECTIONS: dict[str, type] = {"data": MusicDataConfig, "model": GeneratorConfig, "train": TrainConfig}


def default_config() -> dict[str, dict[str, Any]]:
    model = GeneratorConfig(pitches=PITCHES, dropout=0.3,
                            recurrent=RecurrentConfig(cell="lstm", layers=1, hidden=200))
    train = TrainConfig(steps=3000, batch_size=8, lr=2e-3, eval_every=100, clip_norm=5.0,
                        plateau_patience=2, early_stop=8)
    return {"data": asdict(MusicDataConfig()), "model": model.to_dict(), "train": train.to_dict()}


def load_rolls(path: Path) -> dict[str, list[Tensor]]:
    """The three splits of a .mat file as lists of (T, P) float 0/1 rolls."""
    from scipy.io import loadmat

    contents = loadmat(str(path))
    missing = [key for key in SPLITS.values() if key not in contents]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (expected {', '.join(SPLITS.values())})")
    rolls = {}
    for split, key in SPLITS.items():
        cells = contents[key].reshape(-1)
        rolls[split] = [torch.tensor(cell, dtype=torch.float32) for cell in cells]
        bad = [i for i, roll in enumerate(rolls[split]) if roll.dim() != 2 or roll.shape[0] < 2]
        if bad:
            raise ValueError(f"{path}: {key}[{bad[0]}] is not a (T ≥ 2, pitches) matrix")
    return rolls


def collate(rolls: list[Tensor]) -> Batch:
    """Frames (T, B, P) zero-padded, with lengths (1, B) as the targets' bookkeeping."""
    lengths = torch.tensor([roll.shape[0] for roll in rolls])
    frames = nn.utils.rnn.pad_sequence(rolls)  # (T, B, P)
    return Batch(frames, per_sequence(lengths))


@torch.no_grad()
def rolls_nll(model: nn.Module, rolls: list[Tensor], batch_size: int) -> float:
    """NLL per predicted time step (nats, summed over keys) over every roll (T, P) given."""
    model.eval()
    device = device_of(model)
    total, steps = 0.0, 0
    for start in range(0, len(rolls), batch_size):
        batch = collate(rolls[start:start + batch_size])
        frames, lengths = batch.inputs, batch.targets[0]
        logits, _ = model(frames[:-1].to(device), lengths - 1)
        logits = logits.cpu()  # (T-1, B, P)
        mask = valid_mask(lengths - 1, frames.shape[0] - 1)  # (T-1, B)
        count = int(mask.sum())
        total += float(frame_nll(logits, frames[1:], mask)) * count
        steps += count
    return total / steps


class MusicTask:
    """The Trainer's view of piano-roll modelling."""

    name = NAME

    def __init__(self, rolls: dict[str, list[Tensor]], data: MusicDataConfig,
                 model_config: GeneratorConfig, batch_size: int, seed: int) -> None:
        self.rolls, self.data, self.model_config = rolls, data, model_config
        self.plan = EpochPlan([roll.shape[0] for roll in rolls["train"]], batch_size, seed)
        self.counts = {split: len(r) for split, r in rolls.items()}

    def num_batches(self) -> int:
        return len(self.plan)

    def batch(self, index: int) -> Batch:
        return collate([self.rolls["train"][i] for i in self.plan.indices(index)])

    def chance_loss(self) -> float:
        """The NLL per step of a coin flip for every pitch (the Trainer calls far above it
        divergence)."""
        return self.model_config.pitches * math.log(2)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        lengths = batch.targets[0]
        loss = model.loss(batch.inputs, lengths)
        return StepResult(loss, None, int((lengths - 1).sum()))

    def nll(self, model: nn.Module, split: str = "valid") -> float:
        """NLL per predicted time step over every sequence of ``split``."""
        return rolls_nll(model, self.rolls[split], self.data.eval_batch_size)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"loss": self.nll(model, "valid")}

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "model": self.model_config.to_dict(), "data": asdict(self.data)}


def build(config: dict[str, dict[str, Any]]) -> tuple[MusicTask, FrameGenerator, str]:
    """Task and a fresh model from a resolved config (seed the RNGs first)."""
    data = MusicDataConfig(**config["data"])
    train = TrainConfig.from_dict(config["train"])
    require_full_bptt(train, NAME)
    path = shared_path("polyphonic/JSB_Chorales.mat", data.path)
    rolls = load_rolls(path)
    pitches = rolls["train"][0].shape[1]
    model_config = GeneratorConfig.from_dict({**config["model"], "pitches": pitches})
    task = MusicTask(rolls, data, model_config, train.batch_size, train.seed)
    counts = ", ".join(f"{n} {split}" for split, n in task.counts.items())
    return task, FrameGenerator(model_config), f"{path} ({counts} sequences)"


def load_model(path: str | Path | Checkpoint) -> tuple[FrameGenerator, Checkpoint]:
    """The trained generator from a run directory or checkpoint."""
    model, checkpoint, _ = load_task_model(
        path, NAME, lambda m: FrameGenerator(GeneratorConfig.from_dict(m)))
    return model, checkpoint


def generate(model: FrameGenerator, primer: Tensor, steps: int, temperature: float = 1.0,
             seed: int = 0, midi: str | Path | None = None, picture: str | Path | None = None,
             title: str = "generated chorale") -> Tensor:
    """The primer (T0, P) continued by ``steps`` sampled frames; optionally as MIDI and PNG."""
    from rnnkit.tasks.midi import plot_piano_roll, write_midi

    model.eval()
    roll = model.sample(primer, steps, temperature=temperature, seed=seed)  # (T0 + steps, P)
    if midi is not None:
        write_midi(midi, roll)
    if picture is not None:
        plot_piano_roll(roll, picture, title, primer_steps=primer.shape[0])
    return roll


def report(task: MusicTask, model: FrameGenerator, config: dict[str, Any], out: Path) -> None:
    """What a finished run prints: the test NLL of the weights validation chose (also in
    metrics.jsonl), and a chorale continued from a test primer as MIDI and a piano-roll PNG."""
    from rnnkit.tasks.common import chosen_weights, record_test

    which, step = chosen_weights(model, out)
    test = task.nll(model, "test")
    print(f"test ({task.counts['test']} sequences), {which}: NLL {test:.4f} nats per time step")
    record_test(out, "test", step, {"loss": test})
    primer = task.rolls["test"][0][:PRIMER_STEPS]
    seed = int(config["train"].get("seed", 0))
    generate(model, primer, SAMPLE_STEPS, seed=seed, midi=out / "sample.mid",
             picture=out / "sample.png", title="continued from the first test chorale")
    print(f"sample: {out / 'sample.mid'} ({PRIMER_STEPS} primer + {SAMPLE_STEPS} generated steps), "
          f"piano roll {out / 'sample.png'}")

