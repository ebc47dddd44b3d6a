"""Batch options are checked where the task is defined, and again at worker start."""

from __future__ import annotations

import math
from typing import Any

import pytest
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_batches import Batches, SimpleRequest
from celery_batches.errors import BatchesError, InvalidBatchSetting
from celery_batches.settings import (
    DEFAULT_PREFETCH_LIMIT,
    MAX_FLUSH_INTERVAL,
    MAX_PREFETCH_LIMIT,
    prefetch_limit,
)
from tests.unit.conftest import FakeWorker


def define(app: Celery, **options: Any) -> Any:
    """Define a batch task with ``options`` on ``app``, as a user would.

    The app is finalized first, so the decorator creates the task at once
    instead of returning a lazy proxy.
    """
    app.finalize()

    @app.task(base=Batches, name="unit.settings.task", shared=False, **options)
    def task(requests: list[SimpleRequest]) -> None:
        pass

    return task


def valid_flush_every(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def valid_flush_interval(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_FLUSH_INTERVAL
    )


#: Values of every kind a decorator option may be given by mistake.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None)
@given(flush_every=ANY_VALUE)
def test_flush_every_is_an_int_of_at_least_one(flush_every: Any) -> None:
    app = Celery("unit", set_as_current=False)
    if valid_flush_every(flush_every):
        # a valid value is taken as it is, not rounded or coerced
        assert define(app, flush_every=flush_every).flush_every == flush_every
        return
    # an invalid one fails where the task is defined, naming all of it
    with pytest.raises(InvalidBatchSetting) as raised:
        define(app, flush_every=flush_every)
    error = raised.value
    assert (error.task, error.option, error.value) == (
        "unit.settings.task",
        "flush_every",
        flush_every,
    )
    assert "unit.settings.task" in str(error) and "flush_every" in str(error)
    assert "at least 1" in str(error)


@settings(max_examples=150, deadline=None)
@given(flush_interval=ANY_VALUE)
def test_flush_interval_is_a_positive_finite_number_of_seconds(
    flush_interval: Any,
) -> None:
    app = Celery("unit", set_as_current=False)
    if valid_flush_interval(flush_interval):
        task = define(app, flush_interval=flush_interval)
        assert task.flush_interval == flush_interval
        return
    with pytest.raises(InvalidBatchSetting, match="flush_interval") as raised:
        define(app, flush_interval=flush_interval)
    assert raised.value.option == "flush_interval"
    assert "greater than 0" in str(raised.value)


@pytest.mark.parametrize("value", [0, 1, "yes", None, [True]])
def test_per_request_results_is_a_bool(value: Any) -> None:
    app = Celery("unit", set_as_current=False)
    with pytest.raises(InvalidBatchSetting, match="per_request_results"):
        define(app, per_request_results=value)


@pytest.mark.parametrize("value", ["", 3, ["tenant"], b"tenant"])
def test_batch_key_is_a_keyword_name_or_a_callable(value: Any) -> None:
    app = Celery("unit", set_as_current=False)
    with pytest.raises(InvalidBatchSetting, match="batch_key"):
        define(app, batch_key=value)


def test_valid_batch_keys_are_accepted() -> None:
    app = Celery("unit", set_as_current=False)
    assert define(app, batch_key="tenant").batch_key == "tenant"
    app = Celery("unit", set_as_current=False)
    define(app, batch_key=lambda request: request.args[0])


def test_a_subclass_is_checked_when_it_is_defined() -> None:
    with pytest.raises(InvalidBatchSetting, match=r"Halves.*flush_every=2\.5"):

        class Halves(Batches):
            flush_every = 2.5  # type: ignore[assignment]


def test_a_fractional_interval_on_a_subclass_type_checks_and_works() -> None:
    # mypy checks this file: flush_interval is a float setting
    class HalfSecond(Batches):
        flush_interval = 0.5

    assert HalfSecond.flush_interval == 0.5


def test_an_invalid_setting_is_a_value_error_and_a_batches_error() -> None:
    app = Celery("unit", set_as_current=False)
    with pytest.raises(ValueError):
        define(app, flush_every=0)
    app = Celery("unit", set_as_current=False)
    with pytest.raises(BatchesError):
        define(app, flush_every=0)


def test_an_annotation_with_a_bad_value_fails_when_the_task_is_bound() -> None:
    # given an app whose task_annotations give the task a flush_every of 0
    app = Celery("unit", set_as_current=False)
    app.conf.task_annotations = {"unit.settings.task": {"flush_every": 0}}
    # when the task is defined, then the annotated value is refused
    with pytest.raises(InvalidBatchSetting, match="flush_every=0"):
        define(app)


def test_a_value_changed_on_the_task_is_refused_when_the_worker_starts_it(
    app: Celery, worker: FakeWorker
) -> None:
    # given a valid task whose flush_interval is set to 0 afterwards
    task = define(app)
    task.flush_interval = 0
    # when a worker starts the task's strategy, then it refuses
    with pytest.raises(InvalidBatchSetting, match=r"unit\.settings\.task.*interval"):
        worker.strategy(task)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, DEFAULT_PREFETCH_LIMIT), (0, 0), (MAX_PREFETCH_LIMIT, MAX_PREFETCH_LIMIT)],
)
def test_the_prefetch_limit_setting(value: Any, expected: int) -> None:
    app = Celery("unit", set_as_current=False)
    if value is not None:
        app.conf.batches_prefetch_limit = value
    assert prefetch_limit(app.conf) == expected


@pytest.mark.parametrize("value", [-1, MAX_PREFETCH_LIMIT + 1, 65_536, 2.5, "1", True])
def test_a_prefetch_limit_out_of_range_is_refused(value: Any) -> None:
    app = Celery("unit", set_as_current=False)
    app.conf.batches_prefetch_limit = value
    with pytest.raises(InvalidBatchSetting, match="batches_prefetch_limit"):
        prefetch_limit(app.conf)
