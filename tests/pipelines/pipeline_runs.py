"""Tiny runs of every task, trained once per test session through the command line, with the
held-out data each one validated on written out in the task's own file format."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rnnkit.cli import main

RATE = 8000


@dataclass
class Run:
    task: str
    path: Path  # the run directory
    valid: Path  # the data its validation scored, in the task's file format
    inputs: list[Any]  # a few inputs of the kind a person has


def _train(root: Path, task: str, config: dict[str, Any]) -> Path:
    out = root / f"run-{task}"
    cfg = root / f"{task}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    torch.set_num_threads(1)
    assert main(["train", task, "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return out


def _sentences(count: int, seed: int) -> list[str]:
    good, bad = ["great", "fine", "lovely", "superb"], ["awful", "dull", "bad", "boring"]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        words = good if i % 2 else bad
        picks = torch.randint(4, (1 + i % 4,), generator=generator).tolist()
        rows.append(f"{i % 2}\tthe film was " + " ".join(words[p] for p in picks) + " !")
    return rows


CITIES = ["boston", "denver", "new york", "san francisco"]


def _utterances(count: int, seed: int) -> list[tuple[list[str], list[str], str]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        a, b = torch.randint(len(CITIES), (2,), generator=generator).tolist()
        fare = bool(torch.randint(2, (1,), generator=generator))
        tokens, tags = ["show", "fares" if fare else "flights", "from"], ["O", "O", "O"]
        for city, role in ((CITIES[a], "fromloc"), (CITIES[b], "toloc")):
            words = city.split()
            tokens += words + (["to"] if role == "fromloc" else [])
            tags += [f"B-{role}.city_name"] + [f"I-{role}.city_name"] * (len(words) - 1)
            tags += ["O"] if role == "fromloc" else []
        out.append((tokens, tags, "atis_airfare" if fare else "atis_flight"))
    return out


def _rolls(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = np.empty((1, count), dtype=object)
    for i in range(count):
        steps = int(rng.integers(6, 12))
        roll = np.zeros((steps, 88), dtype=np.uint8)
        for t in range(steps):
            roll[t, 39 + (0, 4, 7)[t % 3]] = 1
        cells[0, i] = roll
    return cells


def _digit_sound(digit: int, take: int) -> torch.Tensor:
    t = torch.arange(int((0.12 + 0.02 * (take % 3)) * RATE)) / RATE
    base = 300 + 250 * digit + 10 * take
    return 0.3 * (torch.sin(2 * math.pi * base * t) + torch.sin(2 * math.pi * 1.5 * base * t))


TRAIN = {"steps": 4, "eval_every": 2}


def make_run(task: str, root: Path) -> Run:
    """Trains a tiny ``task`` run under ``root``; returns it with its validation data."""
    root.mkdir(parents=True, exist_ok=True)
    if task == "charlm":
        text = "the cat sat on the mat. a dog ran to the park!\n" * 30
        (root / "text.txt").write_text(text)
        config = {"data": {"files": [str(root / "text.txt")], "seq_len": 16},
                  "model": {"layers": 1, "hidden": 16, "embedding": 8},
                  "train": {**TRAIN, "batch_size": 4}, "sample": {"length": 10, "count": 1}}
        from rnnkit.tasks.charlm import DataConfig, split_text

        valid = root / "valid.txt"
        valid.write_text(split_text(text, DataConfig(files=[str(valid)], seq_len=16))[1])
        return Run(task, _train(root, task, config), valid, ["the c", "", "a dog"])
    if task == "wordlm":
        lines = [" the cat sat on the mat", " a dog ran to the <unk>", " the dog sat N days"] * 20
        (root / "train.txt").write_text("\n".join(lines) + "\n")
        valid = root / "valid.txt"
        valid.write_text(" the cat ran to a zebra\n the dog sat on a mat\n" * 3)
        config = {"data": {"train": str(root / "train.txt"), "valid": str(valid), "seq_len": 5,
                           "eval_batch_size": 2},
                  "model": {"hidden": 16, "embedding": 8}, "train": {**TRAIN, "batch_size": 4}}
        return Run(task, _train(root, task, config), valid, ["The cat", "", "a Zebra sat 3.5 days"])
    if task == "sentiment":
        (root / "train.tsv").write_text("\n".join(["label\tsentence", *_sentences(80, 0)]) + "\n")
        valid = root / "dev.tsv"
        valid.write_text("\n".join(["label\tcontent", *_sentences(20, 1)]) + "\n")
        config = {"data": {"train": str(root / "train.tsv"), "valid": str(valid), "holdout": 0},
                  "model": {"embedding": 8, "chars": True, "recurrent": {"hidden": 8}},
                  "train": {**TRAIN, "batch_size": 16}}
        return Run(task, _train(root, task, config), valid,
                   ["The film was GREAT!", "it's awful, really dull."])
    if task == "digits":
        from rnnkit.tasks import digits

        config = {"model": {"recurrent": {"hidden": 16}}, "train": {**TRAIN, "batch_size": 32}}
        run = _train(root, task, config)
        images, labels = digits.load_images()
        _, valid_ids, _ = digits.split_indices(labels, digits.DigitsDataConfig())
        valid = root / "valid.tes"  # the UCI optdigits layout: 64 pixel counts, then the digit
        valid.write_text("".join(
            ",".join(str(int(v)) for v in (images[i] * 16).round().flatten().tolist())
            + f",{int(labels[i])}\n" for i in valid_ids))
        return Run(task, run, valid, [(images[0] * 16).round().int().numpy(), images[1].tolist()])
    if task == "tagging":
        for split, count, seed in (("train", 60, 0), ("dev", 12, 1), ("test", 12, 2)):
            folder = root / split
            folder.mkdir(exist_ok=True)
            rows = _utterances(count, seed)
            (folder / "seq.in").write_text("".join(" ".join(t) + "\n" for t, _, _ in rows))
            (folder / "seq.out").write_text("".join(" ".join(g) + "\n" for _, g, _ in rows))
            (folder / "label").write_text("".join(i + "\n" for _, _, i in rows))
        config = {"data": {"train": str(root / "train"), "valid": str(root / "dev"),
                           "test": str(root / "test")},
                  "model": {"embedding": 8, "recurrent": {"hidden": 8}},
                  "train": {**TRAIN, "batch_size": 16}}
        return Run(task, _train(root, task, config), root / "dev",
                   ["Show flights from Boston to New York", "fares from denver to boston"])
    if task == "translate":
        from rnnkit.tasks import dates

        config = {"data": {"train_size": 64, "valid_size": 8},
                  "model": {"embedding": 8, "encoder": {"hidden": 8}, "decoder": {"hidden": 8}},
                  "train": {**TRAIN, "batch_size": 16}}
        run = _train(root, task, config)
        valid = root / "valid.tsv"
        valid.write_text("".join(f"{s}\t{t}\n" for s, t in dates.make_pairs(8, seed=2)))
        return Run(task, run, valid, ["24 November 2026", "Nov 3, '99"])
    if task == "music":
        from scipy.io import savemat

        mat = root / "tiny.mat"
        savemat(str(mat), {"traindata": _rolls(12, 0), "validdata": _rolls(4, 1),
                           "testdata": _rolls(4, 2)})
        config = {"data": {"path": str(mat)}, "model": {"recurrent": {"hidden": 16}},
                  "train": {**TRAIN, "batch_size": 4}}
        return Run(task, _train(root, task, config), mat, [None])
    if task == "speech":
        from rnnkit.data.audio import write_wav

        recordings, held_out = root / "recordings", root / "held-out"
        recordings.mkdir(exist_ok=True)
        held_out.mkdir(exist_ok=True)
        for speaker in ("ann", "bob"):
            for digit in range(10):
                for take in range(7):
                    name = f"{digit}_{speaker}_{take}.wav"
                    write_wav(recordings / name, _digit_sound(digit, take), RATE)
                    if take < 5:  # FSDD's convention: takes 0-4 are held out
                        write_wav(held_out / name, _digit_sound(digit, take), RATE)
        config = {"data": {"recordings": str(recordings), "valid_utterances": 8, "max_digits": 2,
                           "max_silence": 0.1},
                  "model": {"recurrent": {"hidden": 16, "layers": 1}},
                  "train": {**TRAIN, "batch_size": 4}}
        clip = root / "clip.wav"
        write_wav(clip, torch.cat([_digit_sound(4, 1), torch.zeros(400), _digit_sound(2, 0)]), RATE)
        return Run(task, _train(root, task, config), held_out, [str(clip)])
    raise ValueError(task)


TASKS = ["charlm", "wordlm", "sentiment", "digits", "tagging", "translate", "music", "speech"]
