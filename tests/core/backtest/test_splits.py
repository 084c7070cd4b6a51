from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usp_core import walk_forward_split
from usp_core.backtest.splits import required_length, select_folds


def test_expanding_folds_known_layout():
    folds = walk_forward_split(100, train_ratio=0.7, n_folds=3)
    assert walk_forward_split(101, train_ratio=0.7, n_folds=3)[0].train == range(0, 71)  # remainder -> train
    assert [(f.train, f.test) for f in folds] == [
        (range(0, 70), range(70, 80)),
        (range(0, 80), range(80, 90)),
        (range(0, 90), range(90, 100)),
    ]
    assert [f.holdout for f in folds] == [False, False, True]


def test_rolling_window_keeps_first_train_length_and_embargo_gap():
    folds = walk_forward_split(100, train_ratio=0.6, n_folds=4, window="rolling", embargo=2)
    lengths = {len(f.train) for f in folds}
    assert lengths == {len(folds[0].train)}
    for f in folds:
        assert f.test.start - f.train.stop == 2
    assert folds[-1].test.stop == 100


def test_max_memory_caps_train():
    folds = walk_forward_split(200, train_ratio=0.5, n_folds=2, max_memory=30)
    assert all(len(f.train) == 30 for f in folds)
    assert walk_forward_split(200, 0.5, 2, max_memory=0) == walk_forward_split(200, 0.5, 2)


def test_too_short_raises_with_required_length():
    with pytest.raises(ValueError, match=r"needs length >= (\d+)") as info:
        walk_forward_split(20, train_ratio=0.7, n_folds=5, min_train=64)
    needed = int(info.value.args[0].rsplit(">= ", 1)[1])
    assert needed == required_length(0.7, 5, min_train=64)
    walk_forward_split(needed, train_ratio=0.7, n_folds=5, min_train=64)
    with pytest.raises(ValueError):
        walk_forward_split(needed - 1, train_ratio=0.7, n_folds=5, min_train=64)


def test_folds_unpack_as_train_test_pairs():
    folds = walk_forward_split(100, train_ratio=0.6, n_folds=4, window="rolling", embargo=2)
    pairs = [(train, test) for train, test in folds]
    assert pairs == [(f.train, f.test) for f in folds]
    train, test = folds[-1]
    assert (train, test) == (folds[-1].train, folds[-1].test) and folds[-1].holdout


def test_fold_equality_and_hash_still_include_holdout():
    folds = walk_forward_split(50, 0.5, 5)
    last = folds[-1]
    twin = type(last)(last.train, last.test, holdout=False)
    assert twin != last and last in select_folds(folds, "holdout") and twin not in select_folds(folds, "holdout")
    assert len({*folds, *walk_forward_split(50, 0.5, 5)}) == 5


def test_select_folds():
    folds = walk_forward_split(50, 0.5, 5)
    assert select_folds(folds, "tuning") == folds[:-1]
    assert select_folds(folds, "holdout") == folds[-1:]
    assert select_folds(folds, "all") == folds
    with pytest.raises(ValueError):
        select_folds(folds, "everything")


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 3000),
    ratio=st.floats(0.05, 0.95),
    n_folds=st.integers(1, 12),
    embargo=st.integers(0, 20),
    rolling=st.booleans(),
    memory=st.one_of(st.none(), st.integers(1, 500)),
    min_train=st.integers(1, 100),
)
def test_folds_are_causal_and_non_overlapping(n, ratio, n_folds, embargo, rolling, memory, min_train):
    kwargs = dict(window="rolling" if rolling else "expanding", embargo=embargo, max_memory=memory, min_train=min_train)
    try:
        folds = walk_forward_split(n, ratio, n_folds, **kwargs)
    except ValueError:
        assert n < required_length(ratio, n_folds, embargo=embargo, min_train=min_train)
        return
    assert len(folds) == n_folds and folds[-1].holdout and not any(f.holdout for f in folds[:-1])
    for f in folds:
        assert len(f.test) >= 1 and len(f.train) >= 1
        assert f.train.stop + embargo == f.test.start  # train strictly before test, embargo between
        assert 0 <= f.train.start and f.test.stop <= n
    for a, b in zip(folds, folds[1:], strict=False):
        assert a.test.stop == b.test.start  # test segments tile the tail without overlap
    assert folds[-1].test.stop == n
    assert folds[0].train.stop >= min_train  # the predictor has min_train points before any test point
