"""Models: the shapes in which recurrent layers are used (here: the language model / generator)."""

from rnnkit.models.language_model import LanguageModel, LMConfig, generate

__all__ = ["LMConfig", "LanguageModel", "generate"]
