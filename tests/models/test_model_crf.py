"""Linear-chain CRF against brute-force enumeration of every tag sequence (with masks)."""

from __future__ import annotations

import itertools

import pytest
import torch

from rnnkit.models.crf import LinearChainCRF

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def brute_scores(crf: LinearChainCRF, emissions: torch.Tensor, length: int, row: int) -> dict:
    """Score of every tag sequence of one sentence, written directly from the definition."""
    scores = {}
    for tags in itertools.product(range(crf.num_tags), repeat=length):
        s = crf.start[tags[0]] + crf.end[tags[-1]]
        for t, tag in enumerate(tags):
            s = s + emissions[t, row, tag]
            if t > 0:
                s = s + crf.transitions[tags[t - 1], tag]
        scores[tags] = s
    return scores


@pytest.fixture
def problem() -> tuple[LinearChainCRF, torch.Tensor, torch.Tensor, torch.Tensor]:
    crf = LinearChainCRF(3).double()
    with torch.no_grad():  # larger than the init so that the transitions matter
        for p in crf.parameters():
            p.normal_()
    emissions = torch.randn(4, 3, 3, dtype=torch.float64)  # (T, B, K)
    lengths = torch.tensor([4, 1, 3])
    mask = torch.arange(4).unsqueeze(1) < lengths  # (T, B)
    return crf, emissions, lengths, mask


def test_log_likelihood_equals_brute_force(problem) -> None:
    crf, emissions, lengths, mask = problem
    tags = torch.randint(0, 3, (4, 3))
    log_z = crf.log_partition(emissions, mask)
    log_lik = crf.log_likelihood(emissions, tags, mask)
    for b, n in enumerate(lengths.tolist()):
        scores = brute_scores(crf, emissions, n, b)
        expected_z = torch.logsumexp(torch.stack(list(scores.values())), 0)
        torch.testing.assert_close(log_z[b], expected_z)
        gold = tuple(tags[:n, b].tolist())
        torch.testing.assert_close(log_lik[b], scores[gold] - expected_z)


def test_probabilities_sum_to_one_and_padding_is_ignored(problem) -> None:
    crf, emissions, lengths, mask = problem
    noisy = emissions.clone()
    noisy[~mask] = 1e3  # padding emissions must not leak into any score
    torch.testing.assert_close(crf.log_partition(noisy, mask), crf.log_partition(emissions, mask))
    n = int(lengths[2])
    total = sum(
        crf.log_likelihood(emissions[:n, 2:3], torch.tensor(tags).unsqueeze(1)).exp()
        for tags in itertools.product(range(3), repeat=n)
    )
    torch.testing.assert_close(total, torch.ones(1, dtype=torch.float64))


def test_viterbi_equals_brute_force_argmax(problem) -> None:
    crf, emissions, lengths, mask = problem
    paths, best = crf.decode(emissions, mask)
    for b, n in enumerate(lengths.tolist()):
        scores = brute_scores(crf, emissions, n, b)
        argmax = max(scores, key=lambda k: float(scores[k].detach()))
        assert paths[b] == list(argmax)
        torch.testing.assert_close(best[b], scores[argmax])


def test_gradients_flow_and_bad_masks_are_refused(problem) -> None:
    crf, emissions, _, mask = problem
    emissions.requires_grad_(True)
    loss = crf.loss(emissions, torch.zeros(4, 3, dtype=torch.int64), mask)
    loss.backward()
    assert emissions.grad is not None and crf.transitions.grad is not None
    assert emissions.grad[~mask].abs().max() == 0  # padding gets no gradient
    with pytest.raises(ValueError, match="at least one token"):
        crf.log_partition(emissions, torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="emissions must be"):
        crf.log_partition(emissions[..., :2], mask)
