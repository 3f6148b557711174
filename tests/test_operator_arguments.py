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
    with pytest.raises(RuntimeError, match=f"^{name} must be"):
        _ln().layer_backward(*args.values())


@pytest.mark.parametrize("h0", [_rand(H), _rand(1, B, H)])
def test_ln_forward_refuses_a_state_that_is_not_2d(h0):
    """h0 (B, H, 1) was taken as (B, H) and returned as h_n of that shape; 1-D h0 raised
    "Dimension out of range"."""
    gh = 3 * H
    args = [2, False, False, True, _rand(T, B, gh), h0, None, _rand(gh, H), _rand(gh),
            _rand(gh), None, None, None, None, None, [], False, 1]
    with pytest.raises(RuntimeError, match=r"^h0 must be \(B, H\)"):
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


# ---- session 16: None for a tensor, the step's own names, one wording for both extensions -------


def _first_line(error: pytest.ExceptionInfo) -> str:
    return str(error.value).splitlines()[0]


def test_pack_gemv_names_a_missing_weight():
    """pack_gemv(None, 3) never reached the kernel: "There were no tensor arguments to this
    function ..., but no fallback function is registered" (a CPU-only registration)."""
    with pytest.raises(RuntimeError, match=r"^w is None; a tensor is required"):
        _fused().pack_gemv(None, 3)


def _lstm_step_arguments(batch: int = 1) -> dict:
    return dict(x=_rand(batch, IN, dtype=torch.float32), h=_rand(batch, H, dtype=torch.float32),
                c=_rand(batch, H, dtype=torch.float32),
                w_ih=_rand(4 * H, IN, dtype=torch.float32),
                w_hh=_rand(4 * H, H, dtype=torch.float32), b_ih=None, b_hh=None, pw=None)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name, wrong, message", [
    ("h", _rand(2, H, dtype=torch.float32), r"^h must be \(B, H\) with x's B = 1"),
    ("h", None, r"^h must be \(B, H\) .*got None"),
    ("c", None, r"^c must be \(B, H\) = \[1, 5\] .*got None"),
    ("c", _rand(1, H - 1, dtype=torch.float32), r"^c must be \(B, H\)"),
])
def test_step_operators_name_the_steps_own_state(packed, name, wrong, message):
    """The step's state is its h and c: the errors said h0 and c0 (forward_op's names)."""
    ops = _fused()
    arguments = _lstm_step_arguments()
    arguments[name] = wrong
    variant = (1, 0, False, False, False)
    gemv = (ops.pack_gemv(arguments["w_ih"], 4), ops.pack_gemv(arguments["w_hh"], 4))
    with pytest.raises(RuntimeError, match=message):
        if packed:
            ops.step_packed(*variant, *arguments.values(), *gemv, 1)
        else:
            ops.step(*variant, *arguments.values(), 1)


def _fused_lstm_backward_args() -> dict:
    ops = _fused()
    x, h0, c0 = _rand(T, B, IN, dtype=torch.float32), _rand(B, H, dtype=torch.float32), \
        _rand(B, H, dtype=torch.float32)
    w_ih, w_hh = _rand(4 * H, IN, dtype=torch.float32), _rand(4 * H, H, dtype=torch.float32)
    b = _rand(4 * H, dtype=torch.float32)
    variant = (1, 0, False, False, False)
    y, _, _, acts, cells, extra = ops.layer_forward(*variant, x, h0, c0, w_ih, w_hh, b, b.clone(),
                                                    None, None, None, None, [], True, 1)
    return dict(kind=1, act=0, peephole=False, coupled=False, before=False, x=x, h0=h0, c0=c0,
                w_ih=w_ih, w_hh=w_hh, pw=None, recurrent_mask=None, zoneout_h=None,
                zoneout_c=None, has_bias=True, batch_sizes=[], y=y, acts=acts, cells=cells,
                extra=extra, grad_y=torch.ones_like(y), grad_h_n=None, grad_c_n=None,
                need_dx=True, need_dw=True, threads=1)


@pytest.mark.parametrize("name", ["acts", "grad_y"])
def test_fused_backward_names_saved_tensors_of_another_dtype(name):
    """float64 acts or grad_y for a float32 layer raised "expected scalar type Float but found
    Double", naming no argument."""
    arguments = _fused_lstm_backward_args()
    arguments[name] = arguments[name].double()
    with pytest.raises(RuntimeError, match=f"^{name} must be .*Float.*got .* of Double"):
        _fused().layer_backward(*arguments.values())


@pytest.mark.parametrize("name", ["w_ih", "w_hh"])
def test_layer_forward_packed_names_a_missing_weight(name):
    """w_ih None raised "Dimension out of range" (its size(1) read before any check)."""
    ops = _fused()
    variant = (2, 0, False, False, False)
    weights = {"w_ih": _rand(3 * H, IN, dtype=torch.float32),
               "w_hh": _rand(3 * H, H, dtype=torch.float32)}
    packed = ops.pack_weights(*variant, *weights.values())
    weights[name] = None
    with pytest.raises(RuntimeError, match=f"^{name} must be \\(G\\*H, .*got None"):
        ops.layer_forward_packed(*variant, _rand(T, B, IN, dtype=torch.float32),
                                 _rand(B, H, dtype=torch.float32), None, *weights.values(), None,
                                 None, None, *packed, [], 1)


@pytest.mark.parametrize("batch_sizes", [[3, 3, 1, 2], [3, 4, 2, 1], [3, 2, 1]])
def test_both_extensions_refuse_batch_sizes_in_one_wording(batch_sizes):
    """The check existed twice: the fused kernels said "batch_sizes must not increase" or "out
    of range" or "must have T entries", the layer-normalised ones otherwise."""
    fused = _fused()
    x, h0 = _rand(T, B, IN), _rand(B, H)
    with pytest.raises(RuntimeError) as fused_error:
        fused.layer_forward(2, 0, False, False, False, x, h0, None, _rand(3 * H, IN),
                            _rand(3 * H, H), None, None, None, None, None, None, batch_sizes,
                            False, 1)
    gh = 3 * H
    with pytest.raises(RuntimeError) as ln_error:
        _ln().layer_forward(2, False, False, False, _rand(T, B, gh), h0, None, _rand(gh, H),
                            _rand(gh), _rand(gh), None, None, None, None, None, batch_sizes,
                            False, 1)
    assert _first_line(fused_error) == _first_line(ln_error)
    assert _first_line(fused_error).startswith("batch_sizes must ")


@pytest.mark.parametrize("name, message", [("c0", "rnnkit_ln: c0 is None; an LSTM needs it"),
                                           ("cell_bias", "rnnkit_ln: cell_weight or cell_bias is None"),
                                           ("h0", r"h0 must be \(B, H\), got None")])
def test_ln_forward_names_a_missing_tensor(name, message):
    """c0 or the cell LN None said "the LSTM needs c0 and the cell LN" whichever was missing;
    h0 None said "got [0]"."""
    gh = 4 * H
    arguments = dict(kind=1, peephole=False, coupled=False, before=False, gx=_rand(T, B, gh),
                     h0=_rand(B, H), c0=_rand(B, H), w_hh=_rand(gh, H), ln_weight=_rand(gh),
                     ln_bias=_rand(gh), cell_weight=_rand(H), cell_bias=_rand(H),
                     peephole_weights=None, ln_ih_weight=None, ln_ih_bias=None, batch_sizes=[],
                     training=False, threads=1)
    arguments[name] = None
    with pytest.raises(RuntimeError, match=f"^{message}"):
        _ln().layer_forward(*arguments.values())


def test_ctc_kernel_names_missing_log_probs():
    """log_probs None raised "tensor does not have a device"."""
    from rnnkit.losses.ctc import _EXTENSION as CTC_EXTENSION

    ops = CTC_EXTENSION.load()
    if ops is None:
        pytest.skip("ctc kernels unavailable")
    lengths = torch.tensor([6, 4])
    with pytest.raises(RuntimeError, match="log_probs is None; a tensor is required"):
        ops.ctc(None, torch.tensor([[1, 2], [3, 3]]), lengths, torch.tensor([2, 2]), 0, False,
                False)


def test_checked_lengths_names_missing_lengths():
    """None raised AttributeError: 'NoneType' object has no attribute 'dtype'."""
    import rnnkit.validation  # noqa: F401  (registers rnnkit::checked_lengths)

    with pytest.raises(ValueError, match="checked_lengths: lengths is None"):
        torch.ops.rnnkit.checked_lengths(None, 4)
