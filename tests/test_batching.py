"""Length-grouped batching: the same examples per epoch, less padding, reproducible."""

import torch

from common.data import batches_forever, length_grouped_batches, padding_fraction

PAD = 0


def _skewed_examples(n=400):
    """Mostly short examples and a few long ones: the case where random batches pad most."""
    lengths = torch.randint(4, 12, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    for i in range(0, n, 10):
        lengths[i] = 90
    return [{"input_ids": [i + 1] * n_tok, "labels": [i + 1] * n_tok}
            for i, n_tok in enumerate(lengths)]


def _epoch(examples, batch_size, group, seed=0):
    per_epoch = -(-len(examples) // batch_size)
    stream = batches_forever(examples, batch_size, PAD, torch.Generator().manual_seed(seed),
                             group_by_length=group)
    return [next(stream) for _ in range(per_epoch)]


def _ids(batches):
    """Each example's id (its token value) in the order the batches hold them."""
    return [int(row[0]) - 1 for b in batches for row in b["input_ids"]]


def test_grouped_epoch_yields_every_example_once():
    examples = _skewed_examples(403)  # not a multiple of the batch size
    batches = _epoch(examples, 8, group=True)
    assert sorted(_ids(batches)) == list(range(403))


def test_grouped_batches_cover_the_order_once_and_keep_the_size():
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    lengths = [i % 37 for i in range(1000)]
    batches = length_grouped_batches(order, lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches)[1:] == [8] * (len(batches) - 1)


def test_grouping_pads_less_on_skewed_lengths():
    examples = _skewed_examples()
    plain = padding_fraction(_epoch(examples, 8, group=False))
    grouped = padding_fraction(_epoch(examples, 8, group=True))
    assert grouped < plain / 2, (plain, grouped)


def test_grouped_order_is_seeded():
    examples = _skewed_examples()
    assert _ids(_epoch(examples, 8, True, seed=5)) == _ids(_epoch(examples, 8, True, seed=5))
    assert _ids(_epoch(examples, 8, True, seed=5)) != _ids(_epoch(examples, 8, True, seed=6))


def test_plain_order_is_unchanged_by_the_option():
    """Off, the batches are the plain seeded shuffle: earlier runs and resumes replay."""
    examples = _skewed_examples(64)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    assert _ids(_epoch(examples, 8, group=False)) == order
