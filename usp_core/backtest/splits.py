"""Walk-forward folds (SPEC §4.1).

The first ``max(floor(n * train_ratio), min_train)`` points (plus any remainder that does not divide evenly) are training
only; the rest, after an optional embargo, is cut into ``n_folds`` contiguous test segments of equal length.
Fold k trains on everything before its test segment minus the embargo (expanding) or on the last
``len(first train)`` points of it (rolling); ``max_memory`` caps the train length in both cases. The last
fold is the holdout reserved for the promotion gate; tuning uses the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

WindowKind = Literal["expanding", "rolling"]


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold; unpacks as ``train, test`` (``holdout`` is read by attribute)."""

    train: range
    test: range
    holdout: bool = False

    def __iter__(self) -> Iterator[range]:
        # Not a NamedTuple: equality and hashing must keep comparing holdout, and a Fold must never equal a
        # plain tuple.
        yield self.train
        yield self.test


def _fold_length(n: int, train_ratio: float, n_folds: int, embargo: int, min_train: int) -> tuple[int, int]:
    """(first train end, test length) for a series of length n; monotone in n, so "too short" is a threshold."""
    initial_train = max(int(math.floor(n * train_ratio)), min_train)
    test_length = max(n - initial_train - embargo, 0) // n_folds
    return n - n_folds * test_length - embargo, test_length


def _fits(n: int, train_ratio: float, n_folds: int, embargo: int, min_train: int) -> bool:
    return _fold_length(n, train_ratio, n_folds, embargo, min_train)[1] >= 1


def required_length(train_ratio: float, n_folds: int, *, embargo: int = 0, min_train: int = 1) -> int:
    """Smallest series length for which ``walk_forward_split`` returns folds."""
    n = min_train + n_folds + embargo  # a lower bound; the remainder rule makes a closed form awkward
    while not _fits(n, train_ratio, n_folds, embargo, min_train):
        n += 1
    return n


def walk_forward_split(
    n: int,
    train_ratio: float = 0.7,
    n_folds: int = 5,
    *,
    window: WindowKind = "expanding",
    max_memory: int | None = None,
    embargo: int = 0,
    min_train: int | None = None,
) -> list[Fold]:
    """Causal, non-overlapping walk-forward folds over indices 0..n-1; raises ValueError when none fits."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    if embargo < 0:
        raise ValueError(f"embargo must be >= 0, got {embargo}")
    if window not in ("expanding", "rolling"):
        raise ValueError(f"window must be 'expanding' or 'rolling', got {window!r}")
    if max_memory is not None and max_memory < 1:
        max_memory = None  # 0 in the config means unlimited
    min_train = max(1 if min_train is None else min_train, 1)
    if not _fits(n, train_ratio, n_folds, embargo, min_train):
        needed = required_length(train_ratio, n_folds, embargo=embargo, min_train=min_train)
        raise ValueError(
            f"series of length {n} is too short for {n_folds} walk-forward folds with train_ratio={train_ratio}, "
            f"embargo={embargo} and at least {min_train} training points: it needs length >= {needed}"
        )
    first_train_end, test_length = _fold_length(n, train_ratio, n_folds, embargo, min_train)
    memory = first_train_end if window == "rolling" else None
    if max_memory is not None:
        memory = max_memory if memory is None else min(memory, max_memory)
    folds = []
    for k in range(n_folds):
        test_start = first_train_end + embargo + k * test_length
        train_end = test_start - embargo
        train_start = 0 if memory is None else max(train_end - memory, 0)
        folds.append(
            Fold(
                train=range(train_start, train_end),
                test=range(test_start, test_start + test_length),
                holdout=k == n_folds - 1,
            )
        )
    return folds


def select_folds(folds: list[Fold], include: str) -> list[Fold]:
    """``tuning``: all but the holdout; ``holdout``: the last fold; ``all``: every fold."""
    if include == "tuning":
        return [f for f in folds if not f.holdout]
    if include == "holdout":
        return [f for f in folds if f.holdout]
    if include == "all":
        return list(folds)
    raise ValueError(f"include must be 'tuning', 'holdout' or 'all', got {include!r}")
