"""What every cell family shares: the math contract the engine runs, and the one-step module API.

A cell family is described twice, on purpose, and only twice:

* its *math* (a :class:`CellMath`): one forward step written with plain torch ops — which the
  reference backend differentiates with autograd and the BPTT engine runs without autograd — and
  the hand-derived backward of that step, checked against autograd by ``gradcheck``;
* its *module* (a :class:`RecurrentCell`): the parameters of one layer in ``torch.nn`` naming and
  the cell-level API of the material (``output, state = cell(x_t, state)``).

Everything else (time, lengths, stacking, direction) lives in the engine and the layers and knows
nothing about the gates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.validation import check_cell_input, check_cell_sizes

State = tuple[Tensor, ...]
"""A cell's state: ``(h,)`` for Elman and GRU, ``LSTMState(h, c)`` for LSTM."""


@dataclass(frozen=True)
class CellSpec:
    """The whole identity of a cell variant, as plain values: what kernels dispatch on.

    Every backend that compiles a cell (the fused C++ engine, the ONNX exporter) looks a spec up
    in its own table of the variants it implements; a spec missing from a table raises there,
    so a new field (a variant a table does not know) can never fall through to the wrong kernel.
    """

    kind: str  # "rnn" | "lstm" | "gru"
    nonlinearity: str = "tanh"  # rnn: "tanh" | "relu" | "sigmoid" | "identity"
    peephole: bool = False  # lstm
    coupled: bool = False  # lstm
    reset: str = "after"  # gru: "after" | "before"
    projection: bool = False  # lstm: h_t = W_hr (o_t ⊙ tanh c_t), torch.nn.LSTM's proj_size > 0
    layer_norm: bool = False  # lstm, gru: layer-normalised (cells/layer_norm.py)


class CellMath(ABC):
    """One recurrent step of a cell family and its hand-derived backward.

    Conventions shared by every family (they are what the engine relies on):

    * ``gx`` is the input projection ``x_t W_ih^T + b_ih`` of shape (B, G*H), computed by the engine
      for all time steps in one GEMM; the step adds the recurrent part itself, because some cells
      (GRU) combine the two halves non-additively.
    * The recurrent weight ``w_hh`` (G*H, H) is applied to *recurrent inputs* that the step returns
      in ``recurrent_inputs(cache)``, one tensor per row group of ``recurrent_row_groups``; for most
      cells that is just ``h_{t-1}`` for all rows. The engine forms ``dW_hh`` from them with one GEMM
      per group over all time steps.
    * ``step_backward`` returns the gradient of the loss w.r.t. ``gx`` and w.r.t. the recurrent
      pre-activation ``W_hh · input + b_hh`` (they differ only for GRU), the gradient w.r.t. the
      previous state, and the gradients of the diagonal (peephole) weights summed over the batch.
    """

    #: the family: "rnn", "lstm" or "gru" (what a fused kernel dispatches on)
    kind: str
    #: number of gate blocks stacked in the rows of ``w_ih`` and ``w_hh``
    num_gates: int
    #: the names of the state tensors, in order; the first is always ``h`` (the output)
    state_names: tuple[str, ...] = ("h",)
    #: names of the diagonal (H,) weights of this variant, in the order they are passed
    diagonal_names: tuple[str, ...] = ()
    #: True when d(gx) and d(recurrent pre-activation) are the same tensor (Elman, LSTM)
    shares_preactivation_grad: bool = True
    #: True for the layer-normalised forms; the engine then applies the input LN before the loop
    layer_norm: bool = False
    #: False where the biases are the layer norms' (no ``bias_ih``/``bias_hh``)
    has_bias_vectors: bool = True
    #: the gate blocks the chrono initialisation sets, as (block index, sign): the bias of block
    #: ``index`` starts at ``sign · log u`` (see :func:`init_chrono`); empty: no gates (Elman)
    chrono_gates: tuple[tuple[int, float], ...] = ()

    @property
    def extra_weight_names(self) -> tuple[str, ...]:
        """Every weight after ``(w_ih, w_hh, b_ih, b_hh)``, in the order the engine passes them
        (as ``diag`` to :meth:`step`): the diagonal weights, then any others (LSTM's ``weight_hr``)."""
        return self.diagonal_names

    @property
    @abstractmethod
    def spec(self) -> CellSpec:
        """This variant as a :class:`CellSpec`."""

    @abstractmethod
    def step(
        self, gx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None, diag: Sequence[Tensor],
        recurrent_mask: Tensor | None = None,
    ) -> tuple[State, Any]:
        """One time step: returns the new state and a cache for :meth:`step_backward`.

        ``recurrent_mask`` (B, H) is variational recurrent dropout's mask (Gal & Ghahramani
        2016): ``W_hh`` then multiplies ``h_{t-1} ⊙ m`` (see :func:`recurrent_input`); every other
        use of ``h_{t-1}`` (the GRU's blend) keeps ``h_{t-1}``. The cache holds the mask, so
        :meth:`step_backward` routes the gradient of that product back through it.
        """

    @abstractmethod
    def step_backward(
        self, d_state: State, cache: Any, w_hh: Tensor, diag: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, State, tuple[Tensor, ...]]:
        """Returns ``(d_gx, d_gh, d_previous_state, d_diag)`` for one step."""

    def diagonal_size(self, name: str, hidden_size: int) -> int:
        """The length of the diagonal weight ``name`` (H; layer-norm gains may be G·H)."""
        return hidden_size

    def initial_value(self, name: str) -> float | None:
        """A constant a parameter starts at (layer-norm gains 1, biases 0); None: uniform."""
        return None

    def recurrent_row_groups(self, hidden_size: int) -> list[slice]:
        """Row ranges of ``w_hh`` that multiply the same recurrent input."""
        return [slice(0, self.num_gates * hidden_size)]

    def recurrent_inputs(self, cache: Any) -> tuple[Tensor, ...]:
        """The tensors ``w_hh``'s row groups multiplied at this step (default: ``h_{t-1}``)."""
        return (cache[0],)

    def make_state(self, tensors: Sequence[Tensor]) -> State:
        """Wraps plain tensors in this family's state type."""
        return tuple(tensors)


def chrono_bias(hidden_size: int, t_max: float, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """``log u`` with ``u ~ U[1, T_max − 1]`` per unit: Tallec & Ollivier (2018)'s chrono bias.

    A gate that keeps the state with probability σ(b) forgets it at the rate 1 / (1 + e^b) per
    step, so e^b = u makes each unit's characteristic memory 1 + u steps: the units' time
    scales spread over 2 … T_max (their Eq. 13). Drawn from torch's global generator, like
    ``nn.init``, so ``torch.manual_seed`` fixes it.
    """
    if isinstance(t_max, bool) or not isinstance(t_max, (int, float)):  # (as check_rate)
        raise ValueError(f"chrono must be a number (T_max, in steps), got {t_max!r}")
    if not t_max >= 2:  # U[1, T_max − 1] must not be empty (T_max = 2: every bias 0)
        raise ValueError(f"chrono needs T_max >= 2 (the longest dependency in steps), got {t_max}")
    u = torch.empty(hidden_size, dtype=dtype, device=device).uniform_(1.0, t_max - 1.0)
    return u.log()


def gate_bias_vectors(module: nn.Module, suffix: str) -> tuple[Tensor | None, Tensor | None]:
    """The two vectors whose sum is each gate's bias: ``bias_ih``/``bias_hh``, or with
    ``layer_norm`` the two layer norms' biases (added after each LN, so the same role); None where
    ``module`` has none (``bias=False``; minGRU/minLSTM have no ``bias_hh``)."""
    names = (("ln_ih_bias", "ln_hh_bias") if getattr(module.math, "layer_norm", False)
             else ("bias_ih", "bias_hh"))
    parameters = module._parameters  # (a name that is not there: None, not an AttributeError)
    return parameters.get(names[0] + suffix), parameters.get(names[1] + suffix)


def weight_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of ``layer.weight_hh_l0`` without computing it where it can: read from the
    parameter, or, when the weight is parametrized (``orthogonal=``, torch's parametrizations),
    from the tensor it is computed from (the parametrization runs once per forward, in
    layer_params); a weight set by a hook (pruning, the old weight_norm, AWD-LSTM's WeightDrop)
    is read as it stands."""
    weight = layer._parameters.get("weight_hh_l0")
    if weight is None:
        parametrizations = getattr(layer, "parametrizations", None)
        if parametrizations is not None and "weight_hh_l0" in parametrizations:
            originals = parametrizations["weight_hh_l0"]  # (original, or original0, 1, … when
            # the parametrization has several inputs, as weight_norm's g and v)
            weight = originals.original if hasattr(originals, "original") else originals.original0
        else:
            weight = layer.weight_hh_l0
    return weight.dtype


def init_chrono(chrono_gates: tuple[tuple[int, float], ...], bias_ih: Tensor | None,
                bias_hh: Tensor | None, hidden_size: int, t_max: float) -> None:
    """Sets the gate biases of one layer and direction to the chrono initialisation.

    ``chrono_gates`` is the math's (:attr:`CellMath.chrono_gates`): LSTM ``b_f = log u``,
    ``b_i = −b_f``; GRU ``b_z = log u`` (its z keeps h); minGRU ``b_z = −log u`` (its z
    updates h). The total bias is ``bias_ih + bias_hh``, so ``bias_hh`` is zeroed in those rows;
    the other rows keep their initialisation.
    """
    if not chrono_gates:
        raise ValueError("chrono initialises gate biases; this cell has no gates")
    if bias_ih is None:
        raise ValueError("chrono needs bias=True")
    b = chrono_bias(hidden_size, t_max, bias_ih.dtype, bias_ih.device)  # (H,)
    with torch.no_grad():
        for block, sign in chrono_gates:
            rows = slice(block * hidden_size, (block + 1) * hidden_size)
            bias_ih[rows] = sign * b
            if bias_hh is not None:
                bias_hh[rows] = 0.0


def _engine() -> Any:
    """rnnkit.engine, imported on first use (the engine itself imports this module)."""
    import rnnkit.engine

    return rnnkit.engine


# rnnkit.engine.fused.inference, imported on first use (the engine imports this module): a
# `from ... import` in forward costs a Python-level fromlist lookup on every step
_inference: Any = None


def _load_inference() -> Any:
    global _inference
    from rnnkit.engine.fused import inference

    _inference = inference
    return _inference


def sigmoid_grad(y: Tensor) -> Tensor:
    """σ'(x) written with the output y = σ(x)."""
    return y * (1 - y)


def tanh_grad(y: Tensor) -> Tensor:
    """tanh'(x) written with the output y = tanh(x)."""
    return 1 - y * y


def recurrent_input(h: Tensor, mask: Tensor | None) -> Tensor:
    """``h ⊙ m``, what ``W_hh`` multiplies under recurrent dropout; ``h`` itself without a mask.

    The same product carries the gradient back (``dh_{t-1} = (d_pre W_hh) ⊙ m``).
    """
    return h if mask is None else h * mask


def recurrent_projection(h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """``h W_hh^T + b_hh`` as one fused BLAS call when there is a bias."""
    if b_hh is None:
        return h @ w_hh.t()
    return torch.addmm(b_hh, h, w_hh.t())


def pickle_state(state: dict[str, Any]) -> dict[str, Any]:
    """A layer's or cell's pickled ``__dict__`` with its math replaced by plain values.

    Like ``torch.nn.LSTM``, a pickle of an rnnkit module holds only its class, tensors and plain
    values, so ``torch.load(weights_only=True)`` accepts it once the module classes are allowed;
    the math object is rebuilt from the spec on load (:func:`unpickle_state`).
    """
    state = dict(state)
    # (the inference path's caches: weights_only loads refuse them, and they rebuild on use)
    state.pop("_inference_plan", None)
    state.pop("_inference_config", None)
    state.pop("_inference_lane", None)  # (holds the operator: not picklable at all)
    spec = state.pop("math").spec
    state["_cell_spec"] = (spec.kind, spec.nonlinearity, spec.peephole, spec.coupled, spec.reset,
                           spec.projection, spec.layer_norm)
    return state


def unpickle_state(state: dict[str, Any]) -> dict[str, Any]:
    from rnnkit.cells import math_for

    state = dict(state)
    state["math"] = math_for(CellSpec(*state.pop("_cell_spec")))
    return state


class RecurrentCell(nn.Module):
    """Base of the cell-level API: one layer's parameters and one step at a time.

    Parameter names follow ``torch.nn.RNNCell/LSTMCell/GRUCell`` (``weight_ih``, ``weight_hh``,
    ``bias_ih``, ``bias_hh``), plus the diagonal weights of a variant (e.g. ``weight_ci``).
    """

    math: CellMath

    def __init__(self, input_size: int, hidden_size: int, bias: bool, math_: CellMath,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}  # as torch.nn's factory arguments
        check_cell_sizes(input_size, hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.math = math_
        rows = math_.num_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory_kwargs))
        if bias and math_.has_bias_vectors:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        for name in math_.diagonal_names:
            setattr(self, name, nn.Parameter(torch.empty(math_.diagonal_size(name, hidden_size),
                                                         **factory_kwargs)))
        self.reset_parameters()

    def __getstate__(self) -> dict[str, Any]:
        return pickle_state(super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(unpickle_state(state))

    def reset_parameters(self) -> None:
        """Uniform(-1/√H, 1/√H) for every parameter, as ``torch.nn`` initialises its cells."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, weight in self.named_parameters():
            value = self.math.initial_value(name)
            if value is None:
                nn.init.uniform_(weight, -bound, bound)
            else:
                nn.init.constant_(weight, value)

    @property
    def diagonal_weights(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self.math.diagonal_names)

    @property
    def state_size(self) -> Any:
        """The size of each state tensor (an int, or an ``LSTMState`` of ints)."""
        return self.hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def zero_state(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> State:
        """An all-zero state for ``batch_size`` sequences (parameter dtype and device by default)."""
        dtype = dtype or self.weight_hh.dtype
        device = device or self.weight_hh.device
        zeros = [
            torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device)
            for _ in self.math.state_names
        ]
        return self.math.make_state(zeros)

    def forward(self, x_t: Tensor, state: State | Tensor | None = None) -> tuple[Tensor, State]:
        """One step: ``output, new_state = cell(x_t, state)``; x_t is (B, input_size) or (input_size,)."""
        if not torch.is_grad_enabled():  # inference: the lean step (engine/fused/inference.py)
            result = (_inference or _load_inference()).cell_step(self, x_t, state)
            if result is not None:
                return result
        unbatched = x_t.dim() == 1
        x_t, state = check_cell_input(self, x_t, state)
        if state is None:
            state = self.zero_state(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
        # one step is a sequence of length 1: the engine's fused kernel is the fastest way to run
        # it (a streaming step), and the cell shares every backend's tested code path
        # (from the parameters' dict: a Module attribute costs ~0.5 µs each, a step ~20 µs; a
        # parametrized weight is not in the dict: then by attribute)
        p = self._parameters
        try:
            params = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"],
                      *(p[name] for name in self.math.diagonal_names))
        except KeyError:
            params = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                      *self.diagonal_weights)
        new_state = self.math.make_state(_engine().run_step(self.math, x_t, tuple(state), params))
        if unbatched:
            new_state = self.math.make_state([s.squeeze(0) for s in new_state])
        return new_state[0], new_state

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"

    @classmethod
    def _copy_from_torch(cls, cell: RecurrentCell, module: nn.Module) -> RecurrentCell:
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                source = getattr(module, name)
                if source is not None:
                    getattr(cell, name).copy_(source)
        return cell.to(module.weight_hh.dtype)
