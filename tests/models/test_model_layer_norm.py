"""The layer_norm option of the shared recurrent config and of the language model, to the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rnnkit.cli import main
from rnnkit.models.language_model import LanguageModel, LMConfig
from rnnkit.models.recurrent import RecurrentConfig, build_recurrent
from rnnkit.options import OptionError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

TEXT = "the cat sat on the mat. 고양이가 매트 위에 앉았다.\n" * 12


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_build_recurrent_passes_layer_norm(cell: str) -> None:
    layer = build_recurrent(RecurrentConfig(cell=cell, layers=2, hidden=5, layer_norm=True), 3)
    assert layer.math.spec.layer_norm and layer.math.spec.kind == cell
    assert "ln_hh_weight_l1" in dict(layer.named_parameters())
    plain = build_recurrent(RecurrentConfig(cell=cell, layers=1, hidden=5), 3)
    assert not plain.math.spec.layer_norm


def test_layer_norm_on_another_cell_is_refused() -> None:
    with pytest.raises((OptionError, ValueError), match="layer_norm is an LSTM and GRU option"):
        RecurrentConfig(cell="rnn", layer_norm=True)
    with pytest.raises((OptionError, ValueError), match="layer-norm is an LSTM and GRU option"):
        LMConfig(vocab_size=5, cell="mingru", layer_norm=True)


def test_language_model_with_layer_norm_trains_a_step() -> None:
    model = LanguageModel(LMConfig(vocab_size=7, layers=2, hidden=6, embedding=4, cell="lstm",
                                   peephole=True, layer_norm=True))
    tokens = torch.randint(0, 7, (5, 3))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.view(-1, 7), tokens.view(-1)).backward()
    assert all(p.grad is not None for p in model.parameters())


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "charlm", "--data", str(data), "--out", str(out), "--steps", "3",
            "--eval-every", "3", "--layers", "1", "--hidden", "8", "--embedding", "4",
            "--batch-size", "2", "--seq-len", "8", "--sample-length", "5", "--no-progress",
            *extra]


def test_cli_trains_and_records_layer_norm(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(_train_args(data, out, "--cell", "gru", "--layer-norm")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["layer_norm"] is True and config["model"]["cell"] == "gru"
    capsys.readouterr()
    assert main(_train_args(data, tmp_path / "bad", "--cell", "rnn", "--layer-norm")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer-norm is an LSTM and GRU option" in err[0]
