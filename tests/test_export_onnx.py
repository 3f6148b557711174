"""ONNX export checked by onnxruntime, an independently written implementation of every
variant: outputs and final states equal rnnkit's within 1e-5 (float32), with batch and time
sizes other than the ones exported with (dynamic axes)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit
import rnnkit.data.vocab
import rnnkit.decoding

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
    # (no ONNX operator of their own: one ONNX GRU node per stacked layer, minimal_node_input)
    "min_gru": lambda i, h, **o: rnnkit.MinGRU(i, h, **o),
    "min_lstm": lambda i, h, **o: rnnkit.MinLSTM(i, h, **o),
}
ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU", "min": "GRU"}

# (layers, bidirectional, with lengths): the whole matrix issue 15 asks for
CONFIGS = [(layers, bi, lengths) for layers in (1, 2) for bi in (False, True)
           for lengths in (False, True)]


def _config_name(layers: int, bidirectional: bool, with_lengths: bool) -> str:
    return (f"{layers} layer{'s' if layers > 1 else ''}, "
            f"{'bidirectional' if bidirectional else 'unidirectional'}, "
            f"{'with' if with_lengths else 'without'} lengths")


class EveryVariant(nn.Module):
    """Every variant in every configuration side by side on one input (the configurations with
    lengths read the ``lengths`` input, the others not): ONE export, ONE onnxruntime session
    checks the whole matrix. ``labels`` names each output: variant, configuration, tensor."""

    def __init__(self, configs: list[tuple[int, bool, bool]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.uses_lengths: list[bool] = []
        self.labels: list[str] = []
        for layers, bidirectional, with_lengths in configs:
            for name, make in VARIANTS.items():
                layer = make(3, 5, num_layers=layers, bidirectional=bidirectional)
                self.layers.append(layer)
                self.uses_lengths.append(with_lengths)
                where = f"{name} ({_config_name(layers, bidirectional, with_lengths)})"
                states = ("h_n", "c_n") if isinstance(layer, rnnkit.LSTM) else ("h_n",)
                self.labels += [f"{where}: {tensor}" for tensor in ("output", *states)]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        results = []
        for layer, uses_lengths in zip(self.layers, self.uses_lengths):
            output, state = layer(x, lengths=lengths if uses_lengths else None)
            results += [output, *(state if isinstance(state, tuple) else (state,))]
        return results


def _run(path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(feeds), (names, list(feeds))
    return session.run(None, {name: feeds[name].numpy() for name in names})


def _assert_equal(got: list[np.ndarray], want: list[torch.Tensor], atol: float = 1e-5,
                  labels: list[str] | None = None) -> None:
    assert len(got) == len(want)
    labels = labels or [f"output {i}" for i in range(len(want))]
    differing = []
    for g, w, label in zip(got, want, labels):
        w = w.detach().numpy()
        if g.shape != w.shape or not np.allclose(g, w, rtol=1e-5, atol=atol):
            gap = np.abs(g - w).max() if g.shape == w.shape else f"shape {g.shape} != {w.shape}"
            differing.append(f"{label}: max |onnxruntime - rnnkit| = {gap}")
    assert not differing, "onnxruntime differs from rnnkit:\n" + "\n".join(differing)


def test_every_variant_in_every_configuration_matches_onnxruntime(tmp_path):
    """Issue 15's matrix: every exported variant x {1, 2 layers} x {uni, bidirectional} x {with,
    without lengths}, outputs and final states within 1e-5 of rnnkit's under onnxruntime, at
    other batch and time sizes than exported with (dynamic axes), lengths unsorted."""
    torch.manual_seed(0)
    model = EveryVariant(CONFIGS).eval()
    path = tmp_path / "every.onnx"
    export_onnx(model, (torch.randn(7, 4, 3), torch.tensor([7, 5, 5, 2])), path)
    graph = onnx.load(str(path)).graph
    recurrent = [n.op_type for n in graph.node if n.op_type in ("RNN", "LSTM", "GRU")]
    assert recurrent == [ONNX_OP[name.split("_")[0]] for layers, _, _ in CONFIGS
                         for name in VARIANTS for _ in range(layers)]
    x, lengths = torch.randn(9, 3, 3), torch.tensor([4, 9, 1])
    with torch.no_grad():
        want = model(x, lengths)
    assert len(want) == len(model.labels)
    _assert_equal(_run(path, {"x": x, "lengths": lengths}), want, labels=model.labels)


def test_batch_first_initial_state_and_no_bias(tmp_path):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, num_layers=2, batch_first=True, bias=False, peephole=True).eval()
    x, h0, c0 = torch.randn(2, 6, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    path = export_onnx(layer, (x, (h0, c0)), tmp_path / "lstm.onnx")
    x2, h2, c2 = torch.randn(3, 5, 3), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with torch.no_grad():
        output, (h_n, c_n) = layer(x2, (h2, c2))
    _assert_equal(_run(path, {"input": x2, "hx_0": h2, "hx_1": c2}), [output, h_n, c_n])


def test_written_model_has_the_mode_open_would_give(tmp_path):
    # the file is written to a temporary name first (0600) and renamed: others in the user's
    # group must still be able to read a shipped model as they read the run's other files
    umask = os.umask(0)
    os.umask(umask)
    path = export_onnx(rnnkit.GRU(3, 4).eval(), torch.randn(5, 2, 3), tmp_path / "gru.onnx")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


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


# ---- refusals, one by one: one error naming the piece, and no file --------------------------


def _seq2seq():
    from rnnkit.models.recurrent import RecurrentConfig
    from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig

    return Seq2Seq(Seq2SeqConfig(source_vocab=7, target_vocab=7, embedding=4,
                                 encoder=RecurrentConfig(cell="gru", layers=1, hidden=4),
                                 decoder=RecurrentConfig(cell="gru", layers=1, hidden=4)))


def _language_model():
    from rnnkit.models.language_model import LanguageModel, LMConfig

    return LanguageModel(LMConfig(vocab_size=5, cell="gru", layers=1, hidden=4, embedding=3))


def _generator():
    from rnnkit.models.generator import FrameGenerator, GeneratorConfig
    from rnnkit.models.recurrent import RecurrentConfig

    return FrameGenerator(GeneratorConfig(pitches=3, recurrent=RecurrentConfig(
        cell="gru", layers=1, hidden=4)))


class _Calls(nn.Module):
    """A model whose forward runs ``model`` and then ``piece`` on it (as a client's wrapper
    around a decoding or sampling call would)."""

    def __init__(self, model: nn.Module, piece) -> None:
        super().__init__()
        self.model = model
        self.piece = piece

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        return self.piece(self.model, x, lengths)


def _step(model):
    """A decoder step function for rnnkit.decoding's searches: (tokens, state) -> log-probs."""
    def step(tokens, state):
        logits, _, state = model.step(tokens, state)
        return logits.log_softmax(-1), state
    return step


def _ctc_log_probs(model, x, lengths):
    return model(x)[0].log_softmax(-1)  # (T, B, C) from a recurrent layer


REFUSED = {
    # name: (model, piece(model, x, lengths), what the error names)
    "seq2seq_beam": (_seq2seq, lambda m, x, n: m.beam(x, n, beam_width=2, max_length=3),
                     r"beam search \(Seq2Seq\.beam\)"),
    "seq2seq_greedy": (_seq2seq, lambda m, x, n: m.greedy(x, n, max_length=3),
                       r"greedy search \(Seq2Seq\.greedy\)"),
    "decoding_beam_search": (_seq2seq, lambda m, x, n: rnnkit.decoding.beam_search(
        _step(m), m.encode(x[:, :1], n[:1]), lambda state, index: state.select(index), 2, 3,
        beam_width=2, max_length=3), r"beam search \(rnnkit\.decoding\.beam_search\)"),
    "decoding_greedy_search": (_seq2seq, lambda m, x, n: rnnkit.decoding.greedy_search(
        _step(m), m.encode(x[:, :1], n[:1]), 2, 3, max_length=3),
        r"greedy search \(rnnkit\.decoding\.greedy_search\)"),
    "generator_sample": (_generator, lambda m, x, n: m.sample(x[:, 0].float(), 3, seed=0),
                         r"sampling loop FrameGenerator\.sample"),
    "language_model_generate": (_language_model, lambda m, x, n: rnnkit.models.language_model
                                .generate(m, rnnkit.data.vocab.CharVocab(tuple("abcd\n")), "ab", 3),
                                r"sampling loop rnnkit\.models\.language_model\.generate"),
    "language_model_continue_streams": (
        _language_model, lambda m, x, n: rnnkit.models.language_model.continue_streams(
            m, [[1, 2]], 3), r"sampling loop rnnkit\.models\.language_model\.continue_streams"),
    "ctc_greedy_decode": (lambda: rnnkit.GRU(3, 5), lambda m, x, n: rnnkit.decoding.greedy_decode(
        _ctc_log_probs(m, x.float(), n)[:, 0]), "CTC greedy decoding"),
    "ctc_prefix_beam_search": (lambda: rnnkit.GRU(3, 5), lambda m, x, n: rnnkit.decoding
                               .prefix_beam_search(_ctc_log_probs(m, x.float(), n)[:, 0]),
                               "CTC prefix beam search"),
    "ctc_prefix_beam_search_batch": (lambda: rnnkit.GRU(3, 5), lambda m, x, n: rnnkit.decoding
                                     .prefix_beam_search_batch(_ctc_log_probs(m, x.float(), n), n),
                                     "CTC prefix beam search"),
    "ctc_decode_batch": (lambda: rnnkit.GRU(3, 5), lambda m, x, n: rnnkit.decoding.decode_batch(
        _ctc_log_probs(m, x.float(), n), n), "CTC decoding"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_piece_without_onnx_form_is_refused_by_name_and_writes_nothing(tmp_path, name):
    """Beam search, greedy decoding, sampling loops, CTC decoders, each reached the way a client
    reaches it (the package's names, the model's methods): ExportError naming it, no file, and
    the piece works again afterwards."""
    make, piece, what = REFUSED[name]
    torch.manual_seed(0)
    model = _Calls(make().eval(), piece)
    x = torch.randint(4, 7, (5, 2)) if name.startswith(("seq2seq", "decoding")) else (
        torch.randint(0, 2, (5, 2, 3)) if name.startswith("generator") else torch.randn(5, 2, 3))
    if name.startswith("language_model"):
        x = torch.randint(0, 5, (5, 2))
    lengths = torch.tensor([5, 3])
    path = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match=what + ".* has no ONNX form"):
        export_onnx(model, (x, lengths), path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with torch.no_grad():
        model(x, lengths)  # (the refusal is undone: the piece runs again)


# ---- torch's own (dynamo) exporter: rnnkit's translations of its fused operators --------------

_DYNAMO_EXPORT = r"""
import sys

import numpy as np
import torch

import rnnkit

assert "onnxscript" not in sys.modules  # (the translations arrive when torch's exporter loads it)
torch.manual_seed(0)
options = dict(num_layers=2, bidirectional=True)
layers = [rnnkit.RNN(3, 5, nonlinearity=n, **options) for n in ("tanh", "relu", "sigmoid",
                                                                  "identity")]
layers += [rnnkit.LSTM(3, 5, peephole=p, coupled=c, **options) for p in (False, True)
           for c in (False, True)]
layers += [rnnkit.GRU(3, 5, reset=r, **options) for r in ("after", "before")]


class Every(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        results = []
        for layer in self.layers:
            y, state = layer(x)
            results += [y, *(state if isinstance(state, tuple) else (state,))]
        return results


model = Every().eval()
x = torch.randn(7, 4, 3)
torch.onnx.export(model, (x,), sys.argv[1], dynamo=True, input_names=["x"])
with torch.no_grad():
    np.savez(sys.argv[1] + ".npz", x.numpy(), *[w.numpy() for w in model(x)])
"""
_DYNAMO_LABELS = [f"{name}: {tensor}" for name in
                  ("rnn_tanh", "rnn_relu", "rnn_sigmoid", "rnn_identity") for tensor in ("y", "h")]
_DYNAMO_LABELS += [f"{name}: {tensor}" for name in
                   ("lstm", "lstm_coupled", "lstm_peephole", "lstm_coupled_peephole")
                   for tensor in ("y", "h", "c")]
_DYNAMO_LABELS += [f"{name}: {tensor}" for name in ("gru_after", "gru_before")
                   for tensor in ("y", "h")]


def test_torch_dynamo_onnx_export_writes_onnx_nodes_for_every_fused_variant(tmp_path):
    """``torch.onnx.export(model, args, dynamo=True)`` — torch's default exporter — on rnnkit's
    fused layers (it failed with torch's ConversionError: no ONNX function for
    rnnkit_fused::layer_forward): one ONNX node per layer and direction, every variant, equal
    to rnnkit under onnxruntime. In a fresh process, where onnxscript is first imported by the
    exporter and the model never ran before (rnnkit.export.dynamo)."""
    import subprocess
    import sys

    path = tmp_path / "dynamo.onnx"
    done = subprocess.run([sys.executable, "-c", _DYNAMO_EXPORT, str(path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node
             if n.op_type in ("RNN", "LSTM", "GRU")]
    # 2 layers x 2 directions each (torch's own nn.LSTM op for the plain LSTM: 2 bidirectional)
    assert nodes.count("RNN") == 16 and nodes.count("GRU") == 8, nodes
    assert nodes.count("LSTM") in (14, 16), nodes
    saved = np.load(str(path) + ".npz")
    x, *want = (saved[f"arr_{i}"] for i in range(len(saved.files)))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    _assert_equal(got, [torch.from_numpy(w) for w in want], labels=_DYNAMO_LABELS)


def test_torch_dynamo_onnx_export_with_lengths_names_export_onnx(tmp_path):
    """lengths= has no translation in torch's exporter (the layer's stable sort of its rows):
    the error names rnnkit.export_onnx, and no file is written."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnnkit.GRU(3, 4, bidirectional=True)

        def forward(self, x, lengths):
            return self.rnn(x, lengths=lengths)[0]

    path = tmp_path / "never.onnx"
    with pytest.raises(Exception, match=r"cannot write an rnnkit layer called with lengths=; "
                                        r"use rnnkit\.export_onnx"):
        torch.onnx.export(Padded().eval(), (torch.randn(6, 3, 3), torch.tensor([6, 4, 2])),
                          str(path), dynamo=True)
    assert not path.exists()


@pytest.mark.parametrize("make", [
    lambda: rnnkit.LSTM(3, 8, num_layers=2, bidirectional=True),  # torch's op or rnnkit's kernel
    lambda: rnnkit.GRU(3, 8, reset="before"),
    lambda: rnnkit.LSTM(3, 8, peephole=True),
], ids=["lstm", "gru_before", "lstm_peephole"])
def test_torch_dynamo_onnx_export_with_dynamic_batch_and_time(tmp_path, make):
    """``dynamic_shapes=`` through torch's exporter: the file runs at another batch and length.
    (The plain LSTM's route lookup hashed the symbolic sizes: 'unhashable type: non-nested
    SymInt'; symbolic sizes now take rnnkit's kernel.)"""
    module = make().eval()
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    path = tmp_path / "dynamic.onnx"
    torch.onnx.export(module, (torch.randn(6, 4, 3),), str(path), dynamo=True,
                      dynamic_shapes=({0: steps, 1: batch},))
    x = torch.randn(9, 3, 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = module(x)
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-5)


# ---- the rnnkit_onnx operators' own arguments (the hostile fuzzer of session 16) ----------------


def _onnx_gru_arguments(directions: int = 1) -> dict:
    """rnnkit_onnx::gru's arguments for T, B, I, H = 4, 3, 2, 5 in ONNX's layout 0, by name."""
    steps, batch, inputs, hidden = 4, 3, 2, 5
    return dict(x=torch.randn(steps, batch, inputs), W=torch.randn(directions, 3 * hidden, inputs),
                R=torch.randn(directions, 3 * hidden, hidden),
                B=torch.randn(directions, 6 * hidden),
                sequence_lens=torch.tensor([4, 3, 2], dtype=torch.int32),
                initial_h=torch.randn(directions, batch, hidden), linear_before_reset=1)


# (before the checks: a W, B or R of another width was split into other gate blocks and gave
# numbers or a shape error from inside the layer; sequence_lens of 2 entries for 3 rows and an
# initial_h of another batch ran; linear_before_reset=7 ran as 1)
@pytest.mark.parametrize("name, wrong, message", [
    ("W", torch.randn(1, 15, 3), r"W must be \(1, 15, 2\)"),
    ("W", torch.randn(2, 15, 2), r"W must be \(1, 15, 2\)"),
    ("R", torch.randn(1, 14, 5), r"R must be \(D, 3\*H, H\)"),
    ("B", torch.randn(1, 15), r"B must be \(1, 30\)"),
    ("B", torch.randn(1, 30, dtype=torch.float64), r"B must be \(1, 30\) of x's dtype"),
    ("initial_h", torch.randn(1, 2, 5), r"initial_h must be \(1, 3, 5\)"),
    ("initial_h", None, "initial_h is None"),
    ("sequence_lens", torch.tensor([4, 3], dtype=torch.int32), r"sequence_lens must be \(B,\)"),
    ("sequence_lens", torch.tensor([4.0, 3.0, 2.0]), "sequence_lens must be a"),
    ("linear_before_reset", 7, r"linear_before_reset must be one of \[0, 1\]"),
])
def test_onnx_operator_refuses_arguments_onnx_does_not_define(name, wrong, message):
    arguments = _onnx_gru_arguments()
    arguments[name] = wrong
    with pytest.raises((ValueError, RuntimeError), match=f"rnnkit_onnx::gru: {message}"):
        torch.ops.rnnkit_onnx.gru(*arguments.values())


def test_onnx_operator_checks_under_fake_tensors_as_in_eager():
    """The fake kernel (what torch.onnx.export runs) refuses what the eager kernel refuses:
    before, it returned outputs of R's width for any W."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    arguments = _onnx_gru_arguments()
    arguments["W"] = torch.randn(1, 15, 3)
    with FakeTensorMode(allow_non_fake_inputs=True), \
            pytest.raises((ValueError, RuntimeError), match=r"W must be \(1, 15, 2\)"):
        torch.ops.rnnkit_onnx.gru(*arguments.values())


@pytest.mark.parametrize("lengths, error, message", [
    (torch.tensor([3.0, 2.5]), TypeError, "lengths must hold integers"),
    (torch.tensor([[3, 2]]), ValueError, r"lengths must be 1-D \(batch,\)"),
    (torch.tensor([3, 2, 1]), ValueError, "lengths has .* entries but the batch has"),
])
def test_export_refuses_lengths_that_are_not_one_integer_per_row(tmp_path, lengths, error,
                                                                 message):
    """lengths were cast to int32 as they came: float lengths were truncated (NaN became
    garbage) and a wrong count or shape wrote a file, or failed deep inside the exporter."""
    model = rnnkit.GRU(3, 4).eval()
    path = tmp_path / "model.onnx"
    with pytest.raises((error, ExportError), match=message):
        export_onnx(model, (torch.randn(5, 2, 3),), path, kwargs={"lengths": lengths})
    assert not path.exists()


@pytest.mark.parametrize("lengths, message", [([4, 0, 2], "at least 1, but lengths\\[1\\] = 0"),
                                              ([4, -1, 2], "at least 1, but lengths\\[1\\] = -1"),
                                              ([5, 3, 2], "lengths\\[0\\] = 5 is longer")])
def test_onnx_gru_affine_refuses_lengths_out_of_range(lengths, message):
    """Its eager kernel is its own loop (not a layer, which checks): a length of 0, below 0 or
    past T ran, rows that never ran giving the initial state."""
    arguments = _onnx_gru_arguments()
    del arguments["linear_before_reset"]
    arguments["sequence_lens"] = torch.tensor(lengths, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        torch.ops.rnnkit_onnx.gru_affine(*arguments.values())
