"""The drop-in promise, tested through other people's programs.

Each test re-creates, in small form, the recurrent part of a well-known public PyTorch program
(pytorch/examples, pytorch/tutorials) — or one idiom such programs rely on — builds it with
``torch.nn``'s recurrent modules, swaps them for rnnkit's with the same weights
(:func:`swapped`), runs both from the same seed and compares every answer: outputs, states,
losses, gradients and the parameters after optimiser steps. No network, no data files.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkit

TORCH_TO_RNNKIT = {nn.RNN: rnnkit.RNN, nn.LSTM: rnnkit.LSTM, nn.GRU: rnnkit.GRU}


def swapped(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every torch.nn RNN/LSTM/GRU replaced by rnnkit's (same
    weights): the client program, unmodified except for the recurrent module's class."""
    model = copy.deepcopy(model)  # (once: shared parameters, e.g. tied weights, stay shared)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in TORCH_TO_RNNKIT:
                setattr(module, name, TORCH_TO_RNNKIT[type(child)].from_torch(child))
    return model


def tensors(value) -> list[Tensor]:
    """Every tensor in a (nested) result, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, PackedSequence):
        return [value.data, value.batch_sizes]
    return [t for item in value for t in tensors(item)]


def assert_same(expected, actual, tol: float = 1e-5) -> None:
    expected, actual = tensors(expected), tensors(actual)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and e.dtype == a.dtype
        torch.testing.assert_close(a, e, atol=tol, rtol=tol, equal_nan=True)


def grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


# --- pytorch/examples word_language_model ----------------------------------------------------

class RNNModel(nn.Module):
    """word_language_model/model.py: encoder, recurrent module, decoder (tied if asked)."""

    def __init__(self, rnn_type: str, ntoken: int, ninp: int, nhid: int, nlayers: int,
                 dropout: float = 0.5, tie_weights: bool = False, proj_size: int = 0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type == "LSTM":
            self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout, proj_size=proj_size)
        elif rnn_type == "GRU":
            self.rnn = nn.GRU(ninp, nhid, nlayers, dropout=dropout)
        else:
            nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
        out = proj_size or nhid
        self.decoder = nn.Linear(out, ntoken)
        if tie_weights:
            assert out == ninp
            self.decoder.weight = self.encoder.weight
        self.rnn_type, self.nhid, self.nlayers, self.proj_size = rnn_type, nhid, nlayers, proj_size
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input: Tensor, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (weight.new_zeros(self.nlayers, bsz, self.proj_size or self.nhid),
                    weight.new_zeros(self.nlayers, bsz, self.nhid))
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def train_word_lm(model: RNNModel, data: Tensor, bptt: int, bsz: int, lr: float = 20.0,
                  clip: float = 0.25) -> list[float]:
    """main.py's train(): truncated BPTT over batchified data, clipping, plain SGD by hand."""
    model.train()
    losses = []
    hidden = model.init_hidden(bsz)
    for i in range(0, data.size(0) - 1, bptt):
        seq_len = min(bptt, len(data) - 1 - i)
        source, targets = data[i:i + seq_len], data[i + 1:i + 1 + seq_len].reshape(-1)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(source, hidden)
        loss = F.nll_loss(output, targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        losses.append(loss.item())
    return losses


def evaluate_word_lm(model: RNNModel, data: Tensor, bptt: int, bsz: int) -> float:
    model.eval()
    total = 0.0
    hidden = model.init_hidden(bsz)
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            seq_len = min(bptt, len(data) - 1 - i)
            output, hidden = model(data[i:i + seq_len], hidden)
            hidden = repackage_hidden(hidden)
            total += seq_len * F.nll_loss(output, data[i + 1:i + 1 + seq_len].reshape(-1)).item()
    return total / (len(data) - 1)


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("tied", [False, True])
def test_word_language_model_trains_and_evaluates_like_torch(rnn_type: str, tied: bool) -> None:
    torch.manual_seed(0)
    ntoken, bsz, bptt = 11, 3, 4
    data = torch.randint(ntoken, (14, bsz))  # batchify'd: (T, B)
    reference = RNNModel(rnn_type, ntoken, 6, 6, 2, dropout=0.3, tie_weights=tied)
    model = swapped(reference)
    assert (model.decoder.weight is model.encoder.weight) == tied
    torch.manual_seed(1)  # the same dropout masks in both: torch's RNG drawn in the same order
    expected = train_word_lm(reference, data, bptt, bsz)
    torch.manual_seed(1)
    actual = train_word_lm(model, data, bptt, bsz)
    assert actual == pytest.approx(expected, rel=1e-4)
    assert_same(list(reference.parameters()), list(model.parameters()), 1e-4)
    assert evaluate_word_lm(model, data, bptt, bsz) == pytest.approx(
        evaluate_word_lm(reference, data, bptt, bsz), rel=1e-5)


def test_word_language_model_tied_with_proj_size() -> None:
    """LSTM(proj_size=P) lets the decoder be tied to a P-wide embedding though H > P."""
    torch.manual_seed(0)
    data = torch.randint(9, (9, 2))
    reference = RNNModel("LSTM", 9, 3, 5, 2, dropout=0.2, tie_weights=True, proj_size=3)
    model = swapped(reference)
    torch.manual_seed(1)
    expected = train_word_lm(reference, data, 4, 2)
    torch.manual_seed(1)
    assert train_word_lm(model, data, 4, 2) == pytest.approx(expected, rel=1e-4)
    assert_same(list(reference.parameters()), list(model.parameters()), 1e-4)


def test_word_language_model_save_load_and_flatten_parameters() -> None:
    """main.py: ``torch.save(model, f)``, ``torch.load(f)``, ``model.rnn.flatten_parameters()``."""
    torch.manual_seed(0)
    reference = RNNModel("LSTM", 7, 4, 5, 2)
    buffer = io.BytesIO()
    torch.save(swapped(reference), buffer)
    buffer.seek(0)
    model = torch.load(buffer, weights_only=False)
    model.rnn.flatten_parameters()
    data = torch.randint(7, (6, 2))
    assert evaluate_word_lm(model, data, 3, 2) == pytest.approx(
        evaluate_word_lm(reference, data, 3, 2), rel=1e-5)


# --- pytorch/examples time_sequence_prediction -------------------------------------------------

class Sequence(nn.Module):
    """train.py's two stacked LSTMCells in float64 with a ``future`` loop that feeds back its
    own prediction. ``torch_cells=False`` uses rnnkit's cells, whose call returns
    ``output, LSTMState(h, c)`` where torch's returns ``(h, c)``: the one line that differs."""

    def __init__(self, torch_cells: bool, hidden: int = 7) -> None:
        super().__init__()
        cell = nn.LSTMCell if torch_cells else rnnkit.LSTMCell
        self.torch_cells, self.hidden = torch_cells, hidden
        self.lstm1 = cell(1, hidden)
        self.lstm2 = cell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def step(self, cell: nn.Module, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        if self.torch_cells:
            return cell(x, (h, c))
        _, (h, c) = cell(x, (h, c))
        return h, c

    def forward(self, input: Tensor, future: int = 0) -> Tensor:
        outputs = []
        zeros = lambda: torch.zeros(input.size(0), self.hidden, dtype=torch.double)  # noqa: E731
        h_t, c_t, h_t2, c_t2 = zeros(), zeros(), zeros(), zeros()
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.step(self.lstm1, input_t, h_t, c_t)
            h_t2, c_t2 = self.step(self.lstm2, h_t, h_t2, c_t2)
            output = self.linear(h_t2)
            outputs += [output]
        for _ in range(future):  # predict the future from its own outputs
            h_t, c_t = self.step(self.lstm1, output, h_t, c_t)
            h_t2, c_t2 = self.step(self.lstm2, h_t, h_t2, c_t2)
            output = self.linear(h_t2)
            outputs += [output]
        return torch.cat(outputs, dim=1)


def test_time_sequence_prediction_float64_lbfgs_like_torch() -> None:
    torch.manual_seed(0)
    wave = torch.sin(torch.arange(12, dtype=torch.double)[None] / 2 + torch.arange(3)[:, None])
    input, target = wave[:, :-1], wave[:, 1:]
    reference = Sequence(torch_cells=True).double()
    model = Sequence(torch_cells=False).double()
    model.load_state_dict(reference.state_dict())
    for seq in (reference, model):
        assert seq.lstm1.weight_ih.dtype == torch.float64
    histories = []
    for seq in (reference, model):
        optimizer = torch.optim.LBFGS(seq.parameters(), lr=0.8)
        history = []

        def closure(seq=seq, optimizer=optimizer, history=history) -> Tensor:
            optimizer.zero_grad()
            loss = F.mse_loss(seq(input), target)
            history.append(loss.item())
            loss.backward()
            return loss

        for _ in range(2):
            optimizer.step(closure)
        with torch.no_grad():
            history.append(seq(input[:1], future=5))
        histories.append(history)
    assert histories[1][:-1] == pytest.approx(histories[0][:-1], rel=1e-9)
    assert_same(histories[0][-1], histories[1][-1], 1e-9)
    assert_same(list(reference.parameters()), list(model.parameters()), 1e-9)


# --- pytorch/examples snli ------------------------------------------------------------------

class Encoder(nn.Module):
    """snli/model.py's Encoder: h0 = c0 one zero tensor; a birnn's last two h_n rows joined."""

    def __init__(self, d_embed: int, d_hidden: int, n_layers: int, birnn: bool) -> None:
        super().__init__()
        self.n_cells = n_layers * (2 if birnn else 1)
        self.d_hidden, self.birnn = d_hidden, birnn
        self.rnn = nn.LSTM(input_size=d_embed, hidden_size=d_hidden, num_layers=n_layers,
                           dropout=0.2, bidirectional=birnn)

    def forward(self, inputs: Tensor) -> Tensor:
        batch_size = inputs.size()[1]
        h0 = c0 = inputs.new_zeros(self.n_cells, batch_size, self.d_hidden)
        _outputs, (ht, _ct) = self.rnn(inputs, (h0, c0))
        if not self.birnn:
            return ht[-1]
        return ht[-2:].transpose(0, 1).contiguous().view(batch_size, -1)


@pytest.mark.parametrize("birnn", [False, True])
def test_snli_encoder_like_torch(birnn: bool) -> None:
    torch.manual_seed(0)
    reference = Encoder(5, 4, 2, birnn)
    model = swapped(reference)
    premise = torch.randn(6, 3, 5)
    for train in (True, False):
        reference.train(train)
        model.train(train)
        torch.manual_seed(2)
        expected = reference(premise)
        expected.pow(2).sum().backward()
        torch.manual_seed(2)
        actual = model(premise)
        actual.pow(2).sum().backward()
        assert actual.shape == (3, 8 if birnn else 4)
        assert_same(expected, actual)
        assert_same(grads(reference), grads(model), 1e-4)


# --- pytorch/tutorials ------------------------------------------------------------------------

class CharRNN(nn.Module):
    """The char-RNN name classifier: nn.RNN over one-hot letters, batch 1, the final hidden."""

    def __init__(self, n_letters: int, hidden: int, n_categories: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(n_letters, hidden)
        self.h2o = nn.Linear(hidden, n_categories)

    def forward(self, line_tensor: Tensor) -> Tensor:
        _rnn_out, hidden = self.rnn(line_tensor)
        return F.log_softmax(self.h2o(hidden[0]), dim=1)


def test_char_rnn_name_classification_like_torch() -> None:
    torch.manual_seed(0)
    reference = CharRNN(8, 6, 3)
    model = swapped(reference)
    line = F.one_hot(torch.tensor([3, 0, 7, 7, 1]), 8).float().unsqueeze(1)  # (T, 1, letters)
    for net in (reference, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.15)
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.nll_loss(net(line), torch.tensor([2]))
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 3)
            optimizer.step()
    assert_same(list(reference.parameters()), list(model.parameters()))
    with torch.no_grad():
        assert_same(reference(line), model(line))


class EncoderRNN(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:
        return self.gru(self.dropout(self.embedding(input)))


class AttnDecoderRNN(nn.Module):
    """The seq2seq translation tutorial's decoder: Bahdanau attention, one GRU step per call,
    teacher forcing when a target is given, else its own greedy prediction."""

    def __init__(self, hidden: int, vocab: int, max_length: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.Wa, self.Ua, self.Va = (nn.Linear(hidden, hidden), nn.Linear(hidden, hidden),
                                     nn.Linear(hidden, 1))
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(0.1)
        self.max_length = max_length

    def forward(self, encoder_outputs: Tensor, encoder_hidden: Tensor,
                target_tensor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch_size = encoder_outputs.size(0)
        decoder_input = torch.zeros(batch_size, 1, dtype=torch.long)  # SOS
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        for i in range(self.max_length):
            decoder_output, decoder_hidden = self.forward_step(decoder_input, decoder_hidden,
                                                               encoder_outputs)
            decoder_outputs.append(decoder_output)
            if target_tensor is not None:
                decoder_input = target_tensor[:, i].unsqueeze(1)  # teacher forcing
            else:
                _, topi = decoder_output.topk(1)
                decoder_input = topi.squeeze(-1).detach()
        return F.log_softmax(torch.cat(decoder_outputs, dim=1), dim=-1), decoder_hidden

    def forward_step(self, input: Tensor, hidden: Tensor, encoder_outputs: Tensor):
        embedded = self.dropout(self.embedding(input))  # (B, 1, H)
        query = hidden.permute(1, 0, 2)  # (B, 1, H): a non-contiguous view of h_n
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(encoder_outputs)))
        weights = F.softmax(scores.squeeze(2).unsqueeze(1), dim=-1)
        context = torch.bmm(weights, encoder_outputs)
        output, hidden = self.gru(torch.cat((embedded, context), dim=2), hidden)
        return self.out(output), hidden


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = EncoderRNN(9, 6)
        self.decoder = AttnDecoderRNN(6, 8, max_length=4)

    def forward(self, source: Tensor, target: Tensor | None = None):
        encoder_outputs, encoder_hidden = self.encoder(source)
        return self.decoder(encoder_outputs, encoder_hidden, target)


def test_seq2seq_translation_tutorial_like_torch() -> None:
    torch.manual_seed(0)
    reference = Seq2Seq()
    model = swapped(reference)
    source, target = torch.randint(9, (3, 5)), torch.randint(8, (3, 4))
    first_grads = []
    for net in (reference, model):
        # (SGD, not the tutorial's Adam: the attention's Va.bias has an exactly zero gradient
        # (softmax ignores a shift), and Adam would blow its rounding noise up to a full step)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        torch.manual_seed(3)
        for step in range(2):
            optimizer.zero_grad()
            output, _ = net(source, target)
            F.nll_loss(output.view(-1, output.size(-1)), target.view(-1)).backward()
            if step == 0:
                first_grads.append(grads(net))
            optimizer.step()
    assert_same(*first_grads)
    assert_same(list(reference.parameters()), list(model.parameters()), 1e-4)
    reference.eval()
    model.eval()
    with torch.no_grad():
        assert_same(reference(source), model(source), 1e-4)  # greedy decoding


class LSTMTagger(nn.Module):
    """"Sequence Models and LSTM Networks": one sentence, ``embeds.view(len(sentence), 1, -1)``."""

    def __init__(self, embedding_dim: int, hidden_dim: int, vocab: int, tags: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim)
        self.hidden2tag = nn.Linear(hidden_dim, tags)

    def forward(self, sentence: Tensor) -> Tensor:
        embeds = self.word_embeddings(sentence)
        lstm_out, _ = self.lstm(embeds.view(len(sentence), 1, -1))
        return F.log_softmax(self.hidden2tag(lstm_out.view(len(sentence), -1)), dim=1)


def test_pos_tagger_tutorial_like_torch() -> None:
    torch.manual_seed(0)
    reference = LSTMTagger(4, 5, 10, 3)
    model = swapped(reference)
    sentence, tags = torch.tensor([1, 4, 2, 9, 0]), torch.tensor([0, 1, 2, 1, 0])
    for net in (reference, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            net.zero_grad()
            F.nll_loss(net(sentence), tags).backward()
            optimizer.step()
    assert_same(list(reference.parameters()), list(model.parameters()))


class BiLSTMFeatures(nn.Module):
    """The BiLSTM-CRF tutorial's emission scores: a random initial state each sentence."""

    def __init__(self, vocab: int, embedding_dim: int, hidden_dim: int, tags: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.word_embeds = nn.Embedding(vocab, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim // 2, num_layers=1, bidirectional=True)
        self.hidden2tag = nn.Linear(hidden_dim, tags)

    def init_hidden(self) -> tuple[Tensor, Tensor]:
        return (torch.randn(2, 1, self.hidden_dim // 2), torch.randn(2, 1, self.hidden_dim // 2))

    def forward(self, sentence: Tensor) -> Tensor:
        self.hidden = self.init_hidden()
        embeds = self.word_embeds(sentence).view(len(sentence), 1, -1)
        lstm_out, self.hidden = self.lstm(embeds, self.hidden)
        return self.hidden2tag(lstm_out.view(len(sentence), self.hidden_dim))


def test_bilstm_crf_tutorial_features_like_torch() -> None:
    torch.manual_seed(0)
    reference = BiLSTMFeatures(10, 5, 4, 3)
    model = swapped(reference)
    sentence = torch.tensor([3, 1, 4, 1, 5, 9])
    results = []
    for net in (reference, model):
        torch.manual_seed(7)  # the same random initial state in both
        feats = net(sentence)
        feats.logsumexp(1).sum().backward()
        results.append([feats, *net.hidden, *grads(net)])
    assert_same(results[0], results[1], 1e-4)


# --- torch.nn.utils.rnn: packed sequences -----------------------------------------------------

@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
def test_packed_input_and_pad_packed_output_like_torch(enforce_sorted: bool, kind) -> None:
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    model = swapped(nn.Sequential(reference))[0]
    lengths = torch.tensor([5, 4, 2]) if enforce_sorted else torch.tensor([2, 5, 4])
    x = torch.randn(3, 5, 3, requires_grad=True)
    h0 = torch.randn(4, 3, 4, requires_grad=True)  # in the batch's own order, as torch.nn takes it
    results = []
    for net in (reference, model):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        hx = (h0, h0 * 2) if kind is nn.LSTM else h0
        output, state = net(packed, hx)
        assert isinstance(output, PackedSequence)
        assert torch.equal(output.batch_sizes, packed.batch_sizes)
        for index in ("sorted_indices", "unsorted_indices"):
            assert (getattr(output, index) is None) == enforce_sorted
        padded, out_lengths = pad_packed_sequence(output, batch_first=True, total_length=6)
        loss = padded.pow(2).sum() + sum(s.sum() for s in tensors(state))
        x.grad = h0.grad = None
        loss.backward()
        results.append([padded, out_lengths, *tensors(state), x.grad, h0.grad, *grads(net)])
    assert_same(results[0], results[1], 1e-4)


# --- idioms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"nonlinearity": "relu"}])
def test_torch_nn_attributes_clients_read(options: dict) -> None:
    for kind in TORCH_TO_RNNKIT:
        if options and kind is not nn.RNN:
            continue
        reference = kind(3, 4, 2, bidirectional=True, **options)
        layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
        assert [(n, p.shape) for n, p in layer.named_parameters()] == [
            (n, p.shape) for n, p in reference.named_parameters()]
        reference.load_state_dict(layer.state_dict())
        layer.load_state_dict(reference.state_dict())
        assert [[w.shape for w in ws] for ws in layer.all_weights] == [
            [w.shape for w in ws] for ws in reference.all_weights]
        assert layer.mode == reference.mode


def test_register_forward_hook_sees_torch_arguments_and_results() -> None:
    reference = nn.LSTM(3, 4)
    layer = rnnkit.LSTM.from_torch(reference)
    seen: list = []
    for net in (reference, layer):
        net.register_forward_hook(lambda m, args, out: seen.append(
            (len(args), [t.shape for t in tensors(out)])))
    x = torch.randn(5, 2, 3)
    for net in (reference, layer):
        net(x)
        with torch.no_grad():
            net(x, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    assert seen[:2] == seen[2:]


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
def test_eval_no_grad_inference_mode_and_training_like_torch(kind) -> None:
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=3, dropout=0.5)
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    x = torch.randn(5, 2, 3)
    for train in (True, False):
        for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            results = []
            for net in (reference, layer):
                net.train(train)
                torch.manual_seed(4)
                with context():
                    results.append(net(x))
            assert_same(*results)


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
def test_state_gradients_retain_graph_and_non_contiguous_inputs(kind) -> None:
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=2, bidirectional=True)
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    x = torch.randn(2, 5, 3).transpose(0, 1)  # (T, B, I), not contiguous
    results = []
    for net in (reference, layer):
        h0 = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1)).transpose(0, 1)
        c0 = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(2))
        h0.requires_grad_()
        c0.requires_grad_()
        xx = x.clone().requires_grad_()
        output, state = net(xx, (h0, c0) if kind is nn.LSTM else h0)
        loss = output.pow(2).sum() + sum(s.pow(3).sum() for s in tensors(state))
        loss.backward(retain_graph=True)
        loss.backward()  # a second pass through the retained graph: gradients double
        results.append([output, *tensors(state), xx.grad, h0.grad, *grads(net)]
                       + ([c0.grad] if kind is nn.LSTM else []))
    assert_same(results[0], results[1], 1e-4)


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
def test_unbatched_empty_batch_and_some_calls_without_state(kind) -> None:
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=2)
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    x = torch.randn(5, 3)
    _, state = reference(x)
    assert_same(reference(x), layer(x))  # unbatched (T, I), h_n (L, H)
    assert_same(reference(x, state), layer(x, state))
    assert_same(reference(x), layer(x))
    empty = torch.randn(5, 0, 3)
    assert_same(reference(empty), layer(empty))


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_propagate_like_torch(kind, value: float) -> None:
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=2, bidirectional=True)
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    x = torch.randn(5, 2, 3)
    x[2, 1, 0] = value
    assert_same(reference(x), layer(x))
    with torch.no_grad():
        assert_same(reference(x), layer(x))


def test_float64_deepcopy_and_double_like_torch() -> None:
    torch.manual_seed(0)
    reference = nn.GRU(3, 4, 2).double()
    layer = copy.deepcopy(rnnkit.GRU.from_torch(nn.GRU(3, 4, 2))).to(torch.float64)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert_same(reference(x), layer(x), 1e-12)


def _prune(module: nn.Module, name: str) -> None:
    prune.l1_unstructured(module, name, amount=0.5)


def _weight_norm(module: nn.Module, name: str) -> None:
    torch.nn.utils.parametrizations.weight_norm(module, name)


def _weight_drop(module: nn.Module, name: str) -> None:
    """AWD-LSTM's WeightDrop: the raw weight is the parameter, the layer's weight a tensor set
    before each call (here once, a fixed DropConnect mask)."""
    raw = module._parameters.pop(name)
    module.register_parameter(name + "_raw", raw)
    mask = torch.rand(raw.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    setattr(module, name, raw * mask)


@pytest.mark.parametrize("reweight", [_prune, _weight_norm, _weight_drop])
@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_ih_l1"])
def test_computed_weights_prune_weight_norm_weight_drop_like_torch(reweight, name: str) -> None:
    """Pruning, weight norm and WeightDrop replace a weight parameter by a tensor computed from
    one; the layer must read that tensor (it raised KeyError), train its source, and not run a
    cached copy of the old weight under no_grad (the lean path's plans)."""
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4, num_layers=2)
    layer = rnnkit.LSTM.from_torch(reference)
    x = torch.randn(5, 2, 3)
    results = []
    for net in (reference, layer):
        with torch.no_grad():
            before = net(x[:, :1])  # (a plan of the plain weights, if any)
        reweight(net, name)
        output = net(x)
        output[0].pow(2).sum().backward()
        with torch.no_grad():
            after = net(x[:, :1])
        results.append([before, output, after, *grads(net)])
    assert_same(results[0], results[1], 1e-4)


def test_torch_jit_script_refusal_names_the_way_out() -> None:
    """Scripting a client model that holds an rnnkit layer: one clear error (TorchScript's own
    was "Unknown type annotation: 'float | None'")."""
    model = nn.Sequential(nn.Linear(3, 3), rnnkit.GRU(3, 4))
    with pytest.raises(RuntimeError, match=r"rnnkit\.GRU cannot be compiled by torch\.jit\.script"
                                           r".*to_torch\(\)"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=r"MinGRU has no torch\.nn counterpart"):
        torch.jit.script(rnnkit.MinGRU(3, 4))


LSTM_MISTAKES = {  # a wrong call -> (the error torch.nn raises, what rnnkit's message says)
    "features": (lambda m: m(torch.randn(5, 2, 4)), RuntimeError, "features"),
    "no steps": (lambda m: m(torch.randn(0, 2, 3)), RuntimeError, "sequence length 0"),
    "state batch": (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4),) * 2), RuntimeError,
                    "must have shape"),
    "batched input, 2-D state": (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 4),) * 2),
                                 RuntimeError, "must have shape"),
    "input dtype": (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64)), ValueError, "dtype"),
    "4-D input": (lambda m: m(torch.randn(1, 5, 2, 3)), ValueError, "3-D"),
}


@pytest.mark.parametrize("mistake", sorted(LSTM_MISTAKES))
def test_wrong_calls_raise_what_torch_raises(mistake: str) -> None:
    """``except RuntimeError`` (or ValueError) written around torch.nn catches rnnkit's error
    too; rnnkit's message still names the problem."""
    call, error, message = LSTM_MISTAKES[mistake]
    reference = nn.LSTM(3, 4)
    with pytest.raises(error):
        call(reference)
    with pytest.raises(error, match=message):
        call(rnnkit.LSTM.from_torch(reference))


@pytest.mark.parametrize(("cell_class", "torch_class"), [(rnnkit.LSTMCell, nn.LSTMCell),
                                                         (rnnkit.GRUCell, nn.GRUCell)])
def test_wrong_cell_calls_raise_what_torch_raises(cell_class, torch_class) -> None:
    cell = cell_class.from_torch(torch_class(3, 4))
    state = (torch.zeros(3, 4),) * (2 if cell_class is rnnkit.LSTMCell else 1)
    for module in (torch_class(3, 4), cell):
        with pytest.raises(RuntimeError):
            module(torch.randn(2, 5))
        with pytest.raises(RuntimeError):
            module(torch.randn(2, 3), state if len(state) == 2 else state[0])


@pytest.mark.parametrize("cell_class", [rnnkit.RNNCell, rnnkit.GRUCell, rnnkit.LSTMCell])
@pytest.mark.parametrize("grad", [True, False])
def test_torch_style_cell_loop_gets_an_error_naming_the_call_convention(cell_class, grad) -> None:
    """rnnkit's cells return ``output, state`` (torch.nn's: h, or (h, c)). A loop written for
    torch.nn (``h = cell(x, h)``; ``h, c = cell(x, (h, c))``) feeds that back as the state:
    one error that names the difference (it was "state.c must be a torch.Tensor, got
    LSTMState" or "expects a state of 1 tensor(s)")."""
    cell = cell_class(3, 4)
    x = torch.randn(2, 3)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="_, \\(h, c\\) = cell"):
        if cell_class is rnnkit.LSTMCell:
            h, c = cell(x, (torch.zeros(2, 4), torch.zeros(2, 4)))
            cell(x, (h, c))
        else:
            h = cell(x, torch.zeros(2, 4))
            cell(x, h)
    _, (h, c) = rnnkit.LSTMCell(3, 4)(x, (torch.zeros(2, 4), torch.zeros(2, 4)))  # the way
    assert h.shape == c.shape == (2, 4)


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU])
def test_double_backward_raises_or_matches_torch(kind) -> None:
    torch.manual_seed(0)
    reference = kind(3, 4).double()
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for net in (reference, layer):
        (grad,) = torch.autograd.grad(net(x)[0].pow(2).sum(), x, create_graph=True)
        try:
            (second,) = torch.autograd.grad(grad.pow(2).sum(), x)
        except RuntimeError:
            return  # a refusal is as good as torch's answer
        results.append(second)
    assert_same(*results, 1e-9)


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_dropout_between_layers_on_packed_input_draws_as_torch(kind, enforce_sorted) -> None:
    """Training with dropout on packed sequences: torch.nn drops the packed data, so the same
    seed must give the same masks and the same answer (rnnkit drew them over the padded
    tensor: other masks, other outputs and gradients)."""
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=3, dropout=0.5, bidirectional=True)
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    lengths = [5, 3, 2] if enforce_sorted else [3, 5, 2]
    x = torch.randn(5, 3, 3)
    results = []
    for net in (reference, layer):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        torch.manual_seed(9)
        output, state = net(packed)
        padded = pad_packed_sequence(output)[0]
        padded.pow(2).sum().backward()
        results.append([padded, *tensors(state), *grads(net)])
    assert_same(results[0], results[1], 1e-4)


# 20 rows with ties: from 17 rows on, torch.sort(descending=True) orders tied lengths otherwise
# than a stable sort (rows 3, 9, 14, 19 all 5 long come out 19, 14, 9, 3)
TIED_LENGTHS = [3, 6, 2, 5, 6, 1, 2, 3, 6, 5, 1, 2, 3, 4, 5, 6, 2, 3, 4, 5]


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("given", ["lengths", "packed", "packed sorted"])
def test_dropout_between_layers_with_tied_lengths_draws_as_torch(kind, given) -> None:
    """Tied lengths: torch.nn runs the rows in the order of ``torch.sort(lengths,
    descending=True)`` (``pack_padded_sequence(enforce_sorted=False)``), which is not stable,
    and draws the dropout between layers over them in that order; rnnkit sorted stably, so tied
    rows got each other's masks (other outputs and gradients under the same seed). ``lengths=``
    stands for packing with ``enforce_sorted=False``; a PackedSequence runs in its own order."""
    torch.manual_seed(0)
    reference = kind(3, 4, num_layers=3, dropout=0.5, bidirectional=True)
    layer = TORCH_TO_RNNKIT[kind].from_torch(reference)
    lengths = sorted(TIED_LENGTHS, reverse=True) if given == "packed sorted" else TIED_LENGTHS
    x = torch.randn(6, len(lengths), 3)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=given == "packed sorted")
    results = []
    for net in (reference, layer):
        torch.manual_seed(9)
        if net is layer and given == "lengths":
            padded, state = net(x, lengths=torch.tensor(lengths))
        else:
            output, state = net(packed)
            padded = pad_packed_sequence(output)[0]
        padded.pow(2).sum().backward()
        results.append([padded, *tensors(state), *grads(net)])
    assert_same(results[0], results[1], 1e-4)


def test_constructors_take_torch_nn_positional_arguments() -> None:
    """``nn.LSTM(I, H, L, bias, batch_first, dropout, bidirectional, proj_size)`` positionally:
    the eighth argument was rnnkit's ``peephole`` (a silent peephole LSTM without projection);
    rnnkit's own options are keyword-only after torch's."""
    args = (3, 4, 2, False, True, 0.0, True, 2)
    reference = nn.LSTM(*args)
    layer = rnnkit.LSTM(*args)
    assert not layer.peephole
    assert [(n, p.shape) for n, p in layer.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()]
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 3)
    assert_same(reference(x), layer(x))
    assert rnnkit.LSTM(3, 4, 1, True, False, 0.0, False, 0, "cpu", torch.float64).weight_hh_l0.dtype \
        == torch.float64
    with pytest.raises(TypeError):
        rnnkit.LSTM(3, 4, 1, True, False, 0.0, False, 0, None, None, True)  # peephole: keyword


@pytest.mark.parametrize(("kind", "args", "rnnkit_option"), [
    (nn.GRU, (3, 4, 2, False, True, 0.0, True), "before"),  # reset
    (nn.RNN, (3, 4, 2, "relu", False, True, 0.0, True), "reference"),  # backend
])
def test_gru_and_rnn_take_torch_nn_positional_arguments(kind, args, rnnkit_option) -> None:
    """``nn.GRU(I, H, L, bias, batch_first, dropout, bidirectional, device, dtype)`` (RNN:
    ``nonlinearity`` after L), torch's documented order: a positional device was rnnkit's
    ``reset`` (GRU) or ``backend`` (RNN); rnnkit's own options are keyword-only after torch's.
    (torch 2.x itself reads an eighth positional argument of GRU/RNN as its internal
    ``proj_size``, so the reference takes device and dtype by keyword.)"""
    reference = kind(*args, device="cpu", dtype=torch.float64)
    layer = TORCH_TO_RNNKIT[kind](*args, "cpu", torch.float64)
    assert [(n, p.shape, p.dtype) for n, p in layer.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in reference.named_parameters()]
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_same(reference(x), layer(x), 1e-9)
    with pytest.raises(TypeError):
        TORCH_TO_RNNKIT[kind](*args, None, None, rnnkit_option)


@pytest.mark.parametrize(("cell_class", "torch_class"), [(rnnkit.LSTMCell, nn.LSTMCell),
                                                         (rnnkit.GRUCell, nn.GRUCell)])
def test_cells_take_torch_nn_positional_arguments(cell_class, torch_class) -> None:
    """``nn.LSTMCell(I, H, bias, device, dtype)``: a positional device was rnnkit's
    ``peephole`` (LSTMCell: silently a peephole cell) or ``reset`` (GRUCell)."""
    reference = torch_class(3, 4, True, "cpu", torch.float64)
    cell = cell_class(3, 4, True, "cpu", torch.float64)
    assert [(n, p.shape, p.dtype) for n, p in cell.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in reference.named_parameters()]


def test_quantize_dynamic_leaves_rnnkit_layers_alone_and_converts_through_to_torch() -> None:
    """rnnkit layers are not torch.nn.LSTM instances (torch.compile refuses those), so
    ``quantize_dynamic(model, {nn.LSTM})`` leaves them as they are — a peephole LSTM is never
    silently made a quantized plain LSTM; ``to_torch()`` first quantizes a standard one."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3)
    for layer in (rnnkit.LSTM(3, 8, num_layers=2), rnnkit.LSTM(3, 8, peephole=True)):
        model = nn.Sequential(layer).eval()
        with torch.no_grad():
            want = layer(x)[0]
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM})
            assert type(quantized[0]) is rnnkit.LSTM
            torch.testing.assert_close(quantized[0](x)[0], want, rtol=0, atol=0)
    model = nn.Sequential(rnnkit.LSTM(3, 8, num_layers=2).to_torch()).eval()
    with torch.no_grad():
        want = model[0](x)[0]
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM})
        assert type(quantized[0]) is torch.ao.nn.quantized.dynamic.LSTM
        torch.testing.assert_close(quantized[0](x)[0], want, rtol=0, atol=0.05)


def test_an_old_positional_reset_or_backend_is_named_not_taken_for_a_device():
    """GRU's 8th and RNN's 9th positional arguments were rnnkit's reset and backend before they
    took torch.nn's order (device): such a call says so rather than failing on the device."""
    with pytest.raises(TypeError, match="reset is keyword-only"):
        rnnkit.GRU(3, 4, 1, True, False, 0.0, False, "before")
    with pytest.raises(TypeError, match="backend is keyword-only"):
        rnnkit.RNN(3, 4, 1, "tanh", True, False, 0.0, False, "bptt")
