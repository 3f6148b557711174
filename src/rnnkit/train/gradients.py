"""Gradient bookkeeping: per-layer norms (to see explosion and vanishing) and clipping."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# "rnn.weight_hh_l1_reverse" → group "rnn.l1_reverse": one curve per recurrent layer
_LAYER_PARAM = re.compile(r"^(?:(.*)\.)?[a-z]+(?:_[a-z]+)*?_(l\d+(?:_reverse)?)$")


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters grouped by layer: recurrent layers by index, other modules by name."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = _LAYER_PARAM.match(name)
        if match:
            key = f"{match.group(1)}.{match.group(2)}" if match.group(1) else match.group(2)
        else:
            key = name.rsplit(".", 1)[0] if "." in name else name
        groups.setdefault(key, []).append(param)
    return groups


def _norm(params: Iterable[nn.Parameter]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def gradient_norms(groups: dict[str, list[nn.Parameter]]) -> tuple[float, dict[str, float]]:
    """The global L2 norm of all gradients and the norm of each group's."""
    per_group = {key: _norm(params) for key, params in groups.items()}
    total = torch.linalg.vector_norm(torch.stack(list(per_group.values()))) if per_group else torch.zeros(())
    return float(total), {key: float(value) for key, value in per_group.items()}


def clip_gradients(
    params: Iterable[nn.Parameter], clip_value: float | None, clip_norm: float | None
) -> None:
    """Element-wise to [-clip_value, clip_value] first, then the global norm to ≤ clip_norm."""
    params = [p for p in params if p.grad is not None]
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
