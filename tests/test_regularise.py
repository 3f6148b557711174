"""Recurrent dropout, input dropout, zoneout and DropConnect (rnnkit.engine.regularise).

Checked against torch.nn's own cells run step by step with the same masks, by gradcheck in
float64, and across engines: with one seed every engine draws the same masks and gives the same
result, and every option changes the result in every engine (none is silently dropped).
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn

import rnnkit
from conftest import VARIANTS
from rnnkit.engine import run_layer
from rnnkit.engine.regularise import StepMasks

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ("reference", "bptt", "fused")
OPTIONS = {
    "recurrent_dropout": {"recurrent_dropout": 0.4},
    "input_dropout": {"input_dropout": 0.4},
    "zoneout": {"zoneout": 0.3},
    "weight_drop": {"weight_drop": 0.4},
    "all": {"recurrent_dropout": 0.3, "input_dropout": 0.2, "zoneout": 0.2, "weight_drop": 0.3},
}
LENGTHS = [5, 3, 5, 1]


def _layer(variant: str, backend: str, dtype=torch.float64, **options) -> nn.Module:
    layer_class, _, cell_options = VARIANTS[variant]
    torch.manual_seed(3)
    return layer_class(3, 4, num_layers=2, bidirectional=True, backend=backend, **cell_options,
                       **options).to(dtype)


def _run(layer: nn.Module, x: torch.Tensor, seed: int = 11, lengths=LENGTHS):
    torch.manual_seed(seed)  # the masks' draws
    out, state = layer(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss = loss + sum((s * s).sum() for s in states)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return [out, *states, *grads]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # the fused engine's fallback notice, before slice 2
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_engines_agree_with_the_same_seed(variant: str, option: str) -> None:
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    results = {backend: _quiet(_run, _layer(variant, backend, **OPTIONS[option]), x)
               for backend in BACKENDS}
    for backend in ("bptt", "fused"):
        for got, expected in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_changes_the_result_in_each_backend(variant: str, option: str,
                                                         backend: str) -> None:
    # a test that fails if an engine silently ran the layer without the option
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    plain = _run(_layer(variant, backend), x)
    regularised = _quiet(_run, _layer(variant, backend, **OPTIONS[option]), x)
    assert not torch.allclose(plain[0], regularised[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_lstm_shape_torch_would_run_keeps_the_options(backend: str) -> None:
    # B=40, H=80: the fused engine hands a plain LSTM to torch's own op, which has no
    # recurrent dropout or zoneout; those must run rnnkit's own path, never torch's silently
    x = torch.randn(4, 40, 6)
    for options in ({"recurrent_dropout": 0.5}, {"zoneout": 0.5}, {"weight_drop": 0.5}):
        torch.manual_seed(0)
        layer = rnnkit.LSTM(6, 80, backend=backend, **options)
        torch.manual_seed(1)
        got = _quiet(layer, x)[0]
        reference = rnnkit.LSTM(6, 80, backend="reference", **options)
        reference.load_state_dict(layer.state_dict())
        torch.manual_seed(1)
        expected = reference(x)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        layer_plain = rnnkit.LSTM(6, 80, backend=backend)
        layer_plain.load_state_dict(layer.state_dict())
        assert not torch.allclose(layer_plain(x)[0], got, atol=1e-4)


def test_masks_are_reproducible_and_fresh_per_forward() -> None:
    layer = rnnkit.GRU(3, 5, recurrent_dropout=0.5, zoneout=0.2, input_dropout=0.3,
                       weight_drop=0.3)
    x = torch.randn(6, 2, 3)
    torch.manual_seed(5)
    first = _quiet(layer, x)[0]
    second = _quiet(layer, x)[0]
    torch.manual_seed(5)
    again = _quiet(layer, x)[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("backend", ["reference", "bptt", "fused"])
def test_two_forwards_before_one_backward_keep_their_masks(backend: str) -> None:
    # the first forward's masks stay saved for the backward while the second draws its own:
    # the same gradients as each forward followed by its own backward (same seed, same draws)
    options = {"zoneout": 0.3, "zoneout_cell": 0.4, "recurrent_dropout": 0.2}
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, 5 * 4 * 8, dtype=x.dtype).view(5, 4, 8)

    def loss(out: torch.Tensor, index: int) -> torch.Tensor:
        return (out * out).sum() if index == 0 else (out * weights).sum()

    layer = _layer("lstm", "reference", **options)
    torch.manual_seed(13)
    expected = [0, 0]
    for index in range(2):
        grads = torch.autograd.grad(loss(layer(x)[0], index), [x, layer.weight_hh_l0])
        expected = [e + g for e, g in zip(expected, grads)]
    layer = _layer("lstm", backend, **options)
    torch.manual_seed(13)
    outs = [_quiet(layer, x)[0] for _ in range(2)]
    got = torch.autograd.grad(loss(outs[0], 0) + loss(outs[1], 1), [x, layer.weight_hh_l0])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def _torch_cell_loop(cell: nn.Module, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None,
                     mask: torch.Tensor | None, keep_h: torch.Tensor | None,
                     keep_c: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The regularisers' equations around torch.nn's own cells, one step at a time."""
    outputs = []
    for t in range(x.shape[0]):
        h_in = h if mask is None else h * mask
        if c is None:
            new_h, new_c = cell(x[t], h_in), None
        else:
            new_h, new_c = cell(x[t], (h_in, c))
        if keep_h is not None:
            new_h = keep_h[t] * h + (1 - keep_h[t]) * new_h
        if keep_c is not None:
            new_c = keep_c[t] * c + (1 - keep_c[t]) * new_c
        h, c = new_h, new_c
        outputs.append(h)
    return (torch.stack(outputs), h) if c is None else (torch.stack(outputs), h, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("which", ["recurrent", "zoneout", "both"])
def test_equals_torch_cells_with_the_same_masks(backend: str, kind: str, which: str) -> None:
    steps, batch, inputs, hidden = 5, 3, 4, 6
    torch_cell = nn.LSTMCell(inputs, hidden) if kind == "lstm" else nn.RNNCell(inputs, hidden)
    torch_cell = torch_cell.double()
    layer_class = rnnkit.LSTM if kind == "lstm" else rnnkit.RNN
    layer = layer_class(inputs, hidden).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, name + "_l0").copy_(getattr(torch_cell, name))
    x = torch.randn(steps, batch, inputs, dtype=torch.float64)
    h0 = torch.randn(batch, hidden, dtype=torch.float64)
    c0 = torch.randn(batch, hidden, dtype=torch.float64) if kind == "lstm" else None
    mask = (torch.rand(batch, hidden) > 0.4).double() / 0.6 if which != "zoneout" else None
    keeps = None
    if which != "recurrent":
        keeps = tuple((torch.rand(steps, batch, hidden) < 0.3).double()
                      for _ in (h0, c0) if _ is not None)
    state0 = (h0,) if c0 is None else (h0, c0)
    out, final = _quiet(run_layer, layer.math, x, state0, layer.layer_params(0, 0), None,
                        backend, StepMasks(mask, keeps))
    keep_h = keeps[0] if keeps else None
    keep_c = keeps[1] if keeps and c0 is not None else None
    expected = _torch_cell_loop(torch_cell, x, h0, c0, mask, keep_h, keep_c)
    for got, want in zip((out, *final), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_zoneout_at_evaluation_is_its_expectation() -> None:
    torch_cell = nn.GRUCell(3, 5).double()
    layer = rnnkit.GRU(3, 5, zoneout=0.25).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(torch_cell, name).copy_(getattr(layer, name + "_l0"))
    layer.eval()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h = torch.zeros(2, 5, dtype=torch.float64)
    outputs = []
    for t in range(6):
        h = 0.25 * h + 0.75 * torch_cell(x[t], h)
        outputs.append(h)
    for backend in BACKENDS:
        layer.backend = backend
        out, h_n = _quiet(layer, x)
        torch.testing.assert_close(out, torch.stack(outputs), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h_n[0], h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("option", ["recurrent_dropout", "input_dropout", "weight_drop"])
def test_dropouts_do_nothing_at_evaluation(option: str) -> None:
    layer = rnnkit.LSTM(3, 5, num_layers=2, **{option: 0.5}).eval()
    plain = rnnkit.LSTM(3, 5, num_layers=2).eval()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(layer(x)[0], plain(x)[0])


def _gradcheck_masks(variant: str, backend: str, batch_sizes, masks_of) -> None:
    layer_class, _, options = VARIANTS[variant]
    layer = layer_class(2, 3, **options).double()
    math = layer.math
    params = tuple(p.detach().requires_grad_() for p in layer.layer_params(0, 0))
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
                   for _ in math.state_names)
    masks = masks_of(len(state0))
    count = len(state0)

    def run(x, *rest):
        outputs, final = run_layer(math, x, rest[:count], rest[count:], batch_sizes, backend,
                                   masks)
        return (outputs, *final)

    assert torch.autograd.gradcheck(lambda *a: _quiet(run, *a), (x, *state0, *params))


MASKS = {
    "recurrent": lambda n: StepMasks((torch.rand(3, 3) > 0.3).double() / 0.7, None),
    "zoneout": lambda n: StepMasks(None, tuple((torch.rand(4, 3, 3) < 0.4).double()
                                               for _ in range(n))),
    "zoneout_expectation": lambda n: StepMasks(None, (torch.full((4, 3, 3), 0.3, dtype=torch.float64),) * n),
    "both": lambda n: StepMasks((torch.rand(3, 3) > 0.3).double() / 0.7,
                                tuple((torch.rand(4, 3, 3) < 0.4).double() for _ in range(n))),
}


SLOW = pytest.mark.slow


@pytest.mark.parametrize("backend", ["bptt", "fused"])
@pytest.mark.parametrize("batch_sizes", [pytest.param(None, marks=SLOW), [3, 3, 2, 1]],
                         ids=["full", "lengths"])
@pytest.mark.parametrize("masks", [pytest.param(name, marks=SLOW if name in ("recurrent", "zoneout")
                                                else ()) for name in sorted(MASKS)])
def test_gradcheck_with_masks(variant: str, backend: str, batch_sizes, masks: str) -> None:
    _gradcheck_masks(variant, backend, batch_sizes, MASKS[masks])


@pytest.mark.parametrize("backend", ["bptt", "fused"])
@pytest.mark.parametrize("variant", ["lstm_peephole_coupled", "gru_before",
                                     pytest.param("rnn_tanh", marks=SLOW)])
def test_gradcheck_stacked_bidirectional_with_lengths(backend: str, variant: str) -> None:
    layer = _layer(variant, backend, **OPTIONS["all"])
    names = [name for name, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)

    def run(x, *weights):
        torch.manual_seed(11)  # the same masks at every evaluation
        out, state = torch.func.functional_call(layer, dict(zip(names, weights)), (x,),
                                                {"lengths": LENGTHS})
        return (out, *(state if isinstance(state, tuple) else (state,)))

    # fast mode (random projections of the Jacobian): the full one takes ~40 s per variant
    assert torch.autograd.gradcheck(lambda *a: _quiet(run, *a), (x, *values), fast_mode=True)


def test_bad_rates_name_the_option() -> None:
    with pytest.raises(ValueError, match="recurrent_dropout must be in"):
        rnnkit.LSTM(3, 4, recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="zoneout must be in"):
        rnnkit.GRU(3, 4, zoneout=-0.1)
    with pytest.raises(ValueError, match="zoneout_cell"):
        rnnkit.GRU(3, 4, zoneout_cell=0.1)
    with pytest.raises(TypeError, match="zonout"):
        rnnkit.LSTM(3, 4, zonout=0.1)


def test_to_torch_names_the_regulariser_and_pickle_keeps_them() -> None:
    layer = rnnkit.LSTM(3, 4, zoneout=0.1, weight_drop=0.2)
    with pytest.raises(ValueError, match="zoneout, weight_drop"):
        layer.to_torch()
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.regularisers == {"zoneout": 0.1, "weight_drop": 0.2}
    assert "zoneout=0.1" in repr(layer)


def test_configs_pass_the_options_to_the_layers() -> None:
    from rnnkit.models.language_model import LanguageModel, LMConfig
    from rnnkit.models.recurrent import RecurrentConfig, build_recurrent

    layer = build_recurrent(RecurrentConfig(cell="gru", recurrent_dropout=0.2, zoneout=0.1,
                                            input_dropout=0.3, weight_drop=0.4), 5)
    assert layer.regularisers == {"recurrent_dropout": 0.2, "input_dropout": 0.3,
                                  "zoneout": 0.1, "weight_drop": 0.4}
    model = LanguageModel(LMConfig(vocab_size=7, zoneout=0.1, zoneout_cell=0.3))
    assert model.rnn.regularisers == {"zoneout": 0.1, "zoneout_cell": 0.3}
    with pytest.raises(ValueError, match="zoneout: options of the lstm, gru and rnn cells"):
        RecurrentConfig(cell="tcn", zoneout=0.1)
    with pytest.raises(ValueError, match="zoneout_cell is an LSTM option"):
        RecurrentConfig(cell="gru", zoneout_cell=0.1)


@pytest.mark.parametrize("threads,split", [(1, "auto"), (2, "hidden"), (2, "batch")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kernel_runs_the_masks_itself(variant: str, threads: int, split: str,
                                            dtype: torch.dtype,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel, not the bptt fallback, on one thread and split over two (hidden: H = 40, two
    # unit ranges; batch: two blocks of rows), batch 1 (weights as stored) and batch 6
    # (transposed copies), with lengths
    from rnnkit.engine import fused
    from rnnkit.engine.fused import _function

    monkeypatch.setattr(_function, "loop_threads", threads)
    monkeypatch.setattr(fused, "use_native", False)
    with fused.thread_split(split):
        _check_masks_in_kernel(variant, dtype, monkeypatch)


def _check_masks_in_kernel(variant: str, dtype: torch.dtype,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    import rnnkit.engine as engine

    layer_class, _, options = VARIANTS[variant]
    for batch, lengths in ((1, None), (6, [7, 7, 5, 4, 4, 1])):
        layer = layer_class(5, 40, bidirectional=True, backend="reference", **options,
                            recurrent_dropout=0.3, zoneout=0.2).to(dtype)
        x = torch.randn(7, batch, 5, dtype=dtype, requires_grad=True)
        expected = _run(layer, x, lengths=lengths)
        layer.backend = "fused"
        with monkeypatch.context() as patch:
            patch.setattr(engine, "run_bptt", None)  # a fallback would fail here
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = _run(layer, x, lengths=lengths)
        tolerance = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {
            "rtol": 2e-4, "atol": 2e-5}
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **tolerance)


def test_onnx_export_refuses_zoneout_and_keeps_the_dropouts_out(tmp_path) -> None:
    from rnnkit.export.onnx import ExportError, export_onnx

    x = torch.randn(4, 2, 3)
    with pytest.raises(ExportError, match="zoneout has no ONNX form"):
        export_onnx(rnnkit.LSTM(3, 5, zoneout=0.1).eval(), (x,), tmp_path / "z.onnx")


def test_command_line_options_reach_the_saved_model(tmp_path, capsys) -> None:
    from rnnkit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    assert main(["train", "charlm", "--data", str(text), "--out", str(out), "--steps", "2",
                 "--eval-every", "2", "--no-progress", "--hidden", "8", "--batch-size", "2",
                 "--seq-len", "8", "--zoneout", "0.1", "--set", "model.recurrent_dropout=0.2",
                 "--weight-drop", "0.3"]) == 0
    layers = [m for m in rnnkit.load(out).module.modules() if hasattr(m, "regularisers")]
    assert [m.regularisers for m in layers] == [
        {"recurrent_dropout": 0.2, "zoneout": 0.1, "weight_drop": 0.3}]
    capsys.readouterr()
    assert main(["train", "digits", "--out", str(tmp_path / "bad"),
                 "--set", "model.recurrent.zoneout=1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.recurrent.zoneout must be" in err


def test_explorer_records_the_zoned_out_states() -> None:
    from rnnkit.explore.record import record_layer

    layer = rnnkit.LSTM(3, 5, num_layers=2, bidirectional=True, zoneout=0.3,
                        zoneout_cell=0.1).eval()
    x = torch.randn(6, 3)
    output, _ = layer(x)
    traces = record_layer(layer, x)
    top = torch.cat([traces[2].values["h"], traces[3].values["h"]], dim=1)
    torch.testing.assert_close(top, output)


def test_minimal_layers_have_no_regularisers() -> None:
    layer = rnnkit.MinGRU(3, 4, num_layers=2)
    assert layer.regularisers == {} and "zoneout" not in repr(layer)
    layer(torch.randn(5, 2, 3))


@pytest.mark.parametrize("variant", ["lstm_peephole", "gru_after", "gru_before", "rnn_relu"])
def test_nan_and_inf_propagate_alike_in_every_engine(variant: str) -> None:
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    x[1, 0, 0], x[3, 2, 1] = float("nan"), float("inf")
    x.requires_grad_()
    results = {backend: _quiet(_run, _layer(variant, backend, **OPTIONS["all"]), x)
               for backend in BACKENDS}
    for backend in ("bptt", "fused"):
        for got, expected in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, equal_nan=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer_norm=True, zoneout=0.1), "not implemented with layer_norm"),
    (dict(layer_norm=True, recurrent_dropout=0.1), "not implemented with layer_norm"),
    (dict(proj_size=2, zoneout=0.1), "not implemented with proj_size"),
    (dict(proj_size=2, layer_norm=True), "layer_norm=True with proj_size"),
])
def test_combinations_without_an_implementation_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rnnkit.LSTM(3, 4, **kwargs)


def test_layer_norm_takes_weight_drop_and_input_dropout():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, layer_norm=True, weight_drop=0.5, input_dropout=0.2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and layer.weight_hh_l0.grad is not None


def test_weight_dropped_lstm_at_small_batches_trains_on_rnnkits_kernel(monkeypatch,
                                                                    builtin_routes) -> None:
    # measured (engine/fused/__init__.py, DROPPED_OWN_BATCH): with W_hh ⊙ M rnnkit's kernel wins
    # at batch <= 4 with one thread, torch's op still at 35,20,200
    from rnnkit.engine import fused

    assert fused.own_kernel_faster(200, 1, 64, 1, dropped_weight=True)
    assert fused.own_kernel_faster(200, 4, 64, 1, dropped_weight=True)
    assert not fused.own_kernel_faster(200, 1, 64, 1)
    assert not fused.own_kernel_faster(35, 20, 200, 1, dropped_weight=True)
    if fused._build.load() is None:
        pytest.skip(f"fused kernel unavailable: {fused._build.error()}")
    torch_ran = []
    real = torch._VF.lstm
    monkeypatch.setattr(torch._VF, "lstm", lambda *a: torch_ran.append(1) or real(*a))
    x = torch.randn(40, 1, 8)
    dropped = rnnkit.LSTM(8, 8, weight_drop=0.5, backend="fused")
    dropped(x)[0].sum().backward()
    assert not torch_ran  # the dropped W_hh went to rnnkit's kernel
    plain = rnnkit.LSTM(8, 8, backend="fused")
    plain(x)[0].sum().backward()
    assert torch_ran  # the plain LSTM of that shape still goes to torch's op
    dropped.eval()
    dropped(x)
    assert len(torch_ran) == 2  # at evaluation nothing is dropped: torch's op again


def _mask_ops():
    from rnnkit.engine import regularise

    ops = regularise._EXTENSION.load()
    if ops is None:
        pytest.skip(f"the masks' C++ op is not built: {regularise._EXTENSION.error}")
    return ops


@pytest.mark.parametrize("threads", [1, 2])
def test_mask_op_gives_the_bits_of_its_torch_reference(threads: int) -> None:
    from rnnkit.engine.regularise import keep_mask_reference

    ops = _mask_ops()
    torch.set_num_threads(threads)  # (the fixture restores the count) 2 threads split 2^17
    cases = [((35, 20, 200), 0.1, 1.0, torch.float32), ((3, 7, 5), 1.0, 2.0, torch.float64),
             ((1000,), 0.0, 1.0, torch.float32), ((4, 1000), 0.5, 1 / 0.6, torch.bfloat16),
             ((2, 65537), 0.75, 4 / 3, torch.float64), ((0, 3), 0.5, 1.0, torch.float32)]
    for shape, probability, value, dtype in cases:
        for key in ((0, 0), (123456789, 4000000000), (2**32 - 1, 7)):
            threshold = min(round(probability * 2**32), 2**32)
            got = ops.keep_mask(list(shape), *key, threshold, value, dtype)
            expected = keep_mask_reference(shape, key, threshold, value, dtype)
            assert got.shape == shape and got.dtype == dtype
            assert torch.equal(got, expected), (shape, key)
    # the hash itself, written out for one element in Python integers (i = 5, key = (3, 9))
    def mix(x: int) -> int:
        x ^= x >> 16
        x = x * 0x7FEB352D % 2**32
        x ^= x >> 15
        x = x * 0x846CA68B % 2**32
        return x ^ (x >> 16)

    u = mix(mix(5 ^ 3) ^ 9)
    for threshold in (u, u + 1):
        mask = keep_mask_reference((6,), (3, 9), threshold, 1.0, torch.float64)
        assert mask[5].item() == (1.0 if u < threshold else 0.0)
        assert torch.equal(ops.keep_mask([6], 3, 9, threshold, 1.0, torch.float64), mask)


def test_masks_have_their_rate_and_no_correlation() -> None:
    # a fixed seed: the statistics below are of one deterministic draw (no flaky test)
    from rnnkit.engine.regularise import dropout_mask, zoneout_keep

    torch.manual_seed(0)
    like = torch.empty(0, dtype=torch.float64)
    steps, batch, hidden = 50, 40, 100
    n = steps * batch * hidden
    for z in (0.05, 0.3, 0.5):
        first = zoneout_keep(like, (steps, batch, hidden), z, True)
        second = zoneout_keep(like, (steps, batch, hidden), z, True)
        assert set(first.unique().tolist()) <= {0.0, 1.0}
        sigma = (z * (1 - z) / n) ** 0.5
        assert abs(first.mean().item() - z) < 5 * sigma
        flat = (first.flatten() - z) / (z * (1 - z)) ** 0.5
        # neighbours along units, batch rows and steps, and the next call's mask
        for lag in (1, hidden, batch * hidden):
            assert abs((flat[lag:] * flat[:-lag]).mean().item()) < 5 / n**0.5, (z, lag)
        other = (second.flatten() - z) / (z * (1 - z)) ** 0.5
        assert abs((flat * other).mean().item()) < 5 / n**0.5
    mask = dropout_mask(like, (400, 500), 0.25)
    assert set(mask.unique().tolist()) == {0.0, 1 / 0.75}
    assert abs((mask != 0).double().mean().item() - 0.75) < 5 * (0.75 * 0.25 / 2e5) ** 0.5


@pytest.mark.parametrize("option", ["zoneout", "recurrent_dropout", "weight_drop", "all"])
def test_fused_engine_with_the_op_masks_equals_the_reference_with_torch_generated_masks(
        option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the fused engine draws its masks with the C++ op, the reference engine with the same hash
    # in torch ops (as where the op cannot be built): one seed, the same masks, the same results
    from rnnkit.engine import regularise

    _mask_ops()
    options = dict(OPTIONS[option], zoneout_cell=0.3) if option != "recurrent_dropout" else OPTIONS[option]
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    fused = _run(_layer("lstm", "fused", **options), x)
    torch.manual_seed(11)
    masks_op = regularise.recurrent_masks(True, x, 2, 4, 0.3, 0.2, 0.3)
    monkeypatch.setattr(regularise._EXTENSION, "load", lambda: None)
    reference = _run(_layer("lstm", "reference", **options), x)
    torch.manual_seed(11)
    masks_torch = regularise.recurrent_masks(True, x, 2, 4, 0.3, 0.2, 0.3)
    assert torch.equal(masks_op.recurrent, masks_torch.recurrent)
    for got, expected in zip(masks_op.zoneout, masks_torch.zoneout):
        assert torch.equal(got, expected)
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
