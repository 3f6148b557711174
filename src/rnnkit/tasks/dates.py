"""A generated translation data set: dates written the ways people write them → ISO 8601.

    "24 November 2026", "Nov 24, '26", "2026年11月24日", "24.11.2026", "le 24 novembre 2026",
    "24 de noviembre de 2026", "Dienstag, 24. November 2026", ...   →   "2026-11-24"

Every format is unambiguous: the day-first numeric form uses dots or dashes and the US
month-first form uses slashes, never both with the same separator; two-digit years mean
1950–2049 ("'75" → 1975, "'26" → 2026). Weekday names, when written, are the true weekday of
the date. :func:`make_pairs` is a pure function of (count, seed).
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable

FIRST_YEAR, LAST_YEAR = 1950, 2049  # two-digit years resolve into this century window

MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September",
           "Oktober", "November", "Dezember"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre",
           "octobre", "novembre", "décembre"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre",
           "octubre", "noviembre", "diciembre"],
}
WEEKDAYS = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
}


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _short(name: str) -> str:
    return name[:3]


Format = Callable[[datetime.date], str]


def _formats() -> list[Format]:
    en, de, fr, es = MONTHS["en"], MONTHS["de"], MONTHS["fr"], MONTHS["es"]

    def wd(lang: str, d: datetime.date) -> str:
        return WEEKDAYS[lang][d.weekday()]

    return [
        lambda d: f"{d.day} {en[d.month - 1]} {d.year}",
        lambda d: f"{en[d.month - 1]} {d.day}, {d.year}",
        lambda d: f"{_short(en[d.month - 1])} {d.day}, '{d.year % 100:02d}",
        lambda d: f"{d.day} {_short(en[d.month - 1])} {d.year}",
        lambda d: f"{_short(en[d.month - 1]).upper()} {d.day:02d} {d.year}",
        lambda d: f"{wd('en', d)}, {en[d.month - 1]} {d.day}, {d.year}",
        lambda d: f"{_short(wd('en', d))} {d.day} {_short(en[d.month - 1])} {d.year}",
        lambda d: f"the {_ordinal(d.day)} of {en[d.month - 1]}, {d.year}",
        lambda d: f"{_short(en[d.month - 1])}. {_ordinal(d.day)} {d.year}",
        lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
        lambda d: f"{d.day}.{d.month}.{d.year % 100:02d}",
        lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}",
        lambda d: f"{d.month}/{d.day}/{d.year}",
        lambda d: f"{d.month:02d}/{d.day:02d}/{d.year % 100:02d}",
        lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
        lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
        lambda d: f"{d.year}年{d.month}月{d.day}日",
        lambda d: f"{d.year}년 {d.month}월 {d.day}일",
        lambda d: f"{d.day}. {de[d.month - 1]} {d.year}",
        lambda d: f"{wd('de', d)}, {d.day}. {de[d.month - 1]} {d.year}",
        lambda d: f"{d.day}. {_short(de[d.month - 1])}. {d.year}",
        lambda d: f"{'1er' if d.day == 1 else d.day} {fr[d.month - 1]} {d.year}",
        lambda d: f"le {wd('fr', d)} {d.day} {fr[d.month - 1]} {d.year}",
        lambda d: f"{d.day} de {es[d.month - 1]} de {d.year}",
        lambda d: f"{wd('es', d)}, {d.day} de {es[d.month - 1]} de {d.year}",
    ]


FORMATS = _formats()


def iso(date: datetime.date) -> str:
    return date.isoformat()


def make_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (human date, ISO date) pairs; dates uniform over 1950–2049, formats uniform."""
    rng = random.Random(seed)
    first = datetime.date(FIRST_YEAR, 1, 1).toordinal()
    last = datetime.date(LAST_YEAR, 12, 31).toordinal()
    pairs = []
    for _ in range(count):
        date = datetime.date.fromordinal(rng.randint(first, last))
        pairs.append((rng.choice(FORMATS)(date), iso(date)))
    return pairs
