"""Tagger: learns deterministic tag rules (softmax and CRF, + intent head), spelling via characters."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rnnkit.data.text import Vocabulary, pad_characters, pad_sequences
from rnnkit.models.recurrent import RecurrentConfig
from rnnkit.models.tagger import Tagger, TaggerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def rule_tags(words: list[int]) -> list[int]:
    """1 on a 'big' word (id > 10), 2 right after one, else 0: needs left context."""
    return [1 if w > 10 else 2 if t > 0 and words[t - 1] > 10 else 0 for t, w in enumerate(words)]


def make_data(n: int, seed: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    rng = random.Random(seed)
    sentences = [[rng.randint(1, 20) for _ in range(rng.randint(1, 8))] for _ in range(n)]
    intents = [int(any(w > 15 for w in s)) for s in sentences]
    return sentences, [rule_tags(s) for s in sentences], intents


def config(**options) -> TaggerConfig:
    recurrent = RecurrentConfig(cell="lstm", layers=1, hidden=16, bidirectional=True)
    return TaggerConfig(**{"vocab_size": 21, "tags": 3, "embedding": 16, "recurrent": recurrent, **options})


def test_config_round_trips_through_json() -> None:
    c = config(crf=True, chars=30, intents=5, intent_pooling="mean")
    assert TaggerConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("crf", [False, True], ids=["softmax", "crf"])
def test_learns_a_deterministic_tag_rule_and_intent(crf: bool) -> None:
    sentences, tags, intents = make_data(200, seed=0)
    tokens, lengths = pad_sequences(sentences)
    gold, _ = pad_sequences(tags)
    model = Tagger(config(crf=crf, intents=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        loss = model.loss(tokens, lengths, gold, intents=torch.tensor(intents))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_sentences, test_tags, test_intents = make_data(100, seed=1)
    tokens, lengths = pad_sequences(test_sentences)
    predicted, predicted_intents = model.decode(tokens, lengths)
    assert [len(p) for p in predicted] == lengths.tolist()
    assert sum(p == g for p, g in zip(predicted, test_tags)) / len(test_tags) >= 0.98
    assert predicted_intents is not None
    assert sum(p == g for p, g in zip(predicted_intents, test_intents)) / len(test_intents) >= 0.97


def test_padding_does_not_change_emissions() -> None:
    model = Tagger(config(crf=True, chars=5))
    tokens = torch.randint(1, 21, (5, 3))
    lengths = torch.tensor([5, 2, 3])
    chars = torch.randint(1, 5, (5, 3, 4))
    char_lengths = torch.randint(1, 5, (5, 3))
    out = model(tokens, lengths, chars, char_lengths)
    tokens2, chars2 = tokens.clone(), chars.clone()
    tokens2[~out.mask] = 7
    chars2[~out.mask] = 3
    out2 = model(tokens2, lengths, chars2, char_lengths)
    torch.testing.assert_close(out.emissions[out.mask], out2.emissions[out.mask])


def test_character_features_tag_unseen_words_by_spelling() -> None:
    # a word's tag is 1 iff it ends in "e"; test words are new, so only the spelling can tell
    rng = random.Random(0)

    def sentence() -> list[str]:
        length = rng.randint(1, 6)
        return ["".join(rng.choice("abcde") for _ in range(rng.randint(1, 5))) for _ in range(length)]

    train = [sentence() for _ in range(300)]
    test = [sentence() for _ in range(100)]
    words = Vocabulary.build(train)
    letters = Vocabulary.build([list("abcde")], specials=("<pad>",))

    def batch(sentences: list[list[str]]):
        tokens, lengths = pad_sequences([words.encode(s) for s in sentences])
        chars, char_lengths = pad_characters([[letters.encode(list(w)) for w in s] for s in sentences])
        tags, _ = pad_sequences([[int(w.endswith("e")) for w in s] for s in sentences])
        return tokens, lengths, chars, char_lengths, tags

    model = Tagger(config(vocab_size=len(words), tags=2, embedding=8, chars=len(letters)))
    tokens, lengths, chars, char_lengths, tags = batch(train)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(80):
        loss = model.loss(tokens, lengths, tags, chars, char_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, lengths, chars, char_lengths, tags = batch(test)
    unseen = sum(w not in words for s in test for w in s)
    assert unseen > 30  # the test really is about words never seen in training
    predicted, _ = model.decode(tokens, lengths, chars, char_lengths)
    right = sum(p == t for row, n, b in zip(predicted, lengths.tolist(), range(len(test)))
                for p, t in zip(row, tags[:n, b].tolist()))
    assert right / int(lengths.sum()) >= 0.97


def test_missing_inputs_are_named() -> None:
    tokens, lengths = torch.randint(1, 21, (3, 2)), torch.tensor([3, 1])
    with pytest.raises(ValueError, match="chars"):
        Tagger(config(chars=5))(tokens, lengths)
    with pytest.raises(ValueError, match="intents"):
        Tagger(config(intents=3)).loss(tokens, lengths, torch.zeros(3, 2, dtype=torch.int64))
