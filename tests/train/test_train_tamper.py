"""Hand-edited, truncated, hostile checkpoints: one CheckpointError naming the file and the fault.

The SHA-256 in ``checkpoint.json`` covers the weights, not the JSON itself, so every field a
person could edit is checked on load; files outside the checkpoint's directory are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from trainer_helpers import make_trainer

from rnnkit.tasks import charlm
from rnnkit.train import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    make_trainer(out, steps=4).fit()
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A fresh copy of the trained run directory for each test to damage."""
    out = tmp_path / "run"
    out.mkdir()
    for file in trained.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


def _edit(run: Path, change: Callable[[dict[str, Any]], Any], name: str = "checkpoint.json") -> None:
    pointer = run / name
    meta = json.loads(pointer.read_text())
    result = change(meta)  # edits in place, or returns a replacement list
    pointer.write_text(json.dumps(result if isinstance(result, list) else meta))


def _rewrite_weights(run: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Changes the tensors and records the new file's SHA-256, as a careful forger would."""
    meta = json.loads((run / "checkpoint.json").read_text())
    weights = run / meta["weights"]
    tensors = safetensors.torch.load(weights.read_bytes())
    change(tensors)
    data = safetensors.torch.save(tensors)
    weights.write_bytes(data)
    meta.update(weights_sha256=hashlib.sha256(data).hexdigest(), weights_bytes=len(data))
    (run / "checkpoint.json").write_text(json.dumps(meta))


def _model(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["task"]["model"]


# (id, edit of checkpoint.json, the message expected)
METADATA_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("hidden size", lambda m: _model(m).update(hidden=32),
     r"rnn\.weight_ih_l0 has shape \(64, 8\), the model needs \(128, 8\)"),
    ("cell", lambda m: _model(m).update(cell="gru"), r"has shape \(64, 8\), the model needs \(48, 8\)"),
    ("layers", lambda m: _model(m).update(layers=1),
     r"unexpected tensor\(s\) rnn\.bias_hh_l1, rnn\.bias_ih_l1"),
    ("huge hidden, built on the meta device", lambda m: _model(m).update(hidden=10**6),
     r"the model needs \(4000000, 8\)"),
    ("unknown cell", lambda m: _model(m).update(cell="transformer"),
     r"task\.model is invalid: cell must be one of"),
    ("negative hidden", lambda m: _model(m).update(hidden=-3), r"task\.model is invalid"),
    ("unknown model option", lambda m: _model(m).update(heads=4),
     r"task\.model is invalid: heads is an unknown option; known here: cell"),
    ("missing task.model", lambda m: m["task"].pop("model"), r"task\.model is missing"),
    ("missing task.vocab", lambda m: m["task"].pop("vocab"), r"task\.vocab is missing"),
    ("task.model null", lambda m: m["task"].update(model=None),
     r"task\.model must be a JSON object, got null"),
    ("task null", lambda m: m.update(task=None), r"task must be a JSON object, got null"),
    ("task missing", lambda m: m.pop("task"), r"task is missing"),
    ("task name missing", lambda m: m["task"].pop("name"), r"task\.name is missing"),
    ("shortened vocabulary", lambda m: m["task"]["vocab"].update(symbols=m["task"]["vocab"]["symbols"][:-2]),
     r"task\.vocab has \d+ entries but task\.model\.vocab_size is \d+"),
    ("vocabulary not a list", lambda m: m["task"]["vocab"].update(symbols=5), r"task\.vocab is invalid"),
    ("vocabulary key missing", lambda m: m["task"]["vocab"].pop("byte_level"),
     r"task\.vocab is invalid: missing key 'byte_level'"),
    ("seq_len 0", lambda m: m["task"]["data"].update(seq_len=0),
     r"task\.data is invalid: seq_len must be an integer ≥ 1, got 0"),
    ("data not an object", lambda m: m["task"].update(data=[1]), r"task\.data must be a JSON object"),
    ("step a string", lambda m: m.update(step="ten"), r"step must be a non-negative integer, got 'ten'"),
    ("step negative", lambda m: m.update(step=-1), r"step must be a non-negative integer"),
    ("weights_bytes a string", lambda m: m.update(weights_bytes="1"), r"weights_bytes must be a byte count"),
    ("sha not hex", lambda m: m.update(weights_sha256="xyz"), r"weights_sha256 must be a SHA-256"),
    ("wrong sha", lambda m: m.update(weights_sha256="0" * 64), r"SHA-256 does not match"),
    ("wrong size", lambda m: m.update(weights_bytes=m["weights_bytes"] + 1), r"truncated or corrupt"),
    ("format", lambda m: m.update(format="other"), r"is not an rnnkit checkpoint"),
    ("version", lambda m: m.update(version=7), r"has format version 7, this rnnkit reads version 1"),
    ("top level a list", lambda m: [m], r"is not an rnnkit checkpoint"),
    ("deeply nested", lambda m: m["task"].update(extra=json.loads("[" * 50 + "]" * 50)),
     r"nested (more than 32 deep|too deeply)"),
    ("absolute weights path", lambda m: m.update(weights="/etc/passwd"), r"refusing to read files elsewhere"),
    ("weights path up and out", lambda m: m.update(weights="../../outside.safetensors"),
     r"refusing to read files elsewhere"),
    ("weights a dot file name", lambda m: m.update(weights=".."), r"refusing to read files elsewhere"),
    ("weights a number", lambda m: m.update(weights=3), r"weights must be a file name"),
]


@pytest.mark.parametrize("edit, message", [(e, m) for _, e, m in METADATA_EDITS],
                         ids=[name for name, _, _ in METADATA_EDITS])
def test_edited_metadata_gives_one_clear_error(run: Path, edit: Any, message: str) -> None:
    _edit(run, edit)
    with pytest.raises(CheckpointError, match=message) as caught:
        charlm.load_model(run)
    text = str(caught.value)
    assert "\n" not in text and str(run) in text  # one line, naming the run's file


def test_deeply_nested_json_that_overflows_the_parser_is_refused(run: Path) -> None:
    (run / "checkpoint.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(run)


def test_the_error_about_an_outside_file_does_not_reveal_its_size(run: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x" * 12345)
    _edit(run, lambda m: m.update(weights="../secret.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(run)
    assert "12345" not in str(caught.value) and "refusing" in str(caught.value)


def test_a_weights_symlink_leading_outside_is_refused(run: Path, tmp_path: Path) -> None:
    meta = json.loads((run / "checkpoint.json").read_text())
    weights = run / meta["weights"]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(weights.read_bytes())  # even the right bytes: the place is wrong
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"a link leading outside .*refusing to read them"):
        load_checkpoint(run)


def test_a_weights_symlink_inside_the_run_directory_is_followed(run: Path) -> None:
    meta = json.loads((run / "checkpoint.json").read_text())
    (run / meta["weights"]).rename(run / "moved.bin")
    (run / meta["weights"]).symlink_to("moved.bin")
    assert load_checkpoint(run).meta["step"] == 4


def test_a_pointer_symlink_leading_outside_the_given_directory_is_refused(run: Path, tmp_path: Path
                                                                         ) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "checkpoint.json").rename(elsewhere / "checkpoint.json")
    (run / "checkpoint.json").symlink_to(elsewhere / "checkpoint.json")
    with pytest.raises(CheckpointError, match="a link leading outside"):
        load_checkpoint(run)


def test_a_fifo_named_as_weights_does_not_hang(run: Path) -> None:
    meta = json.loads((run / "checkpoint.json").read_text())
    (run / meta["weights"]).unlink()
    os.mkfifo(run / meta["weights"])
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(run)


def test_missing_tensor_with_a_matching_sha_is_named(run: Path) -> None:
    _rewrite_weights(run, lambda t: t.pop("model/decoder.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) decoder\.bias"):
        charlm.load_model(run)


def test_wrong_shape_tensor_with_a_matching_sha_is_named(run: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model/decoder.weight"] = tensors["model/decoder.weight"][:, :5].contiguous()

    _rewrite_weights(run, shrink)
    with pytest.raises(CheckpointError, match=r"decoder\.weight has shape \(\d+, 5\), the model needs"):
        charlm.load_model(run)


def test_corrupt_safetensors_with_a_matching_sha_is_refused(run: Path) -> None:
    meta = json.loads((run / "checkpoint.json").read_text())
    data = b"\xff" * 64
    (run / meta["weights"]).write_bytes(data)
    meta.update(weights_sha256=hashlib.sha256(data).hexdigest(), weights_bytes=len(data))
    (run / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(run)


# --- what resuming reads ----------------------------------------------------------------------

RESUME_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("position missing", lambda m: m.pop("position") and None, r"position is missing"),
    ("position short", lambda m: m.update(position=[1]), r"position must be \[batch, chunk\]"),
    ("position chunk too far", lambda m: m.update(position=[0, 9]), r"names chunk 9 of a batch cut into 2"),
    ("carry count wrong", lambda m: m.update(carry=3), r"carry says 3 but .* holds carry tensors"),
    ("optimizer groups not a list", lambda m: m["optimizer"].update(param_groups=5),
     r"optimizer\.param_groups must be a list"),
    ("optimizer groups emptied", lambda m: m["optimizer"].update(param_groups=[]),
     r"optimizer, schedule or random state cannot be restored"),
    ("rng missing", lambda m: m.pop("rng"), r"rng is missing"),
    ("rng torch state garbage", lambda m: m["rng"].update(torch="AAAA"),
     r"the random state cannot be restored"),
    ("best_valid text", lambda m: m.update(best_valid="low"), r"best_valid must be null or a finite"),
    ("best_valid NaN", lambda m: m.update(best_valid=float("nan")), r"best_valid must be null or a finite"),
    ("scheduler a list", lambda m: m.update(scheduler=[1]), r"scheduler must be null or a JSON object"),
]


@pytest.mark.parametrize("edit, message", [(e, m) for _, e, m in RESUME_EDITS],
                         ids=[name for name, _, _ in RESUME_EDITS])
def test_edited_resume_state_gives_one_clear_error(run: Path, edit: Any, message: str) -> None:
    _edit(run, edit)
    trainer = make_trainer(run)
    with pytest.raises(CheckpointError, match=message):
        trainer.load(load_checkpoint(run))


def test_a_carried_state_of_the_wrong_shape_is_refused(run: Path) -> None:
    def widen(tensors: dict[str, torch.Tensor]) -> None:
        tensors["carry/0"] = torch.zeros(2, 4, 17)

    _rewrite_weights(run, widen)
    trainer = make_trainer(run)
    with pytest.raises(CheckpointError, match=r"the carried recurrent state in .* does not fit the model"):
        trainer.load(load_checkpoint(run))


def test_resuming_from_best_json_is_refused(run: Path) -> None:
    trainer = make_trainer(run)
    with pytest.raises(CheckpointError, match="holds the best weights only"):
        trainer.load(load_checkpoint(run / "best.json"))


def test_an_untouched_checkpoint_still_loads(run: Path) -> None:
    model, vocab, checkpoint = charlm.load_model(run)
    assert checkpoint.meta["step"] == 4 and len(vocab) == model.config.vocab_size
    trainer = make_trainer(run)
    trainer.load(load_checkpoint(run))
    assert trainer.step == 4


def test_the_cli_reports_a_tampered_checkpoint_in_one_line(run: Path, capsys: pytest.CaptureFixture
                                                           ) -> None:
    from rnnkit.cli import main

    _edit(run, lambda m: m["task"].update(model=None))
    assert main(["sample", str(run), "--length", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rnnkit sample: error:") and "task.model" in err


# --- the other tasks' loaders share load_task_model and check_size ------------------------------


def _save_task(out: Path, model: torch.nn.Module, task: dict[str, Any]) -> None:
    from rnnkit.train import save_checkpoint

    save_checkpoint(out, {f"model/{k}": v for k, v in model.state_dict().items()},
                    {"step": 1, "task": task})


def test_a_tagging_checkpoint_with_a_shortened_tag_set_is_refused(tmp_path: Path) -> None:
    from rnnkit.data.text import Vocabulary
    from rnnkit.models.tagger import Tagger, TaggerConfig
    from rnnkit.tasks import tagging

    words, tags = Vocabulary(["show", "flights"]), Vocabulary(["O", "B-city", "I-city"], ("<unk>",))
    model = Tagger(TaggerConfig(vocab_size=len(words), tags=len(tags)))
    vocab = tagging.Vocabularies(words, tags, None, None).to_json()
    _save_task(tmp_path, model, {"name": "tagging", "model": model.config.to_dict(), "vocab": vocab,
                                 "data": {}})
    assert tagging.load_model(tmp_path)[1].tags.tokens == tags.tokens  # as written: loads
    vocab["tags"]["tokens"] = vocab["tags"]["tokens"][:-1]
    _save_task(tmp_path, model, {"name": "tagging", "model": model.config.to_dict(), "vocab": vocab,
                                 "data": {}})
    with pytest.raises(CheckpointError, match=r"task\.vocab\.tags has 3 entries but task\.model\.tags is 4"):
        tagging.load_model(tmp_path)


def test_a_translate_checkpoint_with_a_foreign_target_vocabulary_is_refused(tmp_path: Path) -> None:
    from rnnkit.data.text import Vocabulary
    from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig
    from rnnkit.tasks import translate

    source, target = Vocabulary(list("abc")), Vocabulary(list("0123456789-"))
    model = Seq2Seq(Seq2SeqConfig(source_vocab=len(source), target_vocab=len(target)))
    task = {"name": "translate", "model": model.config.to_dict(), "data": {},
            "source_vocab": source.to_json(), "target_vocab": Vocabulary(list("01")).to_json()}
    _save_task(tmp_path, model, task)
    with pytest.raises(CheckpointError, match=r"task\.target_vocab has 6 entries but task\.model\."
                                              r"target_vocab is 15"):
        translate.load_model(tmp_path)
    task["target_vocab"] = target.to_json()
    task["data"] = {"level": "auto", "no_such_option": 1}
    _save_task(tmp_path, model, task)
    with pytest.raises(CheckpointError, match=r"task\.data is invalid: .*no_such_option"):
        translate.load_model(tmp_path)
