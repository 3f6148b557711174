"""The explorer pages of the generated long-memory tasks: adding and copy memory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from explore_helpers import train_adding, train_copymemory

from rnnkit.explore.analysis import InputError, load_run
from rnnkit.tasks import adding, copymemory

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_adding_marks_prefixes_and_saliency(tmp_path: Path) -> None:
    explorer = load_run(train_adding(tmp_path / "run"))
    analysis = explorer.analyse("3")
    p = analysis.predictions
    task, _, _ = adding.build({"data": {**adding.default_config()["data"], "length": 20,
                                        "valid_size": 8},
                               "model": adding.default_config()["model"],
                               "train": adding.default_config()["train"]})
    inputs = task.valid.inputs[:, 3:4]  # the task's own validation draw, sequence 3
    assert p["marks"] == inputs[:, 0, 1].nonzero()[:, 0].tolist() and len(p["marks"]) == 2
    assert p["target"] == pytest.approx(float(task.valid.targets[0, 3]))
    assert [s.startswith("▶") for s in analysis.symbols] == [t in p["marks"] for t in range(20)]
    model = explorer.model
    with torch.no_grad():
        assert p["prediction"] == pytest.approx(float(model(inputs)[0, 0]), rel=1e-5)
        # every prefix: the model run on the prefix alone
        assert p["steps"] == list(range(20))
        for step, value in zip(p["steps"], p["prefix"]):
            assert value == pytest.approx(float(model(inputs[:step + 1])[0, 0]), rel=1e-4, abs=1e-6)
        output, _ = model.rnn(inputs)
    torch.testing.assert_close(analysis.values(0, "h"), output[:, 0])
    assert p["seen"][-1] == pytest.approx(p["target"], rel=1e-6)
    # the saliency against central differences of the model in float64
    model64 = copy.deepcopy(model).double()
    x = inputs.double()
    eps = 1e-6
    for t in (0, *p["marks"], 19):
        for channel, key in ((0, "saliency_value"), (1, "saliency_marker")):
            up, down = x.clone(), x.clone()
            up[t, 0, channel] += eps
            down[t, 0, channel] -= eps
            with torch.no_grad():
                slope = float(model64(up)[0, 0] - model64(down)[0, 0]) / (2 * eps)
            assert p[key][t] == pytest.approx(slope, rel=1e-3, abs=1e-7)
    # how the state carries each marked value: ‖∂h_t/∂value_mark‖ against central differences
    # of the model's own layer (float64) at every step
    for mark, carried in zip(p["marks"], p["carried"]):
        up, down = x.clone(), x.clone()
        up[mark, 0, 0] += eps
        down[mark, 0, 0] -= eps
        with torch.no_grad():
            slope = (model64.rnn(up)[0] - model64.rnn(down)[0])[:, 0] / (2 * eps)  # (T, H)
        torch.testing.assert_close(torch.tensor(carried, dtype=torch.float64), slope.norm(dim=1),
                                   rtol=1e-3, atol=1e-7)
        assert all(value == 0 for value in carried[:mark])  # nothing before it is read
    for bad, message in (("first", "number of a validation sequence"),
                         ("8", "there are 8 validation sequences")):
        with pytest.raises(InputError, match=message):
            explorer.analyse(bad)


def test_copymemory_recall_distribution_and_memory(tmp_path: Path) -> None:
    explorer = load_run(train_copymemory(tmp_path / "run"))
    config = copymemory.default_config()
    config["data"].update(length=15, valid_size=8)
    task, _, _ = copymemory.build(config)
    assert explorer.default_input() == "".join(str(int(d)) for d in task.valid.inputs[:10, 0])
    analysis = explorer.analyse("3141 5265 35")
    p = analysis.predictions
    tokens = torch.tensor([3, 1, 4, 1, 5, 2, 6, 5, 3, 5] + [0] * 14 + [9] + [0] * 10)
    assert "".join(analysis.symbols) == "3141526535" + "_" * 14 + ":" + "_" * 10
    assert p["targets"] == ["_"] * 25 + list("3141526535") and p["recall_start"] == 25
    model = explorer.model
    with torch.no_grad():
        logits, _ = model(tokens.unsqueeze(1))
    probs = torch.softmax(logits[:, 0].double(), -1)
    torch.testing.assert_close(torch.tensor(p["probabilities"], dtype=torch.float64), probs,
                               rtol=1e-5, atol=1e-6)
    recall = probs[-10:].argmax(1)
    assert p["copied"] == "".join(p["vocabulary"][k] for k in recall)
    assert p["correct"] == int((recall == tokens[:10]).sum())
    assert p["loss"] == pytest.approx(float(F.cross_entropy(logits[:, 0], torch.cat(
        (torch.zeros(25, dtype=torch.long), tokens[:10])))), rel=1e-5)
    # memory: |∂ log p(digit k at recall step k) / ∂ one-hot input at digit step j|, float64
    model64 = copy.deepcopy(model).double()
    x = F.one_hot(tokens, 10).double().unsqueeze(1).requires_grad_(True)
    log_probs = torch.log_softmax(model64.decoder(model64.rnn(x)[0])[:, 0], -1)
    for k in (0, 4, 9):
        (grad,) = torch.autograd.grad(log_probs[25 + k, tokens[k]], x, retain_graph=True)
        torch.testing.assert_close(torch.tensor(p["memory"][k], dtype=torch.float64),
                                   grad[:10, 0].norm(dim=-1), rtol=1e-3, atol=1e-8)
    # what the state still holds of digit j: ‖h_t(digit j replaced) − h_t‖, mean over the other 7
    held = torch.tensor(p["held"], dtype=torch.float64)
    assert held.shape == (10, 35)
    with torch.no_grad():
        h = model64.rnn(F.one_hot(tokens, 10).double().unsqueeze(1))[0][:, 0]
        for j in (0, 7):
            changes = []
            for digit in range(1, 9):
                if digit != int(tokens[j]):
                    changed = tokens.clone()
                    changed[j] = digit
                    other = model64.rnn(F.one_hot(changed, 10).double().unsqueeze(1))[0][:, 0]
                    changes.append((other - h).norm(dim=1))
            torch.testing.assert_close(held[j], torch.stack(changes).mean(0), rtol=1e-4, atol=1e-6)
    before = torch.arange(35).unsqueeze(0) < torch.arange(10).unsqueeze(1)  # t < j: not yet read
    assert (held[before] == 0).all() and (held[~before] > 0).all()
    for bad in ("123", "1234567890", "31415265x5"):
        with pytest.raises(InputError, match="type the 10 digits to copy"):
            explorer.analyse(bad)


def test_adding_with_a_minimal_rnn_and_a_tcn(tmp_path: Path) -> None:
    """minGRU is recorded through its own recurrence (the carried sensitivity too); a TCN has
    nothing recurrent to show and says so in one line."""
    explorer = load_run(train_adding(tmp_path / "mingru", cell="mingru"))
    analysis = explorer.analyse("1")
    with torch.no_grad():
        output, _ = explorer.model.rnn(explorer.sequences().inputs[:, 1:2])
    torch.testing.assert_close(analysis.values(0, "h"), output[:, 0])
    mark = analysis.predictions["marks"][0]
    assert analysis.predictions["carried"][0][mark] > 0
    tcn = load_run(train_adding(tmp_path / "tcn", cell="tcn"))
    with pytest.raises(InputError, match="no recurrent layer to show"):
        tcn.analyse("1")
