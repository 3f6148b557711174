"""The MIDI writer: variable-length quantities, event order, and a file read back byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from rnnkit.midi import midi_bytes, notes_of, roll_to_events, variable_length, write_midi


def test_variable_length_quantities_from_the_specification() -> None:
    cases = {0: "00", 0x40: "40", 0x7F: "7F", 0x80: "81 00", 0x2000: "C0 00", 0x3FFF: "FF 7F",
             0x4000: "81 80 00", 0x100000: "C0 80 00", 0x1FFFFF: "FF FF 7F",
             0x200000: "81 80 80 00", 0x0FFFFFFF: "FF FF FF 7F"}
    for value, expected in cases.items():
        assert variable_length(value) == bytes.fromhex(expected), hex(value)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        variable_length(1 << 28)


def test_held_notes_are_one_note_and_offs_come_first() -> None:
    roll = torch.zeros(4, 88)
    roll[0:2, 39] = 1  # middle C (MIDI 60) held for two steps
    roll[1, 43] = 1  # E4 at step 1
    roll[2, 39] = 0
    roll[3, 39] = 1  # C again at step 3, to the end
    events = roll_to_events(roll)
    assert events == [(0, True, 60), (1, True, 64), (2, False, 60), (2, False, 64),
                      (3, True, 60), (4, False, 60)]
    assert notes_of(events) == [(0, 2, 60), (1, 2, 64), (3, 4, 60)]


def _read_track(data: bytes) -> tuple[tuple[int, ...], list[tuple[int, bytes]]]:
    """A tiny independent reader: the header fields and (absolute tick, event bytes)."""
    assert data[:4] == b"MThd"
    header = struct.unpack(">IHHH", data[4:14])
    assert data[14:18] == b"MTrk"
    (length,) = struct.unpack(">I", data[18:22])
    track, position, tick, events = data[22:22 + length], 0, 0, []
    assert len(data) == 22 + length
    while position < len(track):
        delta = 0
        while True:
            byte = track[position]
            position += 1
            delta = (delta << 7) | (byte & 0x7F)
            if byte < 0x80:
                break
        tick += delta
        size = 3 + track[position + 2] if track[position] == 0xFF else 3
        events.append((tick, track[position:position + size]))
        position += size
    return header, events


def test_file_reads_back(tmp_path: Path) -> None:
    roll = torch.zeros(3, 88)
    roll[0, 39] = roll[1, 39] = roll[2, 40] = 1
    path = write_midi(tmp_path / "x.mid", roll, ticks_per_step=240, tempo_bpm=120)
    header, events = _read_track(path.read_bytes())
    assert header == (6, 0, 1, 480)  # format 0, one track, 480 ticks per quarter
    assert events == [
        (0, b"\xff\x51\x03" + (500_000).to_bytes(3, "big")),  # 120 bpm = 0.5 s per quarter
        (0, bytes((0x90, 60, 80))),
        (480, bytes((0x80, 60, 0))),
        (480, bytes((0x90, 61, 80))),
        (720, bytes((0x80, 61, 0))),
        (720, b"\xff\x2f\x00"),
    ]
    # silence still lasts: two steps of 480 ticks before the end of track (960 = 87 40)
    assert midi_bytes(torch.zeros(2, 88)).endswith(bytes.fromhex("87 40 FF 2F 00"))
