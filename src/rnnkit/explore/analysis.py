"""What the explorer shows for one input: the symbols, every recorded trace and the predictions.

One adapter per task turns the user's input into model inputs, runs the model once under a
:class:`~rnnkit.explore.record.Recorder` and says what the task predicts at each step. The run is
loaded by :func:`load_run` alone (the per-task ``load_model`` today; ``rnnkit.load`` pipelines
can take its place without touching the rest).
"""

from __future__ import annotations

import base64
import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rnnkit.explore.record import GATES, LABELS, Recorder, Trace, record_layer
from rnnkit.layers import RecurrentLayer

MAX_SYMBOLS = 20_000  # the longest input the page accepts (the responsiveness target)
MAX_RECORDED_BYTES = 1 << 30  # one analysis's recorded values; the server keeps two
TOP_K = 5  # next-symbol candidates shown per step
MAX_PREFIXES = 400  # classifiers: prefixes evaluated for the probability-over-time curve
PREFIX_BATCH = 128  # prefixes run side by side


class InputError(ValueError):
    """The user's input cannot be explored; the message is shown as is, inline."""


class Explorer(Protocol):
    """What the server needs of a task's explorer (one class per task below)."""

    task: str
    input_kind: str  # "text"; "wav" (base64 of the file); "example" (the number of one)
    checkpoint: Any

    def default_input(self) -> str:
        """An input from the run's validation data (InputError when there is none to read)."""

    def analyse(self, text: str) -> Analysis:
        """Runs the model on ``text`` under a recorder; InputError for what cannot be read."""


@dataclass
class Analysis:
    """One input as the page sees it. ``traces`` are the recorded layers, in model order."""

    task: str
    symbols: list[str]  # what is shown along time (characters, words, frames)
    traces: list[tuple[str, Trace]]  # (module name, trace)
    predictions: dict[str, Any] = field(default_factory=dict)  # task-specific, JSON-able
    text: str = ""  # the input as the user gave it
    # a module whose steps are not the input's (a decoder's steps are the output symbols)
    axes: dict[str, list[str]] = field(default_factory=dict)

    def trace_info(self) -> list[dict[str, Any]]:
        out = []
        for index, (module, trace) in enumerate(self.traces):
            direction = "reverse" if trace.direction == 1 else "forward"
            if trace.kind == "treelstm":  # steps are the nodes, children before their parent
                direction = "bottom-up"
            out.append({"index": index, "module": module, "layer": trace.layer,
                        "direction": direction, "kind": trace.kind, "steps": trace.steps,
                        "hidden": next(iter(trace.values.values())).shape[1],
                        "name": f"{module} layer {trace.layer} {direction}",
                        "quantities": [{"name": q, "label": LABELS.get(q, q)}
                                       for q in trace.values],
                        "gates": [g for g in GATES[trace.kind] if g in trace.values],
                        "symbols": self.axes.get(module, self.symbols)})
        return out

    def summary(self) -> dict[str, Any]:
        """Everything but the activation values (those are fetched per trace and quantity)."""
        return {"task": self.task, "symbols": self.symbols, "text": self.text,
                "traces": self.trace_info(), "predictions": self.predictions}

    def values(self, trace: int, quantity: str) -> Tensor:
        """(T, H) float32 of one recorded quantity; KeyError/IndexError for an unknown one."""
        return self.traces[trace][1].values[quantity].to(torch.float32).contiguous()

    def embedded(self) -> dict[str, Any]:
        """The summary plus every value as base64 float32 (for the self-contained HTML file)."""
        out = self.summary()
        out["values"] = {f"{i}/{q}": base64.b64encode(self.values(i, q).numpy().tobytes()).decode()
                         for i, (_, trace) in enumerate(self.traces) for q in trace.values}
        return out


def _check_length(count: int, what: str) -> None:
    if count == 0:
        raise InputError(f"the {what} is empty")
    if count > MAX_SYMBOLS:
        raise InputError(f"the {what} has {count:,} symbols; the explorer takes at most "
                         f"{MAX_SYMBOLS:,}")


def _probabilities(logits: Tensor) -> Tensor:
    return torch.softmax(logits.double(), dim=-1)


class LanguageModelExplorer:
    """A language model (characters or words): the next-symbol distribution after each symbol."""

    task = ""
    input_kind = "text"
    model: Any
    checkpoint: Any

    def units(self, text: str) -> tuple[list[int], list[str]]:
        """Model ids and the shown symbols of ``text``; InputError for what cannot be read."""
        raise NotImplementedError

    def vocabulary(self) -> list[str]:
        raise NotImplementedError

    @torch.no_grad()
    def analyse(self, text: str) -> Analysis:
        ids, symbols = self.units(text)
        tokens = torch.tensor(ids).unsqueeze(1)  # (T, 1)
        with Recorder(self.model, only=("rnn",)) as recorder:
            logits, _ = self.model(tokens)
        probs = _probabilities(logits[:, 0])  # (T, V): after symbol t, the next one
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        actual = [float(probs[t, ids[t + 1]]) for t in range(len(ids) - 1)] + [None]
        predictions = {
            "kind": "next_symbol", "vocabulary": self.vocabulary(),
            "top_ids": top.indices.tolist(), "top_probs": top.values.float().tolist(),
            "actual_next": actual}
        return Analysis(self.task, symbols, _traces(recorder), predictions, text)


class CharLMExplorer(LanguageModelExplorer):
    task = "charlm"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.charlm import load_model

        self.model, self.vocab, self.checkpoint = load_model(path)

    @staticmethod
    def symbol_text(unit: str | int) -> str:
        return unit if isinstance(unit, str) else (chr(unit) if unit < 128 else f"\\x{unit:02x}")

    def vocabulary(self) -> list[str]:
        return [self.symbol_text(s) for s in self.vocab.symbols]

    def units(self, text: str) -> tuple[list[int], list[str]]:
        from rnnkit.data.vocab import UnknownSymbolError

        _check_length(len(self.vocab.units(text)), "input text")
        try:
            ids = self.vocab.encode(text, "the input")
        except UnknownSymbolError as error:
            raise InputError(str(error)) from None
        names = self.vocabulary()
        return ids, [names[i] for i in ids]

    def default_input(self) -> str:
        """The start of the run's validation text (a sample of the model when it cannot be read)."""
        from rnnkit.tasks.charlm import DataConfig, load_text, split_text

        try:
            data = DataConfig(**self.checkpoint.meta["task"]["data"])
            _, valid = split_text(load_text(data)[0], data)
            if valid:
                return valid[:1000]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the training files moved: the model's own text still shows its units at work
        from rnnkit.models.language_model import generate

        return generate(self.model, self.vocab, "", 400, 0.7, seed=0)


class WordLMExplorer(LanguageModelExplorer):
    """A word LM: words split at white space, unknown ones read as ``<unk>`` as in training."""

    task = "wordlm"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.wordlm import load_model

        self.model, self.vocab, self.checkpoint = load_model(path)

    def vocabulary(self) -> list[str]:
        return list(self.vocab.tokens)

    def units(self, text: str) -> tuple[list[int], list[str]]:
        words = text.split()
        _check_length(len(words), "input text")
        ids = self.vocab.encode(words)
        return ids, [self.vocab.tokens[i] for i in ids]  # what the model reads (<unk> shown)

    def default_input(self) -> str:
        from rnnkit.tasks.common import shared_path
        from rnnkit.tasks.wordlm import read_words

        try:
            configured = self.checkpoint.meta["task"]["data"].get("valid")
            words, _ = read_words(shared_path("ptb/ptb.valid.txt", configured))
            return " ".join(words[:300])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return " ".join(w for w in self.vocab.tokens[:50] if not w.startswith("<"))


class TaggingExplorer:
    """A tagger: the tag marginals of each token (CRF: forward-backward), the decoded tags and
    the intent distribution."""

    task = "tagging"
    input_kind = "text"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.tagging import load_model

        self.model, self.vocab, self.checkpoint = load_model(path)

    def default_input(self) -> str:
        from rnnkit.tasks.tagging import TaggingDataConfig, read_split

        try:
            data = TaggingDataConfig(**self.checkpoint.meta["task"]["data"])
            read = read_split(data, "valid")
            if read is not None and read[0]:
                return " ".join(read[0][0][0])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the data moved: the most frequent training words still make a sentence
        words = [w for w in self.vocab.words.tokens if not w.startswith("<")]
        return " ".join(words[:8])

    def analyse(self, text: str) -> Analysis:
        from rnnkit.tasks.tagging import Example, _model_args, collate, encode

        tokens = text.split()
        _check_length(len(tokens), "input sentence")
        example: Example = (tokens, ["O"] * len(tokens), None)
        args = _model_args(collate(encode([example], self.vocab), [0]))
        model = self.model
        with torch.no_grad(), Recorder(model, only=("rnn",)) as recorder:
            out = model(args["tokens"], args["lengths"], args["chars"], args["char_lengths"])
        emissions = out.emissions.detach()  # (T, 1, K)
        if model.crf is not None:
            marginals = _crf_marginals(model.crf, emissions, out.mask)
            how = "marginal probability under the CRF (forward-backward)"
            best, _ = model.crf.decode(emissions, out.mask)
            best_tags = best[0]
        else:
            marginals = _probabilities(emissions[:, 0])
            how = "softmax of the token's tag scores"
            best_tags = marginals.argmax(1).tolist()
        tag_names = ["O" if t == "<unk>" else t for t in self.vocab.tags.tokens]
        predictions: dict[str, Any] = {
            "kind": "tags", "tags": tag_names, "probabilities": marginals.float().tolist(),
            "decoded": [tag_names[t] for t in best_tags], "how": how}
        if out.intent_logits is not None and self.vocab.intents is not None:
            predictions["intents"] = list(self.vocab.intents.tokens)
            predictions["intent_probabilities"] = _probabilities(out.intent_logits[0]).tolist()
        return Analysis(self.task, tokens, _traces(recorder), predictions, text)


class ClassifierExplorer:
    """A sequence classifier: the class probabilities of every prefix of the input, i.e. what
    the model would answer had the sequence ended at step t (computed exactly, one prefix per
    step, for up to :data:`MAX_PREFIXES` evenly spaced steps)."""

    task = ""
    model: Any
    labels: list[str]

    def batch(self, count: int, steps: list[int], source: Any) -> dict[str, Any]:
        """Model keyword arguments for ``count`` prefixes of ``source`` of lengths ``steps``."""
        raise NotImplementedError

    def read(self, text: str) -> tuple[Any, list[str]]:
        """The model's view of ``text`` and the shown symbols."""
        raise NotImplementedError

    @torch.no_grad()
    def analyse(self, text: str) -> Analysis:
        source, symbols = self.read(text)
        steps = len(symbols)
        with Recorder(self.model, only=("rnn",)) as recorder:
            logits = self.model(**self.batch(1, [steps], source))
        final = _probabilities(logits[0])
        positions, logits = _prefix_outputs(
            lambda ends: self.model(**self.batch(len(ends), ends, source)), steps)
        predictions = {"kind": "classes", "labels": self.labels, "steps": positions,
                       "probabilities": _probabilities(logits).float().tolist(),
                       "final": final.tolist()}
        return Analysis(self.task, symbols, _traces(recorder), predictions, text)


class SentimentExplorer(ClassifierExplorer):
    task = "sentiment"
    input_kind = "text"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.sentiment import load_model

        self.model, self.encoder, self.labels, self.checkpoint = load_model(path)

    def read(self, text: str) -> tuple[Any, list[str]]:
        tokens = self.encoder.tokens(text)
        _check_length(len(tokens), "input sentence")
        return tokens, tokens

    def batch(self, count: int, steps: list[int], source: Any) -> dict[str, Any]:
        from rnnkit.tasks.sentiment import collate, model_inputs

        encoded = [self.encoder.encode(source[:k]) for k in steps]
        return model_inputs(collate(encoded, [0] * count, self.encoder.words.pad))

    def default_input(self) -> str:
        from rnnkit.tasks.sentiment import SentimentDataConfig, read_split

        try:
            data = SentimentDataConfig(**self.checkpoint.meta["task"]["data"])
            examples, _ = read_split(data, "valid")
            return " ".join(examples[0][0])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return " ".join(w for w in self.encoder.words.tokens[:12] if not w.startswith("<"))


class DigitsExplorer(ClassifierExplorer):
    """Handwritten 8×8 digits read a row (or column) per step; the input is the number of an
    image of the held-out test split."""

    task = "digits"
    input_kind = "example"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.digits import load_model

        self.model, self.data, self.checkpoint = load_model(path)
        self.labels = [str(d) for d in range(self.model.config.classes)]
        self._images: Any = None

    def images(self) -> tuple[Tensor, Tensor, list[int]]:
        if self._images is None:
            from rnnkit.tasks.digits import load_images, split_indices

            images, labels = load_images()
            self._images = images, labels, split_indices(labels, self.data)[2]
        return self._images

    def read(self, text: str) -> tuple[Any, list[str]]:
        from rnnkit.tasks.digits import to_sequence

        images, labels, test = self.images()
        number = _example_number(text, len(test), "test image")
        image = images[test[number]]
        sequence = to_sequence(image.unsqueeze(0), self.data.reader)[:, 0]  # (8, 8)
        what = "row" if self.data.reader == "rows" else "column"
        # each step shown as its 8 pixels in ASCII shades: the symbols draw the digit itself
        symbols = [f"{what} {t}: " + "".join(" .:*#"[min(4, int(v * 5))] for v in step)
                   for t, step in enumerate(sequence)]
        self.last_label = int(labels[test[number]])
        return sequence, symbols

    def batch(self, count: int, steps: list[int], source: Any) -> dict[str, Any]:
        inputs = source.unsqueeze(1).expand(-1, count, -1).contiguous()  # (8, B, 8)
        return {"inputs": inputs, "lengths": torch.tensor(steps)}

    def analyse(self, text: str) -> Analysis:
        analysis = super().analyse(text)
        analysis.predictions["reference"] = str(self.last_label)
        return analysis

    def default_input(self) -> str:
        return "0"


class SpeechExplorer:
    """Spoken digits: the CTC posteriors of every (stacked) frame and the greedy decoding. The
    input is a WAV file at the model's sample rate."""

    task = "speech"
    input_kind = "wav"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.speech import load_model

        self.model, self.extractor, self.checkpoint = load_model(path)

    def default_input(self) -> str:
        """A recording from the run's data folder, as base64 WAV ("" when there is none)."""
        from rnnkit.tasks.speech import SHARED_FSDD, find_recordings

        try:
            configured = self.checkpoint.meta["task"]["data"].get("recordings")
            found = find_recordings(Path(configured) if configured else SHARED_FSDD)
            return base64.b64encode(next(iter(found.values())).read_bytes()).decode()
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
            raise InputError("no recording found in the run's data folder: choose a WAV "
                             "file") from None

    @torch.no_grad()
    def analyse(self, wav: str) -> Analysis:
        import tempfile

        from rnnkit.data.audio import AudioError
        from rnnkit.decoding import greedy_decode
        from rnnkit.tasks.speech import BLANK, labels_to_digits

        try:
            data = base64.b64decode(wav, validate=True)
        except ValueError:
            raise InputError("the WAV must come base64-encoded") from None
        if not data:
            raise InputError("the WAV file is empty")
        with tempfile.NamedTemporaryFile(suffix=".wav") as handle:
            handle.write(data)
            handle.flush()
            try:
                features = self.extractor.from_file(handle.name)
            except AudioError as error:  # the message names the temporary file: say "the file"
                raise InputError(str(error).replace(handle.name, "the uploaded file")) from None
        with Recorder(self.model, only=("encoder",)) as recorder:
            log_probs, lengths = self.model(features.unsqueeze(1), torch.tensor([features.shape[0]]))
        steps = int(lengths[0])
        _check_length(steps, "recording")
        posteriors = log_probs[:steps, 0].double().exp()  # (T', C)
        best = greedy_decode(log_probs[:steps, 0], blank=BLANK)
        hop = self.extractor.hop_length / self.extractor.config.sample_rate * self.model.config.stack
        symbols = [f"{t * hop:.2f}s" for t in range(steps)]
        labels = ["blank", *(str(d) for d in range(self.model.config.classes - 1))]
        predictions = {"kind": "ctc", "labels": labels, "posteriors": posteriors.float().tolist(),
                       "decoded": "".join(str(d) for d in labels_to_digits(best.labels)),
                       "frames": [int(t) for t in best.timesteps]}
        return Analysis(self.task, symbols, _traces(recorder), predictions, "")


class TranslateExplorer:
    """An encoder-decoder: the encoder's steps are the source symbols, the decoder's the output
    symbols it writes (greedy, then replayed teacher-forced exactly as ``attention_map`` does);
    predictions are the attention matrix and the output distribution at each decoder step."""

    task = "translate"
    input_kind = "text"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.translate import load_model

        self.translator, self.checkpoint = load_model(path)
        self.model = self.translator.model

    def default_input(self) -> str:
        from rnnkit.tasks.translate import detokenize, read_pairs

        try:
            _, valid, _ = read_pairs(self.translator.data)
            return detokenize(valid[0][0], self.translator.data.char_level)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return " ".join(w for w in self.translator.source_vocab.tokens[:8]
                            if not w.startswith("<"))

    @torch.no_grad()
    def analyse(self, text: str) -> Analysis:
        translator, model = self.translator, self.model
        symbols = translator.symbols(text)
        _check_length(len(symbols), "source sentence")
        source = torch.tensor(translator.source_vocab.encode(symbols))  # (S,)
        lengths = torch.tensor([source.numel()])
        limit = int(translator.data.max_decode_ratio * source.numel()) + 10
        tokens = model.greedy(source.unsqueeze(1), lengths, max_length=limit).tokens[0]
        target = torch.tensor([*tokens, model.config.eos]).unsqueeze(1)  # (T, 1)
        with Recorder(model, only=("encoder", "decoder")) as recorder:
            logits, weights = model(source.unsqueeze(1), lengths, target)
        probs = _probabilities(logits[:, 0])  # (T, V)
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        vocab = translator.target_vocab
        outputs = [*vocab.decode(tokens, strip_specials=False), vocab.tokens[model.config.eos]]
        read = [translator.source_vocab.tokens[i] for i in source.tolist()]
        predictions = {
            "kind": "attention", "source": read, "output": outputs,
            "vocabulary": list(vocab.tokens), "top_ids": top.indices.tolist(),
            "top_probs": top.values.float().tolist(),
            "attention": None if weights is None else weights[:, 0].float().tolist(),
            "translation": " ".join(outputs[:-1]) if not translator.data.char_level
            else "".join(outputs[:-1])}
        return Analysis(self.task, read, _traces(recorder), predictions, text,
                        axes={"decoder": outputs})


class MusicExplorer:
    """A piano-roll generator: each step is a frame (its sounding notes); predictions are the
    probability of each pitch in the next frame and the frame's NLL. The input is the number of
    a validation sequence."""

    task = "music"
    input_kind = "example"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.music import load_model

        self.model, self.checkpoint = load_model(path)
        self._rolls: list[Tensor] | None = None

    def rolls(self) -> list[Tensor]:
        if self._rolls is None:
            from rnnkit.tasks.common import shared_path
            from rnnkit.tasks.music import load_rolls

            try:
                configured = self.checkpoint.meta["task"]["data"].get("path")
                self._rolls = load_rolls(shared_path("polyphonic/JSB_Chorales.mat", configured))[
                    "valid"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise InputError(f"the run's validation chorales cannot be read: {error}") from None
        return self._rolls

    def default_input(self) -> str:
        return "0"

    @staticmethod
    def note_name(pitch: int) -> str:
        from rnnkit.tasks.midi import LOWEST_NOTE

        midi = pitch + LOWEST_NOTE
        return ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"][midi % 12] + str(
            midi // 12 - 1)

    @torch.no_grad()
    def analyse(self, text: str) -> Analysis:
        from rnnkit.models.generator import frame_nll

        rolls = self.rolls()
        number = _example_number(text, len(rolls), "validation sequence")
        roll = rolls[number]  # (T, P)
        _check_length(roll.shape[0], "sequence")
        with Recorder(self.model, only=("rnn",)) as recorder:
            logits, _ = self.model(roll.unsqueeze(1))
        probs = torch.sigmoid(logits[:, 0].double())  # (T, P): each pitch of frame t + 1
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        nll = [float(frame_nll(logits[t:t + 1], roll[t + 1:t + 2].unsqueeze(1)))
               for t in range(roll.shape[0] - 1)] + [None]
        names = [self.note_name(p) for p in range(roll.shape[1])]
        symbols = [" ".join(names[p] for p in frame.nonzero()[:, 0].tolist()) or "rest"
                   for frame in roll]
        predictions = {"kind": "pitches", "vocabulary": names, "top_ids": top.indices.tolist(),
                       "top_probs": top.values.float().tolist(), "nll": nll}
        return Analysis(self.task, symbols, _traces(recorder), predictions, text)


class AddingExplorer:
    """The adding problem: where the two marked values are, what the model would answer had the
    sequence ended at each step, and the saliency ∂ŷ/∂x_t of its final answer to each step's value
    and marker — a model that has learnt the task depends on the two marked values alone, and its
    hidden state must carry the first one across the rest of the sequence. The input is the number
    of a sequence of the run's generated validation set (the same draw training scored)."""

    task = "adding"
    input_kind = "example"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.adding import load_model

        self.model, self.data, self.checkpoint = load_model(path)
        self._valid: Any = None

    def sequences(self) -> Any:
        if self._valid is None:
            from rnnkit.tasks.adding import generate

            # the task's own validation draw (SyntheticTask.valid): same size, length and seed
            self._valid = generate(self.data.valid_size, self.data.length,
                                   torch.Generator().manual_seed(self.data.valid_seed))
        return self._valid

    def default_input(self) -> str:
        return "0"

    def analyse(self, text: str) -> Analysis:
        valid = self.sequences()
        number = _example_number(text, valid.inputs.shape[1], "validation sequence")
        inputs = valid.inputs[:, number:number + 1].clone()  # (T, 1, 2): value, marker
        steps = inputs.shape[0]
        _check_length(steps, "sequence")
        marks = inputs[:, 0, 1].nonzero()[:, 0].tolist()
        inputs.requires_grad_(True)
        with torch.enable_grad(), Recorder(self.model, only=("rnn",)) as recorder:
            prediction = self.model(inputs)[0, 0]
            (saliency,) = torch.autograd.grad(prediction, inputs)  # (T, 1, 2)
        inputs = inputs.detach()
        features = inputs[:, 0]  # (T, 2)
        positions, prefix = _prefix_outputs(lambda ends: self.model(
            features[:max(ends)].unsqueeze(1).expand(-1, len(ends), -1).contiguous(),
            torch.tensor(ends)), steps)
        marked = inputs[:, 0, 0] * inputs[:, 0, 1]
        seen = marked.double().cumsum(0)  # the sum of the marked values read so far
        symbols = [("▶" if m else "") + f"{float(v):.3f}" for v, m in inputs[:, 0].tolist()]
        carried = None
        if isinstance(self.model.rnn, RecurrentLayer):  # a cell whose math can be replayed
            carried = [_carried(self.model.rnn, features, mark).tolist() for mark in marks]
        predictions = {
            "kind": "adding", "marks": marks, "target": float(valid.targets[0, number]),
            "prediction": float(prediction.detach()), "steps": positions,
            "prefix": prefix[:, 0].double().tolist(), "seen": seen[positions].tolist(),
            "saliency_value": saliency[:, 0, 0].double().tolist(),
            "saliency_marker": saliency[:, 0, 1].double().tolist(), "carried": carried}
        return Analysis(self.task, symbols, _traces(recorder), predictions, text)


def _carried(layer: RecurrentLayer, x: Tensor, step: int, channel: int = 0) -> Tensor:
    """‖∂h_t/∂x[step, channel]‖ of the top layer (both directions) at every step t, (T,): how
    much of that one input the state still holds at t. Exact, in one pass: forward-mode AD
    through the layer's own cell math as :func:`~rnnkit.explore.record.record_layer` replays it
    (the tangent of x is 1 at that input, 0 elsewhere)."""
    import torch.autograd.forward_ad as forward_ad

    tangent = torch.zeros_like(x)
    tangent[step, channel] = 1.0
    with forward_ad.dual_level():
        with warnings.catch_warnings():  # torch's first make_dual scripts its jvp decompositions
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            dual = forward_ad.make_dual(x, tangent)
        traces = record_layer(layer, dual)
        top = [trace for trace in traces if trace.layer == layer.num_layers - 1]
        sensitivity = torch.cat([forward_ad.unpack_dual(t.values["h"]).tangent for t in top], 1)
    return sensitivity.double().norm(dim=1)


class CopyMemoryExplorer:
    """The copy memory problem: the user's 10 digits, T blanks, the delimiter and 10 recall steps.
    Predictions: the output distribution of every step (the recall phase is what matters) and
    the memory matrix — for recall step k, how strongly log p(the k-th digit) depends on the
    input at each of the 10 digit steps (the norm of its gradient there): a model that copies
    reads digit k for recall step k, so the matrix is diagonal."""

    task = "copymemory"
    input_kind = "text"
    BLANK_SYMBOL, DELIMITER_SYMBOL = "_", ":"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.copymemory import load_model

        self.model, self.data, self.checkpoint = load_model(path)

    def vocabulary(self) -> list[str]:
        from rnnkit.tasks.copymemory import BLANK, DELIMITER, SYMBOLS

        names = [str(s) for s in range(SYMBOLS)]
        names[BLANK], names[DELIMITER] = self.BLANK_SYMBOL, self.DELIMITER_SYMBOL
        return names

    def default_input(self) -> str:
        """The digits of the run's first validation sequence."""
        from rnnkit.tasks.copymemory import DIGITS, generate

        # the digits are drawn first, for the whole validation batch: the length does not matter
        batch = generate(self.data.valid_size, 1, torch.Generator().manual_seed(self.data.valid_seed))
        return "".join(str(int(d)) for d in batch.inputs[:DIGITS, 0])

    def analyse(self, text: str) -> Analysis:
        from rnnkit.tasks.copymemory import BLANK, DELIMITER, DIGITS

        digits = "".join(text.split())
        if len(digits) != DIGITS or any(d not in "12345678" for d in digits):
            raise InputError(f"type the {DIGITS} digits to copy, each 1–8 (e.g. 3141526535); "
                             f"got {text.strip()[:40]!r}")
        length = self.data.length
        _check_length(length + 2 * DIGITS, "sequence")
        tokens = torch.full((length + 2 * DIGITS,), BLANK, dtype=torch.long)  # as generate() lays
        tokens[:DIGITS] = torch.tensor([int(d) for d in digits])  # it out
        tokens[length + DIGITS - 1] = DELIMITER
        targets = torch.full_like(tokens, BLANK)
        targets[-DIGITS:] = tokens[:DIGITS]
        with torch.enable_grad(), _InputLeaf(self.model.rnn) as read, \
                Recorder(self.model, only=("rnn",)) as recorder:
            logits, _ = self.model(tokens.unsqueeze(1))  # (T, 1, V)
            log_probs = torch.log_softmax(logits[:, 0].double(), dim=-1)
            memory = []
            for k in range(DIGITS):  # recall step k against the input at the digit steps
                step = len(tokens) - DIGITS + k
                (grad,) = torch.autograd.grad(log_probs[step, targets[step]], read.leaf,
                                              retain_graph=k < DIGITS - 1)
                memory.append(grad[:DIGITS, 0].double().norm(dim=-1))
        held = _held(self.model, tokens, DIGITS, range(1, DELIMITER))
        probs = log_probs.detach().exp()  # (T, V)
        names = self.vocabulary()
        recall = probs[-DIGITS:].argmax(1)
        predictions = {
            "kind": "copy", "vocabulary": names, "probabilities": probs.float().tolist(),
            "targets": [names[t] for t in targets.tolist()],
            "recall_start": len(tokens) - DIGITS, "copied": "".join(names[t] for t in recall),
            "correct": int((recall == targets[-DIGITS:]).sum()),
            "memory": torch.stack(memory).tolist(), "held": held.tolist(),
            "loss": float(-log_probs.detach()[torch.arange(len(tokens)), targets].mean())}
        return Analysis(self.task, [names[t] for t in tokens.tolist()], _traces(recorder),
                        predictions, text)


@torch.no_grad()
def _held(model: Any, tokens: Tensor, count: int, symbols: range) -> Tensor:
    """(count, T): for each of the first ``count`` input steps j, how much the recurrent state
    still depends on what was read there — ‖h_t(x_j changed) − h_t‖ of the layer's output at
    every step t, averaged over every other symbol of ``symbols`` put at j. Per step j one
    batched run of the model holds the sequence and every changed one side by side (the same
    arithmetic for all, and bounded memory on long inputs), in float64: in float32 the
    differences stop at its rounding, ~1e-7, and hide how fast the memory fades."""
    model = copy.deepcopy(model).double()
    outputs: list[Tensor] = []
    handle = model.rnn.register_forward_hook(lambda module, args, result: outputs.append(result[0]))
    others = torch.tensor(list(symbols))
    try:
        held = []
        for j in range(count):
            others_j = others[others != tokens[j]]  # the symbol read there is no change
            batch = tokens.unsqueeze(1).repeat(1, 1 + len(others_j))  # (T, 1 + S): column 0 as is
            batch[j, 1:] = others_j
            model(batch)
            h = outputs.pop()  # (T, 1 + S, D·H)
            held.append((h[:, 1:] - h[:, :1]).norm(dim=2).mean(1))  # (T,)
    finally:
        handle.remove()
    return torch.stack(held)


class TreesExplorer:
    """Sentiment on a parse tree (a Tree-LSTM run of the ``trees`` task). The steps are the tree's
    nodes, children before their parent (the order the states are computed in); every node's h, c
    and gates (i, one forget gate per child, o, candidate u) are recorded by replaying the model's
    own :meth:`~rnnkit.models.tree_lstm.TreeLSTM.node_values` node by node with the trained
    weights. Predictions: each node's class probabilities (the model's output layer on the node's
    h: the sentiment of its phrase) and, for a labelled SST tree, the node's gold label.

    The input is an SST bracketed tree ``(3 (2 It) (4 (4 works) (2 .)))`` or plain words, which
    are read as a right-branching binary tree (there is no parser here: paste a parsed tree to
    see the model on a real parse)."""

    task = "trees"
    input_kind = "text"
    SHOWN_PHRASE = 28  # characters of an inner node's phrase shown along the steps

    def __init__(self, model: Any, data: Any, vocab: Any, checkpoint: Any) -> None:
        self.model, self.data, self.vocab, self.checkpoint = model, data, vocab, checkpoint

    def default_input(self) -> str:
        return _first_dev_tree(self.data, self.vocab)

    def analyse(self, text: str) -> Analysis:
        from rnnkit.tasks.trees import IGNORE, LABEL_SETS

        tree, labelled = _read_tree(text, self.data)
        nodes = list(tree.nodes())  # children before their parent
        _check_length(len(nodes), "tree")
        model, cell = self.model, self.model.tree
        place = {id(node): k for k, node in enumerate(nodes)}
        slots = cell.arity if cell.form == "constituency" else max(
            1, max(len(node.children) for node in nodes))
        if any(len(node.children) > slots for node in nodes):
            raise InputError(f"a node of the tree has more than {slots} children; this "
                             f"Tree-LSTM reads binary trees")
        H = cell.hidden_size
        recorded: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            for node in nodes:
                if node.word is not None:
                    x = model.embedding(torch.tensor([self.vocab.index.get(node.word,
                                                                           self.vocab.unk)]))
                else:  # an inner node reads no word: x = 0, as in the batched forward
                    x = model.embedding.weight.new_zeros(1, cell.input_size)
                child_h = x.new_zeros(1, slots, H)
                child_c = x.new_zeros(1, slots, H)
                present = torch.zeros(1, slots, dtype=torch.bool)
                for slot, child in enumerate(node.children):
                    child_h[0, slot] = recorded["h"][place[id(child)]]
                    child_c[0, slot] = recorded["c"][place[id(child)]]
                    present[0, slot] = True
                values = cell.node_values(x, child_h, child_c, present, node.word is not None)
                for name in ("h", "c", "i"):
                    recorded.setdefault(name, []).append(values[name][0])
                for slot in range(slots):  # a gate of an absent child multiplies nothing: NaN
                    forget = values["f"][0, slot]
                    recorded.setdefault(f"f{slot + 1}", []).append(
                        forget if present[0, slot] else torch.full_like(forget, float("nan")))
                for name in ("o", "u"):
                    recorded.setdefault(name, []).append(values[name][0])
            stacked = {name: torch.stack(rows) for name, rows in recorded.items()}
            probs = _probabilities(model.output(stacked["h"]))  # (N, C): each node's phrase
        labels = LABEL_SETS[self.data.classes]
        phrases: dict[int, list[str]] = {}
        shown, described = [], []
        for node in nodes:
            words = [node.word] if node.word is not None else [
                w for child in node.children for w in phrases[id(child)]]
            phrases[id(node)] = words
            phrase = " ".join(words)
            if node.word is None and len(phrase) > self.SHOWN_PHRASE:
                phrase = phrase[:self.SHOWN_PHRASE - 1] + "…"
            if node.word is not None and node.word not in self.vocab.index:
                phrase = "<unk>"  # what the model reads, as the word LM's page shows it
            shown.append(phrase if node.word is not None else f"⟨{phrase}⟩")
            reference = None
            if labelled:
                reference = "neutral (not scored)" if node.label == IGNORE else labels[node.label]
            described.append({"phrase": " ".join(words), "word": node.word is not None,
                              "children": [place[id(c)] for c in node.children],
                              "reference": reference})
        predictions = {"kind": "tree", "labels": labels, "nodes": described,
                       "root": len(nodes) - 1, "probabilities": probs.float().tolist(),
                       "labelled": labelled,
                       "how": "softmax of the model's output layer on the node's h"}
        trace = Trace(0, 0, "treelstm", {k: stacked[k] for k in ("h", "c", "i", *(
            f"f{slot + 1}" for slot in range(slots)), "o", "u")})
        return Analysis(self.task, shown, [("tree", trace)], predictions, text)


class TreesSequenceExplorer(ClassifierExplorer):
    """A sequence encoder of the ``trees`` task (trained on every phrase): the sentence's words
    read as a sequence, with the class probabilities of every prefix, as for ``sentiment``."""

    task = "trees"
    input_kind = "text"

    def __init__(self, model: Any, data: Any, vocab: Any, checkpoint: Any) -> None:
        from rnnkit.tasks.trees import LABEL_SETS

        self.model, self.data, self.vocab, self.checkpoint = model, data, vocab, checkpoint
        self.labels = LABEL_SETS[data.classes]

    def default_input(self) -> str:
        return _first_dev_tree(self.data, self.vocab)

    def read(self, text: str) -> tuple[Any, list[str]]:
        words = _read_tree(text, self.data)[0].leaves()
        _check_length(len(words), "input sentence")
        return words, words

    def batch(self, count: int, steps: list[int], source: Any) -> dict[str, Any]:
        from rnnkit.tasks.trees import collate, model_inputs

        encoded = [(self.vocab.encode(source[:k]), None) for k in steps]  # as sentence_logits
        return model_inputs(collate(encoded, [0] * count, self.vocab.pad))


def _read_tree(text: str, data: Any) -> tuple[Any, bool]:
    """The tree the user gave, words normalised and labels mapped as in training; plain words
    become a right-branching binary tree. Also: whether the tree came with labels."""
    from rnnkit.data.trees import Tree, parse_tree
    from rnnkit.tasks.trees import relabel

    text = text.strip()
    if text.startswith("("):
        try:
            return relabel(parse_tree(text, "the tree"), data), True
        except ValueError as error:
            raise InputError(f"{error} (give an SST bracketed tree, or plain words)") from None
    words = text.split()
    _check_length(len(words), "input sentence")
    tree = Tree(2, words[-1])  # labels are placeholders (2: neutral), never shown
    for word in reversed(words[:-1]):
        tree = Tree(2, None, (Tree(2, word), tree))
    return relabel(tree, data), False


def _first_dev_tree(data: Any, vocab: Any) -> str:
    """The first tree of the run's dev file, as written there (plain words when it is gone)."""
    from rnnkit.tasks.common import shared_path

    try:
        with shared_path("sst-trees/dev.txt", data.valid).open(encoding="utf-8") as lines:
            line = next((line.strip() for line in lines if line.strip()), "")
        if line:
            return line
    except (OSError, ValueError):
        pass  # the data moved: the most frequent training words still make an input
    return " ".join(w for w in vocab.tokens[:12] if not w.startswith("<"))


def _trees_explorer(path: str | Path) -> Explorer:
    """A Tree-LSTM run gets the tree page; a sequence encoder the classifier page."""
    from rnnkit.models.tree_lstm import TreeClassifier
    from rnnkit.tasks.trees import load_model

    model, data, vocab, checkpoint = load_model(path)
    if isinstance(model, TreeClassifier):
        return TreesExplorer(model, data, vocab, checkpoint)
    return TreesSequenceExplorer(model, data, vocab, checkpoint)


class _InputLeaf:
    """Makes what ``module`` reads a leaf that requires grad, so a gradient can be taken with
    respect to the recurrent layer's input (one-hot or embedded) without restating the model's
    forward: ``with _InputLeaf(model.rnn) as read: model(...)`` — then ``read.leaf``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.leaf: Tensor | None = None

    def __enter__(self) -> _InputLeaf:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            self.leaf = args[0].detach().requires_grad_(True)
            return (self.leaf, *args[1:])
        self.handle = self.module.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _example_number(text: str, count: int, what: str) -> int:
    """The example number the user typed, 0 … count − 1, or an InputError saying what to type."""
    try:
        number = int(text.strip())
    except ValueError:
        raise InputError(f"give the number of a {what}, 0…{count - 1}; got "
                         f"{text.strip()[:40]!r}") from None
    if not 0 <= number < count:
        raise InputError(f"there are {count} {what}s: 0…{count - 1}")
    return number


def _prefix_steps(steps: int) -> list[int]:
    """The last steps of the prefixes shown over time: every step, or :data:`MAX_PREFIXES` evenly
    spaced ones, the first and the last included."""
    count = min(steps, MAX_PREFIXES)
    return sorted({round(k * (steps - 1) / max(1, count - 1)) for k in range(count)})


@torch.no_grad()
def _prefix_outputs(run: Callable[[list[int]], Tensor], steps: int) -> tuple[list[int], Tensor]:
    """What a many-to-one model answers had the input ended at each of :func:`_prefix_steps`:
    those steps and the outputs (P, C). ``run(ends)`` runs the model on the prefixes of the
    given lengths side by side, a bounded number at a time (memory stays small on long inputs)."""
    positions = _prefix_steps(steps)
    out = [run([p + 1 for p in positions[begin:begin + PREFIX_BATCH]])
           for begin in range(0, len(positions), PREFIX_BATCH)]
    return positions, torch.cat(out)


def _crf_marginals(crf: Any, emissions: Tensor, mask: Tensor) -> Tensor:
    """P(tag_t = k | sentence) of a linear-chain CRF: ∂ log Z / ∂ emissions (the forward-backward
    marginals, through the CRF's own tested log-partition)."""
    with torch.enable_grad():
        scores = emissions.double().detach().requires_grad_(True)
        log_z = copy.deepcopy(crf).double().log_partition(scores, mask).sum()  # the model stays
        (grad,) = torch.autograd.grad(log_z, scores)
    return grad[:, 0]  # (T, K)


def _traces(recorder: Recorder) -> list[tuple[str, Trace]]:
    if not recorder.layers:  # a TCN: nothing recurrent to show, say so rather than draw nothing
        raise InputError("this run's model has no recurrent layer to show (a TCN is "
                         "convolutional): rnnkit explore shows recurrent states and gates")
    needed = recorder.bytes_needed()
    if needed > MAX_RECORDED_BYTES:  # a wide, deep model on a long input: refuse, do not swap
        raise InputError(f"recording this input would take {needed / 2**30:.1f} GiB "
                         f"(every unit's values at every step); give a shorter input")
    return [(module, trace) for module, traces in recorder.traces().items() for trace in traces]


# per task: what builds its explorer from a run (a class, or a function choosing one)
EXPLORERS: dict[str, Callable[[str | Path], Explorer]] = {
    "charlm": CharLMExplorer, "wordlm": WordLMExplorer, "tagging": TaggingExplorer,
    "sentiment": SentimentExplorer, "digits": DigitsExplorer, "speech": SpeechExplorer,
    "translate": TranslateExplorer, "music": MusicExplorer, "adding": AddingExplorer,
    "copymemory": CopyMemoryExplorer, "trees": _trees_explorer}


def load_run(path: str | Path) -> Explorer:
    """The explorer of the run at ``path`` (a run directory or checkpoint JSON), by its task."""
    from rnnkit.train.checkpoint import load_checkpoint

    task = load_checkpoint(path).meta["task"]["name"]
    if task not in EXPLORERS:
        raise InputError(f"{path} is a {task!r} run; the explorer knows "
                         f"{', '.join(EXPLORERS)}")
    return EXPLORERS[task](path)


def to_json(data: Any) -> str:
    """Strict JSON (NaN and ±inf, which a trained model can emit, become null)."""
    return json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if data == data and abs(data) != float("inf") else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data
