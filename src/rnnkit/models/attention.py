"""Attention over encoder outputs, masked by source lengths.

For a decoder query q (B, Q) and encoder outputs (keys = values) k_s (S, B, K)::

    additive (Bahdanau et al. 2015):     e_s = vᵀ tanh(W_q q + W_k k_s)
    general  (Luong et al. 2015):        e_s = qᵀ W k_s
    dot      (Luong et al. 2015):        e_s = qᵀ k_s                   (needs Q = K)
    a = softmax over the real source positions of e,   context = Σ_s a_s k_s   (B, K)

The key-side projection does not depend on the decoder step, so :meth:`Attention.prepare` computes
it once per source batch and every step reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ATTENTIONS = ("none", "additive", "general", "dot")


@dataclass
class Memory:
    """Encoder outputs prepared for attention."""

    values: Tensor  # (S, B, K) encoder outputs
    keys: Tensor  # (S, B, A) projected keys (additive: W_k k; general: W k; dot: k itself)
    mask: Tensor  # (S, B) bool, True on real source positions

    def select(self, index: Tensor) -> Memory:
        """The rows ``index`` of the batch (beam search reorders and repeats hypotheses)."""
        return Memory(self.values[:, index], self.keys[:, index], self.mask[:, index])


class Attention(nn.Module):
    def __init__(self, kind: str, query_size: int, key_size: int, attention_size: int = 0) -> None:
        super().__init__()
        if kind not in ATTENTIONS[1:]:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS[1:])}, got {kind!r}")
        self.kind = kind
        if kind == "additive":
            size = attention_size or query_size
            self.query_proj = nn.Linear(query_size, size, bias=False)
            self.key_proj: nn.Linear | None = nn.Linear(key_size, size)
            self.v = nn.Linear(size, 1, bias=False)
        elif kind == "general":
            # qᵀ W k computed as qᵀ (W k): project the keys once, not the query every step
            self.key_proj = nn.Linear(key_size, query_size, bias=False)
        else:
            if query_size != key_size:
                raise ValueError(f"dot attention needs equal query and key sizes, got {query_size} "
                                 f"and {key_size}; use 'general' to learn a projection")
            self.key_proj = None

    def prepare(self, values: Tensor, mask: Tensor) -> Memory:
        """values (S, B, K), mask (S, B) → the per-batch memory every step attends over."""
        keys = self.key_proj(values) if self.key_proj is not None else values  # (S, B, A)
        return Memory(values, keys, mask)

    def forward(self, query: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        """query (B, Q) → context (B, K) and weights (B, S) (zero at padding, rows sum to 1)."""
        if self.kind == "additive":
            hidden = torch.tanh(memory.keys + self.query_proj(query).unsqueeze(0))  # (S, B, A)
            scores = self.v(hidden).squeeze(2)  # (S, B)
        else:
            scores = (memory.keys * query.unsqueeze(0)).sum(2)  # (S, B)
        scores = scores.masked_fill(~memory.mask, float("-inf"))
        weights = torch.softmax(scores, dim=0)  # (S, B)
        context = (weights.unsqueeze(2) * memory.values).sum(0)  # (B, K)
        return context, weights.t()  # (B, K), (B, S)
