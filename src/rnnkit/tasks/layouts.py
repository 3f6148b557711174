"""One ``--data`` for every task: a folder in the task's standard layout, or a file per split.

``rnnkit train TASK --data PATH`` names a folder laid out as the task's shared data set is (the
splits are found inside by their usual names) or, for tasks whose data is one thing (charlm's
text files, speech's recordings, music's .mat file), that thing. ``--data train=A valid=B``
names each split's file instead. Either way the paths are the user's: relative to the directory
the command is typed in, and recorded absolute in the run's ``config.yaml`` so that
``--config`` repeats the run from anywhere.

Splits of one run come from one place: a folder must hold every required split (one line names
what it looked for), a single ATIS split folder given as if it were the data set is refused
(its dev and test would otherwise be the shared ATIS ones), and a run whose splits are given
in part (``--data train=A`` alone) says in one line which come from the default data.

A task with several file formats (tagging: ATIS folders or CoNLL files) has one layout per
format, chosen by ``data.format``: a new format adds an entry to :data:`TAGGING`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnkit.options import OptionError
from rnnkit.tasks.common import shared_root


@dataclass(frozen=True)
class Splits:
    """A folder holding one file (or folder) per split under its usual names."""

    names: dict[str, tuple[str, ...]]  # split option -> the names it may have, first preferred
    required: tuple[str, ...] = ("train", "valid")
    marker: str | None = None  # a split is a folder holding this file (ATIS: seq.in)
    sets: dict[str, Any] = field(default_factory=dict)  # options such a folder implies
    defaulted: tuple[str, ...] = ("train", "valid")  # splits that fall back to shared data


@dataclass(frozen=True)
class Whole:
    """One option holding the whole data set: a file, files, or a folder of files."""

    option: str
    pattern: str  # the files a folder holds (charlm: *.txt, speech: *.wav, music: *.mat)
    what: str  # in words, for messages
    several: bool = False  # the option is a list of files (charlm)
    folder_itself: bool = False  # the option names the folder (speech), not the files in it
    subfolder: str | None = None  # the data may sit one level down (fsdd/recordings)
    sets: dict[str, Any] = field(default_factory=dict)


Layout = Splits | Whole

# tagging, per data.format
TAGGING: dict[str, Splits] = {
    "atis": Splits({"train": ("train",), "valid": ("dev", "valid"), "test": ("test",)},
                   marker="seq.in", defaulted=("train", "valid", "test")),
    "conll": Splits({"train": ("train.txt", "eng.train", "train"),
                     "valid": ("dev.txt", "valid.txt", "eng.testa", "dev", "valid"),
                     "test": ("test.txt", "eng.testb", "test")}, defaulted=()),
}
TRANSLATE_TSV = Splits({"train": ("train.tsv",), "valid": ("valid.tsv", "dev.tsv")},
                       sets={"source": "tsv"}, defaulted=())
MULTI30K = Whole("directory", "train.*", "Multi30k files (train.de, train.en, val.de, val.en)",
                 folder_itself=True, sets={"source": "multi30k"})

NO_FILES = {
    "digits": "it reads scikit-learn's bundled 8×8 digits",
    "adding": "its sequences are generated",
    "copymemory": "its sequences are generated",
}


def _tagging(config: dict[str, Any], folder: Path | None) -> Splits:
    """The folder layout of ``data.format``; ``auto`` (the default) is told by what the folder
    holds: ATIS split folders (``train/seq.in``), else CoNLL files (``eng.train``, ``train.txt``)."""
    chosen = config["data"].get("format", "auto")
    if chosen != "auto":
        return TAGGING[chosen]
    if folder is not None and folder.is_dir():
        atis = TAGGING["atis"]
        if not any((folder / name / atis.marker).is_file() for name in atis.names["train"]):
            conll = TAGGING["conll"]
            if any((folder / name).is_file() for name in conll.names["train"]):
                return conll
    return TAGGING["atis"]


def _translate(config: dict[str, Any], folder: Path | None) -> Layout:
    """TSV pairs or a Multi30k folder, by what the folder holds (or data.source)."""
    if folder is not None and folder.is_dir():
        if any((folder / name).is_file() for name in TRANSLATE_TSV.names["train"]):
            return TRANSLATE_TSV
        if any(folder.glob("train.*")):
            return MULTI30K
    return MULTI30K if config["data"].get("source") == "multi30k" else TRANSLATE_TSV


LAYOUTS: dict[str, Callable[[dict[str, Any], Path | None], Layout]] = {
    "charlm": lambda c, f: Whole("files", "*.txt", "UTF-8 text files (*.txt)", several=True),
    "wordlm": lambda c, f: Splits({"train": ("ptb.train.txt", "train.txt"),
                                   "valid": ("ptb.valid.txt", "valid.txt")}),
    "speech": lambda c, f: Whole("recordings", "*.wav", "FSDD recordings ({digit}_{speaker}_"
                                 "{take}.wav)", folder_itself=True, subfolder="recordings"),
    "sentiment": lambda c, f: Splits({"train": ("train.tsv",), "valid": ("dev.tsv", "valid.tsv")}),
    "tagging": lambda c, f: _tagging(c, f),
    "translate": _translate,
    "music": lambda c, f: Whole("path", "*.mat", "a .mat file of piano rolls"),
    "trees": lambda c, f: Splits({"train": ("train.txt",), "valid": ("dev.txt", "valid.txt")}),
}


def _user_path(text: str) -> Path:
    """A path as the user typed it, made absolute against the directory it was typed in."""
    return Path(text).expanduser().absolute()


def _find(folder: Path, names: Sequence[str], marker: str | None) -> Path | None:
    for name in names:
        candidate = folder / name
        if marker is not None:
            if (candidate / marker).is_file():
                return candidate
        elif candidate.is_file():
            return candidate
    return None


def data_options(task: str, values: Sequence[str], config: dict[str, Any]
                 ) -> dict[str, Any]:
    """The data options (``section.option`` → value) that ``--data values`` sets for ``task``
    with the options so far ``config``; a path or form the task cannot use is one OptionError
    naming what was looked for."""
    if task in NO_FILES:
        raise OptionError("--data", f"is not taken by the {task} task: {NO_FILES[task]}")
    if task not in LAYOUTS:
        raise OptionError("--data", f"is not taken by the {task} task")
    pairs = [v.partition("=") for v in values]
    named = [p for p in pairs if p[1]]
    if named and len(named) != len(pairs):
        raise OptionError("--data", "takes one form: a folder (or file), or SPLIT=PATH for "
                                    "every path (e.g. --data train=a.tsv valid=b.tsv)")
    if named:
        return _named_splits(task, config, [(k.strip(), v) for k, _, v in named])
    paths = [_user_path(v) for v in values]
    for path in paths:
        if not path.exists():
            raise OptionError("--data", f"{path} does not exist")
    layout = LAYOUTS[task](config, paths[0])
    if isinstance(layout, Whole):
        return _whole(task, layout, paths)
    if len(paths) > 1:
        raise OptionError("--data", f"takes one folder for the {task} task (or SPLIT=PATH "
                                    f"pairs), got {len(paths)} paths")
    return _folder(task, layout, paths[0])


def _named_splits(task: str, config: dict[str, Any], named: list[tuple[str, str]]
                  ) -> dict[str, Any]:
    first = _user_path(named[0][1])
    layout = LAYOUTS[task](config, None if first.is_file() else first.parent)
    if isinstance(layout, Whole):
        kind = "files" if layout.several else "folder" if layout.folder_itself else "file"
        raise OptionError("--data", f"the {task} task reads every split from one {kind} "
                                    f"({layout.what}): give --data PATH, not SPLIT=PATH")
    chosen: dict[str, Any] = {f"data.{k}": v for k, v in layout.sets.items()}
    for split, text in named:
        if split not in layout.names:
            raise OptionError("--data", f"{split}= is not a split of the {task} task; its "
                                        f"splits are {', '.join(layout.names)}")
        path = _user_path(text)
        if not path.exists():
            raise OptionError("--data", f"{split}={path} does not exist")
        chosen[f"data.{split}"] = str(path)
    return chosen


def _folder(task: str, layout: Splits, folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise OptionError("--data", f"{folder} is a file; the {task} task takes a folder holding "
                                    f"{_expected(layout)}, or --data "
                                    f"{' '.join(s + '=PATH' for s in layout.names)}")
    if layout.marker is not None and (folder / layout.marker).is_file():
        # the trap of issue 17: a split folder as the data set left dev and test to the
        # shared ATIS ones without a word
        raise OptionError("--data", f"{folder} is a single split (it holds {layout.marker}); "
                                    f"give the folder holding {_expected(layout)}, or --data "
                                    f"{' '.join(s + '=PATH' for s in layout.names)}")
    chosen: dict[str, Any] = {f"data.{k}": v for k, v in layout.sets.items()}
    for split, names in layout.names.items():
        found = _find(folder, names, layout.marker)
        if found is None and split in layout.required:
            raise OptionError("--data", f"{folder} has no {split} split: looked for "
                                        f"{_expected(layout)}")
        # a split the folder lacks is absent, never filled in from the default data
        chosen[f"data.{split}"] = str(found) if found is not None else None
    return chosen


def _expected(layout: Splits) -> str:
    """The splits of a layout and their usual names, in words: "train: train.tsv; valid:
    dev.tsv or valid.tsv"."""
    inside = f" (each a folder holding {layout.marker})" if layout.marker else ""
    parts = [f"{split}{'' if split in layout.required else ' (optional)'}: "
             + " or ".join(names) for split, names in layout.names.items()]
    return "; ".join(parts) + inside


def _whole(task: str, layout: Whole, paths: list[Path]) -> dict[str, Any]:
    chosen: dict[str, Any] = {f"data.{k}": v for k, v in layout.sets.items()}
    if len(paths) > 1 and not layout.several:
        raise OptionError("--data", f"takes one path for the {task} task, got {len(paths)}")
    files: list[str] = []
    for path in paths:
        folder = path
        if path.is_dir() and layout.subfolder and not any(path.glob(layout.pattern)) and (
                path / layout.subfolder).is_dir():
            folder = path / layout.subfolder
        if not folder.is_dir():
            if layout.folder_itself:
                raise OptionError("--data", f"{path} is a file; the {task} task takes a folder "
                                            f"of {layout.what}")
            files.append(str(path))
            continue
        found = sorted(folder.glob(layout.pattern))
        if not found:
            raise OptionError("--data", f"{path} holds no {layout.pattern} ({layout.what})")
        if layout.folder_itself:
            files.append(str(folder))
        elif layout.several:
            files.extend(str(f) for f in found)
        elif len(found) > 1:
            raise OptionError("--data", f"{path} holds {len(found)} {layout.pattern} files "
                                        f"({', '.join(f.name for f in found)}); name one")
        else:
            files.append(str(found[0]))
    chosen[f"data.{layout.option}"] = files if layout.several else files[0]
    return chosen


def mixed_sources(task: str, config: dict[str, Any]) -> str | None:
    """One line when the run's splits do not all come from one place: some given, others
    left to the task's default data; None when they do."""
    if task not in LAYOUTS:
        return None
    layout = LAYOUTS[task](config, None)
    if not isinstance(layout, Splits) or not layout.defaulted:
        return None
    data = config["data"]
    given = [s for s in layout.names if data.get(s)]
    # tagging reads no shared test split for data of the user's own (see tasks/tagging.py)
    defaulted = [s for s in layout.defaulted if not data.get(s) and not (
        s == "test" and s not in layout.required and data.get("train"))]
    if not given or not defaulted:
        return None
    return (f"warning: the splits come from two places: {', '.join(given)} as given, "
            f"{', '.join(defaulted)} from the default data in {shared_root()}; give every split "
            f"(--data FOLDER or --data {' '.join(s + '=PATH' for s in layout.names)})")


def data_help(task: str) -> str:
    """What ``--data`` takes for ``task``, for its ``--help``."""
    if task in NO_FILES:
        return f"not taken: {NO_FILES[task]}"
    if task == "translate":
        return (f"a folder of TSV pairs ({_expected(TRANSLATE_TSV)}), or the Multi30k folder "
                f"({MULTI30K.what}); or {' '.join(s + '=PATH' for s in TRANSLATE_TSV.names)}")
    if task == "tagging":
        return " | ".join(f"--format {name}: a folder holding {_expected(layout)}"
                          for name, layout in TAGGING.items()) + (
            " | or train=PATH valid=PATH test=PATH")
    layout = LAYOUTS[task]({"data": {}}, None)
    if isinstance(layout, Whole):
        if layout.folder_itself:
            return f"a folder of {layout.what}"
        if layout.several:
            return f"{layout.what}, or folders of them"
        return f"{layout.what}, or a folder holding one"
    return (f"a folder holding {_expected(layout)}; or "
            f"{' '.join(s + '=PATH' for s in layout.names)}")
