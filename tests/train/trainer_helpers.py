"""A tiny character LM run (a few hundred symbols, 16 hidden units) for Trainer tests.

A plain module, not a conftest: a second ``conftest`` module would shadow the top-level one
for tests that import it by name.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rnnkit.data.vocab import CharVocab
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.tasks.charlm import CharLMTask, DataConfig
from rnnkit.train import TrainConfig, Trainer
from rnnkit.train.rng import seed_everything


def tiny_text(n: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["abc", "bca", "hello", "cab", "안녕", "세상"]
    return " ".join(rng.choice(words) for _ in range(n // 4))


def make_trainer(out_dir: Path | None = None, dropout: float = 0.0, seq_len: int = 10,
                 cell: str = "lstm", **options: Any) -> Trainer:
    """A Trainer for a 2-layer LSTM LM on :func:`tiny_text`, its model built after seeding."""
    settings: dict[str, Any] = dict(steps=12, batch_size=4, bptt=5, eval_every=4,
                                    lr=0.01, seed=7)
    settings.update(options)
    config = TrainConfig(**settings)
    seed_everything(config.seed)
    text = tiny_text()
    vocab = CharVocab.from_text(text)
    cut = int(len(text) * 0.8)
    model_config = LMConfig(vocab_size=len(vocab), cell=cell, layers=2, hidden=16,
                            embedding=8, dropout=dropout)
    task = CharLMTask(vocab, text[:cut], text[cut:], DataConfig(seq_len=seq_len),
                      model_config, config.batch_size)
    return Trainer(LanguageModel(model_config), task, config, out_dir, progress=False)
