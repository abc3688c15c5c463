"""The data order: each example once an epoch, seeded, and with --group-by-length batches of
about one length (less padding) in a still shuffled order."""

import random

from loraflow.finetune.sources import Order, rows_of


def batches(order: Order, epochs: int) -> list[list[int]]:
    per_epoch = order.n // order.batch
    return [order.rows(m) for m in range(epochs * per_epoch)]


def padding(lengths, groups) -> float:
    """The share of a padded batch's tokens that are padding."""
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
    return 1 - sum(lengths[i] for g in groups for i in g) / padded


def test_each_example_once_an_epoch_seeded():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(640)]
    for grouped in (None, lengths):
        order = Order(640, 3, 8, grouped)
        got = batches(order, 2)
        first, second = [i for b in got[:80] for i in b], [i for b in got[80:] for i in b]
        assert sorted(first) == sorted(second) == list(range(640))
        assert first != second  # a new order each epoch
        assert batches(Order(640, 3, 8, grouped), 2) == got  # the same for the seed
        assert batches(Order(640, 4, 8, grouped), 1) != got[:80]
    assert [rows_of(640, 3, m, 8) for m in range(80)] == batches(Order(640, 3, 8), 1)


def test_grouping_by_length_cuts_padding_and_keeps_batches_shuffled():
    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(2048)]
    plain = padding(lengths, batches(Order(2048, 0, 16), 1))
    grouped_batches = batches(Order(2048, 0, 16, lengths), 1)
    grouped = padding(lengths, grouped_batches)
    assert plain > 0.4 and grouped < 0.05, (plain, grouped)
    longest = [max(lengths[i] for i in b) for b in grouped_batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # not one long sweep
