"""``rnnkit export RUN model.onnx``: a trained run as an ONNX file, checked by onnxruntime.

The run is loaded through its task's own ``load_model``; example inputs of the shapes the task's
model takes (token ids, lengths, feature frames) are made here only to trace the graph — batch
and time stay dynamic in the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.export.onnx import ExportError, export_onnx, require_exporter

# Example sizes: time and batch of at least 2 keep those axes dynamic (see export_onnx).
STEPS, BATCH, WORD = 6, 2, 4


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write a trained run as an ONNX model (checked by onnxruntime)",
        description="Write the model of a run directory as an ONNX file whose recurrent layers "
                    "are ONNX LSTM/GRU/RNN nodes, then run it with onnxruntime (if installed) "
                    "and compare with rnnkit. Batch and time are dynamic axes.")
    export.add_argument("checkpoint", help="run directory or its checkpoint.json")
    export.add_argument("output", help="the .onnx file to write")


def example_inputs(model: nn.Module) -> tuple[Tensor, ...]:
    """Inputs of the right kinds for ``model.forward`` (the task's models only)."""
    from rnnkit.models.acoustic import AcousticModel
    from rnnkit.models.classifier import SequenceClassifier
    from rnnkit.models.generator import FrameGenerator
    from rnnkit.models.language_model import LanguageModel
    from rnnkit.models.seq2seq import Seq2Seq
    from rnnkit.models.tagger import Tagger

    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([STEPS, STEPS - 2])

    def tokens(vocab: int) -> Tensor:
        return torch.randint(1, vocab, (STEPS, BATCH), generator=gen)

    def chars(config: Any) -> tuple[Tensor, ...]:
        if not config.chars:
            return ()
        return (torch.randint(1, config.chars, (STEPS, BATCH, WORD), generator=gen),
                torch.full((STEPS, BATCH), WORD))

    if isinstance(model, LanguageModel):
        return (tokens(model.config.vocab_size),)
    if isinstance(model, Tagger):
        return (tokens(model.config.vocab_size), lengths, *chars(model.config))
    if isinstance(model, SequenceClassifier):
        config = model.config
        if not config.embedding:  # feature frames, e.g. the digits' image rows
            return (torch.rand(STEPS, BATCH, config.input_size, generator=gen),)
        return (tokens(config.vocab_size), lengths, *chars(config))
    if isinstance(model, AcousticModel):
        steps = STEPS * model.config.stack
        features = torch.randn(steps, BATCH, model.config.features, generator=gen)
        return features, torch.tensor([steps, steps - model.config.stack])
    if isinstance(model, FrameGenerator):
        return ((torch.rand(STEPS, BATCH, model.config.pitches, generator=gen) > 0.8).float(),)
    if isinstance(model, Seq2Seq):
        raise ExportError("a translate run decodes with greedy or beam search, which has no ONNX "
                          "form; export its encoder and one decoder step from Python with "
                          "rnnkit.export_onnx")
    raise ExportError(f"no example inputs known for a {type(model).__name__}")


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
    """onnxruntime's largest difference from rnnkit on the example inputs, as a sentence."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed: not checked"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(model(*inputs)) if isinstance(t, Tensor)]
    worst = max(float(abs(g - w.numpy()).max()) for g, w in zip(got, want) if w.numel())
    return f"onnxruntime agrees with rnnkit within {worst:.1e} on {len(got)} outputs"


def run(args: argparse.Namespace) -> int:
    require_exporter()
    import onnx

    task, model = load_run(args.checkpoint)
    inputs = example_inputs(model)
    path = export_onnx(model, inputs, args.output)
    graph = onnx.load(str(path)).graph
    recurrent = [n.op_type for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    print(f"{path}: {task} model, inputs {', '.join(i.name for i in graph.input)}; "
          f"{len(recurrent)} recurrent node(s) {' '.join(recurrent)}")
    print(_check_with_onnxruntime(path, model, inputs))
    return 0
