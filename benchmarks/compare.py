"""Recurrent vs convolutional vs recursive, measured on this machine (issue: the comparison).

    python benchmarks/compare.py speed                          # scan vs loop, levels vs nodes
    python benchmarks/compare.py run --row adding --minutes 5   # every model of one row
    python benchmarks/compare.py run --row sst --models treelstm,lstm --minutes 10
    python benchmarks/compare.py table                          # docs/comparison.md + PNG

``run`` trains each model of a row for the same wall-clock budget at (about) the same parameter
count, scores the weights the run keeps (its best validation; for SST that is dev itself, the
test split being held back, so that row's figure is optimistic by the selection) on the row's
held-out split and adds the result to ``docs/comparison.json``
(rows measured in different sessions accumulate). ``table`` renders every stored result beside
the published figure and plots the held-out metric against training time per model.

Published figures: Bai, Kolter & Koltun (2018), Table 1 (LSTM / GRU / RNN / TCN, ~70K parameters
for adding, ~16K for copy memory, ~300K for JSB); Tai, Socher & Manning (2015), Table 2 (SST dev
is not what they report: their figures are test accuracy, with GloVe vectors).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rnnkit.train import TrainConfig, Trainer
from rnnkit.train.checkpoint import BEST, load_checkpoint, load_weights
from rnnkit.train.rng import seed_everything

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "comparison.json"


@dataclass
class Row:
    task: str
    metric: str  # what the score means
    lower_is_better: bool
    params: int  # the parameter count every model is matched to
    published: dict[str, float]
    # per model: config updates (section → options) applied before the width is matched
    models: dict[str, dict[str, dict[str, Any]]]
    base: dict[str, dict[str, Any]] = field(default_factory=dict)  # for every model
    score: Callable[[Any, Any], float] | None = None  # (task, model) → held-out metric
    width: tuple[str, ...] = ("model", "recurrent", "hidden")  # the option the match varies


def _recurrent(cell: str, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"model": {"recurrent": {"cell": cell, **extra}}}


def _lm(cell: str, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"model": {"cell": cell, **extra}}


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PTB = SHARED / "ptb"


def _ptb_characters() -> dict[str, dict[str, Any]]:
    """charlm reading PTB's word-level train + valid text as characters, validated on exactly
    ptb.valid.txt (the last fraction of the concatenation; PTB is ASCII, so characters = bytes)."""
    files = [PTB / "ptb.train.txt", PTB / "ptb.valid.txt"]
    data: dict[str, Any] = {"files": [str(f) for f in files], "valid_chars": None}
    if all(f.is_file() for f in files):  # else the task names the missing file when it runs
        sizes = [f.stat().st_size for f in files]
        data["valid_fraction"] = sizes[1] / sum(sizes)
    return {"data": data, "model": {"embedding": 100}}


# the recurrent rows' common optimiser: wordlm's own default is Zaremba et al.'s SGD at lr 35,
# which a TCN or an Elman RNN does not survive; every model of a row gets the same Adam
ADAM_LM = {"optimizer": "adam", "lr": 1e-3, "clip_norm": 0.25, "schedule": "plateau",
           "plateau_patience": 1}


def _music_test(task: Any, model: Any) -> float:
    return task.nll(model, "test")


def _sst_accuracy(task: Any, model: Any) -> float:
    return task.evaluate(model)["accuracy"]


def _bits_per_char(task: Any, model: Any) -> float:
    return task.evaluate(model)["bpc"]


def _perplexity(task: Any, model: Any) -> float:
    return task.evaluate(model)["ppl"]


def _sst_models(layers: int = 3) -> dict[str, dict[str, dict[str, Any]]]:
    return {"treelstm": {"model": {"encoder": "treelstm"}},
            "childsum": {"model": {"encoder": "childsum"}},
            "lstm": {"model": {"encoder": "lstm", "bidirectional": True}},
            "gru": {"model": {"encoder": "gru", "bidirectional": True}},
            "rnn": {"model": {"encoder": "rnn", "bidirectional": True}},
            "tcn": {"model": {"encoder": "tcn", "bidirectional": True, "layers": layers}},
            "mingru": {"model": {"encoder": "mingru", "bidirectional": True}}}


def _sequence_models(make: Callable[..., dict[str, dict[str, Any]]], tcn: dict[str, Any]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    # minGRU has no recurrent weight: one layer over a 2-channel input would need thousands of
    # units to reach the budget, so it stacks two (as Feng et al.'s models do)
    return {"lstm": make("lstm"), "gru": make("gru"), "rnn": make("rnn"),
            "tcn": make("tcn", **tcn), "mingru": make("mingru", layers=2)}


# Issue 13's target (adding MSE < 1e-3, copy loss < 1e-3 with a recurrent model in the budget): the
# entries below differ from the row's plain models on purpose, each for the reason given.
ADDING_SOLVED = {
    # minGRU, one layer of 64 units, chrono gate biases for T_max = T = 600 (Tallec & Ollivier
    # 2018): its update gate reads x_t alone, so it can open exactly at the two markers, and the
    # chrono biases keep h for hundreds of steps elsewhere from the first step, so the gradient
    # reaches the markers at once. One layer holds the exact solution (a unit that takes the
    # marked value, z = 1, and one that halves, z = ½, read out linearly); 64 units instead of
    # the row's 70 K-parameter width (7·H + 1 parameters: H ≈ 10,000) because a wider scan
    # only costs time here. Width fixed, so the parameter match is skipped. Rate 1e-2 (3e-3
    # works too, about 3× slower: 0.0035 at step 2,900 where 1e-2 had it at 1,000), held for half
    # the budget, then decayed to 1/100 so that the last steps refine rather than jitter.
    "mingru-chrono": {"model": {"recurrent": {"cell": "mingru", "layers": 1, "hidden": 64,
                                              "chrono": 600}},
                      "train": {"lr": 1e-2, "schedule": "budget", "budget_hold": 0.5,
                                "budget_final": 0.01}},
}
COPY_SOLVED = {
    # the row's LSTM (width matched to 16 K) with chrono gate biases for T_max = T = 1000: Tallec
    # & Ollivier's chrono LSTM solved copy at T = 500 and 2,000 where the standard one stays at
    # the memoryless loss. The task's plateau schedule (rate halved after 3 validations without
    # a gain, 600 steps) would cut the rate while the model sits at the memoryless loss, before
    # it can leave it: the full rate for half the budget instead, then a decay to 1/10. Rate
    # 3e-3: at 200 steps 0.069 where 1e-3 was at 0.128. Not yet seen to solve the task: it needs
    # more steps than a shared core gave it (docs/results.md).
    "lstm-chrono": {**_lm("lstm", chrono=1000),
                    "train": {"lr": 3e-3, "schedule": "budget", "budget_hold": 0.5,
                              "budget_final": 0.1}},
    # the row's Elman RNN (width matched to 16 K like the plain one) made linear with an
    # orthogonal W_hh (expRNN, Lezcano-Casado & Martínez-Rubio 2019: W = B·exp(A − Aᵀ), B
    # Henaff's rotations): h_t = W h_{t-1} + U x_t + b neither forgets nor blows up, so the 10
    # digits are still in h 1,000 steps later, each turned by W^t; the readout learns where, and
    # the angles of W settle so that the turn over the T + 10 steps from a digit to its output
    # step brings it back to what the readout reads. Linear, not tanh: tanh shrinks h a little
    # at every step and mixes what it holds (the same model with tanh sat at the memoryless loss
    # for 3,600 steps, docs/results.md); expRNN's modReLU, with its bias near 0, is this linear
    # map. Rate 1e-3 for everything, held for half the budget, then decayed to 1/100.
    "rnn-orthogonal": {**_lm("rnn", nonlinearity="identity", orthogonal="exp"),
                       "train": {"lr": 1e-3, "schedule": "budget", "budget_hold": 0.5,
                                 "budget_final": 0.01}},
}

ROWS: dict[str, Row] = {
    "adding": Row("adding", "MSE (valid)", True, 70_000,
                  {"lstm": 0.164, "gru": 5.3e-5, "rnn": 0.177, "tcn": 5.8e-5},
                  {**_sequence_models(_recurrent, {"layers": 8, "kernel_size": 8}),
                   **ADDING_SOLVED},
                  {"data": {"length": 600}}),
    "copy": Row("copymemory", "cross-entropy (valid)", True, 16_000,
                {"lstm": 0.0204, "gru": 0.0197, "rnn": 0.0202, "tcn": 3.5e-5},
                {**_sequence_models(_lm, {"layers": 8, "kernel_size": 8}), **COPY_SOLVED},
                {"data": {"length": 1000}}, width=("model", "hidden")),
    "jsb": Row("music", "NLL per step (test)", True, 300_000,
               {"lstm": 8.45, "gru": 8.43, "rnn": 8.91, "tcn": 8.10},
               _sequence_models(_recurrent, {"layers": 2, "kernel_size": 3}),
               score=_music_test),
    "charptb": Row("charlm", "bits/char (PTB valid)", True, 3_000_000,
                   {"lstm": 1.36, "gru": 1.37, "rnn": 1.48, "tcn": 1.31},
                   _sequence_models(_lm, {"layers": 3, "kernel_size": 3}),
                   _ptb_characters(), score=_bits_per_char, width=("model", "hidden")),
    "wordptb": Row("wordlm", "perplexity (PTB valid)", True, 13_000_000,
                   {"lstm": 78.93, "gru": 92.48, "rnn": 114.50, "tcn": 88.68},
                   _sequence_models(_lm, {"layers": 4, "kernel_size": 3}),
                   {"model": {"embedding": 400}, "train": ADAM_LM},
                   score=_perplexity, width=("model", "hidden")),
    # SST rows keep each encoder's own defaults (the 300-d embeddings are most of every model)
    "sst": Row("trees", "binary accuracy (dev sentences)", False, 0,
               {"treelstm": 0.880, "lstm": 0.875}, _sst_models(),
               score=_sst_accuracy, width=("model", "hidden")),
    "sst5": Row("trees", "five-class accuracy (dev sentences)", False, 0,
                {"treelstm": 0.510, "lstm": 0.491}, _sst_models(),
                {"data": {"classes": "fine"}}, score=_sst_accuracy, width=("model", "hidden")),
}


def _update(config: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    for key, value in updates.items():
        if isinstance(value, dict):
            _update(config.setdefault(key, {}), value)
        else:
            config[key] = value
    return config


def _set_width(config: dict[str, Any], path: tuple[str, ...], value: int) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def _get(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config[key]
    return config


def _sets(updates: dict[str, Any], path: tuple[str, ...]) -> bool:
    """True when ``updates`` gives the option at ``path`` itself."""
    for key in path:
        if not isinstance(updates, dict) or key not in updates:
            return False
        updates = updates[key]
    return True


def configured(row: Row, model: str, module: Any) -> dict[str, Any]:
    """The row's config for ``model``, its width matched to the row's parameter count (unless
    the model's entry fixes the width itself)."""
    config = _update(_update(module.default_config(), row.base), row.models[model])
    if not row.params or _sets(row.models[model], row.width):
        return config  # rows without a published budget keep each model's own defaults
    cache: dict[int, int] = {}
    template: list[Any] = []  # (model class, the task's model config) of the first build

    def count(width: int) -> int:
        if width not in cache:
            _set_width(config, row.width, width)
            if not template:  # the task reads its data once (vocabulary sizes and such) ...
                task, built, _ = module.build(config)
                template.extend((type(built), task.model_config))
            else:  # ... and every other width is only the model, from the task's derived config
                model_class, derived = template
                options = _update(derived.to_dict(), json.loads(json.dumps(config["model"])))
                built = model_class(type(derived).from_dict(options))
            cache[width] = sum(p.numel() for p in built.parameters())
        return cache[width]

    low, high = 2, 2048
    while high - low > 1:  # the smallest width at or above the budget, then the nearer of two
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < row.params else (low, middle)
    best = min((low, high), key=lambda w: abs(count(w) - row.params))
    _set_width(config, row.width, best)
    return config


def run_row(name: str, models: list[str], minutes: float, out: Path, threads: int | None,
            steps: int | None = None, results: Path = RESULTS) -> None:
    """Trains each model for ``minutes`` and stores its result in ``results``; with ``steps``, a
    check that the row runs: that many steps each, nothing stored."""
    from rnnkit.tasks import task_module

    row = ROWS[name]
    module = task_module(row.task)
    stored = json.loads(results.read_text()) if results.is_file() else {}
    for model_name in models:
        if threads:
            torch.set_num_threads(threads)
        config = configured(row, model_name, module)
        if steps is None:
            config["train"].update(minutes=minutes, steps=10_000_000)
        else:  # a check: a validation at the end only
            config["train"].update(minutes=None, steps=steps, eval_every=steps)
        train_config = TrainConfig.from_dict(config["train"])
        seed_everything(train_config.seed)
        task, model, source = module.build(config)
        params = sum(p.numel() for p in model.parameters())
        run_dir = out / f"{'check-' if steps is not None else ''}{name}-{model_name}"
        published = row.published.get(model_name)
        budget = f" (row budget {row.params:,})" if row.params else ""
        print(f"== {name} / {model_name}: {params:,} parameters{budget}; published {row.metric}: "
              f"{'—' if published is None else published}; {source}", flush=True)
        # the load and this process's CPU time: on a shared core a wall-clock budget buys less
        # compute than on a quiet one, and these say how much
        load_start, cpu_start = _load_average(), time.process_time()
        start = time.perf_counter()
        result = Trainer(model, task, train_config, run_dir, progress=False).fit()
        elapsed = time.perf_counter() - start
        cpu_minutes, load_end = (time.process_time() - cpu_start) / 60, _load_average()
        last = _score(row, task, model)
        if steps is not None:  # a check: the scoring path ran once, that is all it asks
            print(f"   {row.metric}: {last:.6g} after {result.step} steps, {elapsed / 60:.1f} min "
                  "(a check: not stored)", flush=True)
            continue
        best = run_dir / f"{BEST}.json"
        if best.is_file():  # the weights the run keeps: its best validation (the monitored metric)
            load_weights(load_checkpoint(best), model)
        score = _score(row, task, model)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # validation records carry the step; the training record of that step carries its time
        seconds = {r["step"]: r["time"] for r in records if r.get("kind") == "train"}
        curve = [(seconds.get(r["step"], 0.0), r[_curve_key(r, row)])
                 for r in records if r.get("kind") == "valid"]
        print(f"   {row.metric}: {score:.6g} with the kept weights ({last:.6g} with the last) after "
              f"{result.step} steps, {elapsed / 60:.1f} min ({cpu_minutes:.1f} CPU min; load "
              f"average {load_start} at the start, {load_end} at the end)", flush=True)
        stored.setdefault(name, {})[model_name] = {
            "score": score, "last_score": last, "params": params, "steps": result.step,
            "minutes": elapsed / 60, "cpu_minutes": cpu_minutes,
            "load_average": [load_start, load_end],
            "budget_minutes": minutes, "threads": torch.get_num_threads(), "curve": curve,
            "config": config["model"], "date": time.strftime("%Y-%m-%d"),
        }
        results.write_text(json.dumps(stored, indent=1) + "\n")


def _load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as /proc/loadavg gives them."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.is_file() else "?"


def _score(row: Row, task: Any, model: Any) -> float:
    return row.score(task, model) if row.score else task.evaluate(model)["loss"]


def _curve_key(record: dict[str, Any], row: Row) -> str:
    return "accuracy" if not row.lower_is_better and "accuracy" in record else "loss"


def table() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = json.loads(RESULTS.read_text())
    lines = ["| benchmark | model | parameters | budget | steps | held-out | published |",
             "|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(stored), figsize=(4.2 * len(stored), 3.4), squeeze=False)
    for axis, (name, results) in zip(axes[0], stored.items()):
        row = ROWS[name]
        for model_name, result in sorted(results.items()):
            published = row.published.get(model_name)
            budget = f"{result['budget_minutes']:g} min × {result['threads']} thread(s)"
            if result.get("cpu_minutes", result["minutes"]) < 0.8 * result["minutes"]:
                # a run on a shared core: the budget bought less compute than it says
                budget += f", shared core: {result['cpu_minutes']:.1f} CPU min"
            lines.append(
                f"| {name}: {row.metric} | {model_name} | {result['params']:,} | "
                f"{budget} | {result['steps']:,} | "
                f"{result['score']:.4g} | {'' if published is None else f'{published:g}'} |")
            times = [t / 60 for t, _ in result["curve"]]
            axis.plot(times, [v for _, v in result["curve"]], label=model_name)
        axis.set_title(name)
        axis.set_xlabel("training minutes")
        axis.set_ylabel(row.metric if row.score else "validation loss")
        if row.lower_is_better and all(v > 0 for r in results.values() for _, v in r["curve"]):
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "comparison.png", dpi=110)
    (DOCS / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from report import write_section

    write_section(DOCS / "results.md", "comparison", "\n".join(summary_table(stored)))
    print(f"wrote {DOCS / 'comparison.md'}, {DOCS / 'comparison.png'} and the comparison table "
          f"of {DOCS / 'results.md'}")


# the summary's columns: the row's models by family, in the order; any other entry of a
# row (the target's models, e.g. mingru-chrono) goes to the last column with its name
COLUMNS = {"lstm": "LSTM", "gru": "GRU", "rnn": "Elman RNN", "tcn": "TCN", "mingru": "minGRU",
           "treelstm": "Tree-LSTM", "childsum": "child-sum Tree-LSTM"}
TITLES = {"adding": "adding, T = 600", "copy": "copy memory, T = 1000",
          "jsb": "JSB Chorales", "charptb": "character PTB", "wordptb": "word PTB",
          "sst": "SST binary", "sst5": "SST five-class"}
PUBLISHED_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "tcn": "TCN",
                   "treelstm": "Tree-LSTM"}


def _shared(result: dict[str, Any]) -> bool:
    """Whether the run got less compute than its budget says: a core shared with other work
    (under 80 % of the budget in CPU time, or conditions recorded by hand for older runs)."""
    return ("conditions" in result
            or result.get("cpu_minutes", result["minutes"]) < 0.8 * result["minutes"])


def _cell(result: dict[str, Any], best: bool) -> str:
    score = f"{result['score']:.4g}"
    return (f"{'**' + score + '**' if best else score}{' †' if _shared(result) else ''} "
            f"({result['steps']:,} steps, {result['budget_minutes']:g} min)")


def _parameters(count: int) -> str:
    return f"{count / 1e6:g} M" if count >= 1e6 else f"{count / 1e3:g} K"


def summary_table(stored: dict[str, dict[str, Any]]) -> list[str]:
    """One table of every stored row: a column per model family, the row's parameter budget, the
    published figures beside them and the command that reproduces each row (issue 13)."""
    columns = [c for c in COLUMNS if any(c in results for results in stored.values())]
    lines = ["| row (metric, split), parameters | " + " | ".join(COLUMNS[c] for c in columns)
             + " | other entries | published |",
             "|---" * (len(columns) + 3) + "|"]
    commands = []
    for name, results in stored.items():
        row = ROWS[name]
        scores = [r["score"] for r in results.values()]
        best = min(scores) if row.lower_is_better else max(scores)
        cells = [_cell(results[c], results[c]["score"] == best) if c in results else "—"
                 for c in columns]
        others = "; ".join(f"{model}: {_cell(result, result['score'] == best)}"
                           for model, result in sorted(results.items()) if model not in COLUMNS)
        published = " / ".join(f"{PUBLISHED_NAMES.get(m, m)} {v:g}"
                               for m, v in row.published.items())
        budget = _parameters(row.params) if row.params else "the encoders' defaults"
        lines.append(f"| {TITLES.get(name, name)}: {row.metric}, {budget} | " + " | ".join(cells)
                     + f" | {others or '—'} | {published or '—'} |")
        # one command per budget of the row (models run with another budget listed by name)
        by_budget: dict[tuple[float, int], list[str]] = {}
        for model, result in results.items():
            by_budget.setdefault((result["budget_minutes"], result["threads"]), []).append(model)
        for (minutes, threads), models in sorted(by_budget.items()):
            every = set(models) == set(row.models)
            commands.append(f"python benchmarks/compare.py run --row {name} --minutes {minutes:g} "
                            f"--threads {threads}" + ("" if every else f" --models {','.join(models)}"))
    shared = [f"{name}/{model}: " + (r.get("conditions") or f"{r['cpu_minutes']:.1f} CPU min")
              for name, results in stored.items() for model, r in results.items() if _shared(r)]
    return [*lines, "",
            "Score (steps in the budget, budget in wall-clock minutes per model); bold: the row's "
            "best; † a run on a core shared with other work, so its budget bought less compute ("
            + "; ".join(shared) + "). Published: Bai, Kolter & Koltun (2018), Table 1; SST: Tai, Socher & "
            "Manning (2015), test accuracy with GloVe vectors (these rows: dev sentences, "
            "embeddings from scratch). Each row, reproduced (then `python benchmarks/compare.py "
            "table`):", "", "```", *commands, "```"]


def _time(fn: Callable[[], Any], seconds: float = 1.0) -> float:
    """The median wall time of ``fn`` over about ``seconds`` (after one warm-up call)."""
    return _times(fn, seconds)[0]


def _times(fn: Callable[[], Any], seconds: float = 1.0) -> tuple[float, float, float]:
    """(median wall, minimum wall, minimum CPU time of this thread) of ``fn``. With one torch
    thread all the work runs on the calling thread, so its CPU time leaves out the time other
    processes held the core: the steadiest of the three on a shared machine."""
    fn()  # warm-up
    walls, cpus = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(walls) < 3:
        start, cpu = time.perf_counter(), time.thread_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - cpu)
    return sorted(walls)[len(walls) // 2], min(walls), min(cpus)


EPOCH_ROWS = ("copy", "adding")  # the T = 1000 and T = 600 rows, where "per epoch" is the issue's


def _training_step(module: Any, config: dict[str, Any]) -> tuple[Callable[[], None], int, int]:
    """One training step of a row's model (its batch generated, forward, loss, backward, Adam),
    the batches per epoch and the parameter count."""
    task, model, _ = module.build(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    index = [0]

    def step() -> None:
        batch = task.batch(index[0])
        index[0] += 1
        loss, _ = task.loss(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return step, task.num_batches(), sum(p.numel() for p in model.parameters())


def gru_and_same_width_mingru(row: Row, module: Any) -> tuple[dict, dict, int]:
    """The row's GRU config, a one-layer minGRU config of the GRU's width (everything else as
    the GRU's), and that width: the "same width" pair of the per-epoch comparisons."""
    gru = configured(row, "gru", module)
    width = _get(gru, row.width)
    same = _update(json.loads(json.dumps(gru)), row.models["mingru"])
    _set_width(same, row.width, width)
    _set_width(same, (*row.width[:-1], "layers"), 1)
    return gru, same, width


def epoch_speed(repeats: int = 9) -> list[str]:
    """Per-epoch training time of the rows' own models: rnnkit's GRU at the row's matched width
    beside minGRU of the same width (one layer) and the row's minGRU (two layers, matched
    parameters); interleaved, minimum of ``repeats`` rounds of 2 steps each."""
    from rnnkit.tasks import task_module

    lines = ["| row | T | model | parameters | ms per step (min wall) | s per epoch | GRU / this (wall) "
             "| GRU / this (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for name in EPOCH_ROWS:
        row = ROWS[name]
        module = task_module(row.task)
        gru, same, width = gru_and_same_width_mingru(row, module)
        variants = {f"GRU 1×{width}": gru, f"minGRU 1×{width} (same width)": same}
        matched = configured(row, "mingru", module)
        layers = _get(matched, (*row.width[:-1], "layers"))
        variants[f"minGRU {layers}×{_get(matched, row.width)} (the row's)"] = matched
        steps: dict[str, tuple[Callable[[], None], int, int]] = {}
        for label, config in variants.items():
            seed_everything(0)
            steps[label] = _training_step(module, config)
            steps[label][0]()  # warm-up (and the kernels' first build)
        best = dict.fromkeys(steps, math.inf)
        cpu = dict.fromkeys(steps, math.inf)
        for round_ in range(repeats):  # interleaved: a change of load hits every model alike
            for label in (list(steps) if round_ % 2 == 0 else list(reversed(steps))):
                start, thread = time.perf_counter(), time.thread_time()
                steps[label][0]()
                steps[label][0]()
                best[label] = min(best[label], (time.perf_counter() - start) / 2)
                cpu[label] = min(cpu[label], (time.thread_time() - thread) / 2)
        reference, reference_cpu = best[f"GRU 1×{width}"], cpu[f"GRU 1×{width}"]
        for label, seconds in best.items():
            _, batches, params = steps[label]
            lines.append(f"| {name} | {gru['data']['length']} | {label} | {params:,} | "
                         f"{1000 * seconds:.1f} | {batches * seconds:.1f} | {reference / seconds:.2f}× | "
                         f"{reference_cpu / cpu[label]:.2f}× |")
        print("\n".join(lines[-len(best):]), flush=True)
    return lines


def _min_cpu(phases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The minimum CPU time of this thread (seconds) of each phase, run in order ``repeats``
    times (each phase may use what the previous one left)."""
    best = dict.fromkeys(phases, math.inf)
    for _ in range(repeats):
        for name, phase in phases.items():
            start = time.thread_time()
            phase()
            best[name] = min(best[name], time.thread_time() - start)
    return best


def _phase_times(module: Any, config: dict[str, Any], repeats: int) -> dict[str, float]:
    """The minimum CPU seconds of each phase of one copy-row training step of ``config``'s model
    (see :func:`copy_breakdown`)."""
    import torch.nn.functional as F

    from rnnkit.losses.cross_entropy import linear_cross_entropy
    from rnnkit.models.language_model import one_hot as identity_rows

    seed_everything(0)
    task, model, _ = module.build(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    head = model.decoder
    live: dict[str, Any] = {}

    def generate() -> None:
        live["batch"] = task.batch(0)

    def torch_one_hot() -> None:
        live["x"] = F.one_hot(live["batch"].inputs, head.weight.shape[0]).to(head.weight.dtype)

    def one_hot() -> None:  # what LanguageModel.features does for embedding = 0
        live["x"] = identity_rows(live["batch"].inputs, head.weight.shape[0], head.weight.dtype)

    def recurrent_forward() -> None:
        live["out"], _ = model.rnn(live["x"])
        live["features"] = live["out"].detach().flatten(0, 1).requires_grad_()

    def torch_loss_forward() -> None:
        live["loss"] = F.cross_entropy(F.linear(live["features"], head.weight, head.bias),
                                       live["batch"].targets.flatten())

    def loss_forward() -> None:
        live["loss"] = linear_cross_entropy(live["features"], head.weight, head.bias,
                                            live["batch"].targets.flatten())

    def loss_backward() -> None:
        live["features"].grad = None
        live["loss"].backward()

    def recurrent_backward() -> None:
        live["out"].backward(live["features"].grad.view_as(live["out"]))

    def adam() -> None:
        optimiser.step()
        optimiser.zero_grad()

    def whole_step() -> None:
        loss, _ = task.loss(model, task.batch(0))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    phases = {"batch generation": generate,
              "one-hot input (torch: F.one_hot, .to)": torch_one_hot,
              "one-hot input (identity rows)": one_hot,
              "recurrent forward": recurrent_forward,
              "output + loss forward (torch: F.linear, F.cross_entropy)": torch_loss_forward,
              "output + loss backward (torch)": loss_backward,
              "output + loss forward (linear_cross_entropy: loss and gradients)": loss_forward,
              "output + loss backward (linear_cross_entropy: scaled by 1, handed over)": loss_backward,
              "recurrent backward": recurrent_backward, "Adam step + zero_grad": adam}
    whole_step()  # warm-up (and the kernels' first build)
    times = _min_cpu(phases, repeats)
    times["whole step as trained (task.loss, backward, Adam)"] = _min_cpu(
        {"step": whole_step}, repeats)["step"]
    return times


def copy_breakdown(repeats: int = 7) -> list[str]:
    """Where one training step of the copy row (T = 1000, batch 32) goes, GRU and minGRU at the
    GRU's matched width: each phase run on its own (minimum CPU time over ``repeats``), the
    input and the output layer + loss both as torch composes them and as the model and task
    compute them now, and the whole step as trained (for the overhead between phases)."""
    from rnnkit.tasks import task_module

    row = ROWS["copy"]
    module = task_module(row.task)
    gru, same, width = gru_and_same_width_mingru(row, module)
    columns = {label: _phase_times(module, config, repeats)
               for label, config in ((f"GRU 1×{width}", gru), (f"minGRU 1×{width}", same))}
    labels = list(columns)
    lines = [f"| phase (min CPU ms of {repeats}) | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for phase in columns[labels[0]]:
        lines.append(f"| {phase} | " + " | ".join(f"{1000 * columns[k][phase]:.1f}" for k in labels)
                     + " |")
    print("\n".join(lines), flush=True)
    return lines


def speed(threads: int, skip_epochs: bool = False) -> None:
    """minGRU vs rnnkit's GRU at T = 1000 (one layer, input = H; and per epoch of the copy and
    adding rows), and Tree-LSTM levels vs nodes, side by side; the tables also go to
    docs/performance.md."""
    import rnnkit
    from report import write_section
    from rnnkit.data.trees import read_trees
    from rnnkit.models.tree_lstm import TreeBatch, TreeLSTM

    torch.set_num_threads(threads)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = [f"`python benchmarks/compare.py speed --threads {threads}` ({time.strftime('%Y-%m-%d %H:%M')}, "
             f"load average at the start {load}; minimum over interleaved repeats).", "",
             "One layer, input size = H, forward + backward (the output's gradient given):", "",
             "| model | T | B | H | fwd+bwd ms (min wall) | GRU / this (wall) | CPU ms (min) | "
             "GRU / this (CPU) |", "|---|---|---|---|---|---|---|---|"]
    print(lines[0])
    for T, B, H in ((1000, 16, 128), (1000, 32, 256)):
        x = torch.randn(T, B, H)
        grad = torch.randn(T, B, H)  # what a layer receives from the model above it
        layers = {"GRU (fused)": rnnkit.GRU(H, H), "minGRU (scan)": rnnkit.MinGRU(H, H),
                  "minLSTM (scan)": rnnkit.MinLSTM(H, H)}

        def step(layer: torch.nn.Module, x: torch.Tensor = x, grad: torch.Tensor = grad
                 ) -> Callable[[], None]:
            def run() -> None:
                output, _ = layer(x)
                output.backward(grad)
            return run

        walls: dict[str, float] = {}
        cpus: dict[str, float] = {}
        for round_ in range(3):  # alternate, so a change of load hits every model alike
            for name, layer in (layers.items() if round_ % 2 == 0 else reversed(layers.items())):
                _, wall, cpu = _times(step(layer))
                walls[name] = min(walls.get(name, math.inf), wall)
                cpus[name] = min(cpus.get(name, math.inf), cpu)
        for name in walls:
            lines.append(f"| {name} | {T} | {B} | {H} | {1000 * walls[name]:.1f} | "
                         f"{walls['GRU (fused)'] / walls[name]:.2f}× | {1000 * cpus[name]:.1f} | "
                         f"{cpus['GRU (fused)'] / cpus[name]:.2f}× |")
            print(lines[-1], flush=True)
    if not skip_epochs:
        lines += ["", "Per epoch (100 batches of 32, generated) of the rows' own models: one training "
                  "step each (batch generation, forward, loss, backward, Adam):", ""]
        lines += epoch_speed()
        lines += ["", "Where one step of the copy row goes (each phase alone, minimum CPU time; the "
                  "'torch' rows are torch's composition of the output layer and loss, for scale; "
                  "linear_cross_entropy makes its gradients in the forward, one C++ pass):", ""]
        lines += copy_breakdown()
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst-trees" / "dev.txt"
    if not path.is_file():
        print(f"(Tree-LSTM timing skipped: {path} not present)")
    else:
        trees = read_trees(path)[:100]
        words = {w: i for i, w in enumerate(sorted({w for t in trees for w in t.leaves()}))}
        embed = torch.nn.Embedding(len(words), 150)
        tree_lstm = TreeLSTM(150, 150)

        def levels() -> None:
            batch = TreeBatch.build(trees, words)
            h, _ = tree_lstm(batch, embed(batch.words))
            h[batch.roots].sum().backward()

        def nodes() -> None:
            torch.stack(tree_lstm.forward_node_by_node(trees, embed, words)).sum().backward()

        level_time, node_time = _time(levels, 2.0), _time(nodes, 2.0)
        lines += ["", f"Tree-LSTM, 100 SST dev trees, fwd+bwd: level by level {1000 * level_time:.1f} ms, "
                  f"node by node {1000 * node_time:.1f} ms: {node_time / level_time:.1f}× faster batched"]
        print(lines[-1])
    write_section(DOCS / "performance.md", "compare-speed",
                  "## minGRU / minLSTM vs GRU, Tree-LSTM batching (issue 13)\n\n" + "\n".join(lines))
    print(f"wrote its section of {DOCS / 'performance.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every model of a row under one budget")
    run.add_argument("--row", required=True, choices=sorted(ROWS))
    run.add_argument("--models", default=None, help="comma-separated (default: all of the row)")
    run.add_argument("--minutes", type=float, default=10.0, help="budget per model")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", type=Path, default=Path("runs/compare"),
                     help="directory of the runs (checkpoints, metrics)")
    run.add_argument("--results", type=Path, default=RESULTS,
                     help="the JSON the results are added to (default: docs/comparison.json, "
                          "what `table` renders; another path keeps a trial run out of it)")
    run.add_argument("--steps", type=int, default=None,
                     help="check the row runs: this many steps per model, results not stored")
    sub.add_parser("table", help="render docs/comparison.md and .png from the stored results")
    timing = sub.add_parser("speed", help="scan vs loop and levels vs nodes, side by side")
    timing.add_argument("--threads", type=int, default=1)
    timing.add_argument("--skip-epochs", action="store_true", help="only the layer and tree timings")
    args = parser.parse_args()
    if args.command == "run":
        models = args.models.split(",") if args.models else list(ROWS[args.row].models)
        unknown = sorted(set(models) - set(ROWS[args.row].models))
        if unknown:
            parser.error(f"row {args.row} has no model(s) {', '.join(unknown)}; "
                         f"it has {', '.join(ROWS[args.row].models)}")
        if args.steps is not None and args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        run_row(args.row, models, args.minutes, args.out, args.threads, args.steps, args.results)
    elif args.command == "table":
        table()
    else:
        speed(args.threads, args.skip_epochs)


if __name__ == "__main__":
    main()
