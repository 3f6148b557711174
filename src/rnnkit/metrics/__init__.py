"""The scores the tasks report, each a hand-written copy of the field's reference implementation.

* :mod:`~rnnkit.metrics.bleu`: corpus BLEU as sacrebleu computes it (translate);
* :mod:`~rnnkit.metrics.entities`: entity precision / recall / F1 as seqeval computes it,
  BIO, IOB1 and BIOES alike (tagging);
* :mod:`~rnnkit.metrics.scoring`: edit-distance alignment and error rates (speech).

Each is tested against that library (``tests/metrics``) where it installs (the dev extra).
"""

from rnnkit.metrics.bleu import BLEU, corpus_bleu, tokenize_13a
from rnnkit.metrics.entities import EntityScores, entity_scores, get_entities
from rnnkit.metrics.scoring import align, edit_distance, error_rate

__all__ = ["BLEU", "EntityScores", "align", "corpus_bleu", "edit_distance", "entity_scores",
           "error_rate", "get_entities", "tokenize_13a"]
