"""A character vocabulary over Unicode code points, or over bytes (``byte_level``).

Code points keep Korean, Burmese, Bengali or Chinese text one symbol per character; byte level
keeps the vocabulary at most 256 symbols whatever the script, at the price of longer sequences.

Example::

    >>> vocab = CharVocab.from_text("hello")
    >>> vocab.symbols, vocab.encode("hole")
    (['e', 'h', 'l', 'o'], [1, 3, 2, 0])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class UnknownSymbolError(ValueError):
    """A symbol that is not in the vocabulary (e.g. in a priming text)."""


def _describe(symbol: str | int) -> str:
    if isinstance(symbol, int):
        return f"byte 0x{symbol:02x}"
    return f"{symbol!r} (U+{ord(symbol):04X})"


@dataclass(frozen=True)
class CharVocab:
    """Symbols in index order: characters, or byte values (as ints) when ``byte_level``."""

    symbols: tuple[str | int, ...]
    byte_level: bool = False

    def __post_init__(self) -> None:
        # a dict beside the tuple: encoding is a hot loop over millions of characters
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.symbols)})
        if len(self._index) != len(self.symbols):
            raise ValueError("vocabulary symbols must be distinct")

    @classmethod
    def from_text(cls, text: str | Iterable[str], byte_level: bool = False) -> CharVocab:
        """The sorted set of symbols of ``text`` (one string or several)."""
        parts = [text] if isinstance(text, str) else list(text)
        seen: set[str | int] = set()
        for part in parts:
            seen.update(part.encode("utf-8") if byte_level else part)
        return cls(tuple(sorted(seen)), byte_level)  # type: ignore[type-var]

    def __len__(self) -> int:
        return len(self.symbols)

    def units(self, text: str) -> Sequence[str | int]:
        """The symbols ``text`` is made of: its characters, or its UTF-8 bytes."""
        return text.encode("utf-8") if self.byte_level else text

    def encode(self, text: str, what: str = "text") -> list[int]:
        """Indices of the symbols of ``text``; an unknown symbol raises naming it."""
        index = self._index  # type: ignore[attr-defined]
        try:
            return [index[u] for u in self.units(text)]
        except KeyError as error:
            symbol = error.args[0]
            raise UnknownSymbolError(
                f"{what} contains {_describe(symbol)}, which is not in the model's vocabulary "
                f"of {len(self)} symbols"
            ) from None

    def encode_known(self, text: str) -> tuple[list[int], int]:
        """Indices of the known symbols of ``text`` and how many unknown ones were left out."""
        index = self._index  # type: ignore[attr-defined]
        units = self.units(text)
        known = [index[u] for u in units if u in index]
        return known, len(units) - len(known)

    def decode(self, indices: Iterable[int]) -> str:
        if self.byte_level:
            return bytes(self.symbols[i] for i in indices).decode("utf-8", errors="replace")  # type: ignore[misc]
        return "".join(self.symbols[i] for i in indices)  # type: ignore[misc]

    def to_json(self) -> dict[str, Any]:
        return {"byte_level": self.byte_level, "symbols": list(self.symbols)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CharVocab:
        return cls(tuple(data["symbols"]), bool(data["byte_level"]))
