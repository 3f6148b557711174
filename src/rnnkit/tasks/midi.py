"""A minimal Standard MIDI File writer: piano rolls → format-0 files of note-on / note-off events.

The layout (MIDI 1.0, "Standard MIDI Files")::

    "MThd" <len 6> <format 0> <1 track> <ticks per quarter note>
    "MTrk" <len> events..., each <delta time as a variable-length quantity> <event>
        FF 51 03 tttttt      tempo: microseconds per quarter note
        9c nn vv / 8c nn 00  note on / note off, channel c, note nn, velocity vv
        FF 2F 00             end of track

A variable-length quantity stores 7 bits per byte, most significant group first, with the top
bit set on every byte but the last (0x80 → 81 00). No running status: every event carries its
status byte, which any reader accepts.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

LOWEST_NOTE = 21  # A0: piano-roll column 0 of an 88-key roll


def variable_length(value: int) -> bytes:
    """``value`` (0 ≤ value < 2^28) as a MIDI variable-length quantity."""
    if not 0 <= value < 1 << 28:
        raise ValueError(f"a MIDI variable-length quantity holds 0..2^28-1, got {value}")
    groups = [value & 0x7F]
    value >>= 7
    while value:
        groups.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(groups))


def roll_to_events(roll: Tensor, lowest_note: int = LOWEST_NOTE
                   ) -> list[tuple[int, bool, int]]:
    """(step, on?, note) events of a 0/1 roll (T, P); a held note is one long note; offs first.

    A note sounding at step t but not t−1 starts at t; sounding at t−1 but not t ends at t; every
    note still sounding ends after the last step.
    """
    if roll.dim() != 2:
        raise ValueError(f"a piano roll is (T, pitches), got shape {tuple(roll.shape)}")
    active = roll.bool()
    padded = torch.cat((torch.zeros_like(active[:1]), active, torch.zeros_like(active[:1])))
    events = []
    for step in range(active.shape[0] + 1):
        before, now = padded[step], padded[step + 1]
        events += [(step, False, lowest_note + int(p)) for p in torch.nonzero(before & ~now).flatten()]
        events += [(step, True, lowest_note + int(p)) for p in torch.nonzero(now & ~before).flatten()]
    return events


def midi_bytes(roll: Tensor, ticks_per_step: int = 480, ticks_per_quarter: int = 480,
               tempo_bpm: float = 100.0, velocity: int = 80, channel: int = 0,
               lowest_note: int = LOWEST_NOTE) -> bytes:
    """A format-0 Standard MIDI File of the roll (T, P); each step lasts ``ticks_per_step``."""
    if not (0 <= channel < 16 and 1 <= velocity < 128 and 0 < ticks_per_quarter < 1 << 15):
        raise ValueError("need channel 0-15, velocity 1-127 and ticks_per_quarter 1-32767")
    track = bytearray()
    tempo = round(60_000_000 / tempo_bpm)  # microseconds per quarter note
    track += variable_length(0) + b"\xff\x51\x03" + tempo.to_bytes(3, "big")
    last_tick = 0
    for step, on, note in roll_to_events(roll, lowest_note):
        if not 0 <= note < 128:
            raise ValueError(f"MIDI note {note} is out of range 0-127")
        tick = step * ticks_per_step
        status = (0x90 if on else 0x80) | channel
        track += variable_length(tick - last_tick) + bytes((status, note, velocity if on else 0))
        last_tick = tick
    end = roll.shape[0] * ticks_per_step
    track += variable_length(end - last_tick) + b"\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_quarter)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def write_midi(path: str | Path, roll: Tensor, **options: int | float) -> Path:
    """Writes :func:`midi_bytes` of ``roll`` to ``path``."""
    from rnnkit.train.atomic import write_bytes  # atomic, never through a symlink

    path = Path(path)
    write_bytes(path, midi_bytes(roll, **options))  # type: ignore[arg-type]
    return path


def plot_piano_roll(roll: Tensor, path: str | Path, title: str, primer_steps: int = 0,
                    lowest_note: int = LOWEST_NOTE) -> Path:
    """A piano-roll PNG (time across, pitch up), the primer shaded apart from the generated part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = torch.nonzero(roll.sum(0)).flatten()
    low, high = (int(used.min()), int(used.max())) if used.numel() else (0, roll.shape[1] - 1)
    fig, ax = plt.subplots(figsize=(min(16.0, 2 + roll.shape[0] * 0.08), 4.5))
    ax.imshow(roll[:, low:high + 1].t().numpy(), origin="lower", aspect="auto", cmap="Greys",
              interpolation="nearest", extent=(-0.5, roll.shape[0] - 0.5, low + lowest_note - 0.5,
                                               high + lowest_note + 0.5))
    if primer_steps:
        ax.axvspan(-0.5, primer_steps - 0.5, color="tab:blue", alpha=0.12, label="primer")
        ax.legend(loc="upper right")
    ax.set_xlabel("time step (quarter notes)")
    ax.set_ylabel("MIDI note")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    from rnnkit.viz.curves import save_figure  # atomic, never through a symlink

    save_figure(fig, path, dpi=120)
    return path


def notes_of(events: Sequence[tuple[int, bool, int]]) -> list[tuple[int, int, int]]:
    """(start step, end step, note) of each note, from :func:`roll_to_events`' events."""
    started: dict[int, int] = {}
    notes = []
    for step, on, note in events:
        if on:
            started[note] = step
        else:
            notes.append((started.pop(note), step, note))
    return sorted(notes)


class MidiError(ValueError):
    """A file that is not a Standard MIDI File this reader understands."""


def _read_variable_length(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for _ in range(4):
        if position >= len(data):
            raise MidiError("a variable-length quantity runs past the end of its track")
        byte = data[position]
        position += 1
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, position
    raise MidiError("a variable-length quantity is longer than 4 bytes")


def _track_notes(track: bytes) -> list[tuple[int, bool, int]]:
    """(absolute tick, on?, note) of one track's note events (running status understood)."""
    position, tick, status, events = 0, 0, 0, []
    while position < len(track):
        delta, position = _read_variable_length(track, position)
        tick += delta
        if position >= len(track):
            raise MidiError("a track ends inside an event")
        if track[position] & 0x80:
            status = track[position]
            position += 1
        elif status == 0 or status >= 0xF0:
            raise MidiError("a data byte without a status byte")
        if status == 0xFF:  # meta event: type, length, data
            position += 1
            length, position = _read_variable_length(track, position)
            position += length
        elif status in (0xF0, 0xF7):  # system exclusive: length, data
            length, position = _read_variable_length(track, position)
            position += length
        else:
            kind = status & 0xF0
            size = 1 if kind in (0xC0, 0xD0) else 2
            if position + size > len(track):
                raise MidiError("a track ends inside an event")
            if kind in (0x80, 0x90):
                note, velocity = track[position], track[position + 1]
                # note-on with velocity 0 is a note-off (the MIDI specification's shorthand)
                events.append((tick, kind == 0x90 and velocity > 0, note))
            position += size
    return events


def read_midi(path: str | Path, pitches: int = 88, lowest_note: int = LOWEST_NOTE) -> Tensor:
    """A Standard MIDI File (format 0 or 1) → a 0/1 piano roll (T, pitches), one step per quarter
    note, as the JSB Chorales are quantised: a note sounds at every step whose start it covers,
    rounded to the nearest quarter. The inverse of :func:`write_midi` with its defaults."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MidiError(f"{path}: cannot be read ({error.strerror})") from None
    if data[:4] != b"MThd" or len(data) < 14:
        raise MidiError(f"{path} is not a Standard MIDI File (no MThd header)")
    length, _, tracks, division = struct.unpack(">IHHH", data[4:14])
    if division & 0x8000:
        raise MidiError(f"{path} uses SMPTE time; only ticks per quarter note are read")
    if division == 0:  # every tick would be a division by zero further down
        raise MidiError(f"{path} is not a readable MIDI file: its header says 0 ticks per "
                        "quarter note")
    position, notes = 8 + length, []
    try:
        for _ in range(tracks):
            if data[position:position + 4] != b"MTrk":
                raise MidiError("a track chunk is missing")
            (size,) = struct.unpack(">I", data[position + 4:position + 8])
            notes += _track_notes(data[position + 8:position + 8 + size])
            position += 8 + size
    except (MidiError, struct.error) as error:
        raise MidiError(f"{path} is not a readable MIDI file: {error}") from None
    spans, started = [], {}
    for tick, on, note in sorted(notes, key=lambda e: (e[0], e[1])):  # offs before ons per tick
        if on:
            started.setdefault(note, tick)
        elif note in started:
            spans.append((started.pop(note), tick, note))
    end = max((tick for tick, _, _ in notes), default=0)
    spans += [(start, end, note) for note, start in started.items()]
    steps = round(end / division)
    roll = torch.zeros(steps, pitches)
    for start, stop, note in spans:
        if lowest_note <= note < lowest_note + pitches:
            roll[round(start / division):round(stop / division), note - lowest_note] = 1
    return roll
