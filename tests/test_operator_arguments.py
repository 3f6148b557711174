"""Every compiled operator refuses arguments of the wrong shape, dtype or range with one line
naming the argument: the operators are public (torch.compile / export graphs and users call
``torch.ops.<ns>.<name>`` directly) and their loops read and write through raw pointers, so an
unchecked argument was read or written past its end. Each case here crashed the process or
returned numbers read past an end before its check (found by the hostile fuzzer of session 15:
one argument changed at a time, each case in its own process under glibc's malloc checks)."""

from __future__ import annotations

import pytest
import torch

from rnnkit.engine.fused import _build, _layer_norm
from rnnkit.engine.scan import _EXTENSION as SCAN_EXTENSION

T, B, IN, H = 4, 3, 2, 5


def _rand(*shape, dtype=torch.float64):
    return torch.rand(*shape, dtype=dtype).sub(0.5)


def _ln():
    ops = _layer_norm.EXTENSION.load()
    if ops is None:
        pytest.skip(f"layer-norm kernels unavailable: {_layer_norm.EXTENSION.error}")
    return ops


def _fused():
    ops = _build.load()
    if ops is None:
        pytest.skip("fused kernels unavailable")
    return ops


def _ln_lstm_backward_args():
    """rnnkit_ln::layer_backward's arguments for an LSTM (input LN in the kernel) after a
    training forward of T, B, H = 4, 3, 5, by name."""
    ops = _ln()
    gh = 4 * H
    forward = dict(kind=1, peephole=False, coupled=False, before=False, gx=_rand(T, B, gh),
                   h0=_rand(B, H), c0=_rand(B, H), w_hh=_rand(gh, H), ln_weight=_rand(gh),
                   ln_bias=_rand(gh), cell_weight=_rand(H), cell_bias=_rand(H),
                   peephole_weights=None, ln_ih_weight=_rand(gh), ln_ih_bias=_rand(gh),
                   batch_sizes=[], training=True, threads=1)
    y, _, _, acts, ahat, stats, cells = ops.layer_forward(*forward.values())
    return dict(kind=1, peephole=False, coupled=False, before=False, h0=forward["h0"],
                c0=forward["c0"], w_hh=forward["w_hh"], ln_weight=forward["ln_weight"],
                ln_bias=forward["ln_bias"], cell_weight=forward["cell_weight"],
                peephole_weights=None, ln_ih_weight=forward["ln_ih_weight"], batch_sizes=[],
                y=y, acts=acts, ahat=ahat, stats=stats, cells=cells, projection=forward["gx"],
                grad_y=torch.ones_like(y), grad_h_n=_rand(B, H), grad_c_n=_rand(B, H),
                threads=1)


def test_ln_backward_valid_arguments_still_run():
    args = _ln_lstm_backward_args()
    first = _ln().layer_backward(*args.values())
    second = _ln().layer_backward(*args.values())
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# (before the checks: c0 of batch 2 or 0 and acts / ahat of batch 2 ended the process with
# SIGSEGV; the others read past their ends)
@pytest.mark.parametrize("name, wrong", [
    ("c0", _rand(B - 1, H)),
    ("c0", _rand(0, H)),
    ("c0", _rand(B, H + 1)),
    ("h0", _rand(B - 1, H)),
    ("acts", _rand(T, B - 1, 4 * H)),
    ("acts", _rand(T, 0, 4 * H)),
    ("ahat", _rand(T, B - 1, 4 * H)),
    ("ahat", _rand(0, B, 4 * H)),
    ("stats", _rand(T, B - 1, 4)),
    ("cells", _rand(T, B, 2 * H)),
    ("projection", _rand(T, B - 1, 4 * H)),
    ("grad_h_n", _rand(1, H)),
    ("grad_c_n", _rand(B, H - 1)),
    ("acts", _rand(T, B, 4 * H, dtype=torch.float32)),
])
def test_ln_backward_refuses_tensors_of_another_shape(name, wrong):
    args = _ln_lstm_backward_args()
    args[name] = wrong
    with pytest.raises(RuntimeError, match=f"rnnkit_ln: {name} must be"):
        _ln().layer_backward(*args.values())


@pytest.mark.parametrize("h0", [_rand(H), _rand(1, B, H)])
def test_ln_forward_refuses_a_state_that_is_not_2d(h0):
    """h0 (B, H, 1) was taken as (B, H) and returned as h_n of that shape; 1-D h0 raised
    "Dimension out of range"."""
    gh = 3 * H
    args = [2, False, False, True, _rand(T, B, gh), h0, None, _rand(gh, H), _rand(gh),
            _rand(gh), None, None, None, None, None, [], False, 1]
    with pytest.raises(RuntimeError, match=r"rnnkit_ln: h0 must be \(B, H\)"):
        _ln().layer_forward(*args)


@pytest.mark.parametrize("threads", [-1, 1 << 40])
@pytest.mark.parametrize("operator", ["step", "forward_packed", "step_packed",
                                      "layer_forward_packed"])
def test_fused_inference_operators_refuse_a_thread_count_out_of_range(operator, threads):
    """threads is cast to int: 2^40 became 0 loop threads (the backward divided by it:
    SIGFPE); a negative count was taken as automatic without a word."""
    ops = _fused()
    x, h, c = _rand(T, 1, IN, dtype=torch.float32), _rand(1, H, dtype=torch.float32), None
    w_ih, w_hh = _rand(3 * H, IN, dtype=torch.float32), _rand(3 * H, H, dtype=torch.float32)
    b = _rand(3 * H, dtype=torch.float32)
    variant = (2, 0, False, False, False)  # GRU, reset after
    common = (h, c, w_ih, w_hh, b, b.clone(), None)
    gemv = (ops.pack_gemv(w_ih, 3), ops.pack_gemv(w_hh, 3))
    call = {"step": lambda: ops.step(*variant, x[0], *common, threads),
            "forward_packed": lambda: ops.forward_packed(*variant, x, *common, *gemv, threads),
            "step_packed": lambda: ops.step_packed(*variant, x[0], *common, *gemv, threads),
            "layer_forward_packed": lambda: ops.layer_forward_packed(
                *variant, x, *common, *ops.pack_weights(*variant, w_ih, w_hh), [], threads)}
    with pytest.raises(RuntimeError, match=r"threads must be in \[0, 1024\]"):
        call[operator]()


@pytest.mark.parametrize("kind", [0, 1])
def test_scan_backward_refuses_h_of_another_shape(kind):
    """grad_out and h were only compared with each other: both of another batch were read past
    their ends (numbers that changed from call to call)."""
    ops = SCAN_EXTENSION.load()
    if ops is None:
        pytest.skip("scan kernels unavailable")
    gates = 2 if kind == 0 else 3
    gx, h0 = _rand(T, B, gates * H), _rand(B, H)
    lengths = torch.empty(0, dtype=torch.int64)
    h = ops.minimal_scan(gx, h0, lengths, kind)
    ops.minimal_scan_backward(torch.ones_like(h), gx, h, h0, lengths, kind)
    short = _rand(T, B - 1, H)
    with pytest.raises(RuntimeError, match=r"grad_out and h must be contiguous \(T, B, H\)"):
        ops.minimal_scan_backward(torch.ones_like(short), gx, short, h0, lengths, kind)


@pytest.mark.parametrize("flags", [(False, False, True), (True, False, False), (False, True, False)])
def test_ln_operators_refuse_flags_of_another_kind(flags):
    """An LSTM with before=True ran the reset-before GRU's buffer widths and returned numbers that
    changed from call to call; a GRU with peephole or coupled likewise reads the flags."""
    peephole, coupled, before = flags
    kind = 1 if before else 2
    gh = 4 * H if kind == 1 else 3 * H
    args = [kind, peephole, coupled, before, _rand(T, B, gh), _rand(B, H),
            _rand(B, H) if kind == 1 else None, _rand(gh, H), _rand(gh), _rand(gh),
            _rand(H) if kind == 1 else None, _rand(H) if kind == 1 else None,
            _rand(3, H) if peephole else None, None, None, [], False, 1]
    with pytest.raises(RuntimeError, match=r"rnnkit_ln: (peephole and coupled are|before .*is) for kind"):
        _ln().layer_forward(*args)


@pytest.mark.parametrize("decoder", ["greedy", "beam"])
def test_ctc_decode_reads_strided_lengths_by_their_strides(decoder):
    """lengths were read through a raw pointer as if contiguous: a strided view decoded other
    lengths than it holds."""
    from rnnkit.decoding.ctc import _EXTENSION as DECODE_EXTENSION

    ops = DECODE_EXTENSION.load()
    if ops is None:
        pytest.skip("ctc_decode kernels unavailable")
    log_probs = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    lengths = torch.tensor([6, 4, 2])
    strided = torch.zeros(6, dtype=torch.int64)[::2]
    strided.copy_(lengths)
    extra = [] if decoder == "greedy" else [4]
    tail = [] if decoder == "greedy" else [0.0, None, 2, None]
    call = getattr(ops, decoder)
    want = call(log_probs, lengths, *extra, 0, *tail)
    got = call(log_probs, strided, *extra, 0, *tail)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [torch.tensor([4.0, 3.0]), torch.tensor([[4, 3]])])
def test_checked_lengths_refuses_lengths_that_are_not_int64_1d(lengths):
    import rnnkit.validation  # noqa: F401  (registers rnnkit::checked_lengths)

    with pytest.raises(ValueError, match=r"checked_lengths: lengths must be an int64 \(B,\)"):
        torch.ops.rnnkit.checked_lengths(lengths, 4)


@pytest.mark.parametrize("name, wrong", [("w_ih", _rand(3 * H, IN, dtype=torch.float32)),
                                         ("w_hh", _rand(3 * H)),
                                         ("w_hh", _rand(3 * H, H + 1))])
def test_fused_step_names_a_weight_of_another_dtype_or_shape(name, wrong):
    """A float32 w_ih for float64 x raised "expected scalar type Double but found Float", a 1-D
    w_hh "Dimension out of range": neither named the argument."""
    ops = _fused()
    weights = {"w_ih": _rand(3 * H, IN), "w_hh": _rand(3 * H, H)}
    weights[name] = wrong
    with pytest.raises(RuntimeError, match=f"^{name} must be \\(G\\*H, "):
        ops.step(2, 0, False, False, False, _rand(B, IN), _rand(B, H), None, *weights.values(),
                 None, None, None, 0)
