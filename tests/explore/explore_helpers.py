"""Small trained runs for the explorer tests, and the LSTM equations written out independently."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rnnkit.tasks import adding, charlm, copymemory, speech, tagging, trees
from rnnkit.train import TrainConfig, Trainer

TEXT = 'He said "hello there" to me.\nAnd then "goodbye", she said at 10:45.\n' * 30


def train_charlm(out: Path, **model: object) -> Path:
    corpus = out.parent / f"{out.name}.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    config = charlm.default_config()
    config["data"].update(files=[str(corpus)], seq_len=20)
    config["model"].update(hidden=12, embedding=8, **model)
    config["train"].update(steps=4, batch_size=4, eval_every=4)
    task, network, _ = charlm.build(config)
    Trainer(network, task, TrainConfig.from_dict(config["train"]), out, progress=False).fit()
    return out


def write_atis(root: Path) -> Path:
    cities = ["boston", "denver", "dallas", "atlanta"]
    for split, count in (("train", 40), ("dev", 6), ("test", 6)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for k in range(count):
            a, b = cities[k % 4], cities[(k * 3 + 1) % 4]
            rows.append((f"show flights from {a} to {b}",
                         "O O O B-fromloc.city_name O B-toloc.city_name",
                         "atis_flight" if k % 3 else "atis_airfare"))
        for name, column in (("seq.in", 0), ("seq.out", 1), ("label", 2)):
            (folder / name).write_text("".join(r[column] + "\n" for r in rows))
    return root


def train_tagger(out: Path, atis: Path, **model: object) -> Path:
    config = tagging.default_config()
    config["data"].update(train=str(atis / "train"), valid=str(atis / "dev"),
                          test=str(atis / "test"))
    config["model"].update(embedding=8, **model)
    config["model"]["recurrent"].update(hidden=6)
    config["train"].update(steps=3, batch_size=8, eval_every=3)
    task, network, _ = tagging.build(config)
    Trainer(network, task, TrainConfig.from_dict(config["train"]), out, progress=False).fit()
    return out


def lstm_by_hand(layer: torch.nn.Module, x: Tensor, direction: int = 0) -> dict[str, Tensor]:
    """h, c, i, f, g, o of layer 0 of a plain LSTM over x (T, I), as torch.nn.LSTM documents
    them, in input order (a reverse direction reads x backwards)."""
    suffix = "_l0" + ("_reverse" if direction else "")
    w_ih, w_hh = getattr(layer, "weight_ih" + suffix), getattr(layer, "weight_hh" + suffix)
    b = getattr(layer, "bias_ih" + suffix) + getattr(layer, "bias_hh" + suffix)
    hidden = w_hh.shape[1]
    h = c = x.new_zeros(hidden)
    out: dict[str, list[Tensor]] = {k: [] for k in "hcifgo"}
    steps = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
    with torch.no_grad():
        for t in steps:
            i, f, g, o = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            for k, v in zip("hcifgo", (h, c, i, f, g, o)):
                out[k].append(v)
    stacked = {k: torch.stack(v) for k, v in out.items()}
    return {k: v.flip(0) for k, v in stacked.items()} if direction else stacked


def train_task(module: object, config: dict, out: Path) -> Path:
    """A few training steps of any task module's ``build`` from ``config``, saved in ``out``."""
    task, network, _ = module.build(config)  # type: ignore[attr-defined]
    Trainer(network, task, TrainConfig.from_dict(config["train"]), out, progress=False).fit()
    return out


def train_speech(out: Path, recordings: Path) -> Path:
    """A few steps of the speech task on tone "digits" written to ``recordings``."""
    import math

    from rnnkit.data.audio import write_wav

    recordings.mkdir(parents=True)
    rate = 8000
    for digit in range(10):
        for take in range(6):
            t = torch.arange(int(0.12 * rate)) / rate
            write_wav(recordings / f"{digit}_ann_{take}.wav",
                      0.3 * torch.sin(2 * math.pi * (300 + 250 * digit + 10 * take) * t), rate)
    config = speech.default_config()
    config["data"].update(recordings=str(recordings), valid_utterances=4, max_digits=2,
                          max_silence=0.1)
    config["model"]["recurrent"].update(hidden=6, layers=1)
    config["train"].update(steps=2, batch_size=4, eval_every=2)
    return train_task(speech, config, out)


def train_adding(out: Path, length: int = 20, cell: str = "gru") -> Path:
    config = adding.default_config()
    config["data"].update(length=length, valid_size=8, eval_batch_size=8)
    config["model"]["recurrent"].update(hidden=6, cell=cell)
    config["train"].update(steps=2, batch_size=4, eval_every=2)
    return train_task(adding, config, out)


def train_copymemory(out: Path, length: int = 15) -> Path:
    config = copymemory.default_config()
    config["data"].update(length=length, valid_size=8, eval_batch_size=8)
    config["model"].update(hidden=6)
    config["train"].update(steps=2, batch_size=4, eval_every=2)
    return train_task(copymemory, config, out)


SST_TREES = ["(4 (2 the) (4 (2 film) (4 (3 is) (4 great))))",
             "(0 (2 the) (0 (2 plot) (0 (2 is) (0 dull))))",
             "(3 (2 (2 a) (3 lovely)) (2 (2 film) (2 .)))",
             "(1 (2 (2 an) (1 awful)) (2 (2 plot) (2 .)))"]


def train_trees(out: Path, encoder: str = "treelstm") -> Path:
    """A few steps of the trees task on SST-style bracketed trees written beside ``out``."""
    folder = out.parent / f"{out.name}-sst"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("\n".join(SST_TREES * 5) + "\n")
    (folder / "dev.txt").write_text("\n".join(SST_TREES) + "\n")
    config = trees.default_config()
    config["data"].update(train=str(folder / "train.txt"), valid=str(folder / "dev.txt"))
    config["model"].update(encoder=encoder, embedding=8, hidden=6)
    config["train"].update(steps=2, batch_size=4, eval_every=2)
    return train_task(trees, config, out)
