"""Save and retention policies: pure functions, checked against tables."""

from __future__ import annotations

import math

import pytest

from ckptstore.manager.policies import (
    AnyOf,
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepFinal,
    KeepLast,
    SaveAt,
    SaveContext,
    SaveEvery,
)


def ctx(
    steps_done: int, *, epoch: int | None = None, end: bool = False, elapsed: float = 0.0
) -> SaveContext:
    return SaveContext(
        steps_done=steps_done,
        epoch=epoch,
        end_of_epoch=end,
        elapsed_s=elapsed,
        last_saved_step=None,
    )


@pytest.mark.parametrize(
    ("policy", "context", "expected"),
    [
        (SaveEvery(steps=500), ctx(500), "interval"),
        (SaveEvery(steps=500), ctx(1000), "interval"),
        (SaveEvery(steps=500), ctx(499), None),
        (SaveEvery(steps=500), ctx(501), None),
        (SaveEvery(steps=1), ctx(7), "interval"),
        (SaveEvery(seconds=60), ctx(3, elapsed=59.9), None),
        (SaveEvery(seconds=60), ctx(3, elapsed=60.0), "interval"),
        (SaveEvery(epochs=1), ctx(10, epoch=0, end=True), "epoch"),
        (SaveEvery(epochs=1), ctx(10, epoch=0, end=False), None),
        (SaveEvery(epochs=2), ctx(10, epoch=0, end=True), None),
        (SaveEvery(epochs=2), ctx(20, epoch=1, end=True), "epoch"),
        (SaveEvery(epochs=1), ctx(10, epoch=None, end=True), None),
        (SaveAt(steps=(100, 250)), ctx(250), "interval"),
        (SaveAt(steps=(100, 250)), ctx(200), None),
        (AnyOf(SaveEvery(steps=100), SaveEvery(epochs=1)), ctx(100, epoch=0, end=True), "interval"),
        (AnyOf(SaveEvery(steps=100), SaveEvery(epochs=1)), ctx(37, epoch=0, end=True), "epoch"),
        (AnyOf(SaveEvery(steps=100), SaveEvery(seconds=5)), ctx(37, elapsed=1), None),
    ],
)
def test_save_policies(policy, context, expected):
    assert policy.should_save(context) == expected


def rec(step, epoch=None, reason="interval", **metrics):
    return CheckpointRecord(step=step, epoch=epoch, reason=reason, metrics=metrics)


RECORDS = [
    rec(100, 0, val_loss=3.0),
    rec(200, 0, "epoch", val_loss=2.5),
    rec(300, 1, val_loss=2.0),
    rec(400, 1, "epoch", val_loss=2.2),
    rec(450, 2, "signal", val_loss=0.1),  # a signal save: never "best"
    rec(500, 2, val_loss=math.nan),
    rec(600, 2, "final", val_loss=1.9),
]


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (KeepLast(1), {600}),
        (KeepLast(3), {450, 500, 600}),
        (KeepLast(100), {100, 200, 300, 400, 450, 500, 600}),
        (KeepEvery(steps=200), {200, 400, 600}),
        (KeepEvery(steps=1000), set()),
        (KeepEvery(epochs=1), {200, 400, 600}),  # the last checkpoint of each epoch
        (KeepEvery(epochs=2), {400}),  # epochs 1, 3, ... (0-based: the 2nd, 4th, ...)
        (KeepBest(1, "val_loss", "min"), {600}),
        (KeepBest(2, "val_loss", "min"), {300, 600}),
        (KeepBest(1, "val_loss", "max"), {100}),
        (KeepBest(1, "accuracy", "max"), set()),  # nobody has the metric
        (KeepFinal(), {600}),
        (AnyOf(KeepLast(1), KeepEvery(epochs=1), KeepBest(1, "val_loss")), {200, 400, 600}),
        (AnyOf(KeepLast(2), KeepBest(1, "val_loss", "max")), {100, 500, 600}),
    ],
)
def test_retention_policies(policy, kept):
    assert policy.keep(RECORDS) == frozenset(kept)


def test_retention_of_nothing():
    for policy in (
        KeepLast(3),
        KeepEvery(steps=10),
        KeepEvery(epochs=1),
        KeepBest(1, "x"),
        KeepFinal(),
    ):
        assert policy.keep([]) == frozenset()


def test_keep_best_ties_prefer_the_newer():
    records = [rec(10, val_loss=1.0), rec(20, val_loss=1.0), rec(30, val_loss=2.0)]
    assert KeepBest(1, "val_loss").keep(records) == {20}


def test_error_and_signal_saves_are_never_best():
    records = [
        rec(10, val_loss=1.0),
        rec(20, reason="error", val_loss=0.0),
        rec(30, reason="signal", val_loss=0.0),
    ]
    assert KeepBest(1, "val_loss").keep(records) == {10}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SaveEvery(), "exactly one"),
        (lambda: SaveEvery(steps=10, seconds=5), "exactly one"),
        (lambda: SaveEvery(steps=0), "positive"),
        (lambda: SaveEvery(steps=2.5), "int"),
        (lambda: SaveEvery(seconds=-1), "positive"),
        (lambda: SaveAt(steps=()), "positive"),
        (lambda: SaveAt(steps=(0,)), "positive"),
        (lambda: KeepLast(0), "n >= 1"),
        (lambda: KeepEvery(), "exactly one"),
        (lambda: KeepEvery(steps=10, epochs=1), "exactly one"),
        (lambda: KeepBest(0, "x"), "k >= 1"),
        (lambda: KeepBest(1, "x", mode="best"), "mode"),
        (lambda: AnyOf(), "at least one"),
    ],
)
def test_bad_policies_are_refused_with_a_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_policies_are_frozen_values():
    p = KeepLast(3)
    with pytest.raises(AttributeError):
        p.n = 4  # type: ignore[misc]
    assert KeepLast(3) == p
    assert hash(KeepLast(3)) == hash(p)
    assert AnyOf(KeepLast(1), KeepFinal()) == AnyOf(KeepLast(1), KeepFinal())


def test_anyof_refuses_mixing_kinds_when_used():
    with pytest.raises(TypeError, match="not a retention policy"):
        AnyOf(SaveEvery(steps=1)).keep(RECORDS)
    with pytest.raises(TypeError, match="not a save policy"):
        AnyOf(KeepLast(1)).should_save(ctx(1))
