"""Property-based checks (hypothesis) that keep issue 10's silent wrong answers fixed.

* the fused engine (and the BPTT engine) equal the reference over random variants, layers,
  directions, shapes (B = 0 and 1, T = 1), lengths, batch_first, strides and dtypes, in outputs,
  final states and every gradient; T = 0 is the same clear error everywhere;
* a NaN or ±inf in the input, an initial state or a weight propagates exactly as through the
  reference and torch.nn (same NaN mask, same infinities) in outputs and gradients;
* both CTC backends equal ``F.ctc_loss``, NaN and ±inf inputs included.

Profiles: "ci" (the default) is derandomized, so every run draws the same examples; set
RNNKIT_HYPOTHESIS=dev for fresh random examples and more of them. Bounded in examples, not in
time per example (deadline=None: the first fused call compiles the kernel).
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnkit
from conftest import VARIANTS
from rnnkit.engine.fused import _function
from rnnkit.losses.ctc import ctc_loss
from test_nonfinite import assert_same_values

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("RNNKIT_HYPOTHESIS", "ci"))

NAN, INF = float("nan"), float("inf")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {torch.float32: dict(atol=2e-4, rtol=2e-3), torch.float64: dict(atol=1e-9, rtol=1e-7)}


def make_layer(variant: str, backend: str, dtype: torch.dtype, **options) -> torch.nn.Module:
    layer, _, variant_options = VARIANTS[variant]
    return layer(backend=backend, **variant_options, **options).to(dtype)


def run(module: torch.nn.Module, x: torch.Tensor, hx, lengths, probe: torch.Tensor):
    """Outputs, final states and the gradients of a random projection of both."""
    x = x.detach().clone().requires_grad_()  # (clone keeps the strides of a non-contiguous x)
    if hx is not None:
        hx = tuple(h.detach().clone().requires_grad_() for h in hx)
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        given_hx = None if hx is None else (hx if len(hx) == 2 else hx[0])
        extra = {} if lengths is None else {"lengths": lengths}  # (torch.nn takes no lengths)
        out, final = module(x, given_hx, **extra)
    final = final if isinstance(final, tuple) else (final,)
    loss = (out * probe).sum() + sum((f * f).sum() for f in final)
    loss.backward()
    grads = [x.grad] + ([] if hx is None else [h.grad for h in hx])
    return [out.detach(), *(f.detach() for f in final), *grads,
            *(p.grad for p in module.parameters())]


def inference(module: torch.nn.Module, x: torch.Tensor, hx, lengths) -> list[torch.Tensor]:
    """Outputs and final states under torch.no_grad() (the kernels' separate inference path)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        given_hx = None if hx is None else (hx if len(hx) == 2 else hx[0])
        extra = {} if lengths is None else {"lengths": lengths}
        out, final = module(x, given_hx, **extra)
    return [out, *(final if isinstance(final, tuple) else (final,))]


@st.composite
def layer_problems(draw):
    variant = draw(st.sampled_from(sorted(VARIANTS)))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    steps = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))
    inputs = draw(st.integers(1, 4))
    hidden = draw(st.sampled_from([1, 3, 8, 17]))  # 17: more units than one 16-wide chunk
    num_layers = draw(st.integers(1, 2))
    bidirectional = draw(st.booleans())
    batch_first = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    lengths = None
    if batch and draw(st.booleans()):
        lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        if draw(st.booleans()):
            lengths = torch.tensor(lengths)
    with_state = draw(st.booleans())
    threads = draw(st.sampled_from([0, 0, 2]))
    seed = draw(st.integers(0, 2**16))
    return dict(variant=variant, dtype=dtype, steps=steps, batch=batch, inputs=inputs,
                hidden=hidden, num_layers=num_layers, bidirectional=bidirectional,
                batch_first=batch_first, layout=layout, lengths=lengths, with_state=with_state,
                threads=threads, seed=seed)


def make_input(p: dict) -> torch.Tensor:
    shape = (p["batch"], p["steps"]) if p["batch_first"] else (p["steps"], p["batch"])
    if p["layout"] == "strided":  # every other feature of a wider tensor
        return torch.randn(*shape, 2 * p["inputs"], dtype=p["dtype"])[..., ::2]
    if p["layout"] == "transposed":  # the two leading dimensions swapped in memory
        return torch.randn(shape[1], shape[0], p["inputs"], dtype=p["dtype"]).transpose(0, 1)
    return torch.randn(*shape, p["inputs"], dtype=p["dtype"])


@settings(PROFILE)
@given(problem=layer_problems())
def test_fused_and_bptt_equal_reference(problem):
    p = problem
    torch.manual_seed(p["seed"])
    options = dict(input_size=p["inputs"], hidden_size=p["hidden"], num_layers=p["num_layers"],
                   bidirectional=p["bidirectional"], batch_first=p["batch_first"])
    reference = make_layer(p["variant"], "reference", p["dtype"], **options)
    x = make_input(p)
    if p["lengths"] is not None:  # padding is never read: NaN there must change nothing
        steps = torch.arange(p["steps"]).unsqueeze(1)
        padding = steps >= torch.as_tensor(p["lengths"]).unsqueeze(0)  # (T, B)
        x = x.masked_fill((padding.t() if p["batch_first"] else padding).unsqueeze(2), NAN)
    depth = p["num_layers"] * (2 if p["bidirectional"] else 1)
    hx = None
    if p["with_state"]:
        hx = tuple(torch.randn(depth, p["batch"], p["hidden"], dtype=p["dtype"])
                   for _ in reference.math.state_names)
    out_shape = (*x.shape[:2], p["hidden"] * (2 if p["bidirectional"] else 1))
    probe = torch.randn(out_shape, dtype=p["dtype"])
    expected = run(reference, x, hx, p["lengths"], probe)
    assert expected[0].shape == out_shape
    previous_threads = _function.loop_threads
    try:
        _function.loop_threads = p["threads"]
        for backend in ("fused", "bptt"):
            module = make_layer(p["variant"], backend, p["dtype"], **options)
            module.load_state_dict(reference.state_dict())
            actual = run(module, x, hx, p["lengths"], probe)
            assert len(actual) == len(expected)
            for i, (e, a) in enumerate(zip(expected, inference(module, x, hx, p["lengths"]))):
                assert_same_values(e, a, f"{backend} no grad, value {i}", **TOLERANCE[p["dtype"]])
            for i, (e, a) in enumerate(zip(expected, actual)):
                assert_same_values(e, a, f"{backend} value {i}", **TOLERANCE[p["dtype"]])
                if p["lengths"] is not None and i > 0:  # (outputs are 0 past the lengths)
                    assert not a.isnan().any(), f"{backend} value {i}: the padding's NaN leaked"
    finally:
        _function.loop_threads = previous_threads


@settings(PROFILE)
@given(variant=st.sampled_from(sorted(VARIANTS)), backend=st.sampled_from(["fused", "bptt",
                                                                            "reference"]),
       batch=st.integers(0, 3), batch_first=st.booleans())
def test_zero_steps_is_one_clear_error(variant, backend, batch, batch_first):
    module = make_layer(variant, backend, torch.float32, input_size=3, hidden_size=4,
                        batch_first=batch_first)
    x = torch.randn(batch, 0, 3) if batch_first else torch.randn(0, batch, 3)
    with pytest.raises(ValueError, match="has sequence length 0"):
        module(x)


PLACES = ("input", "h0", "c0", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
          "peephole", "last layer weight")


@st.composite
def poisoned_problems(draw):
    variant = draw(st.sampled_from(sorted(VARIANTS)))
    is_lstm = VARIANTS[variant][0] is rnnkit.LSTM
    places = [p for p in PLACES if (p != "c0" or is_lstm)
              and (p != "peephole" or VARIANTS[variant][2].get("peephole"))]
    return dict(
        variant=variant, dtype=DTYPES[draw(st.sampled_from(sorted(DTYPES)))],
        steps=draw(st.integers(1, 4)), batch=draw(st.integers(1, 3)),
        hidden=draw(st.sampled_from([2, 5, 17])), num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()), place=draw(st.sampled_from(places)),
        value=draw(st.sampled_from([NAN, INF, -INF])), position=draw(st.floats(0, 1)),
        seed=draw(st.integers(0, 2**16)))


@settings(PROFILE)
@given(problem=poisoned_problems())
def test_nonfinite_propagates_like_reference_and_torch(problem):
    p = problem
    torch.manual_seed(p["seed"])
    options = dict(input_size=3, hidden_size=p["hidden"], num_layers=p["num_layers"],
                   bidirectional=p["bidirectional"])
    reference = make_layer(p["variant"], "reference", p["dtype"], **options)
    depth = p["num_layers"] * (2 if p["bidirectional"] else 1)
    x = torch.randn(p["steps"], p["batch"], 3, dtype=p["dtype"])
    hx = tuple(torch.randn(depth, p["batch"], p["hidden"], dtype=p["dtype"])
               for _ in reference.math.state_names)
    names = [n for n, _ in reference.named_parameters()]
    target = {"input": x, "h0": hx[0], "c0": hx[-1]}.get(p["place"])
    if target is None:
        if p["place"] == "peephole":
            name = next(n for n in names if n.startswith("weight_c"))
        elif p["place"] == "last layer weight":
            name = names[-1]
        else:
            name = p["place"]
        target = dict(reference.named_parameters())[name]
    with torch.no_grad():
        flat = target.view(-1)
        flat[min(int(p["position"] * flat.numel()), flat.numel() - 1)] = p["value"]
    probe = torch.randn(p["steps"], p["batch"], p["hidden"] * (2 if p["bidirectional"] else 1),
                        dtype=p["dtype"])
    expected = run(reference, x, hx, None, probe)
    candidates = {}
    for backend in ("fused", "bptt"):
        module = make_layer(p["variant"], backend, p["dtype"], **options)
        module.load_state_dict(reference.state_dict())
        candidates[backend] = run(module, x, hx, None, probe)
        candidates[f"{backend} (no grad)"] = inference(module, x, hx, None)
    if reference._torch_compatibility_problem() is None:
        candidates["torch.nn"] = run(reference.to_torch(), x, hx, None, probe)
    for backend, values in candidates.items():
        for i, (e, a) in enumerate(zip(expected, values)):
            assert_same_values(e, a, f"{backend} value {i}", **TOLERANCE[p["dtype"]])


@st.composite
def ctc_problems(draw):
    steps = draw(st.integers(1, 8))
    batch = draw(st.integers(1, 3))
    classes = draw(st.integers(2, 6))
    blank = draw(st.integers(0, classes - 1))
    labels = [c for c in range(classes) if c != blank]
    targets = [draw(st.lists(st.sampled_from(labels), min_size=0, max_size=min(4, steps)))
               for _ in range(batch)]
    input_lengths = [draw(st.integers(0, steps)) for _ in range(batch)]
    input_lengths[draw(st.integers(0, batch - 1))] = steps
    count = draw(st.sampled_from([0, 1, 1, 2, 3]))  # most examples hold a NaN or an inf
    poison = draw(st.lists(st.tuples(st.integers(0, steps - 1), st.integers(0, batch - 1),
                                     st.integers(0, classes - 1),
                                     st.sampled_from([NAN, INF, -INF])),
                           min_size=count, max_size=count))
    return dict(steps=steps, batch=batch, classes=classes, blank=blank, targets=targets,
                input_lengths=input_lengths, poison=poison,
                padded=draw(st.booleans()), dtype=DTYPES[draw(st.sampled_from(sorted(DTYPES)))],
                unnormalised=draw(st.sampled_from([False, False, True])),
                reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                zero_infinity=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def needed_frames(labels: list[int]) -> int:
    """Frames an alignment of ``labels`` needs: one per label, one more per repeated pair."""
    return len(labels) + sum(a == b for a, b in itertools.pairwise(labels))


# CTC examples are cheap: three times as many
@settings(PROFILE, max_examples=3 * PROFILE.max_examples)
@given(problem=ctc_problems())
def test_ctc_equals_torch(problem):
    p = problem
    torch.manual_seed(p["seed"])
    log_probs = torch.randn(p["steps"], p["batch"], p["classes"], dtype=p["dtype"])
    # torch accepts any values; scaled up, exp(lp) overflows in float32
    log_probs = log_probs * 60 if p["unnormalised"] else log_probs.log_softmax(2)
    for t, n, c, value in p["poison"]:
        log_probs[t, n, c] = value
    target_lengths = [len(t) for t in p["targets"]]
    if p["padded"]:  # padded with the blank: never read, so never rejected
        width = max(max(target_lengths), 1)
        targets = torch.tensor([t + [p["blank"]] * (width - len(t)) for t in p["targets"]])
    else:
        targets = torch.tensor([c for t in p["targets"] for c in t], dtype=torch.long)
    arguments = dict(targets=targets, input_lengths=p["input_lengths"],
                     target_lengths=target_lengths, blank=p["blank"],
                     reduction=p["reduction"], zero_infinity=p["zero_infinity"])
    unalignable = any(length < needed_frames(t)
                      for length, t in zip(p["input_lengths"], p["targets"]))
    theirs = log_probs.clone().requires_grad_()
    expected = F.ctc_loss(theirs, **arguments)
    expected.sum().backward()
    tolerance = dict(atol=1e-4, rtol=1e-4) if p["dtype"] == torch.float32 else TOLERANCE[
        torch.float64]
    for backend in ("native", "python"):
        ours = log_probs.clone().requires_grad_()
        if unalignable and not p["zero_infinity"]:  # rnnkit names the sample; torch gives inf
            with pytest.raises(ValueError, match="CTC cannot align sample"):
                ctc_loss(ours, **arguments, backend=backend)
            continue
        actual = ctc_loss(ours, **arguments, backend=backend)
        actual.sum().backward()
        assert_same_values(expected.detach(), actual.detach(), f"{backend}: loss", **tolerance)
        assert_same_values(theirs.grad, ours.grad, f"{backend}: gradient", **tolerance)
