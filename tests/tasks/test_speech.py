"""The speech task on tiny generated "recordings": each digit a different chord of tones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rnnkit.data.audio import write_wav
from rnnkit.tasks import speech
from rnnkit.train import TrainConfig, Trainer

RATE = 8000


def _digit_sound(digit: int, take: int) -> torch.Tensor:
    seconds = 0.12 + 0.02 * (take % 3)
    t = torch.arange(int(seconds * RATE)) / RATE
    base = 300 + 250 * digit + 10 * take
    return 0.3 * (torch.sin(2 * math.pi * base * t) + torch.sin(2 * math.pi * 1.5 * base * t))


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("recordings")
    for speaker in ("ann", "bob"):
        for digit in range(10):
            for take in range(7):
                write_wav(directory / f"{digit}_{speaker}_{take}.wav", _digit_sound(digit, take),
                          RATE)
    (directory / "README.txt").write_text("not a recording")
    return directory


def _config(recordings: Path, **train: object) -> dict:
    config = speech.default_config()
    config["data"].update(recordings=str(recordings), valid_utterances=16, max_digits=3,
                          max_silence=0.1)
    config["model"]["recurrent"].update(hidden=16, layers=1)
    config["train"].update({"steps": 4, "batch_size": 4, "eval_every": 2, **train})
    return config


def test_splits_follow_fsdd_conventions(recordings: Path) -> None:
    found = speech.find_recordings(recordings)
    assert len(found) == 140  # the README is not a recording
    by_take, held_by_take = speech.split_recordings(
        found, speech.SpeechDataConfig(recordings=str(recordings)))
    assert {key[2] for key in held_by_take} == set(range(5))
    assert {key[2] for key in by_take} == {5, 6}
    train, held = speech.split_recordings(
        found, speech.SpeechDataConfig(split="speaker", held_out_speaker="bob"))
    assert {key[1] for key in held} == {"bob"} and {key[1] for key in train} == {"ann"}
    with pytest.raises(ValueError, match="held_out_speaker 'eve' is not among the speakers"):
        speech.split_recordings(found, speech.SpeechDataConfig(split="speaker",
                                                               held_out_speaker="eve"))


def test_missing_recordings_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory of recordings"):
        speech.find_recordings(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"holds no recordings named \{digit\}"):
        speech.find_recordings(tmp_path)


def test_batches_are_a_pure_function_of_their_index(recordings: Path) -> None:
    task, _, _ = speech.build(_config(recordings))
    first, again, other = task.batch(3), task.batch(3), task.batch(4)
    assert torch.equal(first.inputs[0], again.inputs[0])
    assert torch.equal(first.targets[0], again.targets[0])
    assert not torch.equal(first.targets[0], other.targets[0]) or \
        first.inputs[0].shape != other.inputs[0].shape
    features, lengths = first.inputs
    targets, target_lengths = first.targets
    assert features.shape[1] == 4 and features.shape[2] == 40
    assert int(lengths.max()) == features.shape[0]
    assert int(target_lengths.min()) >= 1 and int(target_lengths.max()) <= 3
    assert int(targets.min()) >= 0 and int(targets.max()) <= 10  # labels are digit + 1


def test_training_checkpoint_and_transcription(recordings: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = _config(recordings)
    task, model, _ = speech.build(config)
    trainer = Trainer(model, task, TrainConfig.from_dict(config["train"]), out_dir=tmp_path,
                      progress=False)
    result = trainer.fit()
    assert set(result.valid) >= {"loss", "der", "seq_acc"}
    assert math.isfinite(result.valid["loss"])
    loaded, extractor, _ = speech.load_model(tmp_path)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    clip = tmp_path / "clip.wav"
    write_wav(clip, torch.cat([_digit_sound(4, 1), torch.zeros(400), _digit_sound(2, 0)]), RATE)
    text = speech.transcribe(loaded, extractor, clip)
    assert set(text) <= set("0123456789")


def test_confusion_counts_and_plot(tmp_path: Path) -> None:
    counts = speech.confusion_counts([[1, 2, 3], [4]], [[1, 3], [4, 5]])
    assert counts[1, 1] == 1 and counts[2, 10] == 1 and counts[3, 3] == 1
    assert counts[10, 5] == 1 and counts.sum() == 5
    speech.plot_confusion(counts, tmp_path / "confusion.png", "test")
    assert (tmp_path / "confusion.png").stat().st_size > 1000


@pytest.mark.slow
def test_learns_to_read_tone_digit_strings(recordings: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = _config(recordings, steps=300, eval_every=300, lr=5e-3)
    config["model"]["recurrent"].update(hidden=48, layers=1)
    config["data"]["valid_utterances"] = 40
    task, model, _ = speech.build(config)
    result = Trainer(model, task, TrainConfig.from_dict(config["train"]), out_dir=tmp_path,
                     progress=False).fit()
    assert result.valid["der"] < 0.1


def test_command_line_trains_and_transcribes(recordings: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from rnnkit.cli import main

    out = tmp_path / "run"
    code = main(["train", "speech", "--data", str(recordings), "--out", str(out), "--steps", "3",
                 "--eval-every", "3", "--batch-size", "4", "--hidden", "16", "--layers", "1",
                 "--set", "data.valid_utterances=8", "--set", "data.max_digits=2",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "der" in printed and (out / "confusion.png").is_file()
    config = (out / "config.yaml").read_text()
    assert "hidden: 16" in config and "valid_utterances: 8" in config
    clip = tmp_path / "clip.wav"
    write_wav(clip, _digit_sound(7, 2), RATE)
    assert main(["transcribe", str(out), str(clip), "--beam", "4"]) == 0
    assert set(capsys.readouterr().out.strip()) <= set("0123456789")
    assert main(["transcribe", str(out), str(tmp_path / "missing.wav")]) == 2
    assert "no such audio file" in capsys.readouterr().err
    assert main(["train", "speech", "--seq-len", "5", "--out", str(tmp_path / "x")]) == 2
    assert "--seq-len is not an option of the speech task" in capsys.readouterr().err
