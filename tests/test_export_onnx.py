"""ONNX export checked by onnxruntime, an independently written implementation of every
variant: outputs and final states equal rnnkit's within 1e-5 (float32), with batch and time
sizes other than the ones exported with (dynamic axes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[dev]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript is not installed")

from rnnkit.export import ExportError, export_onnx  # noqa: E402

# constructor of every variant (input size, hidden size, **options)
VARIANTS = {
    "rnn_tanh": lambda i, h, **o: rnnkit.RNN(i, h, **o),
    "rnn_relu": lambda i, h, **o: rnnkit.RNN(i, h, nonlinearity="relu", **o),
    "rnn_sigmoid": lambda i, h, **o: rnnkit.RNN(i, h, nonlinearity="sigmoid", **o),
    "rnn_identity": lambda i, h, **o: rnnkit.RNN(i, h, nonlinearity="identity", **o),
    "lstm": lambda i, h, **o: rnnkit.LSTM(i, h, **o),
    "lstm_peephole": lambda i, h, **o: rnnkit.LSTM(i, h, peephole=True, **o),
    "lstm_coupled": lambda i, h, **o: rnnkit.LSTM(i, h, coupled=True, **o),
    "lstm_coupled_peephole": lambda i, h, **o: rnnkit.LSTM(i, h, peephole=True, coupled=True, **o),
    "gru_after": lambda i, h, **o: rnnkit.GRU(i, h, **o),
    "gru_before": lambda i, h, **o: rnnkit.GRU(i, h, reset="before", **o),
}
ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}


class EveryVariant(nn.Module):
    """All variants side by side on one input: one export checks them all."""

    def __init__(self, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make(3, 5, num_layers=layers, bidirectional=bidirectional)
                                    for make in VARIANTS.values())

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
        results = []
        for layer in self.layers:
            output, state = layer(x, lengths=lengths)
            results += [output, *(state if isinstance(state, tuple) else (state,))]
        return results


def _run(path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(feeds), (names, list(feeds))
    return session.run(None, {name: feeds[name].numpy() for name in names})


def _assert_equal(got: list[np.ndarray], want: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.detach().numpy(), rtol=1e-5, atol=atol)


def _check_every_variant(tmp_path, layers: int, bidirectional: bool, with_lengths: bool) -> None:
    torch.manual_seed(layers * 10 + bidirectional * 2 + with_lengths)
    model = EveryVariant(layers, bidirectional).eval()
    path = tmp_path / "every.onnx"
    x = torch.randn(7, 4, 3)
    lengths = torch.tensor([7, 5, 5, 2]) if with_lengths else None
    export_onnx(model, (x,), path, kwargs={"lengths": lengths} if with_lengths else None)
    graph = onnx.load(str(path)).graph
    recurrent = [n.op_type for n in graph.node if n.op_type in ("RNN", "LSTM", "GRU")]
    assert recurrent == [ONNX_OP[name.split("_")[0]] for name in VARIANTS for _ in range(layers)]
    # other batch and time sizes than exported with, lengths in no particular order
    x2 = torch.randn(9, 3, 3)
    feeds = {"x": x2}
    lengths2 = None
    if with_lengths:
        lengths2 = torch.tensor([4, 9, 1])
        feeds["lengths"] = lengths2
    with torch.no_grad():
        want = model(x2, lengths2)
    _assert_equal(_run(path, feeds), want)


CONFIGS = [(layers, bi, lengths) for layers in (1, 2) for bi in (False, True) for lengths in (False, True)]
FAST = [(2, True, True), (1, False, False)]


@pytest.mark.parametrize("layers,bidirectional,with_lengths", FAST)
def test_every_variant_matches_onnxruntime(tmp_path, layers, bidirectional, with_lengths):
    _check_every_variant(tmp_path, layers, bidirectional, with_lengths)


@pytest.mark.slow
@pytest.mark.parametrize("layers,bidirectional,with_lengths", [c for c in CONFIGS if c not in FAST])
def test_every_variant_matches_onnxruntime_all_configurations(tmp_path, layers, bidirectional,
                                                              with_lengths):
    _check_every_variant(tmp_path, layers, bidirectional, with_lengths)


def test_batch_first_initial_state_and_no_bias(tmp_path):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, num_layers=2, batch_first=True, bias=False, peephole=True).eval()
    x, h0, c0 = torch.randn(2, 6, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    path = export_onnx(layer, (x, (h0, c0)), tmp_path / "lstm.onnx")
    x2, h2, c2 = torch.randn(3, 5, 3), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with torch.no_grad():
        output, (h_n, c_n) = layer(x2, (h2, c2))
    _assert_equal(_run(path, {"input": x2, "hx_0": h2, "hx_1": c2}), [output, h_n, c_n])


def test_refuses_before_writing(tmp_path):
    path = tmp_path / "never.onnx"
    model = rnnkit.LSTM(3, 4, num_layers=2, dropout=0.5)  # training mode
    with pytest.raises(ExportError, match=r"training mode with dropout 0\.5.*eval\(\)"):
        export_onnx(model, torch.randn(5, 2, 3), path)
    with pytest.raises(ExportError, match="float64"):
        export_onnx(rnnkit.GRU(3, 4).double().eval(), torch.randn(5, 2, 3).double(), path)
    with pytest.raises(ExportError, match="input 'input' is float64"):
        export_onnx(rnnkit.GRU(3, 4).eval(), torch.randn(5, 2, 3).double(), path)
    # a device other than the CPU (meta stands in for a GPU, which this suite cannot assume)
    with pytest.raises(ExportError, match=r"parameter 'weight_ih_l0' is on meta; export from the CPU"):
        export_onnx(rnnkit.GRU(3, 4, device="meta").eval(), torch.randn(5, 2, 3), path)
    with pytest.raises(ExportError, match="input 'input' is on meta; pass CPU tensors"):
        export_onnx(rnnkit.GRU(3, 4).eval(), torch.randn(5, 2, 3, device="meta"), path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


class _Minimal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = rnnkit.MinGRU(3, 5, num_layers=2, bidirectional=True)
        self.lstm = rnnkit.MinLSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x, lengths):
        y, h = self.gru(x, lengths=lengths)
        z, g = self.lstm(x.transpose(0, 1), lengths=lengths)
        return y, h, z, g


def test_minimal_layers_match_onnxruntime(tmp_path):
    """minGRU / minLSTM have no ONNX operator of their own; each stacked layer is written as one
    ONNX GRU node (Sigmoid gates, Affine candidate) fed ``[u; g(v)]`` from the input projection,
    so that ``h_t = σ(u) h_{t−1} + (1 − σ(u)) g(v)`` is the cell's recurrence. onnxruntime runs
    it at other batch and time sizes, with lengths, equal to rnnkit's scan."""
    torch.manual_seed(0)
    model = _Minimal().eval()
    path = export_onnx(model, (torch.randn(7, 4, 3), torch.tensor([7, 5, 5, 2])),
                       tmp_path / "minimal.onnx")
    recurrent = [n.op_type for n in onnx.load(str(path)).graph.node
                 if n.op_type in ("RNN", "LSTM", "GRU")]
    assert recurrent == ["GRU"] * 4
    x, lengths = torch.randn(9, 3, 3), torch.tensor([4, 9, 1])
    with torch.no_grad():
        want = model(x, lengths)
    _assert_equal(_run(path, {"x": x, "lengths": lengths}), list(want))


def test_piece_without_onnx_form_is_named(tmp_path):
    from rnnkit.models.crf import LinearChainCRF

    class Viterbi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnnkit.GRU(3, 4)
            self.emit = nn.Linear(4, 5)
            self.crf = LinearChainCRF(5)

        def forward(self, x):
            emissions = self.emit(self.rnn(x)[0])
            return self.crf.decode(emissions)[1]

    path = tmp_path / "crf.onnx"
    with pytest.raises(ExportError, match=r"CRF Viterbi decoding .* has no ONNX form"):
        export_onnx(Viterbi().eval(), torch.randn(5, 2, 3), path)
    assert not path.exists()
    # and the patch is undone afterwards
    assert LinearChainCRF.decode.__name__ == "decode"


# ---- one model per task family (tiny, built here, a few training steps) ------------------------


def _train_briefly(model: nn.Module, loss_of, steps: int = 3) -> nn.Module:
    """A few optimizer steps so the weights are no longer the initial ones."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()
    return model.eval()


def test_charlm_language_model(tmp_path):
    from rnnkit.models.language_model import LanguageModel, LMConfig

    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=11, cell="lstm", layers=2, hidden=8, embedding=6,
                                   peephole=True, dropout=0.1))
    tokens = torch.randint(0, 11, (9, 3))
    _train_briefly(model, lambda m: m(tokens)[0].logsumexp(-1).mean())
    path = export_onnx(model, (tokens[:6, :2],), tmp_path / "charlm.onnx")
    with torch.no_grad():
        logits, (h, c) = model(tokens)
    _assert_equal(_run(path, {"tokens": tokens}), [logits, h, c])


def test_sentiment_classifier_with_lengths(tmp_path):
    from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier
    from rnnkit.models.recurrent import RecurrentConfig

    torch.manual_seed(0)
    config = ClassifierConfig(classes=2, vocab_size=20, embedding=6, pooling="max",
                              recurrent=RecurrentConfig(cell="gru", layers=1, hidden=7,
                                                        bidirectional=True, reset="before"))
    model = SequenceClassifier(config)
    tokens, lengths = torch.randint(1, 20, (8, 4)), torch.tensor([8, 3, 5, 1])
    _train_briefly(model, lambda m: m(tokens, lengths).logsumexp(-1).mean())
    path = export_onnx(model, (tokens[:6, :3], torch.tensor([6, 4, 2])), tmp_path / "sst.onnx")
    with torch.no_grad():
        want = model(tokens, lengths)
    _assert_equal(_run(path, {"inputs": tokens, "lengths": lengths}), [want])


def test_tagging_emissions(tmp_path):
    from rnnkit.models.recurrent import RecurrentConfig
    from rnnkit.models.tagger import Tagger, TaggerConfig

    torch.manual_seed(0)
    config = TaggerConfig(vocab_size=15, tags=5, embedding=6, crf=True, intents=3,
                          recurrent=RecurrentConfig(cell="lstm", layers=2, hidden=6,
                                                    bidirectional=True, coupled=True))
    model = Tagger(config)
    tokens, lengths = torch.randint(1, 15, (7, 3)), torch.tensor([4, 7, 2])
    _train_briefly(model, lambda m: m(tokens, lengths).emissions.logsumexp(-1).mean())
    path = export_onnx(model, (tokens[:5, :2], torch.tensor([5, 3])), tmp_path / "tagger.onnx")
    with torch.no_grad():
        out = model(tokens, lengths)
    # the outputs dataclass becomes its fields: emissions, mask, intent logits
    got = _run(path, {"tokens": tokens, "lengths": lengths})
    _assert_equal([got[0], got[2]], [out.emissions, out.intent_logits])
    np.testing.assert_array_equal(got[1], out.mask.numpy())


def test_digits_row_reader(tmp_path):
    from rnnkit.models.classifier import SequenceClassifier, image_rows, row_reader_config
    from rnnkit.models.recurrent import RecurrentConfig

    torch.manual_seed(0)
    model = SequenceClassifier(row_reader_config(8, 10, RecurrentConfig(
        cell="rnn", layers=2, hidden=9, nonlinearity="relu")))
    images = torch.rand(5, 8, 8)
    _train_briefly(model, lambda m: m(image_rows(images)).logsumexp(-1).mean())
    path = export_onnx(model, (image_rows(images[:3]),), tmp_path / "digits.onnx")
    with torch.no_grad():
        want = model(image_rows(images))
    _assert_equal(_run(path, {"inputs": image_rows(images)}), [want])


def test_lengths_as_a_list_is_refused(tmp_path):
    """A list is traced as a constant: the file would reuse the example's lengths for every input
    (and refuse other batch sizes), so export_onnx asks for a tensor instead."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnnkit.GRU(3, 4, bidirectional=True)

        def forward(self, x, lengths):
            return self.rnn(x, lengths=lengths)

    path = tmp_path / "list.onnx"
    with pytest.raises(ExportError, match=r"lengths= given as a list .* pass it as a tensor"):
        export_onnx(Padded().eval(), (torch.randn(6, 3, 3), [6, 4, 2]), path)
    assert not path.exists()


def test_torch_recurrent_modules_beside_rnnkit_layers_keep_time_dynamic(tmp_path):
    """torch's own exporter of nn.LSTM fixes the sequence length into a Reshape; inside
    export_onnx torch.nn.RNN/LSTM/GRU run as their rnnkit copies, so any length runs."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
            self.second = rnnkit.GRU(8, 5)
            self.third = nn.RNN(5, 2, nonlinearity="relu", batch_first=False)

        def forward(self, x):
            y, (h, c) = self.first(x)
            y, _ = self.second(y)
            return self.third(y)[0], h, c

    torch.manual_seed(0)
    model = Mixed().eval()
    path = export_onnx(model, (torch.randn(5, 2, 3),), tmp_path / "mixed.onnx")
    recurrent = [n.op_type for n in onnx.load(str(path)).graph.node
                 if n.op_type in ("RNN", "LSTM", "GRU")]
    assert recurrent == ["LSTM", "LSTM", "GRU", "RNN"]
    assert "forward" not in vars(model.first) and "_rnnkit_onnx_twin" not in model.first._modules
    x = torch.randn(7, 3, 3)
    with torch.no_grad():
        want = model(x)
    _assert_equal(_run(path, {"x": x}), list(want))
    model.first = nn.LSTM(3, 4, num_layers=2, dropout=0.5)  # a new module: in training mode
    with pytest.raises(ExportError, match=r"first is in training mode with dropout 0\.5"):
        export_onnx(model, (x,), tmp_path / "never.onnx")


class _GRUThenRNN(nn.Module):
    """A client's model holding rnnkit layers of the variants torch.nn also has."""

    def __init__(self, nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.gru = rnnkit.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.rnn = rnnkit.RNN(8, 5, nonlinearity=nonlinearity, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, h = self.gru(x)
        z, g = self.rnn(y)
        return z, h, g


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_legacy_torch_onnx_export_writes_gru_and_rnn_nodes(tmp_path, nonlinearity):
    """``torch.onnx.export(model, ..., dynamo=False)`` of a model holding rnnkit.GRU / RNN raised
    "ArrayRef: invalid index" (one layer) or wrote a graph unrolled for the example's length
    (two layers): what torch.nn has is exported as torch.nn exports it, one node per layer
    stack, and runs at other batch and time sizes in onnxruntime."""
    torch.manual_seed(0)
    model = _GRUThenRNN(nonlinearity).eval()
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(model, (torch.randn(2, 5, 3),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "time"}})
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node if n.op_type in ("RNN", "LSTM", "GRU")] == \
        ["GRU", "GRU", "RNN"]
    x = torch.randn(3, 9, 3)
    with torch.no_grad():
        want = model(x)
    _assert_equal(_run(path, {"x": x}), list(want))


@pytest.mark.parametrize("make", [
    lambda: rnnkit.LSTM(3, 4, peephole=True), lambda: rnnkit.GRU(3, 4, reset="before"),
    lambda: rnnkit.RNN(3, 4, nonlinearity="sigmoid"), lambda: rnnkit.GRU(3, 4, zoneout=0.1),
    lambda: rnnkit.GRU(3, 4, layer_norm=True), lambda: "lengths",
    lambda: rnnkit.MinGRU(3, 4), lambda: rnnkit.MinLSTM(3, 4, bidirectional=True),
], ids=["peephole", "gru_before", "rnn_sigmoid", "zoneout", "layer_norm", "lengths", "mingru",
        "minlstm"])
def test_legacy_torch_onnx_export_refuses_what_torch_nn_has_not(tmp_path, make):
    """A variant torch.nn has not (or lengths=, which tracing would fix into the graph): one
    error naming rnnkit.export_onnx, before a file is written (it wrote an unrolled graph)."""
    made = make()
    layer, kwargs = (rnnkit.GRU(3, 4), {"lengths": torch.tensor([5, 3])}) if made == "lengths" \
        else (made, {})
    path = tmp_path / "never.onnx"

    class Client(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer.eval()

        def forward(self, x):
            return self.layer(x, **kwargs)[0]

    with pytest.raises(RuntimeError, match=r"dynamo=False.*rnnkit\.export_onnx"):
        torch.onnx.export(Client(), (torch.randn(5, 2, 3),), str(path), dynamo=False)
    assert not path.exists()
