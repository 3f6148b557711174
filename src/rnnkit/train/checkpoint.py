"""Checkpoints: tensors in safetensors, everything else in JSON; no pickle, so loading runs no code.

A run directory holds ``checkpoint.json`` (the pointer, written last) and the
``checkpoint-<step>.safetensors`` it names together with that file's SHA-256. The Trainer also
keeps the weights of the lowest validation loss so far as ``best.json`` + ``best-<step>.safetensors``
(model weights and task description only: for inference, not for resuming). Each file is written
atomically, so after a crash at any moment the pointer names a complete, matching weights file:
the last good checkpoint stays intact. A file that does not match is refused, naming it.

The SHA-256 covers the weights, not the JSON, which a person may edit (or an attacker plant), so
loading checks the JSON too: its structure and types (:func:`check_meta`, and
:func:`check_resume_meta` for what resuming reads), that the weights file it names lies inside
the checkpoint's directory (no ``/etc/passwd``, no ``../..``, no symlink leading out), and that
the tensors fit the model the metadata builds (:func:`load_weights`). Every refusal is one
:class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor, nn

from rnnkit.train.atomic import write_bytes, write_text
from rnnkit.train.errors import CheckpointError, RunWriteError

POINTER = "checkpoint.json"
BEST = "best"  # stem of the best-validation checkpoint
FORMAT = "rnnkit-checkpoint"
VERSION = 1
MAX_POINTER_BYTES = 64 << 20  # metadata is vocabularies and states: megabytes at most
MAX_DEPTH = 32  # real metadata nests 6 deep; more is a hand-made file
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

__all__ = ["BEST", "POINTER", "Checkpoint", "CheckpointError", "RunWriteError", "check_meta",
           "check_resume_meta", "check_tensors", "load_checkpoint", "load_weights",
           "pointer_path", "save_checkpoint"]


@dataclass
class Checkpoint:
    path: Path  # the pointer JSON
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    weights: Path | None = None  # the safetensors file the pointer names

    def group(self, prefix: str) -> dict[str, Tensor]:
        """Tensors stored under ``prefix/``, with the prefix removed."""
        start = prefix + "/"
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}


def pointer_path(path: str | Path) -> Path:
    """A run directory or a checkpoint JSON → the checkpoint JSON."""
    path = Path(path)
    return path / POINTER if path.is_dir() else path


def save_checkpoint(run_dir: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any],
                    stem: str = "checkpoint") -> Path:
    """Writes ``<stem>-<step>.safetensors`` then its pointer ``<stem>.json``, each atomically.

    If the pointer cannot be written (disk full), the new weights file is removed again: the
    previous pointer and the weights it names are left as they were."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights_name = f"{stem}-{int(meta['step']):08d}.safetensors"
    weights = run_dir / weights_name
    data = safetensors.torch.save({k: v.detach().contiguous() for k, v in tensors.items()})
    # the same step saved again (a resume that stops at once) may name the file the current
    # pointer names: identical bytes need no rewrite, and then must not be removed on failure
    existed = _same_bytes(weights, data)
    if not existed:
        write_bytes(weights, data)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "weights": weights_name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "weights_bytes": len(data),
        **meta,
    }
    pointer = run_dir / f"{stem}.json"
    try:
        write_text(pointer, json.dumps(record, indent=1) + "\n")
    except BaseException:
        if not existed:
            weights.unlink(missing_ok=True)  # unreferenced: the old pointer names another file
        raise
    # only now is the older weights file unreferenced
    for old in run_dir.glob(f"{stem}-*.safetensors"):
        if old.name != weights_name:
            old.unlink(missing_ok=True)
    return pointer


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


# --- reading ---------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile file cannot overflow it)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """Typed access to one JSON object of a checkpoint; a wrong field raises naming the file."""

    def __init__(self, pointer: Path, data: Any, where: str = "") -> None:
        self.pointer, self.where = pointer, where
        if not isinstance(data, dict):
            raise CheckpointError(f"{pointer}: {where or 'the file'} must be a JSON object, got "
                                  f"{_short(data)}")
        self.data = data

    def fail(self, key: str, expected: str) -> CheckpointError:
        value = self.data.get(key)
        return CheckpointError(f"{self.pointer}: {self.where}{key} must be {expected}, got "
                               f"{_short(value)}")

    def get(self, key: str, check: Callable[[Any], bool], expected: str,
            optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise CheckpointError(f"{self.pointer}: {self.where}{key} is missing")
        value = self.data[key]
        if not check(value):
            raise self.fail(key, expected)
        return value

    def section(self, key: str) -> _Fields:
        return _Fields(self.pointer, self.get(key, lambda v: isinstance(v, dict), "a JSON object"),
                       f"{self.where}{key}.")


def check_meta(pointer: Path, meta: Any) -> dict[str, Any]:
    """The fields every checkpoint (resumable or ``best.json``) must have, with their types."""
    if _depth(meta) > MAX_DEPTH:
        raise CheckpointError(f"{pointer}: the JSON is nested more than {MAX_DEPTH} deep; "
                              "this is not a checkpoint rnnkit wrote")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{pointer} is not an rnnkit checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {pointer} has format version {_short(meta.get('version'))}"
                              f", this rnnkit reads version {VERSION}")
    fields = _Fields(pointer, meta)
    fields.get("weights", lambda v: isinstance(v, str) and bool(v), "a file name")
    fields.get("weights_sha256", lambda v: isinstance(v, str) and bool(_SHA256.match(v)),
               "a SHA-256 in hex")
    fields.get("weights_bytes", lambda v: _is_int(v) and v >= 0, "a byte count")
    fields.get("step", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    task = fields.section("task")
    task.get("name", lambda v: isinstance(v, str) and bool(v), "a task name")
    return meta


def check_resume_meta(checkpoint: Checkpoint) -> None:
    """The fields :meth:`Trainer.load` reads to continue a run, with their types."""
    fields = _Fields(checkpoint.path, checkpoint.meta)
    if "position" not in checkpoint.meta and "valid" in checkpoint.meta:
        raise CheckpointError(f"{checkpoint.path} holds the best weights only (for inference); "
                              f"resume from {POINTER}")
    fields.get("position", lambda v: isinstance(v, list) and len(v) == 2
               and all(_is_int(x) and x >= 0 for x in v), "[batch, chunk], two non-negative integers")
    fields.get("carry", lambda v: v is None or v == "tensor" or (_is_int(v) and v > 0),
               'null, "tensor" or a positive count')
    optimizer = fields.section("optimizer")
    optimizer.get("param_groups", lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
                  "a list of JSON objects")
    optimizer.get("scalars", lambda v: isinstance(v, dict) and all(
        isinstance(s, dict) and k.isdigit() for k, s in v.items()), "an object of objects by index")
    fields.get("scheduler", lambda v: v is None or isinstance(v, dict), "null or a JSON object",
               optional=True)
    # NaN would compare false with every later value: no "best" again, silently
    fields.get("best_valid", lambda v: v is None or (_is_number(v) and math.isfinite(v)),
               "null or a finite number", optional=True)
    fields.get("evals_without_gain", lambda v: _is_int(v) and v >= 0, "a non-negative integer",
               optional=True)
    fields.get("last_valid", lambda v: v is None or (isinstance(v, dict) and all(
        _is_number(x) for x in v.values())), "an object of numbers", optional=True)
    rng = fields.section("rng")
    rng.get("torch", lambda v: isinstance(v, str), "base64 text")
    rng.get("numpy", lambda v: isinstance(v, list) and len(v) == 5, "a list of 5 values")
    rng.get("python", lambda v: isinstance(v, list) and len(v) == 3, "a list of 3 values")
    for key in checkpoint.group("optim"):
        pid, sep, _ = key.partition("/")
        if not (sep and pid.isdigit()):
            raise CheckpointError(f"{checkpoint.weights}: unexpected tensor optim/{key}")
    carry = checkpoint.meta.get("carry")
    count = 0 if carry is None else 1 if carry == "tensor" else int(carry)
    stored = checkpoint.group("carry")
    if sorted(stored) != sorted(str(i) for i in range(count)):
        raise CheckpointError(f"{checkpoint.path}: carry says {_short(carry)} but "
                              f"{checkpoint.weights} holds carry tensors {sorted(stored) or 'none'}")


def _read_pointer(pointer: Path) -> Any:
    try:
        size = pointer.stat().st_size
        if size > MAX_POINTER_BYTES:
            raise CheckpointError(f"{pointer} is {size:,} bytes, too large for checkpoint metadata")
        text = pointer.read_text(encoding="utf-8")
    except OSError as error:
        raise CheckpointError(f"cannot read {pointer}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"checkpoint {pointer} is corrupt or truncated (not UTF-8: "
                              f"{error.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"checkpoint {pointer} is corrupt or truncated (not valid JSON: {error})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{pointer}: the JSON is nested too deeply; this is not a "
                              "checkpoint rnnkit wrote") from None


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _weights_file(pointer: Path, name: str) -> Path:
    """The weights file ``name`` beside ``pointer``, refusing any name or link leading out."""
    base = pointer.parent
    plain = (name == Path(name).name and name not in (".", "..") and "/" not in name
             and "\\" not in name and "\0" not in name and name.endswith(".safetensors"))
    if not plain:
        raise CheckpointError(f"{pointer}: weights must name a .safetensors file beside it, got "
                              f"{_short(name)}; refusing to read files elsewhere")
    weights = base / name
    if not weights.exists():  # also a symlink whose target is missing
        raise CheckpointError(f"checkpoint weights {weights} (named by {pointer}) are missing")
    if not _inside(weights, base):
        raise CheckpointError(f"checkpoint weights {weights} (named by {pointer}) are a link "
                              f"leading outside {base}; refusing to read them")
    return weights


def _read_weights(weights: Path, expected_size: int) -> bytes:
    """The bytes of ``weights`` if it is a regular file of the recorded size (not read whole
    otherwise: a FIFO or a huge file must not hang or exhaust memory)."""
    try:
        fd = os.open(weights.resolve(), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointError(f"checkpoint weights {weights} changed into a link while read; "
                                  "refusing") from None
        raise CheckpointError(f"cannot read {weights}: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"checkpoint weights {weights} are not a regular file")
        if info.st_size != expected_size:
            raise CheckpointError(f"checkpoint weights {weights} are truncated or corrupt: "
                                  f"{info.st_size} bytes, {expected_size} expected")
        return handle.read(expected_size)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at a run directory or pointer JSON, its structure and weights checked.

    Given a directory, only files inside it are read (its ``checkpoint.json`` too must not be a
    link leading out); given a JSON file, only files beside it."""
    given = Path(path)
    pointer = pointer_path(given)
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint at {pointer}")
    if given.is_dir() and not _inside(pointer, given):
        raise CheckpointError(f"{pointer} is a link leading outside {given}; refusing to read it")
    meta = check_meta(pointer, _read_pointer(pointer))
    weights = _weights_file(pointer, meta["weights"])
    data = _read_weights(weights, meta["weights_bytes"])
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise CheckpointError(f"checkpoint weights {weights} are corrupt: SHA-256 does not match "
                              f"the one recorded in {pointer}")
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"checkpoint weights {weights} cannot be read: {error}") from None
    return Checkpoint(pointer, meta, tensors, weights)


# --- checkpoint tensors against a model -----------------------------------------------------


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def check_tensors(checkpoint: Checkpoint, expected: dict[str, Tensor], prefix: str = "model",
                  what: str = "the model its task.model describes") -> None:
    """Names and shapes of ``checkpoint``'s ``prefix/`` tensors against ``expected`` (a state
    dict): a missing, unexpected or wrong-shape tensor raises, naming it and the file."""
    stored = checkpoint.group(prefix)
    weights = checkpoint.weights.name if checkpoint.weights else "its weights"
    problems = []
    missing = sorted(name for name in expected if name not in stored)
    unexpected = sorted(name for name in stored if name not in expected)
    if missing:
        problems.append(f"missing tensor(s) {', '.join(missing[:4])}"
                        + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s) {', '.join(unexpected[:4])}"
                        + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""))
    for name, value in expected.items():
        if name in stored and tuple(stored[name].shape) != tuple(value.shape):
            problems.append(f"{name} has shape {_shape(stored[name].shape)}, "
                            f"the model needs {_shape(value.shape)}")
        elif name in stored and stored[name].is_floating_point() != value.is_floating_point():
            problems.append(f"{name} is {stored[name].dtype}, the model needs {value.dtype}")
        if len(problems) >= 4:
            break
    if problems:
        raise CheckpointError(f"{checkpoint.path}: the tensors of {weights} do not fit {what}: "
                              + "; ".join(problems))


def load_weights(checkpoint: Checkpoint, model: nn.Module, prefix: str = "model") -> None:
    """Loads the ``prefix/`` tensors into ``model`` after :func:`check_tensors`."""
    check_tensors(checkpoint, model.state_dict(), prefix)
    values = checkpoint.group(prefix)
    model.load_state_dict(values)

