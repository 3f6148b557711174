"""Variable-length batches: sorting by length, active rows per step, and in-length reversal.

The engine runs a batch sorted by length, longest first, so that the rows still running at step t
are a prefix ``[0:batch_sizes[t]]`` — the layout of ``torch.nn.utils.rnn.PackedSequence``. A step
then touches only its active rows; no work is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# The engine's ``batch_sizes`` argument: the active rows per step (a list of T ints, read in
# Python), or — when a graph is being traced (torch.compile, torch.export), where the values of
# the lengths tensor cannot be read — the longest-first lengths tensor itself (B,), which the
# kernels' ``*_lengths`` operators turn into batch sizes when the graph runs. None: no padding.
Ragged = Sequence[int] | Tensor | None


def sort_by_length(lengths: Tensor, order: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(sorted_lengths, order, inverse)``: ``x[:, order]`` is longest-first, in the
    given ``order`` (e.g. :func:`torch_order`) or else stably."""
    if order is None:  # argsort of −lengths: the same stable order, ~10x faster than a stable
        order = torch.argsort(-lengths, stable=True)  # descending sort
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return lengths[order], order, inverse


def longest_first(lengths: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """:func:`sort_by_length`'s stable order and :func:`batch_sizes_for`'s active rows per step
    of checked ``lengths`` given as Python ints, computed on the ints: ``(order, batch_sizes)``.

    For the lean inference path (``engine/fused/inference.py``), where a call's fixed cost
    counts. Measured 2026-12-02 at B = 20, T = 35 (timeit, min of 5, warm, load average ~8 on
    the 2-core machine, so inflated alike): ``lengths.tolist()`` and this 6 µs; check_lengths,
    sort_by_length and batch_sizes_for 388 µs (43 + 144 + 102 µs apart: about a dozen ATen
    calls). ``sorted(..., reverse=True)`` keeps equal lengths in their given order, as the
    stable argsort of −lengths does."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    return order, _running_rows(lengths, max_length)


def _running_rows(lengths: Sequence[int], max_length: int) -> list[int]:
    """The rows running at each step (lengths above t), counted on the ints: the batch sizes
    of the longest-first order, whichever order that is among equal lengths."""
    ending = [0] * (max_length + 1)  # ending[n]: rows of length n
    for n in lengths:
        ending[n] += 1
    batch_sizes = [0] * max_length
    running = 0
    for t in range(max_length - 1, -1, -1):  # rows running at step t: lengths above t
        running += ending[t + 1]
        batch_sizes[t] = running
    return batch_sizes


def sort_rows(lengths: Sequence[int], max_length: int, order: Sequence[int] | None = None
              ) -> tuple[list[int] | None, list[int] | None, list[int], list[int] | None]:
    """:func:`sort_by_length` and :func:`batch_sizes_for` of checked ``lengths`` given as
    Python ints (an eager call: the layers' general path), on the ints: ``(order, inverse,
    sorted_lengths, batch_sizes)``. ``order`` is the given one (e.g. :func:`torch_order`'s, as
    ints) or else the stable longest-first one; ``order`` and ``inverse`` are None when the
    rows already are in it (no gathers), ``batch_sizes`` None when every row runs every step
    (or there are no rows).

    Why on ints: the tensor functions are about a dozen ATen calls, ~0.4 ms a call (see
    :func:`longest_first`), and ``inverse[order] = arange`` alone (an ``index_put_``)
    measured 0.44 ms a call in torch.profiler (rnn_tanh 35,20,200, skewed lengths, 1 thread,
    load ~4) — a sixth of that layer's forward+backward."""
    if order is None:
        order, batch_sizes = longest_first(lengths, max_length)
    else:
        order, batch_sizes = list(order), _running_rows(lengths, max_length)
    sorted_lengths = [lengths[i] for i in order]
    if not sorted_lengths or sorted_lengths[-1] == max_length:
        batch_sizes = None  # (as batch_sizes_for: nothing to skip)
    if order == list(range(len(order))):
        return None, None, sorted_lengths, batch_sizes
    inverse = [0] * len(order)
    for position, row in enumerate(order):
        inverse[row] = position
    return order, inverse, sorted_lengths, batch_sizes


def torch_order(lengths: Tensor, sorted_indices: Tensor | None, packed: bool) -> Tensor:
    """The longest-first order in which torch.nn runs the rows of a ragged batch.

    Rows of equal length may come in any order, and where a random draw follows the rows (the
    dropout between layers draws over the packed data, longest first) the order decides which
    row gets which mask. torch.nn runs a PackedSequence in its ``sorted_indices`` (none: the
    batch was packed sorted, ``enforce_sorted=True``); padded input with ``lengths=`` stands for
    ``pack_padded_sequence(x, lengths, enforce_sorted=False)``, whose order is
    ``torch.sort(lengths, descending=True)`` on the int64 CPU lengths — not stable (from 17
    rows on, ties come out of CPU sort in another order than the stable one), so it is that same
    call here.
    """
    if packed:
        return torch.arange(lengths.numel()) if sorted_indices is None else sorted_indices.cpu()
    return torch.sort(lengths.to(torch.int64), descending=True).indices


def every_row_runs(lengths: Sequence[int], max_length: int) -> bool:
    """Whether every row of checked ``lengths`` (Python ints: eager only, a traced graph cannot
    read the values) runs all ``max_length`` steps: a batch with nothing to skip, which the
    layers run as the padded call itself (no sort, no gathers, no padding to zero). False for
    no rows."""
    return len(lengths) > 0 and min(lengths) == max_length


def batch_sizes_for(sorted_lengths: Tensor, max_length: int) -> list[int] | None:
    """Active rows per step for longest-first lengths; None when every row runs every step."""
    if sorted_lengths.numel() == 0 or int(sorted_lengths[-1]) == max_length:  # (B = 0: no rows)
        return None
    steps = torch.arange(max_length).unsqueeze(1)
    return (steps < sorted_lengths.unsqueeze(0)).sum(1).tolist()


def packed_index(batch_sizes: Sequence[int], batch: int) -> Tensor:
    """The rows that run of a (T, B, ...) batch flattened to (T·B, ...), in the order of
    torch's PackedSequence data: step t's first ``batch_sizes[t]`` rows (t·B + b), step after
    step. ``x.flatten(0, 1).index_select(0, packed_index(bs, B))`` is ``x``'s packed rows (Σ
    bs, ...), and the padding is never read."""
    steps = torch.arange(len(batch_sizes)).unsqueeze(1)
    running = torch.arange(batch) < torch.tensor(batch_sizes, dtype=torch.long).unsqueeze(1)
    return (steps * batch + torch.arange(batch)).masked_select(running)


def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverses each sequence of ``x`` (T, B, ...) within its own length; padding stays in place.

    The permutation is its own inverse, so the same call maps a reversed output back.
    """
    return reverse_rows(x, None if lengths is None else reversal_rows(lengths, x.shape[0]))


def reversal_rows(lengths: Tensor, steps: int) -> Tensor:
    """The permutation :func:`reverse_within_lengths` applies, as rows of the (T·B, ...) layout:
    row ``t·B + b`` of the result is read from row ``rows[t·B + b]``. It depends on the lengths
    and T only, so one index serves every tensor of a call (each layer's input and output in
    the lean inference path, whatever their widths)."""
    batch = lengths.shape[0]
    t = torch.arange(steps).unsqueeze(1)
    lengths = lengths.unsqueeze(0)
    source = torch.where(t < lengths, lengths - 1 - t, t)  # (T, B): the step each row reads
    return (source * batch + torch.arange(batch)).reshape(-1)


def reverse_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """``x`` (T, B, ...) permuted by :func:`reversal_rows`' ``rows`` (a new contiguous tensor);
    reversed in time when ``rows`` is None (no lengths: every row runs every step)."""
    if rows is None:
        return x.flip(0)
    steps, batch = x.shape[0], x.shape[1]
    flat = x.reshape(steps * batch, *x.shape[2:])
    return flat.index_select(0, rows.to(x.device)).view(x.shape)


def zero_padding(x: Tensor, batch_sizes: Sequence[int] | Tensor | None) -> Tensor:
    """``x`` (T, B, ...) with the rows past each sequence's length set to 0 (a new tensor; ``x``
    itself when nothing is padded).

    ``batch_sizes``: the active rows per step, or (in a traced graph, see :data:`Ragged`) the
    longest-first lengths themselves.

    For the engines whose products run over all T·B rows (the Python engines, the
    layer-normalised kernel in a traced graph, the bf16 mode), where ``0 * NaN`` would put the
    NaN of padding into dW_ih (torch's packed sequences never see padding); the fused kernels'
    products (the layer-normalised ones' too, eagerly: :func:`packed_index`) run over the rows
    that ran only and need none of it. ``where``, not a product: the padded rows' gradient
    is an exact 0.
    """
    if batch_sizes is None:
        return x
    if not isinstance(batch_sizes, Tensor) and all(b == x.shape[1] for b in batch_sizes):
        return x
    steps, batch = x.shape[0], x.shape[1]
    if isinstance(batch_sizes, Tensor):
        running = torch.arange(steps).unsqueeze(1) < batch_sizes.unsqueeze(0)  # (T, B)
    else:
        running = torch.arange(batch) < torch.tensor(batch_sizes).unsqueeze(1)  # (T, B)
    running = running.view(steps, batch, *([1] * (x.dim() - 2))).to(x.device)
    return torch.where(running, x, torch.zeros((), dtype=x.dtype, device=x.device))
