"""CTC prefix beam search time, no language model: rnnkit's C++ decoder, its pure-Python
reference, and pyctcdecode, at the same beam width, side by side in one process, on speech-model
outputs for FSDD utterances.

    python benchmarks/decoding.py --threads 1          # markdown table of median times, ratios
    python benchmarks/decoding.py --checkpoint RUN     # a trained speech model's outputs instead

A quickly trained RUN (about 25 min on one loaded core; held-out digit error rate 2.8 %):
``rnnkit train speech --threads 1 --out RUN --set train.steps=600 --set train.eval_every=200
--set data.valid_utterances=64``.
    python benchmarks/decoding.py --no-python          # skip the (slow) pure-Python reference

pyctcdecode is a benchmark-only install, not a dependency of rnnkit (it pins numpy < 2, which
would downgrade the numpy the rest of the stack uses), so install it without its dependencies:

    pip install --no-deps pyctcdecode pygtrie      # its other dependency, hypothesis, is in [dev]

Without it the pyctcdecode columns are left out (the script says so).

The utterances are the speech task's: digit strings of 1-5 FSDD recordings (from
../shared/data/fsdd/recordings, or --recordings DIR) with silences and noise between them, built
as its validation set is. The log-probabilities come from the speech task's acoustic model,
**randomly initialised** (seed 0) unless --checkpoint names a trained run: an untrained model
gives nearly uniform outputs over the 11 classes, the hardest case for a beam search (no class
can be pruned); a trained one gives peaked outputs.

One timing decodes every utterance, the n-best list of each. rnnkit decodes the (T, N, C) batch
in one call (utterances split across torch's threads); pyctcdecode and the Python reference
decode utterance by utterance, in this process. Each decoder runs twice: "pruned" with
pyctcdecode's default pruning (token_min_logp=-5: skip classes below it; beam_prune_logp=-10:
drop prefixes more than 10 below the best) and rnnkit's equivalent options (prune_below=-5,
beam_threshold=10), and unpruned (the beam_width best prefixes over all classes: what rnnkit
does by default). The contenders are timed in turn within every repeat, so load from other
processes hits them alike; the table shows medians and ratios (pyctcdecode time / rnnkit C++
time: > 1 means rnnkit is faster), and how often pyctcdecode's best transcription equals
rnnkit's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rnnkit.data.audio import FeatureConfig, FeatureExtractor, read_wav
from rnnkit.decoding import prefix_beam_search_batch
from rnnkit.decoding.ctc import native_unavailable_reason
from rnnkit.models.acoustic import AcousticConfig, AcousticModel
from rnnkit.tasks import speech

BEAM_WIDTHS = (8, 32, 100)
# "pruned": pyctcdecode's defaults, and rnnkit's options that do the same (rnnkit's prune_below
# does not keep a frame's best class when it is below the threshold, as pyctcdecode does)
PRUNING: dict[str, dict[str, float]] = {
    "rnnkit": {"prune_below": -5.0, "beam_threshold": 10.0},
    "pyctcdecode": {"token_min_logp": -5.0, "beam_prune_logp": -10.0},
}
UNPRUNED = {"token_min_logp": -1e30, "beam_prune_logp": -1e30}
Decode = Callable[[int], list[str]]
RECORDINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def utterance_log_probs(directory: Path, count: int, checkpoint: str | None
                        ) -> tuple[Tensor, Tensor]:
    """(T, N, C) log-probabilities and (N,) lengths of ``count`` speech-task utterances."""
    recordings = speech.find_recordings(directory)
    keys = sorted(key for key in recordings if key[2] < 10)  # 10 takes a digit: enough variety
    data = speech.SpeechDataConfig()
    if checkpoint is not None:
        model, extractor, _ = speech.load_model(checkpoint)
    else:
        extractor = FeatureExtractor(FeatureConfig(**data.features))
        torch.manual_seed(0)
        model = AcousticModel(AcousticConfig(features=extractor.config.dim))
    rate = extractor.config.sample_rate
    audio = {key: read_wav(recordings[key], expected_rate=rate)[0] for key in keys}
    maker = speech.UtteranceMaker(keys, audio, data, rate)
    generator = torch.Generator().manual_seed(speech.VALID_SEED_OFFSET)
    made = [maker.make(generator) for _ in range(count)]
    features = extractor.batch([samples for samples, _ in made])
    lengths = torch.tensor([f.shape[0] for f in features])
    with torch.no_grad():
        log_probs, out_lengths = model.eval()(torch.nn.utils.rnn.pad_sequence(features), lengths)
    return log_probs.float(), out_lengths


def pyctcdecode_decoder() -> object | None:
    """pyctcdecode's decoder for the 11 speech classes (blank, digits 0-9), or None."""
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import logging

        logging.getLogger("pyctcdecode").setLevel(logging.ERROR)  # "kenlm not installed" etc.
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        return None
    return build_ctcdecoder(["", *"0123456789"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--recordings", type=Path, default=RECORDINGS)
    parser.add_argument("--checkpoint", default=None, help="a trained speech run or checkpoint")
    parser.add_argument("--beams", type=int, nargs="+", default=list(BEAM_WIDTHS))
    parser.add_argument("--no-python", action="store_true", help="skip the Python reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.recordings.is_dir():
        raise SystemExit(f"{args.recordings}: no FSDD recordings (give --recordings DIR)")
    reason = native_unavailable_reason()  # builds the decoder outside the timings
    if reason is not None:
        raise SystemExit(f"the native CTC decoder is unavailable: {reason}")
    log_probs, lengths = utterance_log_probs(args.recordings, args.utterances, args.checkpoint)
    decoder = pyctcdecode_decoder()
    frames = [log_probs[: int(length), n].numpy() for n, length in enumerate(lengths)]

    def rnnkit(backend: str, pruned: bool) -> Decode:
        options = PRUNING["rnnkit"] if pruned else {}

        def decode(width: int) -> list[str]:
            found = prefix_beam_search_batch(log_probs, lengths, width, backend=backend, **options)
            return ["".join(str(label - 1) for label in best[0].labels) for best in found]
        return decode

    def pyctc(pruned: bool) -> Decode:
        options = PRUNING["pyctcdecode"] if pruned else UNPRUNED

        def decode(width: int) -> list[str]:
            return [decoder.decode_beams(x, beam_width=width, **options)[0][0]  # type: ignore
                    for x in frames]
        return decode

    contenders: dict[str, Decode] = {"C++ pruned": rnnkit("native", True),
                                     "C++": rnnkit("native", False)}
    if not args.no_python:
        contenders["Python"] = rnnkit("python", False)
    if decoder is not None:
        contenders["pyctcdecode pruned"] = pyctc(True)
        contenders["pyctcdecode"] = pyctc(False)
    source = (f"checkpoint {args.checkpoint}" if args.checkpoint
              else "randomly initialised speech model (seed 0)")
    print(f"{args.utterances} FSDD utterances ({source}), T = {int(lengths.min())}-"
          f"{int(lengths.max())} frames (mean {float(lengths.float().mean()):.0f}), "
          f"C = {log_probs.shape[2]}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.2f}; median of {args.repeats}; "
          f"pruned = {PRUNING['rnnkit']} for rnnkit, {PRUNING['pyctcdecode']} for pyctcdecode")
    if decoder is None:
        print("pyctcdecode is not installed (pip install --no-deps pyctcdecode pygtrie): "
              "its columns are left out")
    names = list(contenders)
    header = "| beam | " + " | ".join(f"{name} ms" for name in names)
    if decoder is not None:
        header += (" | pyctcdecode / C++, pruned | pyctcdecode / C++, unpruned | "
                   "same best, pruned")
    if not args.no_python:
        header += " | Python / C++"
    print(header + " |")
    print("|---:|" + "---:|" * (header.count("|") - 1))
    for width in args.beams:
        times: dict[str, list[float]] = {name: [] for name in names}
        results: dict[str, list[str]] = {}
        for name, fn in contenders.items():  # warm-up
            results[name] = fn(width)
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn(width)
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        row = f"| {width} | " + " | ".join(f"{ms[name]:.1f}" for name in names)
        if decoder is not None:
            same = sum(a == b for a, b in zip(results["C++ pruned"],
                                              results["pyctcdecode pruned"]))
            row += (f" | {ms['pyctcdecode pruned'] / ms['C++ pruned']:.1f}× | "
                    f"{ms['pyctcdecode'] / ms['C++']:.1f}× | {same}/{len(frames)}")
        if not args.no_python:
            assert results["Python"] == results["C++"], "C++ and its reference differ"
            row += f" | {ms['Python'] / ms['C++']:.1f}×"
        print(row + " |", flush=True)


if __name__ == "__main__":
    main()
