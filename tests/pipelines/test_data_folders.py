"""One ``--data`` for every task (issue 17, item 3): each task's ``--help``, and a run from a
``--data`` folder in the task's standard layout (tiny data written to tmp_path, a few steps),
given relative to the directory the command runs in; the tasks without files refuse it in one
line, and splits of one run come from one place or the run says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pipeline_runs import _digit_sound, _rolls, _sentences, _utterances

from rnnkit.cli import main
from rnnkit.tasks import TASKS
from rnnkit.tasks.layouts import NO_FILES

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"steps": 2, "eval_every": 2}
TINY = {  # options of a tiny model per task (the data comes from --data alone)
    "charlm": {"data": {"seq_len": 16}, "model": {"layers": 1, "hidden": 16, "embedding": 8},
               "train": {**TRAIN, "batch_size": 4}, "sample": {"length": 10, "count": 1}},
    "wordlm": {"data": {"seq_len": 5, "eval_batch_size": 2},
               "model": {"hidden": 16, "embedding": 8}, "train": {**TRAIN, "batch_size": 4}},
    "sentiment": {"data": {"holdout": 0}, "model": {"embedding": 8, "recurrent": {"hidden": 8}},
                  "train": {**TRAIN, "batch_size": 16}},
    "tagging": {"model": {"embedding": 8, "recurrent": {"hidden": 8}},
                "train": {**TRAIN, "batch_size": 16}},
    "translate": {"model": {"embedding": 8, "encoder": {"hidden": 8}, "decoder": {"hidden": 8}},
                  "train": {**TRAIN, "batch_size": 16}},
    "music": {"model": {"recurrent": {"hidden": 16}}, "train": {**TRAIN, "batch_size": 4}},
    "speech": {"data": {"valid_utterances": 8, "max_digits": 2, "max_silence": 0.1},
               "model": {"recurrent": {"hidden": 16, "layers": 1}},
               "train": {**TRAIN, "batch_size": 4}},
    "trees": {"model": {"embedding": 8, "hidden": 8}, "train": {**TRAIN, "batch_size": 8}},
}


def _atis_split(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = _utterances(count, seed)
    (folder / "seq.in").write_text("".join(" ".join(t) + "\n" for t, _, _ in rows))
    (folder / "seq.out").write_text("".join(" ".join(g) + "\n" for _, g, _ in rows))
    (folder / "label").write_text("".join(i + "\n" for _, _, i in rows))


def _tree(i: int) -> str:
    label, word = (4, ["great", "fine"][i % 2]) if i % 3 else (0, ["awful", "dull"][i % 2])
    return f"({label} (2 the) ({label} (2 film) ({label} {word})))"


def write_layout(task: str, folder: Path) -> None:
    """Tiny data in ``task``'s standard folder layout (that of its shared data set)."""
    folder.mkdir(parents=True)
    if task == "charlm":
        (folder / "a.txt").write_text("the cat sat on the mat.\n" * 20)
        (folder / "b.txt").write_text("a dog ran to the park!\n" * 20)
    elif task == "wordlm":
        (folder / "ptb.train.txt").write_text(" the cat sat on the mat\n a dog ran to it\n" * 20)
        (folder / "ptb.valid.txt").write_text(" the dog sat on a mat\n" * 4)
    elif task == "sentiment":
        (folder / "train.tsv").write_text("\n".join(["sentence\tlabel", *(
            f"{s.split(chr(9))[1]}\t{s.split(chr(9))[0]}" for s in _sentences(40, 0))]) + "\n")
        (folder / "dev.tsv").write_text("\n".join(["sentence\tlabel", *(
            f"{s.split(chr(9))[1]}\t{s.split(chr(9))[0]}" for s in _sentences(10, 1))]) + "\n")
    elif task == "tagging":
        for split, count, seed in (("train", 40, 0), ("dev", 8, 1), ("test", 8, 2)):
            _atis_split(folder / split, count, seed)
    elif task == "translate":
        from rnnkit.tasks import dates

        for name, count, seed in (("train.tsv", 48, 1), ("valid.tsv", 8, 2)):
            (folder / name).write_text("".join(f"{s}\t{t}\n"
                                               for s, t in dates.make_pairs(count, seed=seed)))
    elif task == "music":
        from scipy.io import savemat

        savemat(str(folder / "Tiny.mat"), {"traindata": _rolls(8, 0), "validdata": _rolls(4, 1),
                                           "testdata": _rolls(4, 2)})
    elif task == "speech":
        from rnnkit.data.audio import write_wav

        recordings = folder / "recordings"  # FSDD's layout: fsdd/recordings/*.wav
        recordings.mkdir()
        for speaker in ("ann", "bob"):
            for digit in range(10):
                for take in range(7):
                    write_wav(recordings / f"{digit}_{speaker}_{take}.wav",
                              _digit_sound(digit, take), 8000)
    elif task == "trees":
        (folder / "train.txt").write_text("\n".join(_tree(i) for i in range(24)) + "\n")
        (folder / "dev.txt").write_text("\n".join(_tree(i) for i in range(24, 30)) + "\n")
    else:
        raise ValueError(task)


def _run(tmp_path: Path, task: str, *data: str, out: str = "run") -> int:
    config = tmp_path / f"{task}.yaml"
    config.write_text(yaml.safe_dump(TINY[task]))
    return main(["train", task, "--config", str(config), "--out", str(tmp_path / out),
                 "--no-progress", "--data", *data])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_has_help_naming_its_data(task: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", task, "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"Train the {task} task" in printed and "--data PATH" in printed
    assert ("not taken" in printed) == (task in NO_FILES)


@pytest.mark.parametrize("task", sorted(TINY))
def test_a_data_folder_run_of_every_task(task: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    write_layout(task, tmp_path / "mydata")
    monkeypatch.chdir(tmp_path)  # the path below is relative to where the command runs
    monkeypatch.setenv("RNNKIT_DATA", str(tmp_path / "no-shared-data"))  # nothing to fall back on
    assert _run(tmp_path, task, "mydata") == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "stopped at step 2" in captured.out
    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    paths = [p for key in ("train", "valid", "test", "files", "path", "recordings", "directory")
             for p in ([data.get(key)] if not isinstance(data.get(key), list) else data[key]) if p]
    assert paths, data
    for path in paths:  # recorded absolute, inside the folder given
        assert Path(path).is_absolute() and Path(path).is_relative_to(tmp_path / "mydata"), path


@pytest.mark.parametrize("task", sorted(NO_FILES))
def test_tasks_without_files_refuse_data_in_one_line(task: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", task, "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is not taken by the {task} task" in err, err


def test_a_single_atis_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 17's trap: snips/train alone silently took the shared ATIS dev and test
    write_layout("tagging", tmp_path / "snips")
    assert _run(tmp_path, "tagging", str(tmp_path / "snips" / "train")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a single split (it holds seq.in)" in err, err
    assert not (tmp_path / "run").exists()


def test_a_folder_without_its_files_names_what_it_looked_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" a b c\n")
    assert _run(tmp_path, "wordlm", str(folder)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{folder} has no valid split: looked for train: ptb.train.txt or train.txt; " \
           "valid: ptb.valid.txt or valid.txt" in err
    assert _run(tmp_path, "music", str(folder)) == 2
    assert "holds no *.mat" in capsys.readouterr().err


def test_tagging_folder_without_test_has_no_test(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"  # a default data location with an ATIS test of its own
    _atis_split(shared / "atis" / "test", 8, 9)
    monkeypatch.setenv("RNNKIT_DATA", str(shared))
    for split, count, seed in (("train", 40, 0), ("dev", 8, 1)):
        _atis_split(tmp_path / "mine" / split, count, seed)
    assert _run(tmp_path, "tagging", str(tmp_path / "mine")) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "\ntest (" not in captured.out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["test"] is None


def test_splits_named_one_by_one_and_a_partial_set_warns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    write_layout("tagging", tmp_path / "snips")
    shared = tmp_path / "shared"
    write_layout("tagging", shared / "atis")
    monkeypatch.setenv("RNNKIT_DATA", str(shared))
    snips = tmp_path / "snips"
    assert _run(tmp_path, "tagging", f"train={snips / 'train'}", f"valid={snips / 'dev'}",
                f"test={snips / 'test'}") == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tagging.yaml"
    assert main(["train", "tagging", "--config", str(config), "--out", "run2", "--no-progress",
                 "--data", "train=snips/train"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    # the shared test is never read for a training set of one's own (no test then)
    assert len(lines) == 1 and "train as given, valid from the default data in " \
                               f"{shared}" in lines[0], lines
    # mixed forms and unknown splits: one line each
    assert _run(tmp_path, "tagging", "train=snips/train", "snips/dev", out="r3") == 2
    assert "takes one form" in capsys.readouterr().err
    assert _run(tmp_path, "tagging", "training=snips/train", out="r3") == 2
    assert "training= is not a split of the tagging task; its splits are train, valid, test" \
        in capsys.readouterr().err
    assert _run(tmp_path, "music", "train=a.mat", out="r3") == 2
    assert "reads every split from one file" in capsys.readouterr().err


