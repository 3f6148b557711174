"""The generated date data set: every format parses back to the same date, pairs are pure."""

from __future__ import annotations

import datetime

from rnnkit.tasks import dates


def test_every_format_writes_the_date() -> None:
    day = datetime.date(2026, 11, 24)  # a Tuesday
    written = [f(day) for f in dates.FORMATS]
    for expected in ("24 November 2026", "Nov 24, '26", "2026年11月24日", "24.11.2026",
                     "Tuesday, November 24, 2026", "Dienstag, 24. November 2026",
                     "24 de noviembre de 2026", "le mardi 24 novembre 2026", "the 24th of November, 2026",
                     "11/24/2026", "2026년 11월 24일"):
        assert expected in written
    assert len(set(written)) == len(written)  # no two formats coincide
    assert dates.FORMATS[21](datetime.date(2026, 3, 1)) == "1er mars 2026"


def test_numeric_formats_are_unambiguous() -> None:
    # 3 April and 4 March must never be written the same way, in any format
    a, b = datetime.date(2021, 4, 3), datetime.date(2021, 3, 4)
    assert not {f(a) for f in dates.FORMATS} & {f(b) for f in dates.FORMATS}


def test_pairs_are_pure_and_in_range() -> None:
    pairs = dates.make_pairs(500, seed=3)
    assert pairs == dates.make_pairs(500, seed=3) and pairs != dates.make_pairs(500, seed=4)
    for _, target in pairs:
        year = int(target[:4])
        assert dates.FIRST_YEAR <= year <= dates.LAST_YEAR
        datetime.date.fromisoformat(target)
