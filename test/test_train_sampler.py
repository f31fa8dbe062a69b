"""PlaceBatchSampler: P places x K distinct images, reproducible, disjoint across DDP ranks."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import InputError
from vpr_ros.train.sampler import PlaceBatchSampler

# 10 places with 3..6 images each, interleaved so place members are not contiguous indices
LABELS = np.array([p for rep in range(6) for p in range(10) if rep < 3 + p % 4])


def test_batches_are_p_places_by_k_images() -> None:
    s = PlaceBatchSampler(LABELS, places_per_batch=4, images_per_place=3, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 10 // 4
    seen: list[int] = []
    for b in batches:
        assert len(b) == 12 and len(set(b)) == 12  # distinct images
        labels = LABELS[b].reshape(4, 3)
        assert (labels == labels[:, :1]).all()  # place-major, K of each place
        seen += labels[:, 0].tolist()
    assert len(seen) == len(set(seen))  # an epoch never repeats a place


def test_reproducible_per_epoch_and_different_across_epochs() -> None:
    a = PlaceBatchSampler(LABELS, 3, 2, seed=7)
    b = PlaceBatchSampler(LABELS, 3, 2, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_ranks_are_disjoint_and_fixed_epoch_length() -> None:
    per_rank = [list(PlaceBatchSampler(LABELS, 2, 2, seed=0, rank=r, world_size=2))
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 10 // 2 // 2
    places = [set(LABELS[i] for b in batches for i in b) for batches in per_rank]
    assert not places[0] & places[1]
    long = PlaceBatchSampler(LABELS, 4, 2, seed=0, batches_per_epoch=9)
    assert len(list(long)) == 9  # re-permutes the places when they run out


def test_refuses_batches_that_cannot_be_filled() -> None:
    with pytest.raises(InputError, match="fewer than images_per_place=5"):
        PlaceBatchSampler(LABELS, 2, 5, source="tiny")
    with pytest.raises(InputError, match="tiny: 10 place\\(s\\) but places_per_batch=11"):
        PlaceBatchSampler(LABELS, 11, 2, source="tiny")
    with pytest.raises(InputError, match="must be >= 2"):
        PlaceBatchSampler(LABELS, 4, 1)
    with pytest.raises(InputError, match="cannot fill one batch"):
        PlaceBatchSampler(LABELS, 6, 2, world_size=2)
