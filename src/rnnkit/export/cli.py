"""``rnnkit export RUN model.onnx``: a trained run as an ONNX file, checked by onnxruntime.

The run is loaded through its task's own ``load_model``; example inputs of the shapes the task's
model takes (token ids, lengths, feature frames) are made here only to trace the graph — batch
and time stay dynamic in the file. A translate run is written as its encoder and one decoder step
(:class:`TranslateStep`): the search around them has no ONNX form.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.export.onnx import (
    TREE_ENCODER,
    ExportError,
    dataclasses_as_dicts,
    export_onnx,
    require_exporter,
)

# Example sizes: time and batch of at least 2 keep those axes dynamic (see export_onnx).
STEPS, BATCH, WORD = 6, 2, 4
# the file is checked at other sizes than it was traced with: a fixed axis would fail there
CHECK_STEPS, CHECK_BATCH = 9, 3
# onnxruntime against rnnkit on the check inputs (float32, a few layers deep): |got - want| <=
# TOLERANCE + RELATIVE |want| per element, as torch.testing.assert_close reads it (a language
# model's logits of 20-30 differ by more than 1e-4 in float32 through a few layers)
TOLERANCE, RELATIVE = 1e-4, 1e-5


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write a trained run as an ONNX model (checked by onnxruntime)",
        description="Write the model of a run directory as an ONNX file whose recurrent layers "
                    "are ONNX LSTM/GRU/RNN nodes, then run it with onnxruntime (if installed) "
                    "and compare with rnnkit. Batch and time are dynamic axes.")
    export.add_argument("checkpoint", help="run directory or its checkpoint.json")
    export.add_argument("output", help="the .onnx file to write")


def example_inputs(model: nn.Module, steps: int = STEPS, batch: int = BATCH
                   ) -> tuple[Tensor, ...]:
    """Inputs of the right kinds for ``model.forward`` (the task's models only): ``batch``
    sequences of ``steps`` steps, the first full length and the others shorter."""
    from rnnkit.models.acoustic import AcousticModel
    from rnnkit.models.classifier import SequenceClassifier
    from rnnkit.models.generator import FrameGenerator
    from rnnkit.models.language_model import LanguageModel
    from rnnkit.models.seq2seq import Seq2Seq
    from rnnkit.models.tagger import Tagger
    from rnnkit.models.tree_lstm import TreeClassifier

    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([steps] + [max(1, steps - 2 - i) for i in range(batch - 1)])

    def tokens(vocab: int) -> Tensor:
        return torch.randint(1, vocab, (steps, batch), generator=gen)

    def chars(config: Any) -> tuple[Tensor, ...]:
        if not config.chars:
            return ()
        return (torch.randint(1, config.chars, (steps, batch, WORD), generator=gen),
                torch.full((steps, batch), WORD))

    if isinstance(model, LanguageModel):
        return (tokens(model.config.vocab_size),)
    if isinstance(model, Tagger):
        return (tokens(model.config.vocab_size), lengths, *chars(model.config))
    if isinstance(model, SequenceClassifier):
        config = model.config
        if not config.embedding:  # feature frames, e.g. the digits' image rows
            return (torch.rand(steps, batch, config.input_size, generator=gen),)
        return (tokens(config.vocab_size), lengths, *chars(config))
    if isinstance(model, AcousticModel):
        frames = steps * model.config.stack
        features = torch.randn(frames, batch, model.config.features, generator=gen)
        return features, lengths * model.config.stack
    if isinstance(model, FrameGenerator):
        return ((torch.rand(steps, batch, model.config.pitches, generator=gen) > 0.8).float(),)
    if isinstance(model, TranslateStep):  # (a translate model is written as its step: the
        model = model.model  # inputs are the same; exportable() is where it is wrapped)
    if isinstance(model, Seq2Seq):
        bos = torch.full((batch,), model.config.bos)
        return tokens(model.config.source_vocab), lengths, bos
    if isinstance(model, TreeClassifier):
        raise ExportError(f"{TREE_ENCODER} has no ONNX form: a trees run with a Tree-LSTM "
                          "encoder cannot be exported (its sequence encoders can)")
    raise ExportError(f"no example inputs known for a {type(model).__name__}")


class TranslateStep(nn.Module):
    """What of a translate model has an ONNX form: the encoder and one decoder step, as one graph.

    ``(source (S, B), source_lengths (B,), tokens (B,))`` → logits (B, V) of the next token
    after ``tokens`` (``<s>``: the first), the decoder's new state (L, B, H) — h, and c for an
    LSTM — and, with attention, its weights over the source (B, S). The search around it (greedy,
    beam) has no ONNX form and stays outside the file.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, source: Tensor, source_lengths: Tensor, tokens: Tensor
                ) -> tuple[Tensor, ...]:
        logits, weights, state = self.model.step(tokens, self.model.encode(source, source_lengths))
        return (logits, *state.hidden, *(() if weights is None else (weights,)))


def exportable(model: nn.Module) -> nn.Module:
    """The part of a task's model that is written: the model itself, or a translate model's
    :class:`TranslateStep`."""
    from rnnkit.models.seq2seq import Seq2Seq

    return TranslateStep(model).eval() if isinstance(model, Seq2Seq) else model


def load_run(path: str) -> tuple[str, nn.Module]:
    """The task name and the trained model of a run, through the task's own loader."""
    from rnnkit.tasks import task_module
    from rnnkit.train.checkpoint import load_checkpoint

    name = load_checkpoint(path).meta.get("task", {}).get("name")
    if not isinstance(name, str):
        raise ExportError(f"{path}: the checkpoint does not say which task it belongs to")
    model = task_module(name).load_model(path)[0]
    return name, model.eval()


def _check_with_onnxruntime(path: Path, model: nn.Module, inputs: tuple[Tensor, ...]) -> str:
    """onnxruntime's largest difference from rnnkit on ``inputs`` (other batch and time sizes
    than the export's), as a sentence; ExportError if they disagree (the file is removed)."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed: not checked"
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # the graph's inputs are the forward's tensor arguments, in order (export_onnx)
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    except Exception as error:  # onnxruntime raises its own exception types
        path.unlink(missing_ok=True)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"onnxruntime cannot run the exported file at batch {inputs[0].shape[1]}"
                          f", {inputs[0].shape[0]} steps ({first}); {path} removed") from None
    with torch.no_grad():
        # (outputs as the exporter flattens them: a dataclass such as TaggerOutput by its fields)
        outputs = dataclasses_as_dicts(model(*inputs))
        want = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, Tensor)]
    # (as float64: a bool output such as the tagger's mask has no subtraction)
    pairs = [(g.astype("float64"), w.double().numpy()) for g, w in zip(got, want) if w.numel()]
    worst = max([float(abs(g - w).max()) for g, w in pairs], default=0.0)
    # (not <=: a NaN difference fails too)
    agree = all(bool((abs(g - w) <= TOLERANCE + RELATIVE * abs(w)).all()) for g, w in pairs)
    if len(got) != len(want) or not agree:
        path.unlink(missing_ok=True)
        raise ExportError(f"onnxruntime disagrees with rnnkit on the exported file ({len(got)} "
                          f"outputs, {len(want)} expected; largest difference {worst:.1e}); "
                          f"{path} removed")
    return (f"onnxruntime agrees with rnnkit within {worst:.1e} on {len(got)} outputs "
            f"(batch {inputs[0].shape[1]}, {inputs[0].shape[0]} steps)")


def run(args: argparse.Namespace) -> int:
    require_exporter()
    import onnx

    task, model = load_run(args.checkpoint)
    model = exportable(model)
    inputs = example_inputs(model)
    path = export_onnx(model, inputs, args.output)
    graph = onnx.load(str(path)).graph
    recurrent = [n.op_type for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    print(f"{path}: {task} model, inputs {', '.join(i.name for i in graph.input)}; "
          f"{len(recurrent)} recurrent node(s) {' '.join(recurrent)}")
    print(_check_with_onnxruntime(path, model, example_inputs(model, CHECK_STEPS, CHECK_BATCH)))
    return 0
