"""Reproduces the task results in docs/results.md: train on the real data, report the metric.

    python benchmarks/tasks.py --task speech                 # FSDD digit strings, 20 minutes
    python benchmarks/tasks.py --task speech --minutes 2     # a quick look

Each task trains with its default configuration under a wall-clock budget, evaluates on the
held-out split, prints one markdown table row and writes its pictures into docs/.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rnnkit.train import TrainConfig, Trainer, load_checkpoint
from rnnkit.train.rng import seed_everything

DOCS = Path(__file__).resolve().parents[1] / "docs"
CONLL2003 = DOCS.parent / "examples" / "tagging-conll2003.yaml"


def speech(minutes: float, out: Path) -> str:
    from rnnkit.metrics.scoring import error_rate
    from rnnkit.tasks import speech as task_module

    config = task_module.default_config()
    config["train"].update(minutes=minutes, steps=1_000_000)
    train_config = TrainConfig.from_dict(config["train"])
    seed_everything(train_config.seed)
    task, model, source = task_module.build(config)
    print(f"data: {source}; {task.counts}; {len(task.valid)} held-out utterances")
    start = time.perf_counter()
    result = Trainer(model, task, train_config, out).fit()
    elapsed = (time.perf_counter() - start) / 60
    references, greedy, _ = task.predictions(model)
    _, beam, _ = task.predictions(model, beam_width=8)
    rows = []
    for name, hypotheses in (("greedy", greedy), ("beam 8", beam)):
        exact = sum(r == h for r, h in zip(references, hypotheses))
        der = error_rate(references, hypotheses)
        rows.append(f"{name}: digit error rate {100 * der:.2f}%, sequence accuracy "
                    f"{100 * exact / len(references):.1f}%")
    counts = task_module.confusion_counts(references, greedy)
    png = DOCS / "speech-confusion.png"
    task_module.plot_confusion(counts, png, "FSDD digit strings, held-out takes 0-4 (greedy)")
    print(f"steps {result.step}, {elapsed:.1f} min; " + "; ".join(rows))
    print(f"confusion matrix: {png}; curves: {result.plot}")
    recurrent = config["model"]["recurrent"]
    return (f"| speech (FSDD digit strings, 1–5 digits) | BiLSTM {recurrent['layers']}×"
            f"{recurrent['hidden']} + CTC | {rows[0]}; {rows[1]} | {elapsed:.1f} min "
            f"({result.step} steps) | `python benchmarks/tasks.py --task speech "
            f"--minutes {minutes:g}` |")


def _train(task_module: Any, minutes: float, out: Path, settings: dict[str, Any] | None = None,
           **train: Any) -> tuple[Any, Any, Any, float]:
    """Builds a task with its default config (updated by ``settings``, as ``--set`` would) and
    trains it under the time budget."""
    from rnnkit.tasks import merge_config

    config = task_module.default_config()
    if settings:
        config = merge_config(config, settings, "benchmark settings", task_module.NAME)
    config["train"].update(minutes=minutes, **train)
    train_config = TrainConfig.from_dict(config["train"])
    seed_everything(train_config.seed)
    task, model, source = task_module.build(config)
    print(f"data: {source}")
    start = time.perf_counter()
    result = Trainer(model, task, train_config, out).fit()
    return task, model, result, (time.perf_counter() - start) / 60


def _recurrent(config: dict[str, Any]) -> str:
    kind = "Bi" if config["bidirectional"] else ""
    return f"{kind}{config['cell'].upper()} {config['layers']}×{config['hidden']}"


def digits(minutes: float, out: Path) -> str:
    from rnnkit.tasks import digits as task_module
    from rnnkit.tasks.common import plot_confusion

    task, model, result, elapsed = _train(task_module, minutes, out)
    references, predictions, _ = task.predictions(model, "test")
    accuracy = task_module.accuracy(references, predictions)
    png = plot_confusion(task_module.confusion_on_test(task, model), [str(d) for d in range(10)],
                         DOCS / "digits-confusion.png",
                         f"8×8 digits read row by row: test accuracy {100 * accuracy:.1f}%")
    print(f"steps {result.step}, {elapsed:.1f} min; test accuracy {100 * accuracy:.2f}% "
          f"({len(references)} images); confusion: {png}; curves: {result.plot}")
    return (f"| digits (scikit-learn 8×8, one row per step) | {_recurrent(model.config.recurrent.to_dict())}"
            f", mean pooling | test accuracy {100 * accuracy:.2f}% | {elapsed:.1f} min "
            f"({result.step} steps) | `python benchmarks/tasks.py --task digits --minutes {minutes:g}` |")


SENTIMENT_SEEDS = (1234, 1235, 1236)  # the default seed first: its model is the single-model row


def sentiment(minutes: float, out: Path) -> str:
    """One model per seed (each with the budget / seeds); the first alone, then all as an ensemble."""
    from rnnkit.tasks import sentiment as task_module
    from rnnkit.tasks.common import plot_confusion

    models, rows, total, steps = [], [], 0.0, 0
    for seed in SENTIMENT_SEEDS:
        task, model, result, elapsed = _train(task_module, minutes / len(SENTIMENT_SEEDS),
                                              out / f"seed-{seed}", seed=seed)
        best = out / f"seed-{seed}" / "best.json"  # the weights validation (held-out training
        if best.is_file():                          # sentences) chose
            model.load_state_dict(load_checkpoint(best).group("model"))
        models.append(model)
        total, steps = total + elapsed, steps + result.step
        references, predictions, _ = task.predictions(model)
        accuracy = task_module.classification_metrics(references, predictions, task.labels)["accuracy"]
        rows.append(f"seed {seed}: {100 * accuracy:.2f}%")
        print(f"seed {seed}: steps {result.step}, {elapsed:.1f} min, dev accuracy {100 * accuracy:.2f}%; "
              f"curves: {result.plot}", flush=True)
    names = [task_module.LABEL_NAMES.get(label, label) for label in task.labels]
    results = {}
    for what, chosen in (("single", models[0]), ("ensemble", models)):
        references, predictions, _ = task.predictions(chosen)
        results[what] = task_module.classification_metrics(references, predictions, task.labels)
    single, ensemble = results["single"], results["ensemble"]
    f1 = ", ".join(f"F1 {name} {single['f1_' + name]:.3f}" for name in names)
    png = plot_confusion(task_module.confusion(task, models[0]), names, DOCS / "sentiment-confusion.png",
                         f"SST-2 dev, one model: accuracy {100 * single['accuracy']:.1f}%")
    print(f"dev accuracy: {'; '.join(rows)}; ensemble of {len(models)}: "
          f"{100 * ensemble['accuracy']:.2f}%; confusion: {png}")
    config = models[0].config
    return (f"| sentiment (SST-2, dev) | {_recurrent(config.recurrent.to_dict())}, {config.pooling} "
            f"pooling, embeddings {config.embedding} from scratch | accuracy "
            f"{100 * single['accuracy']:.2f}% (seed {SENTIMENT_SEEDS[0]}; {f1}); other seeds "
            f"{', '.join(rows[1:])}; ensemble of {len(models)} {100 * ensemble['accuracy']:.2f}% | "
            f"{total:.1f} min ({steps} steps, {len(models)} models) | `python benchmarks/tasks.py "
            f"--task sentiment --minutes {minutes:g}` |")


def tagging(minutes: float, out: Path) -> str:
    from rnnkit.tasks import tagging as task_module

    task, model, result, elapsed = _train(task_module, minutes, out)
    parts = []
    for split in ("valid", "test"):
        scores = task.scores(model, split)
        entities = scores.entities
        parts.append(f"{'dev' if split == 'valid' else 'test'}: slot F1 {entities.f1:.4f} "
                     f"(P {entities.precision:.4f}, R {entities.recall:.4f}), intent accuracy "
                     f"{100 * (scores.intent_accuracy or 0):.2f}%, sentence accuracy "
                     f"{100 * scores.sentence_accuracy:.1f}%")
    print(f"steps {result.step}, {elapsed:.1f} min; " + "; ".join(parts) + f"; curves: {result.plot}")
    config = model.config
    extras = " + CRF" if config.crf else ""
    extras += " + char BiLSTM" if config.chars else ""
    return (f"| tagging (ATIS slots + intent) | {_recurrent(config.recurrent.to_dict())}{extras}, "
            f"joint intent head | {parts[1]} ({parts[0]}) | {elapsed:.1f} min ({result.step} steps) "
            f"| `python benchmarks/tasks.py --task tagging --minutes {minutes:g}` |")


def plot_conll2003(metrics: Path, by_type: dict[str, dict[str, float]], png: Path) -> Path:
    """Dev entity F1 at each validation against training minutes, and F1 per entity type."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    minutes = {r["step"]: r["time"] / 60 for r in records if r["kind"] == "train"}
    valid = [(minutes[r["step"]], r["slot_f1"]) for r in records
             if r["kind"] == "valid" and r["step"] in minutes]
    figure, (curve, bars) = plt.subplots(1, 2, figsize=(10, 3.6),
                                         gridspec_kw={"width_ratios": [2, 1]})
    curve.plot(*zip(*valid), marker="o", markersize=3)
    curve.axhline(0.88, color="grey", linestyle="--", linewidth=1, label="goal 0.88")
    curve.set(xlabel="training minutes (1 thread, busy machine)", ylabel="entity F1",
              title="CoNLL-2003 dev (eng.testa), every ~epoch", ylim=(0.6, 0.95))
    curve.grid(alpha=0.3)
    curve.legend(loc="lower right")
    kinds = sorted(by_type)
    bars.bar(kinds, [by_type[k]["f1"] for k in kinds])
    for i, kind in enumerate(kinds):
        bars.text(i, by_type[kind]["f1"] + 0.005, f"{by_type[kind]['f1']:.3f}", ha="center")
    bars.set(ylim=(0.7, 1.0), title="F1 by type, chosen weights")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png


def conll2003(minutes: float, out: Path) -> str:
    """CoNLL-2003 English NER with the settings of examples/tagging-conll2003.yaml (the command
    `rnnkit train tagging --config examples/tagging-conll2003.yaml` trains the same model)."""
    import yaml

    from rnnkit.tasks import tagging as task_module
    from rnnkit.tasks.common import chosen_weights

    settings = yaml.safe_load(CONLL2003.read_text(encoding="utf-8"))
    del settings["task"]
    task, model, result, elapsed = _train(task_module, minutes, out, settings)
    which, _ = chosen_weights(model, out, "dev F1")
    print(f"scored with {which}")
    scores = task.scores(model, "valid")
    entities = scores.entities
    by_type = ", ".join(f"{kind} {row['f1']:.4f}" for kind, row in entities.by_type.items())
    png = plot_conll2003(out / "metrics.jsonl", entities.by_type, DOCS / "conll2003-dev-f1.png")
    print(f"steps {result.step}, {elapsed:.1f} min; dev (eng.testa) entity F1 {entities.f1:.4f} "
          f"(P {entities.precision:.4f}, R {entities.recall:.4f}; {by_type}); picture: {png}; "
          f"curves: {result.plot}")
    config = model.config
    return (f"| tagging (CoNLL-2003 English NER) | eng.testa ({task.counts['valid']}) | "
            f"{_recurrent(config.recurrent.to_dict())} + char BiLSTM + CRF, embeddings from "
            f"scratch | **entity F1 {entities.f1:.4f}** ({by_type}) | ≥ 0.88 "
            f"{'✓' if entities.f1 >= 0.88 else '✗'} | {elapsed:.1f} min ({result.step} steps) | "
            f"`python benchmarks/tasks.py --task conll2003 --minutes {minutes:g} --threads 1` |")


def translate(minutes: float, out: Path) -> str:
    from rnnkit.tasks import translate as task_module

    task, model, result, elapsed = _train(task_module, minutes, out)
    outputs, _ = task.translations(model)
    exact, bleu = task.scores(outputs)
    translator = task_module.Translator(model, task.source_vocab, task.target_vocab, task.data)
    sample = "Dienstag, 24. November 2026" if task.data.source == "dates" else " ".join(task.valid[0][0])
    png = task_module.attention_heatmap(translator, sample, DOCS / "translate-attention.png")
    print(f"steps {result.step}, {elapsed:.1f} min; held-out exact match {100 * exact:.2f}%; {bleu}; "
          f"{sample!r} → {translator.translate(sample)!r}; attention: {png}; curves: {result.plot}")
    config = model.config
    return (f"| translate ({task.counts['valid']} held-out generated dates → ISO) | "
            f"{_recurrent(config.encoder.to_dict())} encoder, {_recurrent(config.decoder.to_dict())} "
            f"decoder, {config.attention} attention, greedy | exact match {100 * exact:.2f}%, "
            f"BLEU {bleu.score:.2f} | {elapsed:.1f} min ({result.step} steps) | "
            f"`python benchmarks/tasks.py --task translate --minutes {minutes:g}` |")


# German → English on Multi30k: a larger model than the dates default, words seen once → <unk>
MULTI30K = {
    "data": {"source": "multi30k", "min_freq": 2, "max_length": 40, "eval_batch_size": 128},
    "model": {"embedding": 256, "dropout": 0.3, "attention": "additive",
              "encoder": {"hidden": 256}, "decoder": {"hidden": 256}},
    "train": {"steps": 1_000_000, "batch_size": 64, "lr": 1e-3, "eval_every": 450,
              "early_stop": 4},
}


def _set_flags(settings: dict[str, Any], prefix: str = "") -> list[str]:
    flags = []
    for key, value in settings.items():
        if isinstance(value, dict):
            flags += _set_flags(value, f"{prefix}{key}.")
        elif key not in ("steps",):
            flags.append(f"--set {prefix}{key}={value}")
    return flags


def multi30k(minutes: float, out: Path) -> str:
    from rnnkit.tasks import translate as task_module

    task, model, result, elapsed = _train(task_module, minutes, out, MULTI30K)
    outputs, _ = task.translations(model)
    _, greedy = task.scores(outputs)
    translator = task_module.Translator(model, task.source_vocab, task.target_vocab, task.data)
    start = time.perf_counter()
    beam = [translator.translate(" ".join(source), beam_width=5).split() for source, _ in task.valid]
    _, beam_bleu = task.scores(beam)
    beam_minutes = (time.perf_counter() - start) / 60
    sample = " ".join(task.valid[0][0])
    png = task_module.attention_heatmap(translator, sample, DOCS / "multi30k-attention.png")
    print(f"steps {result.step}, {elapsed:.1f} min; val BLEU greedy {greedy}; beam 5 {beam_bleu} "
          f"({beam_minutes:.1f} min); {sample!r} → {translator.translate(sample, beam_width=5)!r}; "
          f"attention: {png}; curves: {result.plot}")
    config = model.config
    flags = " ".join(_set_flags(MULTI30K))
    return (f"| translate (Multi30k de→en, val 1,014) | {_recurrent(config.encoder.to_dict())} encoder, "
            f"{_recurrent(config.decoder.to_dict())} decoder, {config.attention} attention | BLEU "
            f"{greedy.score:.2f} greedy, {beam_bleu.score:.2f} beam 5 | {elapsed:.1f} min "
            f"({result.step} steps) | `python benchmarks/tasks.py --task multi30k --minutes "
            f"{minutes:g}` (= `rnnkit train translate {flags}`) |")


def music(minutes: float, out: Path) -> str:
    from rnnkit.tasks import music as task_module

    task, model, result, elapsed = _train(task_module, minutes, out)
    valid, test = task.nll(model, "valid"), task.nll(model, "test")
    primer = task.rolls["test"][0][:16]
    midi, png = DOCS / "music-chorale.mid", DOCS / "music-chorale.png"
    task_module.generate(model, primer, steps=64, seed=0, midi=midi, picture=png,
                         title="JSB-style chorale: 16 primer steps (a test chorale), 64 generated")
    print(f"steps {result.step}, {elapsed:.1f} min; NLL per time step: valid {valid:.3f}, "
          f"test {test:.3f}; MIDI: {midi}; piano roll: {png}; curves: {result.plot}")
    config = model.config
    return (f"| music (JSB Chorales, test) | {_recurrent(config.recurrent.to_dict())}, 88 Bernoulli "
            f"outputs | NLL/step {test:.3f} (valid {valid:.3f}) | {elapsed:.1f} min "
            f"({result.step} steps) | `python benchmarks/tasks.py --task music --minutes {minutes:g}` |")


def wordlm(minutes: float, out: Path) -> str:
    from rnnkit.tasks import wordlm as task_module

    task, model, result, elapsed = _train(task_module, minutes, out)
    metrics = task.evaluate(model)
    text = " ".join(task_module.sample(model, task.vocab, ["the"], words=25, temperature=0.8))
    print(f"steps {result.step} ({result.step / task.num_batches():.2f} epochs), {elapsed:.1f} min; "
          f"validation perplexity {metrics['ppl']:.1f}; sample: {text}; curves: {result.plot}")
    config = model.config
    return (f"| wordlm (PTB, valid) | LSTM {config.layers}×{config.hidden}, Zaremba small preset "
            f"| perplexity {metrics['ppl']:.1f} after {result.step / task.num_batches():.2f} epochs "
            f"| {elapsed:.1f} min ({result.step} steps) | "
            f"`python benchmarks/tasks.py --task wordlm --minutes {minutes:g}` |")


TASKS: dict[str, Callable[[float, Path], str]] = {
    "speech": speech, "digits": digits, "sentiment": sentiment, "tagging": tagging,
    "conll2003": conll2003,
    "translate": translate, "multi30k": multi30k, "music": music, "wordlm": wordlm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--out", type=Path, default=None, help="run directory")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is often faster on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = args.out or Path("runs") / f"bench-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(TASKS[args.task](args.minutes, out))


if __name__ == "__main__":
    main()
