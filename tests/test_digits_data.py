"""The digits memorization data set: deterministic, duplicates pixel-exact with unique captions."""
import numpy as np
import torch

from sharpfast.zoo.digits_data import DUPLICATION_LEVELS, NAMES, augment, build


def test_build_is_deterministic_and_well_formed():
    a, b = build(seed=3), build(seed=3)
    assert [d.caption for d in a.duplicates] == [d.caption for d in b.duplicates]
    assert a.images.shape == (1797, 1, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    caps = [d.caption for d in a.duplicates]
    assert len(set(caps)) == len(caps) == 16 * len(DUPLICATION_LEVELS)
    assert len({d.train_index for d in a.duplicates}) == len(caps)
    for d in a.duplicates:
        assert NAMES[d.digit] in d.caption or str(d.digit) in d.caption
        assert d.digit == a.labels[d.train_index]
    assert sorted({d.duplicates for d in a.duplicates}) == list(DUPLICATION_LEVELS)
    assert build(seed=4).duplicates[0].caption != caps[0]


def test_epoch_repeats_duplicates_and_draws_generic_captions():
    data = build()
    idx, caps, aug = data.epoch(np.random.default_rng(0))
    assert len(idx) == len(data.generic_indices) + sum(d.duplicates for d in data.duplicates)
    for d in data.duplicates[:5]:
        rows = [i for i, c in enumerate(caps) if c == d.caption]
        assert len(rows) == d.duplicates and all(idx[r] == d.train_index and not aug[r] for r in rows)
    generic = [c for c, a in zip(caps, aug) if a]
    assert len(set(generic)) < len(generic), "generic captions are shared by many images"


def test_augment_changes_images_within_range():
    x = build().images[:32]
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert not torch.equal(x, y)
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(0)))
