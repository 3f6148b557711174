"""The classic "hello" example: a tiny Elman RNN learns h→e→l→l→o from one-hot inputs.

The two ``l`` inputs need different answers (``l`` then ``o``), so the network must use its
state, not just the current symbol. Runs the same Trainer as every other task, in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.data.vocab import CharVocab
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.train.config import TrainConfig
from rnnkit.train.rng import seed_everything
from rnnkit.train.task import Batch, StepResult
from rnnkit.train.trainer import Trainer

VOCAB = CharVocab(("h", "e", "l", "o"))
WORD = "hello"


class HelloTask:
    name = "hello"

    def __init__(self) -> None:
        tokens = torch.tensor(VOCAB.encode(WORD))
        self.inputs, self.targets = tokens[:-1, None], tokens[1:, None]  # (4, 1) each

    def num_batches(self) -> int:
        return 1

    def batch(self, index: int) -> Batch:
        return Batch(self.inputs, self.targets)

    def step(self, model: nn.Module, batch: Batch, state: Any) -> StepResult:
        logits, state = model(batch.inputs, state)
        return StepResult(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()), state,
                          batch.targets.numel())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"loss": float(self.step(model, self.batch(0), None).loss.detach())}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab": VOCAB.to_json()}


def run_hello(steps: int = 100, hidden: int = 8, seed: int = 0,
              echo: Callable[[str], None] = print) -> str:
    """Trains and prints each step's predicted distribution; returns the predicted string."""
    seed_everything(seed)
    model = LanguageModel(LMConfig(vocab_size=len(VOCAB), cell="rnn", layers=1, hidden=hidden,
                                   embedding=0))
    task = HelloTask()
    config = TrainConfig(steps=steps, lr=0.05, schedule="none", eval_every=steps, seed=seed)
    echo(f"vocabulary {list(VOCAB.symbols)} (one-hot); input 'hell' → target 'ello'; "
         f"Elman RNN, {hidden} hidden units, Adam, {steps} steps")
    with torch.no_grad():
        untrained = VOCAB.decode(model(task.inputs)[0][:, 0].argmax(-1).tolist())
    echo(f"before training: predicted {untrained!r}, loss "
         f"{task.evaluate(model)['loss']:.4f} nats")
    result = Trainer(model, task, config, progress=False).fit()
    echo(f"after {steps} steps: loss {result.valid['loss']:.4f} nats")
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(task.inputs)[0][:, 0], dim=-1)  # (4, 4)
    header = "  ".join(f"{s:>5}" for s in VOCAB.symbols)
    echo(f"input  → P(next):  {header}   argmax")
    predicted = []
    for symbol, row in zip(WORD[:-1], probs):
        best = VOCAB.symbols[int(row.argmax())]
        predicted.append(str(best))
        cells = "  ".join(f"{float(p):5.3f}" for p in row)
        echo(f"  {symbol}    →          {cells}   {best}")
    text = "".join(predicted)
    echo(f"predicted: {text}")
    return text
