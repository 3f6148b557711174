r"""The recurrent regularisers' masks, drawn by the layers and applied by every engine.

Four options of every recurrent layer (``rnnkit.LSTM/GRU/RNN``), each with one mask per forward
pass drawn here — never inside an engine — so a fixed seed gives the same masks, and the same
result, in every engine (``reference``, ``bptt``, ``fused``). Each mask is a counter-based hash of
a key drawn from torch's generator (:func:`keep_mask`): ``torch.manual_seed`` fixes it, and the
C++ op that computes it and its torch reference give the same bits:

* ``input_dropout`` p (variational dropout on x_t, Gal & Ghahramani 2016): one mask m_x (B, I)
  per sequence, the same at every step, on each layer's input::

      x̃_t = x_t ⊙ m_x,                  m_x ~ Bernoulli(1 − p) / (1 − p)

* ``recurrent_dropout`` p (Gal & Ghahramani 2016, Keras's ``recurrent_dropout``): one mask
  m_h (B, H) per sequence on the h_{t-1} that ``W_hh`` multiplies::

      pre_t = W_ih x_t + b_ih + W_hh (h_{t-1} ⊙ m_h) + b_hh     (every gate block; GRU: r, z, n)
      GRU blend keeps the undropped state: h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

* ``zoneout`` z_h and ``zoneout_cell`` z_c (Krueger et al. 2017): per step and unit, the state
  keeps its previous value with probability z; at evaluation the expectation::

      h_t = k^h_t ⊙ h_{t-1} + (1 − k^h_t) ⊙ h̃_t,     k^h_t ~ Bernoulli(z_h)   (training)
      c_t = k^c_t ⊙ c_{t-1} + (1 − k^c_t) ⊙ c̃_t,     k^c_t ~ Bernoulli(z_c)   (LSTM)
      evaluation: k^h_t = z_h, k^c_t = z_c

  where h̃_t, c̃_t are the cell's new state; the output at step t is the zoned h_t.

* ``weight_drop`` p (DropConnect, Wan et al. 2013; AWD-LSTM's weight drop, Merity et al. 2018):
  one mask on the recurrent matrix per forward pass, shared by every sequence and step::

      W̃_hh = W_hh ⊙ M,                  M ~ Bernoulli(1 − p) / (1 − p)   (G·H, H)

Nothing is dropped at evaluation (``model.eval()``); zoneout then blends with its expectation.
``input_dropout`` and ``weight_drop`` transform a layer's input and weight before the engine runs,
so every engine (torch's own LSTM op included) runs them; ``recurrent_dropout`` and ``zoneout``
act inside the time loop and reach the engine as :class:`StepMasks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnnkit.cells.base import CellMath, State
from rnnkit.native import NativeExtension, tracing


def check_rate(name: str, value: float | None) -> float | None:
    """A rate in [0, 1), or None; ValueError naming the option otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


# The masks' generator: u_i = mix(mix(i ^ key0) ^ key1) over uint32, mix = lowbias32 (C. Wellons,
# hash-prospector); element i is kept when u_i < threshold. csrc/masks.cpp computes it vectorised
# (torch.rand costs ~2.8 ns per element: 0.4 ms of a 3.5 ms zoneout training step at T,B,H =
# 35,20,200); keep_mask_reference is the same hash in torch integer ops.
_MIX = (0x7FEB352D, 0x846CA68B)
_WORD = 0xFFFFFFFF


def _register_fake(ops: Any) -> None:
    @torch.library.register_fake("rnnkit_masks::keep_mask")
    def _(shape: Sequence[int], key0: int, key1: int, threshold: int, value: float,
          dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype)


_EXTENSION = NativeExtension(
    "rnnkit_masks", [Path(__file__).with_name("csrc") / "masks.cpp"],
    extra_cflags=("-O3",), wide_vectors=True, ops_namespace="rnnkit_masks",
    on_load=_register_fake,
)


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x · constant mod 2^32`` for x in [0, 2^32) as int64, without an int64 overflow (the
    constant is split into 16-bit halves, so no partial product reaches 2^49)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _WORD


def _mix(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX[1])
    return x ^ (x >> 16)


def keep_mask_reference(shape: Sequence[int], key: tuple[int, int], threshold: int, value: float,
                        dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """The masks' generator in torch ops (any device): ``value`` where u_i < threshold, else 0."""
    count = 1
    for size in shape:
        count *= int(size)
    if count > 2**32:
        raise ValueError(f"a mask of {count} elements is larger than the 32-bit counter allows")
    u = _mix(_mix(torch.arange(count, dtype=torch.int64, device=device) ^ key[0]) ^ key[1])
    mask = torch.zeros(count, dtype=dtype, device=device)
    return mask.masked_fill_(u < threshold, value).reshape(tuple(shape))


def keep_mask(like: Tensor, shape: Sequence[int], probability: float, value: float) -> Tensor:
    """A mask of ``shape`` (dtype and device of ``like``): ``value`` with the given probability,
    0 otherwise, independently per element. One key per call is drawn from torch's default
    generator, so ``torch.manual_seed`` makes the masks reproducible and each call fresh.

    In a traced graph (torch.compile, torch.export) the key stays a tensor, drawn by the graph's
    own ``randint`` and read by ``rnnkit_masks::keyed_mask`` when the graph runs (a Python
    ``int`` read from it would end the graph). A graph that replays torch's generator (AOT
    autograd, ``aot_eager``; inductor with ``fallback_random=True``) gives eager's masks for the
    same seed; inductor's own random stream (its default) gives other keys."""
    key = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    threshold = min(round(probability * 2**32), 2**32)
    if tracing():
        return torch.ops.rnnkit_masks.keyed_mask(list(shape), key, threshold, value, like.dtype,
                                                 like.device)
    return _mask_of_key(shape, key, threshold, value, like.dtype, like.device)


def _mask_of_key(shape: Sequence[int], key: Tensor, threshold: int, value: float,
                 dtype: torch.dtype, device: torch.device) -> Tensor:
    """The mask of one (2,) key: the C++ op on the CPU, its torch reference elsewhere."""
    key0, key1 = (int(k) for k in key.tolist())
    ops = _EXTENSION.load() if device.type == "cpu" else None
    if ops is not None:
        return ops.keep_mask(list(shape), key0, key1, threshold, value, dtype)
    return keep_mask_reference(shape, (key0, key1), threshold, value, dtype, device)


@torch.library.custom_op("rnnkit_masks::keyed_mask", mutates_args=())
def keyed_mask(shape: Sequence[int], key: Tensor, threshold: int, value: float,
               dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`keep_mask` from a key tensor (2,): the operator a traced graph calls."""
    return _mask_of_key(shape, key, threshold, value, dtype, device)


@keyed_mask.register_fake
def _(shape: Sequence[int], key: Tensor, threshold: int, value: float, dtype: torch.dtype,
      device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def dropout_mask(like: Tensor, shape: Sequence[int], p: float) -> Tensor:
    """A Bernoulli(1 − p) / (1 − p) mask (inverted dropout: the expectation is 1)."""
    return keep_mask(like, shape, 1 - p, 1 / (1 - p))


@dataclass(frozen=True)
class StepMasks:
    """What the time loop of one layer and direction applies (all sorted like the batch).

    ``recurrent``: (B, H) recurrent-dropout mask m_h, or None. ``zoneout``: per state tensor
    (``(h,)`` or ``(h, c)``) the (T, B, H) keep mask k_t — Bernoulli(z) draws in training, z
    itself at evaluation — or None for a state without zoneout; None for no zoneout at all.
    """

    recurrent: Tensor | None = None
    zoneout: tuple[Tensor | None, ...] | None = None

    def names(self) -> list[str]:
        """The options these masks carry (for dispatch messages)."""
        names = ["recurrent_dropout"] if self.recurrent is not None else []
        if self.zoneout is not None:
            names += [name for name, keep in zip(("zoneout", "zoneout_cell"), self.zoneout)
                      if keep is not None]
        return names


def zoneout_keep(like: Tensor, shape: Sequence[int], z: float, training: bool) -> Tensor:
    """Zoneout's keep mask k: Bernoulli(z) per element in training, the expectation z otherwise."""
    if training:
        return keep_mask(like, shape, z, 1.0)
    return like.new_full((1, 1, shape[2]), z).expand(*shape)


def zoneout(previous: Tensor, new: Tensor, keep: Tensor) -> Tensor:
    """``k ⊙ previous + (1 − k) ⊙ new``: the one definition of zoneout's blend."""
    return keep * previous + (1 - keep) * new


def step(math: CellMath, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
         diag: Sequence[Tensor], masks: StepMasks | None, t: int) -> tuple[State, object]:
    """One step of ``math`` with the masks of step t (rows = the running prefix of the batch)."""
    if masks is None:
        return math.step(gx, state, w_hh, b_hh, diag)
    rows = gx.shape[0]
    mask = None if masks.recurrent is None else masks.recurrent[:rows]
    new, cache = math.step(gx, state, w_hh, b_hh, diag, recurrent_mask=mask)
    if masks.zoneout is not None:
        new = tuple(n if keep is None else zoneout(s, n, keep[t, :rows])
                    for s, n, keep in zip(state, new, masks.zoneout))
    return new, cache


def step_backward(math: CellMath, d_state: State, cache: object, w_hh: Tensor,
                  diag: Sequence[Tensor], masks: StepMasks | None, t: int
                  ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
    """The backward of :func:`step`: zoneout splits each state gradient between the kept
    previous state (``d ⊙ k``) and the cell's new state (``d ⊙ (1 − k)``)."""
    if masks is None or masks.zoneout is None:
        return math.step_backward(d_state, cache, w_hh, diag)
    rows = d_state[0].shape[0]
    keeps = [None if keep is None else keep[t, :rows] for keep in masks.zoneout]
    d_new = tuple(d if k is None else d * (1 - k) for d, k in zip(d_state, keeps))
    d_gx, d_gh, d_previous, d_diag = math.step_backward(d_new, cache, w_hh, diag)
    d_previous = tuple(p if k is None else p + d * k
                       for p, d, k in zip(d_previous, d_state, keeps))
    return d_gx, d_gh, d_previous, d_diag


def recurrent_masks(layer_training: bool, x: Tensor, num_states: int, hidden: int,
                    recurrent_dropout: float, zoneout_h: float, zoneout_c: float
                    ) -> StepMasks | None:
    """The :class:`StepMasks` of one layer and direction for input x (T, B, ·), or None."""
    steps, batch = x.shape[0], x.shape[1]
    recurrent = None
    if recurrent_dropout > 0 and layer_training:
        recurrent = dropout_mask(x, (batch, hidden), recurrent_dropout)
    rates = (zoneout_h, zoneout_c)[:num_states]
    keeps = tuple(zoneout_keep(x, (steps, batch, hidden), z, layer_training) if z > 0 else None
                  for z in rates)
    if all(k is None for k in keeps):
        keeps = None
    if recurrent is None and keeps is None:
        return None
    return StepMasks(recurrent, keeps)


def drop_weight(w_hh: Tensor, p: float) -> Tensor:
    """DropConnect: ``W_hh ⊙ M`` with one Bernoulli(1 − p) / (1 − p) mask M (autograd's product)."""
    return w_hh * dropout_mask(w_hh, w_hh.shape, p)


def drop_input(x: Tensor, p: float) -> Tensor:
    """Variational input dropout: x (T, B, I) times one (B, I) mask shared by every step."""
    return x * dropout_mask(x, (1, x.shape[1], x.shape[2]), p)
