"""TCN: causal (no output reads a later input), its receptive field as stated, windows == one call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from rnnkit.models.tcn import TCN, CausalConv, receptive_field
from rnnkit.train import TrainConfig
from rnnkit.train.trainer import _make_optimizer


def make(**kwargs: object) -> TCN:
    torch.manual_seed(0)
    return TCN(3, 6, **{"num_layers": 3, "kernel_size": 3, **kwargs}).double().eval()


def test_no_output_depends_on_a_later_input() -> None:
    tcn = make()
    x = torch.randn(40, 2, 3, dtype=torch.float64, requires_grad=True)
    output, _ = tcn(x)
    for t in (0, 7, 25, 39):
        (grad,) = torch.autograd.grad(output[t].sum(), x, retain_graph=True)
        assert grad[t + 1:].abs().sum() == 0
        assert grad[t].abs().max() > 0


def test_receptive_field_is_what_it_says() -> None:
    tcn = make()
    R = tcn.receptive_field
    assert R == receptive_field(3, 3) == 29
    x = torch.randn(60, 1, 3, dtype=torch.float64, requires_grad=True)
    output, _ = tcn(x)
    (grad,) = torch.autograd.grad(output[50].sum(), x)
    reads = grad[:, 0].abs().sum(1) > 0
    assert reads[50 - R + 1] and not reads[: 50 - R + 1].any()


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 7], [3, 1, 8]])
def test_windows_with_carried_state_equal_one_call(chunks: list[int]) -> None:
    tcn = make()
    x = torch.randn(sum(chunks), 2, 3, dtype=torch.float64)
    whole, (h_whole, *_) = tcn(x)
    state, pieces, start = None, [], 0
    for size in chunks:
        out, state = tcn(x[start:start + size], state)
        pieces.append(out)
        start += size
    torch.testing.assert_close(torch.cat(pieces), whole)
    torch.testing.assert_close(state[0], h_whole)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_equal_each_sequence_alone(bidirectional: bool) -> None:
    tcn = make(bidirectional=bidirectional)
    x = torch.randn(9, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 1])
    output, (h_n, *_) = tcn(x, lengths=lengths)
    assert output.shape == (9, 3, 6 * (2 if bidirectional else 1))
    for row, length in enumerate(lengths.tolist()):
        alone, (h_alone, *_) = tcn(x[:length, row:row + 1])
        torch.testing.assert_close(output[:length, row:row + 1], alone)
        assert output[length:, row].abs().sum() == 0
        torch.testing.assert_close(h_n[:, row:row + 1], h_alone)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        TCN(3, 6, kernel_size=1)
    tcn = make(bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    _, state = tcn(x)
    with pytest.raises(ValueError, match="whole sequences"):
        tcn(x, state)


def test_a_fresh_sequence_is_bai_et_al_s_zero_padded_tcn() -> None:
    """No state = each convolution's input padded with (k − 1)·d zeros on the left."""
    import torch.nn.functional as F

    tcn = make()
    x = torch.randn(20, 2, 3, dtype=torch.float64)
    y = x.permute(1, 2, 0)
    for block in tcn.directions[0].blocks:
        h = F.relu(block.conv1.conv(F.pad(y, (block.conv1.left_pad, 0))))
        h = F.relu(block.conv2.conv(F.pad(h, (block.conv2.left_pad, 0))))
        y = F.relu(h + (y if block.downsample is None else block.downsample(y)))
    output, _ = tcn(x)
    torch.testing.assert_close(output, y.permute(2, 0, 1))


def test_state_shapes_are_checked() -> None:
    tcn = make()
    _, state = tcn(torch.randn(4, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="histories must have shapes"):
        tcn(torch.randn(4, 3, 3, dtype=torch.float64), state)


def _dead_channel_run(make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                      steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trains a TCN block on a loss that ignores output channel 0 of its first convolution (a
    ReLU channel that never fires gets exactly this: no gradient). Returns that convolution's
    ‖v‖ per channel and its weight."""
    torch.manual_seed(0)
    conv = CausalConv(3, 2, kernel_size=3, dilation=1)
    optimiser = make_optimizer(conv)
    x, ends = torch.randn(4, 3, 6), torch.full((4,), 6)
    for _ in range(steps):
        optimiser.zero_grad()
        y, _ = conv(x, None, ends)
        y[:, 1].square().mean().backward()
        optimiser.step()
    v = conv.conv.parametrizations.weight.original1.detach()
    return v.flatten(1).norm(dim=1), conv.conv.weight.detach()


def test_weight_decay_spares_weight_norm_directions_so_dead_channels_stay_finite() -> None:
    """The cause of the BiTCN's NaN on SST at step 958 (Adam, lr 2e-3, weight decay 1e-5): decay
    on the direction v of a dead channel shrinks it geometrically (Adam rescales the tiny decay
    gradient to steps of ~lr) until ‖v‖² underflows to 0 and w = g v / ‖v‖ is inf."""
    config = TrainConfig(lr=2e-3, weight_decay=1e-5)
    decayed_norm, decayed_weight = _dead_channel_run(
        lambda m: torch.optim.Adam(m.parameters(), lr=2e-3, weight_decay=1e-5), 1100)
    # what happened: ‖v‖ reached 0, w inf, and from then on NaN everywhere
    assert not decayed_norm[0] > 0 and not decayed_weight.isfinite().all()
    norm, weight = _dead_channel_run(lambda m: _make_optimizer(m, config), 1100)
    initial, _ = _dead_channel_run(lambda m: _make_optimizer(m, config), 0)
    assert weight.isfinite().all()
    torch.testing.assert_close(norm[0], initial[0])  # no gradient and no decay: v stays
    assert norm[1] != initial[1]  # the live channel trains


def test_only_flagged_parameters_escape_weight_decay() -> None:
    model = TCN(3, 4, num_layers=2)
    optimiser = _make_optimizer(model, TrainConfig(weight_decay=1e-4))
    decay = {id(p): group["weight_decay"] for group in optimiser.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert decay[id(parameter)] == (0.0 if name.endswith("original1") else 1e-4), name
    plain = _make_optimizer(torch.nn.Linear(2, 2), TrainConfig(weight_decay=1e-4))
    assert len(plain.param_groups) == 1  # other models keep one group (their checkpoints resume)
