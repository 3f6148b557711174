"""Streaming: a sequence fed in chunks with the state carried equals one call on all of it,
for every cell variant, stacked, on every backend; and the StreamBank that serves many streams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import rnnkit
from conftest import VARIANTS
from rnnkit.cells.base import CellSpec
from rnnkit.engine import fused, get_default_backend, set_default_backend
from rnnkit.streaming import Stream, StreamBank

CHUNKS = [1, 4, 0, 2, 3, 1]  # sizes of the pieces, a zero-length one among them
BACKENDS = ["reference", "bptt", "fused"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = get_default_backend()
    set_default_backend(request.param)  # the cells run the default backend
    yield request.param
    set_default_backend(previous)


def _pieces(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes, dim=0))


def test_layer_in_chunks_equals_one_call(variant: str, backend: str) -> None:
    torch.set_num_threads(1)
    layer_class, _, options = VARIANTS[variant]
    layer = layer_class(3, 5, num_layers=2, backend=backend, **options).double()
    x = torch.randn(sum(CHUNKS), 2, 3, dtype=torch.float64)
    whole, final = layer(x)
    state, outputs = None, []
    for piece in _pieces(x, CHUNKS):
        if piece.shape[0] == 0:
            continue  # a layer call needs a step; an empty chunk simply leaves the state alone
        out, state = layer(piece, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=0, atol=1e-12)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    final if isinstance(final, tuple) else (final,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_float32_layer_in_chunks_equals_one_call(variant: str) -> None:
    # the default dtype on the default backend, as a server would run it
    torch.set_num_threads(1)
    layer_class, _, options = VARIANTS[variant]
    layer = layer_class(3, 6, num_layers=2, **options)
    x = torch.randn(9, 3, 3)
    whole, _ = layer(x)
    state, outputs = None, []
    for piece in _pieces(x, [2, 5, 1, 1]):
        out, state = layer(piece, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=1e-5, atol=1e-6)


def test_stacked_cell_in_chunks_equals_one_unroll(variant: str, backend: str) -> None:
    _, cell_class, options = VARIANTS[variant]
    cell = rnnkit.StackedCell([cell_class(3, 4, **options), cell_class(4, 4, **options)]).double()
    x = torch.randn(sum(CHUNKS), 2, 3, dtype=torch.float64)
    whole, final = rnnkit.unroll(cell, x)
    state, outputs = None, []
    for piece in _pieces(x, CHUNKS):
        if piece.shape[0]:
            out, state = rnnkit.unroll(cell, piece, initial_state=state)
            outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-12)


def test_bank_steps_interleaved_streams_as_if_each_ran_alone() -> None:
    layer = rnnkit.LSTM(3, 5, num_layers=2, peephole=True).double()
    sequences = [torch.randn(6, 1, 3, dtype=torch.float64) for _ in range(3)]
    alone = [layer(s)[0] for s in sequences]
    bank = StreamBank(layer)
    keys = [bank.add() for _ in sequences]
    got: list[list[torch.Tensor]] = [[] for _ in sequences]
    # streams join late and advance by different chunk sizes; each call batches the live ones
    schedule = [([0], 2), ([0, 1], 1), ([0, 1, 2], 2), ([1, 2], 3), ([0, 2], 1)]
    done = [0, 0, 0]
    for active, size in schedule:
        x = torch.cat([sequences[i][done[i]:done[i] + size] for i in active], dim=1)
        out = bank.step([keys[i] for i in active], x)
        for column, i in enumerate(active):
            got[i].append(out[:, column:column + 1])
            done[i] += size
    assert done == [6, 6, 6]
    for mine, reference in zip(got, alone):
        torch.testing.assert_close(torch.cat(mine), reference, rtol=0, atol=1e-12)


def test_bank_reset_drop_and_cells() -> None:
    cell = rnnkit.GRUCell(2, 3).double()
    bank = StreamBank(cell, state_batch_dim=0, input_batch_dim=0)
    a, b = bank.add(), bank.add("b")
    assert bank.keys == [a, "b"] and bank.state(a) is None
    x = torch.randn(2, 2, dtype=torch.float64)
    first = bank.step([a, b], x)
    torch.testing.assert_close(first, cell(x)[0])
    bank.reset(a)
    again = bank.step([a, b], x)
    torch.testing.assert_close(again[0], first[0])  # a started over
    torch.testing.assert_close(again[1], cell(x[1:], cell(x[1:])[1])[0][0])  # b carried on
    bank.drop(b)
    assert len(bank) == 1 and b not in bank
    with pytest.raises(KeyError, match="no stream 'b'"):
        bank.step([b], x[:1])
    with pytest.raises(KeyError, match="already exists"):
        bank.add(a)
    with pytest.raises(ValueError, match="twice"):
        bank.step([a, a], x)


def test_language_model_generation_streams_equal_rerunning_the_prefix() -> None:
    from rnnkit.models.language_model import LanguageModel, LMConfig, continue_streams

    model = LanguageModel(LMConfig(vocab_size=7, cell="gru", layers=2, hidden=8, embedding=4))
    primes = [[1, 2, 3], [4], [5, 6]]
    together = continue_streams(model, primes, 6, temperature=0)
    for prime, got in zip(primes, together):
        # greedy continuation by re-running the whole history at every step: the slow way
        history = list(prime)
        for _ in range(6):
            logits, _ = model(torch.tensor(history).unsqueeze(1))
            history.append(int(logits[-1, 0].argmax()))
        assert got == history[len(prime):]
    # sampling: a stream in a batch draws what it draws alone from its own generator
    def seeded(count: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(3) for _ in range(count)]

    batched = continue_streams(model, primes, 8, 1.0, None, seeded(3))
    for i, prime in enumerate(primes):
        assert batched[i] == continue_streams(model, [prime], 8, 1.0, None, seeded(1))[0]


def test_bank_serves_a_stacked_cell_with_nested_named_states() -> None:
    cell = rnnkit.StackedCell([rnnkit.LSTMCell(2, 3, peephole=True), rnnkit.GRUCell(3, 3)]).double()
    bank = StreamBank(cell, state_batch_dim=0, input_batch_dim=0)
    a, b = bank.add(), bank.add()
    xs = torch.randn(4, 2, 2, dtype=torch.float64)  # 4 steps of 2 streams
    outputs = [bank.step([a, b], x) for x in xs]
    whole, final = rnnkit.unroll(cell, xs)
    torch.testing.assert_close(torch.stack(outputs), whole, rtol=0, atol=1e-12)
    lstm_state, gru_state = bank.state(b)
    assert isinstance(lstm_state, rnnkit.LSTMState) and lstm_state.c.shape == (1, 3)
    torch.testing.assert_close(lstm_state.c, final[0].c[1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(gru_state[0], final[1][0][1:], rtol=0, atol=1e-12)


def test_bank_refuses_a_bidirectional_layer_or_model() -> None:
    """Chunked, a bidirectional layer's backward direction never sees the later chunks: the
    outputs would silently differ from one call, so the bank refuses it (directly or inside)."""
    with pytest.raises(ValueError, match=r"GRU is bidirectional.*cannot be stepped in chunks"):
        StreamBank(rnnkit.GRU(3, 4, bidirectional=True))
    wrapped = torch.nn.Sequential(torch.nn.Identity(), torch.nn.LSTM(3, 4, bidirectional=True))
    with pytest.raises(ValueError, match=r"^1 is bidirectional"):
        StreamBank(wrapped)
    StreamBank(rnnkit.GRU(3, 4, num_layers=2))  # unidirectional: accepted


# ---- Stream: one cell stepped at batch 1 over its packed weights (step_stream) -------------------


needs_kernel = pytest.mark.skipif(
    fused.unavailable_reason(CellSpec("gru"), torch.float32, "cpu") is not None,
    reason="the fused C++ kernels are unavailable")
# torch.nn's own cells, for the variants torch has (the others: rnnkit's reference engine)
TORCH_CELLS = {
    "rnn_tanh": lambda i, h: torch.nn.RNNCell(i, h),
    "rnn_relu": lambda i, h: torch.nn.RNNCell(i, h, nonlinearity="relu"),
    "lstm": lambda i, h: torch.nn.LSTMCell(i, h),
    "gru_after": lambda i, h: torch.nn.GRUCell(i, h),
}
IN, HID = 19, 37  # off the packed kernel's blocks: H = 37 is a partial 8-wide vector per gate


def _cell(name: str, input_size: int = IN, hidden: int = HID) -> torch.nn.Module:
    _, cell, options = VARIANTS[name]
    return cell(input_size, hidden, **options)


def _parts(state: object) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def _stream(cell: torch.nn.Module, state: object = None) -> Stream:
    stream = Stream(cell, state)
    assert stream._packed is not None  # (the step_stream path under test, not the fallback)
    return stream


def _reference_steps(cell: torch.nn.Module, xs: torch.Tensor, state: object
                     ) -> tuple[list[torch.Tensor], object]:
    """The outputs and final state of ``cell`` stepped over ``xs`` by rnnkit's pure-torch
    reference engine."""
    previous = get_default_backend()
    set_default_backend("reference")
    try:
        outputs = []
        with torch.no_grad():
            for x in xs:
                out, state = cell(x, state)
                outputs.append(out)
    finally:
        set_default_backend(previous)
    return outputs, state


@needs_kernel
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("hidden", [HID, 70])  # 70: a partial panel of four vectors too
def test_stream_equals_torch_nn_cells_and_the_reference_engine(variant: str, hidden: int) -> None:
    """Several steps from a nonzero state: the outputs and the state equal torch.nn's cell (the
    variants torch has) and rnnkit's reference engine (every variant), for both orders in which
    the step reads its weights (it alternates them)."""
    cell = _cell(variant, IN, hidden)
    xs = torch.randn(5, 1, IN)
    state0 = cell.math.make_state([torch.randn(1, hidden) for _ in _parts(cell.zero_state(1))])
    stream = _stream(cell, state0)
    outputs = [stream.step(x) for x in xs]
    assert all(not out.requires_grad and out.shape == (1, hidden) for out in outputs)
    want_outputs, want_state = _reference_steps(cell, xs, state0)
    for got, want in zip([*outputs, *_parts(stream.state)], [*want_outputs, *_parts(want_state)]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if variant in TORCH_CELLS:
        reference = TORCH_CELLS[variant](IN, hidden)
        reference.load_state_dict(cell.state_dict())
        state = tuple(state0) if variant == "lstm" else _parts(state0)[0]
        with torch.no_grad():
            for x, got in zip(xs, outputs):
                state = reference(x, state)
                torch.testing.assert_close(got, state[0] if variant == "lstm" else state,
                                           rtol=1e-5, atol=1e-6)
        for got, want in zip(_parts(stream.state), _parts(state)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(TORCH_CELLS))
def test_stream_nan_and_inf_propagate_as_torch(name: str) -> None:
    """A NaN or an infinity in x, in the state, in a weight or in a bias reaches the same outputs
    as in torch.nn's cell."""
    for where, value in (("x", float("nan")), ("x", float("inf")), ("h", float("-inf")),
                         ("weight_hh", float("nan")), ("weight_ih", float("-inf")),
                         ("bias_hh", float("inf"))):
        cell = _cell(name)
        x = torch.randn(1, IN)
        state = [torch.randn(1, HID) for _ in _parts(cell.zero_state(1))]
        if where == "x":
            x[0, 3] = value
        elif where == "h":
            state[0][0, 5] = value
        else:
            with torch.no_grad():
                getattr(cell, where).view(-1)[30] = value
        reference = TORCH_CELLS[name](IN, HID)
        reference.load_state_dict(cell.state_dict())
        stream = _stream(cell, cell.math.make_state(state))
        got = [stream.step(x), stream.step(x)]  # (the second step: both reading orders)
        with torch.no_grad():
            torch_state = tuple(state) if name == "lstm" else state[0]
            want = []
            for _ in range(2):
                torch_state = reference(x, torch_state)
                want.append(torch_state[0] if name == "lstm" else torch_state)
        for g, w in zip(got, want):
            assert torch.equal(g.isnan(), w.isnan()), (where, value)
            assert torch.equal(g.isinf(), w.isinf()), (where, value)
            finite = g.isfinite()
            torch.testing.assert_close(g[finite], w[finite], rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.usefixtures("one_thread")
def test_stream_follows_weight_changes() -> None:
    """In-place changes, load_state_dict and optimizer steps (torch's fused ones too, which do not
    bump the parameters' versions) re-pack the stream's weights: each step equals torch.nn's
    cell on the current weights."""
    from conftest import fused_optimizer_steps

    cell = _cell("lstm")
    reference = torch.nn.LSTMCell(IN, HID)
    stream = _stream(cell)
    x = torch.randn(1, IN)

    def check() -> None:
        state = tuple(s.clone() for s in stream.state)
        got = stream.step(x)
        reference.load_state_dict(cell.state_dict())
        with torch.no_grad():
            want, _ = reference(x, state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():
        cell.weight_hh.mul_(-2.0)
    check()
    cell.load_state_dict(_cell("lstm").state_dict())
    check()
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
    cell(x)[0].sum().backward()
    optimizer.step()
    check()
    fused_optimizer_steps(cell, lambda: cell(x)[0].sum(), check)
    # new storage without a version bump: .data =, a new Parameter, vector_to_parameters
    with torch.no_grad():
        cell.weight_hh.data = torch.randn_like(cell.weight_hh)
    check()
    cell.weight_ih = torch.nn.Parameter(torch.randn_like(cell.weight_ih))
    check()
    torch.nn.utils.vector_to_parameters(
        torch.randn(sum(p.numel() for p in cell.parameters())), cell.parameters())
    check()


@needs_kernel
@pytest.mark.usefixtures("one_thread")
def test_stream_bad_input_is_one_clear_error() -> None:
    stream = _stream(_cell("gru_after"))
    for bad, match in ((torch.randn(1, IN + 1), r"x must be a \(1, 19\)"),
                       (torch.randn(IN), r"x must be a \(1, 19\)"),
                       (torch.randn(2, IN), r"x must be a \(1, 19\)"),
                       (torch.randn(1, IN, dtype=torch.float64), "float32"),
                       ([0.0] * IN, r"x must be a \(1, 19\)")):
        with pytest.raises(ValueError, match=match) as info:
            stream.step(bad)
        assert "\n" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(ValueError, match="state"):
        stream.reset(torch.zeros(1, HID + 1))
    with pytest.raises(ValueError, match=r"of the weights' dtype torch\.float32"):
        stream.reset(torch.zeros(1, HID, dtype=torch.float64))
    with pytest.raises(ValueError, match="state"):
        Stream(_cell("lstm"), torch.zeros(1, HID))  # (an LSTM's state is (h, c))
    x = torch.randn(1, IN, requires_grad=True)
    assert not stream.step(x).requires_grad  # (inference only: no graph across steps)
    with pytest.raises(TypeError, match="StackedCell"):
        Stream(rnnkit.StackedCell([_cell("lstm"), _cell("lstm", HID, HID)]))


@needs_kernel
def test_stream_falls_back_to_the_cell_where_the_kernel_does_not_run() -> None:
    """float64, and another default backend than the fused one: the stream steps the cell
    itself, with the same results."""
    previous = get_default_backend()
    for cell, backend in ((_cell("lstm_peephole").double(), previous), (_cell("gru_before"), "bptt")):
        set_default_backend(backend)
        try:
            stream = Stream(cell)
        finally:
            set_default_backend(previous)
        assert stream._packed is None
        xs = torch.randn(3, 1, IN, dtype=cell.weight_hh.dtype)
        outputs = [stream.step(x) for x in xs]
        want_outputs, want_state = _reference_steps(cell, xs, None)
        for got, want in zip([*outputs, *_parts(stream.state)],
                             [*want_outputs, *_parts(want_state)]):
            torch.testing.assert_close(got, want)


@needs_kernel
def test_step_stream_operator() -> None:
    """The operator's schema and fake kernel (torch.library.opcheck), and what it refuses: a
    tensor pack_step did not make, a c where the cell has none."""
    ops = fused._build.load()
    for name in ("lstm", "gru_before"):
        cell = _cell(name)
        cfg = fused._function.KERNELS[fused._function.spec_of(cell.math)]
        params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
        packed = ops.pack_step(*cfg.args(), *(p.detach() for p in params), None)
        if not packed.numel():
            pytest.skip("no packed step on this CPU")
        c = torch.randn(1, HID) if name == "lstm" else None
        torch.library.opcheck(ops.step_stream.default,
                              (torch.randn(1, IN), torch.randn(1, HID), c, packed))
    with pytest.raises(RuntimeError, match="pack_step"):
        ops.step_stream(torch.randn(1, IN), torch.randn(1, HID), None, torch.randn(packed.numel()))
    with pytest.raises(RuntimeError, match="c must be given"):
        ops.step_stream(torch.randn(1, IN), torch.randn(1, HID), torch.randn(1, HID), packed)
    # a missing x or h is named as None (it read "got UNKNOWN_SCALAR [0]")
    for x, h, name in ((None, torch.randn(1, HID), "x"), (torch.randn(1, IN), None, "h")):
        with pytest.raises(RuntimeError, match=rf"step_stream: {name} must be .* got None"):
            ops.step_stream(x, h, None, packed)


@needs_kernel
@pytest.mark.usefixtures("one_thread")
def test_step_stream_refuses_a_packed_tensor_whose_header_was_changed() -> None:
    """The header names the variant and the vector width the weights were packed with: a tensor
    whose kind, activation or width is not one this build packs is refused, never misread."""
    stream = _stream(_cell("lstm"))
    fields = {"kind": 1, "activation": 2, "width": 9}  # (positions in the header, int32)
    for name, value in (("kind", 3), ("activation", 7), ("width", 4)):
        packed = stream._packed.clone()
        packed[:16].view(torch.int32)[fields[name]] = value
        with pytest.raises(RuntimeError, match="packed must be what pack_step returned"):
            stream._op(torch.randn(1, IN), stream._h, stream._c, packed)
    with pytest.raises(RuntimeError, match="unknown variant"):
        torch.ops.rnnkit_fused.pack_step(3, 0, False, False, False, torch.randn(12, IN),
                                         torch.randn(12, 4), None, None, None)
