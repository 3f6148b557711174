"""A linear-chain conditional random field over tag sequences (Lafferty et al. 2001).

For emissions ``e_t(y)`` (the tagger's per-token scores), transitions ``A[i, j]`` (tag i → tag j)
and start / end scores ``s(y)`` / ``z(y)``, a tag sequence y_1..y_n of a sentence of length n
scores::

    score(y) = s(y_1) + e_1(y_1) + Σ_{t=2..n} (A[y_{t-1}, y_t] + e_t(y_t)) + z(y_n)
    log P(y | x) = score(y) − log Z,      log Z = logsumexp over all K^n sequences of score

``log Z`` comes from the forward algorithm (a logsumexp recursion, O(n·K²)), the best sequence
from Viterbi (the same recursion with max, plus back-pointers). Both are vectorised over the
batch and the tags; only time is a Python loop.

Shapes are time-major like the rest of rnnkit: emissions (T, B, K), tags (T, B), mask (T, B)
bool, True on real tokens. Each mask column must be a prefix of Trues (variable lengths, at least
one token): padding past a sentence's end leaves its scores untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearChainCRF(nn.Module):
    def __init__(self, num_tags: int) -> None:
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be positive, got {num_tags}")
        self.num_tags = num_tags
        # small random init so that training from zero emissions still breaks symmetry
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))  # (K, K)
        self.start = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))  # (K,)
        self.end = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))  # (K,)

    def _check(self, emissions: Tensor, mask: Tensor | None) -> Tensor:
        if emissions.dim() != 3 or emissions.shape[2] != self.num_tags:
            raise ValueError(f"emissions must be (T, B, {self.num_tags}), got {tuple(emissions.shape)}")
        if mask is None:
            return emissions.new_ones(emissions.shape[:2], dtype=torch.bool)
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask must be (T, B) = {tuple(emissions.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        if not bool(mask[0].all()):
            raise ValueError("every sequence must have at least one token (mask[0] all True)")
        return mask

    def score(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unnormalised score of the given tag sequences: (B,)."""
        mask = self._check(emissions, mask)
        steps, batch, _ = emissions.shape
        rows = torch.arange(batch, device=emissions.device)
        maskf = mask.to(emissions.dtype)  # (T, B)
        emitted = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (T, B)
        total = self.start[tags[0]] + (emitted * maskf).sum(0)  # (B,)
        if steps > 1:
            moves = self.transitions[tags[:-1], tags[1:]]  # (T-1, B)
            total = total + (moves * maskf[1:]).sum(0)
        last = tags[mask.sum(0) - 1, rows]  # (B,) the tag at each sentence's last real token
        return total + self.end[last]

    def log_partition(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """log Z by the forward algorithm: (B,)."""
        mask = self._check(emissions, mask)
        alpha = self.start + emissions[0]  # (B, K): log-sum of all prefixes ending in each tag
        for t in range(1, emissions.shape[0]):
            # (B, K_prev, 1) + (K_prev, K) → logsumexp over previous tag → (B, K)
            step = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1) + emissions[t]
            alpha = torch.where(mask[t].unsqueeze(1), step, alpha)  # finished rows keep theirs
        return torch.logsumexp(alpha + self.end, dim=1)

    def log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None) -> Tensor:
        """log P(tags | x) per sequence: (B,)."""
        return self.score(emissions, tags, mask) - self.log_partition(emissions, mask)

    def loss(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None) -> Tensor:
        """Negative log-likelihood summed over the batch's sequences and divided by its tokens.

        Per token rather than per sentence, so the scale matches a per-token cross-entropy and
        does not grow with sentence length.
        """
        mask = self._check(emissions, mask)
        return -self.log_likelihood(emissions, tags, mask).sum() / mask.sum()

    @torch.no_grad()
    def decode(self, emissions: Tensor, mask: Tensor | None = None) -> tuple[list[list[int]], Tensor]:
        """Viterbi: the best tag sequence of each sentence (lists of its length) and its score (B,)."""
        mask = self._check(emissions, mask)
        steps, batch, _ = emissions.shape
        best = self.start + emissions[0]  # (B, K): best prefix score ending in each tag
        pointers = []
        for t in range(1, steps):
            candidates = best.unsqueeze(2) + self.transitions  # (B, K_prev, K)
            value, previous = candidates.max(dim=1)  # (B, K) each
            active = mask[t].unsqueeze(1)  # (B, 1)
            best = torch.where(active, value + emissions[t], best)
            # a finished row points to the same tag, so back-tracking passes through padding
            stay = torch.arange(self.num_tags, device=emissions.device).expand(batch, -1)
            pointers.append(torch.where(active, previous, stay))  # (B, K)
        scores, last = (best + self.end).max(dim=1)  # (B,)
        lengths = mask.sum(0).tolist()
        path = [last]
        for back in reversed(pointers):
            path.append(back.gather(1, path[-1].unsqueeze(1)).squeeze(1))
        tags = torch.stack(path[::-1]).tolist()  # (T, B) as lists
        return [[tags[t][b] for t in range(n)] for b, n in enumerate(lengths)], scores
