"""Streaming: a sequence fed in chunks with the state carried equals one call on all of it,
for every cell variant, stacked, on every backend; and the StreamBank that serves many streams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import rnnkit
from conftest import VARIANTS
from rnnkit.engine import get_default_backend, set_default_backend
from rnnkit.streaming import StreamBank

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
