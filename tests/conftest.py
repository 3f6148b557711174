"""Shared test fixtures: every cell variant rnnkit has, by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

import rnnkit

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# name -> (layer class, cell class, options); the same options work for layers and cells
VARIANTS = {
    "rnn_tanh": (rnnkit.RNN, rnnkit.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnkit.RNN, rnnkit.RNNCell, {"nonlinearity": "relu"}),
    "rnn_sigmoid": (rnnkit.RNN, rnnkit.RNNCell, {"nonlinearity": "sigmoid"}),
    "lstm": (rnnkit.LSTM, rnnkit.LSTMCell, {}),
    "lstm_peephole": (rnnkit.LSTM, rnnkit.LSTMCell, {"peephole": True}),
    "lstm_coupled": (rnnkit.LSTM, rnnkit.LSTMCell, {"coupled": True}),
    "lstm_peephole_coupled": (rnnkit.LSTM, rnnkit.LSTMCell, {"peephole": True, "coupled": True}),
    "gru_after": (rnnkit.GRU, rnnkit.GRUCell, {"reset": "after"}),
    "gru_before": (rnnkit.GRU, rnnkit.GRUCell, {"reset": "before"}),
}
# name -> (layer class, options): the layers of VARIANTS alone
LAYER_VARIANTS = {name: (layer, options) for name, (layer, _, options) in VARIANTS.items()}
# name -> layer constructor (input size, hidden size, **more options)
LAYER_FACTORIES = {name: partial(layer, **options) for name, (layer, options) in LAYER_VARIANTS.items()}
# the VARIANTS torch.nn has a layer for (its RNN, LSTM and GRU)
TORCH_FORMS = ("rnn_tanh", "rnn_relu", "lstm", "gru_after")


@pytest.fixture
def rnnkit_kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain LSTM on rnnkit's kernel too (at small shapes its padded calls would run
    torch's op; a ragged batch stays on rnnkit's kernel either way)."""
    from rnnkit.engine import fused

    monkeypatch.setattr(fused, "use_native", False)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test naming the file that is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data sets beside the repository)")
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for a test: tiny GEMMs gain nothing from threads, and on a shared
    machine spinning workers cost 100×. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def builtin_routes() -> Iterator[None]:
    """The plain LSTM routed by the built-in (AVX-512-measured) rules of
    ``fused.own_kernel_faster``, not by this CPU's measured table (``fused.route_table``): for
    tests that pin a rule's shapes, which must not depend on the CPU the suite runs on."""
    from rnnkit.engine.fused import route_table

    with route_table.using(None):
        yield


def fused_optimizer_steps(module: torch.nn.Module, loss_of: Callable[[], torch.Tensor],
                          check: Callable[[], None]) -> None:
    """One step of torch's fused SGD and one of its fused Adam on ``module`` (they write the
    parameters in one kernel without bumping ``_version``), ``check()`` after each."""
    for optimizer in (torch.optim.SGD(module.parameters(), lr=0.1, fused=True),
                      torch.optim.Adam(module.parameters(), lr=0.1, fused=True)):
        module.zero_grad()
        loss_of().backward()
        optimizer.step()
        check()
