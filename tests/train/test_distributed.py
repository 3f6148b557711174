"""Training on two gloo ranks on localhost equals training on one process.

The two-rank runs are real ``torchrun`` jobs (``rnnkit train ... --nproc-per-node 2`` starts
torch's elastic launcher), each bounded by a timeout so a hang fails the test instead of the CI.
They compare the saved weights of one process and of two ranks with the same seed and global
batch (dropout off): a stream task with truncated BPTT, where each rank carries the state of its
own streams, and a tagging task with variable lengths and a bidirectional LSTM + CRF, with an
odd global batch (uneven shares, weighted by their tokens). Then a two-rank run stopped by
SIGTERM to the launcher and resumed equals one that ran straight through.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnnkit.train import Batch
from rnnkit.train.checkpoint import load_checkpoint
from rnnkit.train.distributed import (
    Group,
    check_batch_size,
    gather_rows,
    shard_rows,
    shard_span,
    strip_option,
)

SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT = 300  # seconds per job: generous for a loaded 2-core machine, never a hang


# --- the sharding rule, without processes ------------------------------------------------------

@pytest.mark.parametrize(("total", "world"), [(8, 2), (5, 2), (7, 3), (3, 3), (2, 4)])
def test_shards_cover_the_batch_once_remainder_to_the_first_ranks(total: int, world: int) -> None:
    spans = [shard_span(total, rank, world) for rank in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, no overlap
    sizes = [stop - start for start, stop in spans]
    assert sizes == [len(p) for p in torch.arange(total).tensor_split(world)]  # torch's rule


def test_batch_shard_cuts_every_tensor_on_its_batch_dimension() -> None:
    tokens = torch.arange(4 * 5).reshape(4, 5)  # (T, B)
    lengths = torch.tensor([[4, 3, 3, 2, 1]])  # (1, B)
    chars = torch.zeros(4, 5, 6)  # (T, B, W)
    batch = Batch((tokens, lengths, chars), (tokens + 100, lengths), continues=True)
    first, second = batch.shard(0, 2), batch.shard(1, 2)
    assert torch.equal(first.inputs[0], tokens[:, :3]) and torch.equal(second.inputs[0], tokens[:, 3:])
    assert second.inputs[1].tolist() == [[2, 1]] and second.inputs[2].shape == (4, 2, 6)
    assert torch.equal(second.targets[0], tokens[:, 3:] + 100) and second.continues
    assert batch.shard(0, 1) is batch


def test_a_tensor_without_the_batch_on_dim_1_is_refused_by_shape() -> None:
    batch = Batch((torch.zeros(7, 4), torch.tensor([3, 3, 2, 1])), torch.zeros(7, 4))
    with pytest.raises(ValueError, match=r"shape \(4,\) has no batch dimension 1"):
        batch.shard(0, 2)


def test_carried_state_gathers_back_to_the_one_process_layout() -> None:
    h = torch.randn(2, 5, 3)  # (layers, B, H)
    pieces = [shard_rows((h, h + 1), *shard_span(5, rank, 2)) for rank in range(2)]
    assert [p[0].shape[1] for p in pieces] == [3, 2]
    assert torch.equal(torch.cat([p[0] for p in pieces], 1), h)
    assert gather_rows([h], Group()) == [h]  # one process: nothing to gather


def test_charlm_validation_shares_sum_to_the_whole_set(text: Path) -> None:
    from rnnkit.tasks import charlm

    config = charlm.default_config()
    config["data"].update(files=[str(text)], seq_len=12)
    config["model"].update(hidden=8, embedding=4)
    task, model, _ = charlm.build(config)
    model.eval()
    whole = task.evaluate(model)
    shares = [task.evaluate_totals(model, rank, 3) for rank in range(3)]
    summed = task.metrics_from_totals({k: sum(s[k] for s in shares) for k in shares[0]})
    assert summed["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert sum(s["count"] for s in shares) == task.evaluate_totals(model)["count"]
    assert all(s["count"] > 0 for s in shares)


def test_a_batch_smaller_than_the_ranks_is_refused_naming_both() -> None:
    check_batch_size(2, Group(0, 2))
    with pytest.raises(ValueError, match="--batch-size 2 cannot be shared by 3 ranks"):
        check_batch_size(2, Group(0, 3))


def test_the_launcher_flag_is_not_passed_to_the_ranks() -> None:
    assert strip_option(["train", "charlm", "--nproc-per-node", "2", "--steps", "3"],
                        "--nproc-per-node") == ["train", "charlm", "--steps", "3"]
    assert strip_option(["--nproc-per-node=2", "x"], "--nproc-per-node") == ["x"]


# --- real two-rank jobs -----------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _rnnkit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rnnkit", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).group("model")


def _assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=atol, msg=name)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "rnn", "lstm", "gru", "stream", "rank"]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


def _charlm(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "charlm", "--data", str(data), "--out", str(out), "--hidden", "16",
            "--embedding", "8", "--cell", "lstm", "--peephole", "--seq-len", "12", "--bptt", "4",
            "--dropout", "0", "--eval-every", "4", "--no-progress", "--threads", "1",
            "--sample-length", "5", "--set", "sample.count=1", *extra]


def test_charlm_two_ranks_equal_one_process(text: Path, tmp_path: Path) -> None:
    """Batch 5 over 2 ranks (3 + 2 streams), truncated BPTT: each rank carries its streams'
    state across windows; weights, the carried state and the validation loss match."""
    args = ["--steps", "9", "--batch-size", "5"]
    one = _rnnkit(_charlm(text, tmp_path / "one", *args), tmp_path)
    assert one.returncode == 0, one.stderr
    two = _rnnkit(_charlm(text, tmp_path / "two", *args, "--nproc-per-node", "2"), tmp_path)
    assert two.returncode == 0, two.stderr
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for key, value in a.group("carry").items():  # gathered back to (layers, 5 streams, hidden)
        torch.testing.assert_close(b.group("carry")[key], value, rtol=1e-4, atol=2e-5)
    assert b.meta["world_size"] == 2 and len(b.meta["rng_ranks"]) == 2
    assert abs(a.meta["last_valid"]["loss"] - b.meta["last_valid"]["loss"]) < 1e-5
    # rank 0 alone printed the run's report
    assert two.stdout.count("checkpoint:") == 1, two.stdout
    # rank 0 wrote the resolved options once the run started, as one process does
    assert ((tmp_path / "two" / "config.yaml").read_text()
            == (tmp_path / "one" / "config.yaml").read_text())


def _conll(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    cities = ["boston", "new york", "san francisco bay", "denver"]
    lines = []
    for _ in range(count):
        words = rng.choice([["show", "flights"], ["list", "all", "cheap", "fares"], ["fly"]])
        tokens, tags = [*words, "to"], ["O"] * (len(words) + 1)
        city = rng.choice(cities).split()
        tokens += city
        tags += ["B-city"] + ["I-city"] * (len(city) - 1)
        lines += [f"{t} {g}" for t, g in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tagging_bidirectional_variable_lengths_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """A BiLSTM + CRF tagger on sentences of 2 to 8 tokens, global batch 7 (4 + 3 sentences of
    different token counts): the token-weighted shares give the one-process gradient. 57
    sentences make the epoch's last batch a single sentence: rank 1 then has no row and joins
    the all-reduce with weight 0."""
    train, valid = _conll(tmp_path / "train.conll", 57, 0), _conll(tmp_path / "valid.conll", 14, 1)

    def args(out: str, *extra: str) -> list[str]:
        return ["train", "tagging", "--set", "data.format=conll", "--set", f"data.train={train}",
                "--set", f"data.valid={valid}", "--out", str(tmp_path / out), "--hidden", "8",
                "--set", "model.embedding=8", "--dropout", "0", "--steps", "10", "--batch-size",
                "7", "--eval-every", "5", "--no-progress", "--threads", "1", *extra]

    one = _rnnkit(args("one"), tmp_path)
    assert one.returncode == 0, one.stderr
    two = _rnnkit(args("two", "--nproc-per-node", "2"), tmp_path)
    assert two.returncode == 0, two.stderr
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a.meta["last_valid"]["slot_f1"] == b.meta["last_valid"]["slot_f1"]
    assert abs(a.meta["last_valid"]["loss"] - b.meta["last_valid"]["loss"]) < 1e-5


@pytest.mark.slow
def test_sentiment_validation_shared_by_ranks_equals_one_process(tmp_path: Path) -> None:
    """A BiLSTM classifier with max pooling, global batch 9 (5 + 4 sentences): the weights and
    the validation metrics, all-reduced from each rank's share of the dev set, match."""
    rng = random.Random(0)
    for name, count in (("train", 90), ("dev", 21)):
        rows = [f"{i % 2}\tthe film was " + " ".join(rng.choice(
            ["great", "superb", "fine"] if i % 2 else ["awful", "dull", "bad"])
            for _ in range(rng.randint(1, 7))) for i in range(count)]
        (tmp_path / f"{name}.tsv").write_text("\n".join(["label\tsentence", *rows]) + "\n")

    def args(out: str, *extra: str) -> list[str]:
        return ["train", "sentiment", "--set", f"data.train={tmp_path / 'train.tsv'}", "--set",
                f"data.valid={tmp_path / 'dev.tsv'}", "--set", "data.holdout=0", "--out",
                str(tmp_path / out), "--hidden", "8", "--set", "model.embedding=8", "--dropout",
                "0", "--steps", "8", "--batch-size", "9", "--eval-every", "4", "--no-progress",
                "--threads", "1", *extra]

    one = _rnnkit(args("one"), tmp_path)
    assert one.returncode == 0, one.stderr
    two = _rnnkit(args("two", "--nproc-per-node", "2"), tmp_path)
    assert two.returncode == 0, two.stderr
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for key, value in a.meta["last_valid"].items():
        assert b.meta["last_valid"][key] == pytest.approx(value, abs=1e-5), key


def test_sigterm_stops_both_ranks_with_one_checkpoint_and_resume_continues_exactly(
        text: Path, tmp_path: Path) -> None:
    steps = ["--steps", "600", "--batch-size", "4", "--checkpoint-every", "10",
             "--eval-every", "300"]
    stopped = tmp_path / "stopped"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "rnnkit", *_charlm(text, stopped, *steps, "--nproc-per-node", "2")],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # the signal goes to the launcher alone, as `kill PID` does
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (stopped / "checkpoint.json").exists():
            assert launcher.poll() is None, launcher.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    step = load_checkpoint(stopped).meta["step"]
    assert 10 <= step < 600, (step, err)
    assert "interrupted; continue with" in out
    resumed = _rnnkit(_charlm(text, stopped, *steps, "--resume", "--nproc-per-node", "2"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} of 600" in resumed.stdout
    straight = _rnnkit(_charlm(text, tmp_path / "straight", *steps, "--nproc-per-node", "2"),
                       tmp_path)
    assert straight.returncode == 0, straight.stderr
    a, b = load_checkpoint(stopped), load_checkpoint(tmp_path / "straight")
    assert a.meta["step"] == b.meta["step"] == 600
    for name, value in b.group("model").items():  # the same processes, the same order of sums
        assert torch.equal(a.group("model")[name], value), name

    # the resume rules of one process hold on two: a fixed option is refused naming it, in one
    # line (the ranks of one machine report it once), and the run's config.yaml stays
    saved = (stopped / "config.yaml").read_text()
    changed = _rnnkit(_charlm(text, stopped, *steps, "--resume", "--batch-size", "2",
                              "--nproc-per-node", "2"), tmp_path)
    assert changed.returncode == 2, changed.stderr
    errors = [line for line in changed.stderr.splitlines() if line.startswith("rnnkit")]
    assert len(errors) == 1 and "train.batch_size cannot change when resuming" in errors[0], \
        changed.stderr
    assert (stopped / "config.yaml").read_text() == saved

    # and a resume on another number of processes is refused before training, in one line
    other = _rnnkit(_charlm(text, stopped, "--steps", "700", "--resume"), tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0, other.stderr
    assert "written by a run on 2 process(es); resume it on 2" in other.stderr


def test_more_ranks_than_examples_per_batch_is_one_line_before_training(
        text: Path, tmp_path: Path) -> None:
    result = _rnnkit(_charlm(text, tmp_path / "run", "--steps", "3", "--batch-size", "2",
                             "--nproc-per-node", "3"), tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("rnnkit")]
    assert errors == ["rnnkit train: error: --batch-size 2 cannot be shared by 3 ranks: each "
                      "needs at least one example; use a batch of 3 or more (it is the global "
                      "batch), or fewer processes"], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_divergence_far_above_chance_stops_both_ranks_at_the_same_step_in_one_line(
        text: Path, tmp_path: Path) -> None:
    """Adam at lr 1e6: the all-reduced loss is the same number on every rank, so both ranks
    see it far above a uniform guess (Task.chance_loss) at the same step and stop together."""
    result = _rnnkit(_charlm(text, tmp_path / "run", "--steps", "40", "--batch-size", "4",
                             "--lr", "1e6", "--nproc-per-node", "2"),
                     tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rnnkit")]
    assert len(errors) == 1, result.stderr
    assert "training diverged at step" in errors[0] and "of a uniform guess" in errors[0], errors
    assert "Traceback" not in result.stderr and "rank 1" not in result.stderr


def test_a_port_in_use_is_one_error_naming_it_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks started without torchrun's own rendezvous (env:// variables by hand or a job
    scheduler): rank 0 cannot open its store on a busy port and says so at once."""
    import socket

    from rnnkit.train.distributed import init_from_env

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(key, value)
        started = time.monotonic()
        with pytest.raises(ValueError, match=f"cannot join the process group at 127.0.0.1:{port}: "
                                             ".*(in use|EADDRINUSE)"):
            init_from_env()
        assert time.monotonic() - started < 60


def _start_two_ranks(text: Path, out: Path, cwd: Path) -> subprocess.Popen[str]:
    """A long 2-rank charlm job in its own session, once its first checkpoint is written."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "rnnkit", *_charlm(text, out, "--steps", "100000", "--batch-size",
                                                   "4", "--checkpoint-every", "10",
                                                   "--eval-every", "100000", "--nproc-per-node", "2")],
        cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoint.json").exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            os.killpg(launcher.pid, signal.SIGKILL)
            raise AssertionError(f"no checkpoint appeared: {launcher.communicate()[1]}")
        time.sleep(0.02)
    return launcher


def _finish(launcher: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_in_the_terminal_stops_every_rank_with_one_checkpoint(text: Path,
                                                                     tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the launcher and every rank (the launcher then signals the
    ranks again): one agreed stop at a step boundary, no rank leaving mid-step."""
    out = tmp_path / "run"
    launcher = _start_two_ranks(text, out, tmp_path)
    os.killpg(launcher.pid, signal.SIGINT)
    stdout, stderr = _finish(launcher)
    assert "interrupted; continue with" in stdout and "--nproc-per-node 2" in stdout, stderr
    assert "Traceback" not in stderr and "stopped at once" not in stderr, stderr
    checkpoint = load_checkpoint(out)
    assert checkpoint.meta["step"] >= 10 and len(checkpoint.meta["rng_ranks"]) == 2


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_with_one_line(text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = _start_two_ranks(text, out, tmp_path)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    if not children.exists():
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.skip("needs /proc to find the ranks' processes")
    ranks = [int(pid) for pid in children.read_text().split()]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # rank 1 (started second) dies without a word
    _, stderr = _finish(launcher)
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("rnnkit train: error")]
    assert len(lines) == 1, stderr
    assert "another rank stopped" in lines[0] and "is intact" in lines[0], lines[0]
    assert "Traceback" not in stderr
