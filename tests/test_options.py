"""Typed options: every option of every task refuses a wrong type, an out-of-range and an empty
value with one line naming it (exit code 2, no traceback); per-task help; the checking layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rnnkit.cli import main
from rnnkit.models import LMConfig
from rnnkit.models.classifier import ClassifierConfig
from rnnkit.options import OptionError, Spec, TaskSchema, coerce, describe, field_specs
from rnnkit.options.command import _shown, flag_names
from rnnkit.tasks import TASKS, task_schema
from rnnkit.tasks.charlm import DataConfig
from rnnkit.train import TrainConfig


def _bad_values(spec: Spec) -> dict[str, tuple[str, Any] | None]:
    """(how, value) per kind of bad value; how: "flag" (typed text) or "file" (a YAML value)."""
    kind, rule = spec.kind, spec.rule
    if kind.base is bool:
        wrong = ("flag", "maybe")
    elif spec.choices:
        wrong = ("flag", "no-such-choice")
    elif kind.base in (int, float):
        wrong = ("flag", "abc")
    elif kind.base is list:
        wrong = ("file", {"not": "a list"})
    else:  # free text: any typed text is text, so the wrong type comes from a file
        wrong = ("file", [1, 2])
    out_of_range: tuple[str, Any] | None = None
    if spec.choices:
        out_of_range = ("file", 12345)
    elif rule.ge is not None:
        out_of_range = ("flag", str(int(rule.ge) - 1))
    elif rule.gt is not None:
        out_of_range = ("flag", str(rule.gt))
    elif rule.lt is not None:
        out_of_range = ("flag", str(rule.lt))
    elif rule.le is not None:
        out_of_range = ("flag", str(rule.le + 1))
    elif kind.base is float:
        out_of_range = ("flag", "nan")  # every float option is finite
    empty = None if rule.empty_ok else ("flag", "")
    return {"wrong type": wrong, "out of range": out_of_range, "empty": empty}


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    tree: Any = value
    for key in reversed(dotted.split(".")):
        tree = {key: tree}
    return tree


@pytest.mark.parametrize("task", list(TASKS))
def test_every_option_refuses_bad_values_in_one_line(task: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    schema = task_schema(task)
    flags = flag_names(schema)
    problems, tried = [], 0
    for dotted, leaf in schema.leaves.items():
        for what, case in _bad_values(leaf.spec).items():
            if case is None:
                continue
            how, value = case
            if how == "file":
                config = tmp_path / "bad.yaml"
                config.write_text(yaml.safe_dump(_nested(dotted, value)), encoding="utf-8")
                extra = ["--config", str(config)]
            elif leaf.spec.kind.base is bool:
                extra = ["--set", f"{dotted}={value}"]
            else:  # the generated flag, '=' so that values like -1 stay values
                extra = [f"--{flags[dotted]}={value}"]
            tried += 1
            code = main(["train", task, "--out", str(tmp_path / "run"), *extra])
            err = capsys.readouterr().err
            if code != 2 or err.count("\n") != 1 or dotted not in err or "Traceback" in err:
                problems.append(f"{dotted} {what} {value!r}: exit {code}, {err!r}")
    assert not (tmp_path / "run").exists()
    assert tried >= 2 * len(schema.leaves)
    assert not problems, "\n".join(problems)


def test_the_generated_flag_and_set_give_the_same_message(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert main(["train", "digits", "--hidden", "16.5"]) == 2
    by_flag = capsys.readouterr().err
    assert main(["train", "digits", "--set", "model.recurrent.hidden=16.5"]) == 2
    by_set = capsys.readouterr().err
    assert "model.recurrent.hidden must be an integer ≥ 1, got '16.5' (--hidden)" in by_flag
    assert by_set == by_flag.replace("(--hidden)", "(--set model.recurrent.hidden)")


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "model.hidden=abc"], "model.hidden must be an integer ≥ 1, got 'abc'"),
    (["--set", "train.steps=abc"], "train.steps must be an integer ≥ 1, or none, got 'abc'"),
    (["--set", "train.lr=abc"], "train.lr must be a finite number > 0, got 'abc'"),
    (["--set", "train.seed=abc"], "train.seed must be an integer ≥ 0"),
    (["--set", "model.hidden=16.5"], "model.hidden must be an integer ≥ 1, got '16.5'"),
    (["--set", "model.hidden.x=3"], "model.hidden.x is not an option: model.hidden is a value"),
    (["--set", "train.momentum=fast"], "train.momentum must be a finite number ≥ 0 and < 1"),
    (["--set", "train.stepz=3"], "train.stepz is an unknown option; did you mean steps?"),
    (["--set", "model"], "--set expects SECTION.OPTION=VALUE"),
    (["--embedding", "-3"], "model.embedding must be an integer ≥ 0, got -3 (--embedding)"),
    (["--threads", "-2"], "argument --threads: must be an integer ≥ 1"),
    (["--threads", "two"], "argument --threads: must be an integer ≥ 1"),
    (["--nproc-per-node", "0"], "argument --nproc-per-node: must be an integer ≥ 1, got 0"),
    (["--nproc-per-node", "two"], "argument --nproc-per-node: must be an integer ≥ 1, got 'two'"),
    (["--nproc-per-node=-2"], "argument --nproc-per-node: must be an integer ≥ 1, got -2"),
    (["--clip-norm", "nan"], "train.clip_norm must be a finite number > 0, or none, got nan"),
    (["--top-k", "0"], "sample.top_k must be an integer ≥ 1, or none, got 0"),
    (["--top-k=-1"], "sample.top_k must be an integer ≥ 1, or none, got -1"),
    (["--temperature", "nan"], "sample.temperature must be a finite number ≥ 0, got nan"),
    (["--temperature=-1"], "sample.temperature must be a finite number ≥ 0, got -1.0"),
    (["--lr", "inf"], "train.lr must be a finite number > 0, got inf"),
    (["--seq-len", "0"], "data.seq_len must be an integer ≥ 1, got 0"),
    (["--cell", "lstmm"], "model.cell must be one of lstm, gru, rnn, mingru, minlstm, tcn, got 'lstmm'"),
    (["--no-such-flag", "1"], "--no-such-flag is not an option of the charlm task"),
    (["--hidden"], "argument --hidden: expected one argument"),
])
def test_issue_10_option_bugs(args: list[str], expected: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "charlm", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("rnnkit train: error: ")


@pytest.mark.parametrize(("text", "expected"), [
    ("model:\n  hidden: thirty-two\n", "model.hidden must be an integer ≥ 1, got 'thirty-two'"),
    ("train:\n  steps: 6.5\n", "train.steps must be an integer ≥ 1, or none, got 6.5"),
    ("model:\n  hidden: 32\n   layers: 2\n", "bad.yaml:3:10: mapping values are not allowed here"),
    ("model:\n\thidden: 32\n", "bad.yaml:2:1: found character '\\t' that cannot start any token"),
    ("model: !!python/object:os.system\n  hidden: 3\n", "bad.yaml:1:8: unsupported YAML tag"),
    ("- 1\n- 2\n", "must hold a mapping of sections"),
    ("task: music\n", "is a 'music' config, not a charlm one"),
    ("model: 3\n", "model is a section of options, not a value"),
])
def test_config_file_errors_name_the_file_line_and_option(
        text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    assert main(["train", "charlm", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_toml_errors_name_the_file_and_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nhidden = 3\nhidden = 4\n', encoding="utf-8")
    assert main(["train", "charlm", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: " in err and "line 3" in err and err.count("\n") == 1


def test_bad_values_fail_in_a_real_process_without_a_traceback(tmp_path: Path) -> None:
    for args in (["train", "charlm", "--hidden", "abc"], ["train", "music", "--set", "x.y=1"],
                 ["sample", str(tmp_path), "--temperature", "nan"]):
        result = subprocess.run([sys.executable, "-m", "rnnkit.cli", *args], capture_output=True,
                                text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_help_shows_its_options_and_defaults(task: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", task, "--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps at spaces and hyphens
    schema = task_schema(task)
    for dotted, flag in flag_names(schema).items():
        leaf = schema.leaves[dotted]
        assert f"--{flag}" in text, flag
        shown = (f"{leaf.spec.rule.help.rstrip('.')} [{describe(leaf.spec)}; "
                 f"default {_shown(leaf.spec.default)}]")
        assert "".join(shown.split()) in text, shown
    assert f"Trainthe{task}task" in text


def test_task_defaults_differ_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    shown = {}
    for task in ("charlm", "digits"):
        with pytest.raises(SystemExit):
            main(["train", task, "--help"])
        shown[task] = " ".join(capsys.readouterr().out.split())
    assert "hidden units per layer [an integer ≥ 1; default 256]" in shown["charlm"]
    assert "(per direction; tcn: channels) [an integer ≥ 1; default 128]" in shown["digits"]


def test_tasks_command_lists_every_task_and_its_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for task in TASKS:
        assert f"\n{task} " in f"\n{out}"
    assert out.count("\n           data: ") == len(TASKS)


# --- the checking layer itself -----------------------------------------------------------------


def test_dataclasses_check_their_fields_on_construction() -> None:
    with pytest.raises(OptionError, match="hidden must be an integer ≥ 1, got -3"):
        LMConfig(hidden=-3)
    with pytest.raises(OptionError, match=r"steps must be an integer ≥ 1, or none, got 6\.5"):
        TrainConfig(steps=6.5)  # type: ignore[arg-type]
    assert TrainConfig(steps=6.0).steps == 6 and isinstance(TrainConfig(lr=1).lr, float)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"model\.recurrent\.hidden must be an integer"):
        ClassifierConfig.from_dict({"vocab_size": 3, "recurrent": {"hidden": "x"}}, "model")
    config = ClassifierConfig.from_dict({"vocab_size": 3, "recurrent": {"hidden": 7}})
    assert config.recurrent.hidden == 7
    with pytest.raises(OptionError, match=r"^model\.recurrent: peephole, coupled and forget_bias are LSTM"):
        ClassifierConfig.from_dict({"vocab_size": 3, "recurrent": {"cell": "gru",
                                                                   "peephole": True}}, "model")


def test_coerce_reads_what_yaml_and_flags_give() -> None:
    specs = field_specs(TrainConfig)
    assert coerce("1e-3", specs["lr"], "train.lr") == 1e-3  # YAML 1.1 reads 1e-3 as text
    assert coerce(True, field_specs(LMConfig)["peephole"], "model.peephole") is True
    for bad in (True, "6.5", 6.5, float("inf"), None, [6]):  # batch_size: an int, never none
        with pytest.raises(OptionError, match=r"train\.batch_size must be an integer"):
            coerce(bad, specs["batch_size"], "train.batch_size")
    assert coerce(None, specs["steps"], "train.steps") is None  # steps: none lifts the cap
    files = field_specs(DataConfig)["files"]
    assert coerce("small.txt", files, "data.files") == ["small.txt"]


def test_schema_options_have_help_and_task_defaults() -> None:
    for task in TASKS:
        schema: TaskSchema = task_schema(task)
        for dotted, leaf in schema.leaves.items():
            assert leaf.spec.rule.help, f"{task} {dotted} has no help"
            coerce(leaf.spec.default, leaf.spec, dotted)  # every default passes its own checks
    assert task_schema("charlm").leaves["model.hidden"].spec.default == 256
    assert task_schema("sentiment").leaves["model.chars"].spec.kind.base is bool


def test_language_model_and_recurrent_configs_declare_the_cell_options_alike() -> None:
    """LMConfig's fields are flat (its saved configs and flags), RecurrentConfig's are every other
    model's: each cell option (type, default, help, range) is defined once, in CELL_OPTIONS, and
    LanguageModel hands all of them to its RecurrentConfig."""
    from rnnkit.models.recurrent import CELL_OPTIONS, RecurrentConfig, cell_options_of

    lm, recurrent = field_specs(LMConfig), field_specs(RecurrentConfig)
    for name in CELL_OPTIONS:
        assert lm[name] == recurrent[name], name
    config = LMConfig(vocab_size=5, cell="gru", reset="before", zoneout=0.1, chrono=8.0)
    assert RecurrentConfig(**cell_options_of(config)).reset == "before"
