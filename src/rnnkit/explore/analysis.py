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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnnkit.explore.record import GATES, LABELS, Recorder, Trace

MAX_SYMBOLS = 20_000  # the longest input the page accepts (the responsiveness target)
TOP_K = 5  # next-symbol candidates shown per step


class InputError(ValueError):
    """The user's input cannot be explored; the message is shown as is, inline."""


@dataclass
class Analysis:
    """One input as the page sees it. ``traces`` are the recorded layers, in model order."""

    task: str
    symbols: list[str]  # what is shown along time (characters, words, frames)
    traces: list[tuple[str, Trace]]  # (module name, trace)
    predictions: dict[str, Any] = field(default_factory=dict)  # task-specific, JSON-able
    text: str = ""  # the input as the user gave it

    def trace_info(self) -> list[dict[str, Any]]:
        out = []
        for index, (module, trace) in enumerate(self.traces):
            direction = "reverse" if trace.direction == 1 else "forward"
            out.append({"index": index, "module": module, "layer": trace.layer,
                        "direction": direction, "kind": trace.kind, "steps": trace.steps,
                        "hidden": next(iter(trace.values.values())).shape[1],
                        "name": f"{module} layer {trace.layer} {direction}",
                        "quantities": [{"name": q, "label": LABELS[q]} for q in trace.values],
                        "gates": list(GATES[trace.kind])})
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


class CharLMExplorer:
    """A character LM: the next-symbol distribution after each symbol."""

    task = "charlm"
    input_kind = "text"

    def __init__(self, path: str | Path) -> None:
        from rnnkit.tasks.charlm import load_model

        self.model, self.vocab, self.checkpoint = load_model(path)

    def symbol_text(self, unit: str | int) -> str:
        return unit if isinstance(unit, str) else (chr(unit) if unit < 128 else f"\\x{unit:02x}")

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

    @torch.no_grad()
    def analyse(self, text: str) -> Analysis:
        from rnnkit.data.vocab import UnknownSymbolError

        _check_length(len(self.vocab.units(text)), "input text")
        try:
            ids = self.vocab.encode(text, "the input")
        except UnknownSymbolError as error:
            raise InputError(str(error)) from None
        tokens = torch.tensor(ids).unsqueeze(1)  # (T, 1)
        with Recorder(self.model, only=("rnn",)) as recorder:
            logits, _ = self.model(tokens)
        probs = _probabilities(logits[:, 0])  # (T, V): after symbol t, the next one
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        symbols = [self.symbol_text(s) for s in self.vocab.symbols]
        actual = [float(probs[t, ids[t + 1]]) for t in range(len(ids) - 1)] + [None]
        predictions = {
            "kind": "next_symbol", "vocabulary": symbols,
            "top_ids": top.indices.tolist(), "top_probs": top.values.float().tolist(),
            "actual_next": actual}
        return Analysis(self.task, [symbols[i] for i in ids], _traces(recorder), predictions, text)


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


def _crf_marginals(crf: Any, emissions: Tensor, mask: Tensor) -> Tensor:
    """P(tag_t = k | sentence) of a linear-chain CRF: ∂ log Z / ∂ emissions (the forward-backward
    marginals, through the CRF's own tested log-partition)."""
    with torch.enable_grad():
        scores = emissions.double().detach().requires_grad_(True)
        log_z = copy.deepcopy(crf).double().log_partition(scores, mask).sum()  # the model stays
        (grad,) = torch.autograd.grad(log_z, scores)
    return grad[:, 0]  # (T, K)


def _traces(recorder: Recorder) -> list[tuple[str, Trace]]:
    return [(module, trace) for module, traces in recorder.traces().items() for trace in traces]


EXPLORERS: dict[str, type] = {"charlm": CharLMExplorer, "tagging": TaggingExplorer}


def load_run(path: str | Path) -> Any:
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
