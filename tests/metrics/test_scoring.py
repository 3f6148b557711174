from rnnkit.metrics.scoring import DELETED, INSERTED, align, edit_distance, error_rate


def test_edit_distance_and_alignment() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2
    assert align([1, 2, 3], [1, 3]) == [(1, 1), (2, DELETED), (3, 3)]
    assert align([1, 3], [1, 2, 3]) == [(1, 1), (INSERTED, 2), (3, 3)]
    assert align([4, 5], [4, 6]) == [(4, 4), (5, 6)]


def test_error_rate_is_errors_over_reference_length() -> None:
    assert error_rate([[1, 2, 3, 4], [5]], [[1, 2, 3, 4], []]) == 1 / 5
