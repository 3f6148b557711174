"""Generic beam search on a hand-made next-token table, where greedy is known to be suboptimal."""

from __future__ import annotations

import math

import pytest
import torch

from rnnkit.decoding.beam import beam_search, greedy_search, length_penalty

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


BOS, EOS, A, B, C = 0, 1, 2, 3, 4


def table_step(table: dict[tuple[int, ...], dict[int, float]]):
    """A 'model' whose state is the prefix of each hypothesis; unknown prefixes → uniform."""

    def step(tokens: torch.Tensor, state: list[tuple[int, ...]]):
        prefixes = [(*prefix, int(t)) for prefix, t in zip(state, tokens)]
        rows = []
        for prefix in prefixes:
            probs = table.get(prefix[1:], {})  # without bos
            row = torch.full((5,), 1e-9)
            for token, p in probs.items():
                row[token] = p
            if not probs:
                row[:] = 0.2
            rows.append((row / row.sum()).log())
        return torch.stack(rows), prefixes

    def select(state: list[tuple[int, ...]], index: torch.Tensor) -> list[tuple[int, ...]]:
        return [state[i] for i in index.tolist()]

    return step, select


# greedy takes A (0.6) then C (0.45): 0.27 in all; B (0.4) then </s> (0.95) is 0.38
TABLE = {
    (): {A: 0.6, B: 0.4},
    (A,): {EOS: 0.25, C: 0.45, B: 0.3},
    (B,): {EOS: 0.95, C: 0.05},
    (A, C): {EOS: 1.0},
    (A, B): {EOS: 1.0},
}


def test_beam_finds_the_sequence_greedy_misses() -> None:
    step, select = table_step(TABLE)
    greedy = greedy_search(step, [()], BOS, EOS, max_length=5)
    assert greedy.tokens == [A, C] and greedy.finished
    assert greedy.log_prob == pytest.approx(math.log(0.6 * 0.45), abs=1e-6)
    best = beam_search(step, [()], select, BOS, EOS, beam_width=2, max_length=5, nbest=2)
    assert best[0].tokens == [B] and best[0].finished
    assert best[0].log_prob == pytest.approx(math.log(0.4 * 0.95), abs=1e-6)
    assert best[1].tokens == [A, C]  # greedy's answer is the runner-up


def test_width_one_is_greedy_and_n_best_is_ranked() -> None:
    step, select = table_step(TABLE)
    greedy = greedy_search(step, [()], BOS, EOS, max_length=5)
    one = beam_search(step, [()], select, BOS, EOS, beam_width=1, max_length=5)[0]
    assert (one.tokens, one.finished) == (greedy.tokens, greedy.finished)
    assert one.log_prob == pytest.approx(greedy.log_prob, abs=1e-6)
    many = beam_search(step, [()], select, BOS, EOS, beam_width=4, max_length=5, nbest=4)
    assert [h.tokens for h in many] == [[B], [A, C], [A, B], [A]]
    assert all(h.finished for h in many)
    assert [h.score for h in many] == sorted((h.score for h in many), reverse=True)


def test_length_normalisation_changes_the_ranking() -> None:
    # A then </s> (0.45·0.9 over 2 tokens) vs A C D </s> (0.55·1·1·0.9 over 4 tokens)
    table = {(): {A: 1.0}, (A,): {EOS: 0.45, C: 0.55}, (A, C): {B: 1.0}, (A, C, B): {EOS: 1.0}}
    step, select = table_step(table)
    raw = beam_search(step, [()], select, BOS, EOS, beam_width=2, max_length=6, nbest=2)
    assert raw[0].tokens == [A, C, B]  # raw log-prob: 0.55 > 0.45
    table[(A,)] = {EOS: 0.52, C: 0.48}
    step, select = table_step(table)
    raw = beam_search(step, [()], select, BOS, EOS, beam_width=2, max_length=6, nbest=2)
    normed = beam_search(step, [()], select, BOS, EOS, beam_width=2, max_length=6, nbest=2,
                         length_norm="length")
    assert raw[0].tokens == [A]  # 0.52 beats 0.48 …
    assert normed[0].tokens == [A, C, B]  # … but per token log(0.48)/4 beats log(0.52)/2
    for h in normed:
        assert h.score == pytest.approx(h.log_prob / (len(h.tokens) + 1))


def test_max_length_returns_unfinished_hypotheses() -> None:
    step, select = table_step({})  # uniform: </s> never wins outright
    hyps = beam_search(step, [()], select, BOS, EOS, beam_width=2, max_length=3, nbest=2)
    assert any(not h.finished and len(h.tokens) == 3 for h in hyps)


def test_length_penalties_and_argument_checks() -> None:
    assert length_penalty(7, "none") == 1.0
    assert length_penalty(7, "length") == 7.0
    assert length_penalty(7, "gnmt", alpha=0.6) == pytest.approx((12 / 6) ** 0.6)
    with pytest.raises(ValueError, match="length_norm"):
        length_penalty(3, "bogus")
    step, select = table_step(TABLE)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(step, [()], select, BOS, EOS, beam_width=2, nbest=3)
