"""Data: vocabularies, corpus readers and batch layouts shared by the tasks."""

from rnnkit.data.streams import batchify, stream_window
from rnnkit.data.vocab import CharVocab, UnknownSymbolError

__all__ = ["CharVocab", "UnknownSymbolError", "batchify", "stream_window"]
