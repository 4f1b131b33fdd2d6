"""Few-shot subsets: deterministic by seed, drawn from the training split only, nested by N."""

import pytest

from lnfm.segmentation.fewshot import check_disjoint, select_subset

TRAIN = [f"case{i:03d}" for i in range(40)]


def test_same_seed_same_subset_regardless_of_order():
    a = select_subset(TRAIN, 5, seed=3)
    b = select_subset(list(reversed(TRAIN)), 5, seed=3)
    assert a == b and len(a) == 5 and len(set(a)) == 5


def test_different_seeds_differ_and_stay_in_train():
    subsets = [tuple(select_subset(TRAIN, 5, seed=s)) for s in range(6)]
    assert len(set(subsets)) == 6
    assert all(set(s) <= set(TRAIN) for s in subsets)


def test_nested_prefixes_and_full_split():
    small, large = select_subset(TRAIN, 3, seed=1), select_subset(TRAIN, 10, seed=1)
    assert set(small) < set(large)
    assert select_subset(TRAIN, None, seed=0) == sorted(TRAIN)
    assert select_subset(TRAIN, 100, seed=0) == sorted(TRAIN)


def test_bad_requests():
    with pytest.raises(ValueError, match="at least 1"):
        select_subset(TRAIN, 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        select_subset([], 2, seed=0)


def test_check_disjoint():
    check_disjoint(TRAIN[:10], val=TRAIN[10:12], test=TRAIN[12:])
    with pytest.raises(ValueError, match="test split shares 1 case.*case005"):
        check_disjoint(TRAIN[:10], val=TRAIN[10:12], test=["case005", "case030"])
