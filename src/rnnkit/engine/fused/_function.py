"""The autograd Function around the C++ layer kernels (forward saves activations, backward is the
kernel's hand-derived BPTT) and the inference path that saves nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Threads for the C++ time loop; 0 = automatic. Tests set it to force the multi-thread split.
loop_threads = 0

_KINDS = {"rnn": 0, "lstm": 1, "gru": 2}
_ACTS = {"tanh": 0, "relu": 1, "sigmoid": 2}


@dataclass(frozen=True)
class Config:
    """The integer form of a cell spec that the C++ entry points take."""

    kind: int
    act: int
    peephole: bool
    coupled: bool
    before: bool

    @property
    def num_peephole(self) -> int:
        if self.kind != 1 or not self.peephole:
            return 0
        return 2 if self.coupled else 3

    def args(self) -> tuple[int, int, bool, bool, bool]:
        return self.kind, self.act, self.peephole, self.coupled, self.before


def config_of(spec: Any) -> Config:
    """Validates a duck-typed cell spec; raises ValueError with a short reason."""
    kind = getattr(spec, "kind", None)
    if kind not in _KINDS:
        raise ValueError(f"cell kind {kind!r}")
    act = 0
    if kind == "rnn":
        nonlinearity = getattr(spec, "nonlinearity", "tanh")
        if nonlinearity not in _ACTS:
            raise ValueError(f"nonlinearity {nonlinearity!r}")
        act = _ACTS[nonlinearity]
    lstm = kind == "lstm"
    peephole = lstm and bool(getattr(spec, "peephole", False))
    coupled = lstm and bool(getattr(spec, "coupled", False))
    before = False
    if kind == "gru":
        reset = getattr(spec, "reset", "after")
        if reset not in ("after", "before"):
            raise ValueError(f"gru reset {reset!r}")
        before = reset == "before"
    return Config(_KINDS[kind], act, peephole, coupled, before)


def _peep(cfg: Config, params: Sequence[Tensor | None]) -> Tensor | None:
    """The peephole vectors stacked as one (P, H) tensor, or None."""
    if cfg.num_peephole == 0:
        return None
    extra = params[4:]
    if len(extra) != cfg.num_peephole:
        raise ValueError(f"expected {cfg.num_peephole} peephole vectors, got {len(extra)}")
    return torch.stack(tuple(extra))


def _check(cfg: Config, x: Tensor, state0: Sequence[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (T, B, I), got shape {tuple(x.shape)}")
    want = 2 if cfg.kind == 1 else 1
    if len(state0) != want:
        raise ValueError(f"expected {want} state tensors, got {len(state0)}")


def run_inference(
    ext: ModuleType,
    cfg: Config,
    batch_sizes: list[int] | None,
    x: Tensor,
    state0: Sequence[Tensor],
    params: Sequence[Tensor | None],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Forward only; no activations are kept."""
    _check(cfg, x, state0)
    w_ih, w_hh, b_ih, b_hh = params[:4]
    c0 = state0[1] if cfg.kind == 1 else None
    with torch.no_grad():
        y, h, c, *_ = ext.forward(
            *cfg.args(),
            x,
            state0[0],
            c0,
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            _peep(cfg, params),
            batch_sizes or [],
            False,
            loop_threads,
        )
    return y, ((h, c) if cfg.kind == 1 else (h,))


class FusedLayer(torch.autograd.Function):
    """inputs: ext, cfg, batch_sizes, num_states, x, *state0, w_ih, w_hh, b_ih, b_hh, *peephole."""

    @staticmethod
    def forward(
        ctx: Any,
        ext: ModuleType,
        cfg: Config,
        batch_sizes: list[int] | None,
        num_states: int,
        x: Tensor,
        *tensors: Tensor | None,
    ) -> tuple[Tensor, ...]:
        state0, params = tensors[:num_states], tensors[num_states:]
        _check(cfg, x, state0)
        w_ih, w_hh, b_ih, b_hh = params[:4]
        c0 = state0[1] if cfg.kind == 1 else None
        peep = _peep(cfg, params)
        y, h, c, acts, cs, extra = ext.forward(
            *cfg.args(),
            x,
            state0[0],
            c0,
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            peep,
            batch_sizes or [],
            True,
            loop_threads,
        )
        ctx.ext, ctx.cfg, ctx.batch_sizes, ctx.num_states = ext, cfg, batch_sizes, num_states
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, state0[0], c0, w_ih, w_hh, peep, y, acts, cs, extra)
        return (y, h, c) if cfg.kind == 1 else (y, h)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor | None, *gstate: Tensor | None) -> tuple[Tensor | None, ...]:
        cfg: Config = ctx.cfg
        x, h0, c0, w_ih, w_hh, peep, y, acts, cs, extra = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (ext, cfg, bs, n, x, *state0, *params)
        n = ctx.num_states
        need_dx = needs[4]
        need_dw = any(needs[5 + n :])
        if gy is None:
            gy = torch.zeros_like(y)
        ghT = gstate[0]
        gcT = gstate[1] if cfg.kind == 1 else None
        dx, dh0, dc0, dwih, dwhh, dbih, dbhh, dpeep = ctx.ext.backward(
            *cfg.args(),
            x,
            h0,
            c0,
            w_ih,
            w_hh,
            peep,
            ctx.has_bias,
            ctx.batch_sizes or [],
            y,
            acts,
            cs,
            extra,
            gy,
            ghT,
            gcT,
            need_dx,
            need_dw,
            loop_threads,
        )
        states = (dh0, dc0) if cfg.kind == 1 else (dh0,)
        if ctx.has_bias:
            if dbhh is not None and dbhh is dbih:
                dbhh = dbih.clone()
            bias_grads = (dbih, dbhh)
        else:
            bias_grads = (None, None)
        peeps = () if dpeep is None else tuple(dpeep.unbind(0))
        return (None, None, None, None, dx, *states, dwih, dwhh, *bias_grads, *peeps)
