"""The MIDI writer: variable-length quantities, event order, and a file read back byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from rnnkit.tasks.midi import midi_bytes, notes_of, roll_to_events, variable_length, write_midi


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


def test_read_midi_inverts_write_midi(tmp_path: Path) -> None:
    from rnnkit.tasks.midi import read_midi

    roll = (torch.rand(12, 88, generator=torch.Generator().manual_seed(1)) < 0.08).float()
    roll[-1] = 0
    roll[-1, 50] = 1  # the last step sounds, so the file lasts all 12 steps
    assert torch.equal(read_midi(write_midi(tmp_path / "r.mid", roll)), roll)


def test_mido_reads_what_rnnkit_writes_and_rnnkit_reads_what_mido_writes(tmp_path: Path) -> None:
    mido = pytest.importorskip("mido", reason="the dev extra installs mido")
    from rnnkit.tasks.midi import read_midi

    roll = (torch.rand(10, 88, generator=torch.Generator().manual_seed(2)) < 0.1).float()
    path = write_midi(tmp_path / "ours.mid", roll, tempo_bpm=120)
    song = mido.MidiFile(str(path))
    assert song.type == 0 and song.ticks_per_beat == 480 and len(song.tracks) == 1
    tick, sounding, seen = 0, {}, []
    for message in song.tracks[0]:
        tick += message.time
        if message.type == "note_on":
            sounding[message.note] = tick
        elif message.type == "note_off":
            seen.append((sounding.pop(message.note) // 480, tick // 480, message.note))
        elif message.type == "set_tempo":
            assert mido.tempo2bpm(message.tempo) == pytest.approx(120)
    assert sorted(seen) == notes_of(roll_to_events(roll)) and not sounding
    # mido's own file, format 1 with two tracks, note-on velocity 0 as note-off, running status
    theirs = mido.MidiFile(type=1, ticks_per_beat=96)
    for notes in ([(60, 0, 2), (64, 1, 3)], [(67, 0, 1)]):
        track = mido.MidiTrack()
        events = sorted([(s * 96, "note_on", n, 90) for n, s, _ in notes] +
                        [(e * 96, "note_on", n, 0) for n, _, e in notes])
        last = 0
        for t, kind, note, velocity in events:
            track.append(mido.Message(kind, note=note, velocity=velocity, time=t - last))
            last = t
        theirs.tracks.append(track)
    theirs.save(str(tmp_path / "theirs.mid"))
    read = read_midi(tmp_path / "theirs.mid")
    expected = torch.zeros(3, 88)
    expected[0:2, 60 - 21] = expected[1:3, 64 - 21] = expected[0:1, 67 - 21] = 1
    assert torch.equal(read, expected)


def test_read_midi_refuses_other_files(tmp_path: Path) -> None:
    from rnnkit.tasks.midi import MidiError, read_midi

    (tmp_path / "x.mid").write_text("hello")
    with pytest.raises(MidiError, match=r"x\.mid is not a Standard MIDI File"):
        read_midi(tmp_path / "x.mid")
    data = write_midi(tmp_path / "t.mid", torch.ones(3, 88)).read_bytes()
    (tmp_path / "t.mid").write_bytes(data[:-6])
    with pytest.raises(MidiError, match=r"t\.mid is not a readable MIDI file"):
        read_midi(tmp_path / "t.mid")
    # a header of 0 ticks per quarter note was a ZeroDivisionError traceback
    (tmp_path / "t.mid").write_bytes(data[:12] + bytes(2) + data[14:])
    with pytest.raises(MidiError, match=r"t\.mid is not a readable MIDI file: .* 0 ticks per"):
        read_midi(tmp_path / "t.mid")
