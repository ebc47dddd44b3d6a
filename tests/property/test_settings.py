"""Any value of a batch option: refused where the task is defined, or honoured.

``flush_every`` is an ``int`` of at least 1 (``True`` is a mistake, not 1);
``flush_interval`` a positive, finite number of seconds (a float allowed);
``per_request_results`` a ``bool``; ``batch_key`` ``None``, the name of a
keyword argument or a callable. Hypothesis draws values of every kind
(ints, 0, negatives, 2.5, bools, ``None``, strings, NaN, infinities, huge
numbers): an invalid one fails the task's creation, with a message naming
the task, the option, the value and what is allowed; so does one set on the
task afterwards, when a worker starts it. A valid one is honoured.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import pytest
from celery import Celery, states
from hypothesis import assume, example, given
from hypothesis import strategies as st
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.errors import InvalidBatchSetting
from celery_batches.settings import MAX_FLUSH_INTERVAL
from celery_batches.trace import run_batch
from tests.property.conftest import clean_worker_state, property_settings
from tests.property.values import hashable_scalars
from tests.unit.conftest import FakeWorker, make_message
from tests.unit.test_trace import calls as requests_of


def by_parity(request: SimpleRequest) -> Any:
    """A valid batch key: the parity of the first argument."""
    return request.args[0] % 2


#: Values of no option's type at all.
foreign = st.one_of(
    st.none(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
#: Floats that are no amount of time.
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])

VALID: dict[str, st.SearchStrategy[Any]] = {
    "flush_every": st.one_of(st.integers(1, 50), st.integers(1, 2**64)),
    # Intervals beyond a day have a test of their own (see below).
    "flush_interval": st.one_of(
        st.integers(1, 86400),
        st.floats(min_value=1e-3, max_value=3600.0),
        st.floats(min_value=5e-324, max_value=86400.0),
    ),
    "per_request_results": st.booleans(),
    "batch_key": st.one_of(
        st.none(), st.sampled_from(["tenant", "x"]), st.just(by_parity)
    ),
}

INVALID: dict[str, st.SearchStrategy[Any]] = {
    "flush_every": st.one_of(
        st.integers(max_value=0),
        st.booleans(),
        st.floats(),
        st.just(2.5),
        st.just(1.0),
        foreign,
    ),
    "flush_interval": st.one_of(
        st.integers(max_value=0),
        st.floats(max_value=0.0),
        st.booleans(),
        not_finite,
        foreign,
    ),
    "per_request_results": st.one_of(
        st.integers(), st.floats(allow_nan=False), not_finite, foreign
    ),
    "batch_key": st.one_of(
        st.integers(),
        st.floats(),
        st.booleans(),
        st.just(""),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    ),
}

#: A word of what is allowed, that the message of each option must give.
ALLOWED_HINT = {
    "flush_every": ("1",),
    "flush_interval": ("0", "positive"),
    "per_request_results": ("True", "bool"),
    "batch_key": ("callable",),
}

OPTIONS = sorted(VALID)


def body(requests: list[SimpleRequest]) -> list[Any]:
    return [request.args[0] for request in requests]


def by_decorator(app: Celery, name: str, option: str, value: Any) -> Any:
    """``@app.task(base=Batches, option=value)`` on a finalized app."""
    app.task(base=Batches, name=name, shared=False, **{option: value})(body)
    return app.tasks[name]


def by_subclass(app: Celery, name: str, option: str, value: Any) -> Any:
    """``class Custom(Batches): option = value``, then registered on the app."""
    cls = type(
        "Custom",
        (Batches,),
        {"name": name, option: value, "run": staticmethod(body)},
    )
    return app.register_task(cls())


CREATORS: dict[str, Callable[[Celery, str, str, Any], Any]] = {
    "decorator": by_decorator,
    "subclass": by_subclass,
}


def check_message(error: BaseException, name: str, option: str, value: Any) -> None:
    """The error names the task, the option, the value and what is allowed."""
    message = str(error)
    assert name in message, message
    assert option in message, message
    assert repr(value) in message or str(value) in message, message
    assert any(hint in message for hint in ALLOWED_HINT[option]), message


def same_value(actual: Any, value: Any) -> bool:
    if callable(value):
        return getattr(actual, "__func__", actual) is value
    return bool(actual == value and type(actual) is type(value))


# -- invalid values fail where the task is defined --------------------------------


@pytest.mark.parametrize("how", sorted(CREATORS))
@pytest.mark.parametrize("option", OPTIONS)
@property_settings(max_examples=15)
@given(data=st.data())
def test_an_invalid_option_fails_the_task_creation_naming_it(
    app: Celery, option: str, how: str, data: st.DataObject
) -> None:
    # given any value the option does not allow
    value = data.draw(INVALID[option], label=option)
    app.finalize()
    name = f"property.settings.{uuid()}"
    # when a task is created with it, by the decorator or as a subclass
    with pytest.raises(Exception) as raised:
        CREATORS[how](app, name, option, value)
    # then creating it fails, saying which task, option, value and range
    check_message(raised.value, name, option, value)


@pytest.mark.parametrize("option", OPTIONS)
@property_settings(max_examples=15)
@given(data=st.data())
def test_an_invalid_option_set_after_creation_is_refused_when_the_worker_starts(
    app: Celery, option: str, data: st.DataObject
) -> None:
    # given a valid task whose option is then changed on the task object
    value = data.draw(INVALID[option], label=option)
    app.finalize()
    name = f"property.settings.{uuid()}"
    task = by_decorator(app, name, "flush_every", 3)
    setattr(task, option, value)
    # when a worker starts the task's strategy
    with clean_worker_state(), pytest.raises(Exception) as raised:
        FakeWorker(app).strategy(task)
    # then it is refused, saying which task, option, value and range
    check_message(raised.value, name, option, value)


# -- valid values are accepted and honoured ---------------------------------------


@pytest.mark.parametrize("how", sorted(CREATORS))
@pytest.mark.parametrize("option", OPTIONS)
@property_settings(max_examples=15)
@given(data=st.data())
def test_a_valid_option_is_accepted_as_given(
    app: Celery, option: str, how: str, data: st.DataObject
) -> None:
    value = data.draw(VALID[option], label=option)
    app.finalize()
    # when a task is created with any value the option allows
    task = CREATORS[how](app, f"property.settings.{uuid()}", option, value)
    # then the task carries it as given, and a worker starts it
    assert same_value(getattr(type(task), option), value)
    with clean_worker_state():
        FakeWorker(app).strategy(task)


@property_settings(max_examples=30)
@example(flush_every=1)
@example(flush_every=2**64)
@given(flush_every=VALID["flush_every"])
def test_a_valid_flush_every_makes_batches_of_that_many(
    app: Celery, flush_every: int
) -> None:
    app.finalize()
    task = by_decorator(app, f"property.settings.{uuid()}", "flush_every", flush_every)
    task.flush_interval = 600
    with clean_worker_state():
        worker = FakeWorker(app)
        handler = worker.strategy(task)
        # when up to five calls arrive
        sent = min(flush_every, 5)
        for n in range(sent):
            assert worker.pool.batches == []
            worker.deliver(handler, make_message(app, task.s(n)))
        # then a batch went to the pool exactly when flush_every calls waited
        expected = [flush_every] if flush_every <= 5 else []
        assert [len(batch) for batch in worker.pool.batches] == expected


def check_flush_interval_honoured(app: Celery, flush_interval: float) -> None:
    """A task with ``flush_interval`` flushes a call that many seconds after it."""
    app.finalize()
    name = f"property.settings.{uuid()}"
    task = by_decorator(app, name, "flush_interval", flush_interval)
    with clean_worker_state():
        worker = FakeWorker(app)
        handler = worker.strategy(task)
        # when a call arrives
        before = time.monotonic()
        worker.deliver(handler, make_message(app, task.s(1)))
        after = time.monotonic()
        # then the flush is due flush_interval seconds later
        (due,) = [s.eta for s in worker.timer.queue if not s.entry.canceled]
        assert before + flush_interval <= due * (1 + 1e-12) + 1e-9
        assert due <= (after + flush_interval) * (1 + 1e-12) + 1e-9
        # and when it comes due, the call goes to the pool
        worker.fire_interval()
        assert [len(batch) for batch in worker.pool.batches] == [1]


@property_settings(max_examples=30)
@example(flush_interval=2.5)
@given(flush_interval=VALID["flush_interval"])
def test_a_valid_flush_interval_flushes_that_many_seconds_after_the_first_call(
    app: Celery, flush_interval: float
) -> None:
    check_flush_interval_honoured(app, flush_interval)


@property_settings(max_examples=10)
@example(flush_interval=MAX_FLUSH_INTERVAL)
@given(flush_interval=st.floats(min_value=86400.0, max_value=MAX_FLUSH_INTERVAL))
def test_a_flush_interval_of_up_to_a_year_is_honoured(
    app: Celery, flush_interval: float
) -> None:
    # Longer intervals are refused (the next test): a year bounds the
    # timers' arithmetic, and no batch would wait that long anyway.
    check_flush_interval_honoured(app, flush_interval)


@property_settings(max_examples=10)
@example(flush_interval=31_536_001)
@example(flush_interval=1e300)
@given(flush_interval=st.floats(min_value=MAX_FLUSH_INTERVAL, max_value=1e300))
def test_a_flush_interval_of_more_than_a_year_is_refused_naming_the_range(
    app: Celery, flush_interval: float
) -> None:
    assume(flush_interval > MAX_FLUSH_INTERVAL)
    app.finalize()
    with pytest.raises(InvalidBatchSetting, match="at most 31536000"):
        by_decorator(
            app, f"property.settings.{uuid()}", "flush_interval", flush_interval
        )


@property_settings(max_examples=10)
@given(per_request_results=VALID["per_request_results"])
def test_a_valid_per_request_results_stores_each_value_or_none(
    app: Celery, per_request_results: bool
) -> None:
    app.finalize()
    name = f"property.settings.{uuid()}"
    task = by_decorator(app, name, "per_request_results", per_request_results)
    requests = requests_of(task, 1, 2)
    # when a batch runs whose body returns one value per request
    with clean_worker_state():
        run_batch(task, requests)
    # then each value is its request's result, or nothing is stored
    expected = [states.SUCCESS] * 2 if per_request_results else [states.PENDING] * 2
    assert [app.AsyncResult(r.id).state for r in requests] == expected


@property_settings(max_examples=20)
@given(
    batch_key=VALID["batch_key"],
    arguments=st.lists(st.tuples(st.integers(0, 3), hashable_scalars), max_size=8),
)
def test_a_valid_batch_key_batches_calls_of_one_key_together(
    app: Celery, batch_key: Any, arguments: list[tuple[int, Any]]
) -> None:
    app.finalize()
    task = by_decorator(app, f"property.settings.{uuid()}", "batch_key", batch_key)
    task.flush_every = 2

    def key_of(number: int, value: Any) -> Any:
        if batch_key is None:
            return None
        if callable(batch_key):
            return number % 2
        return value if batch_key == "tenant" else None

    with clean_worker_state():
        worker = FakeWorker(app)
        handler = worker.strategy(task)
        # when calls with any keyword values arrive, and the interval flushes
        for number, value in arguments:
            message = make_message(app, task.s(number, tenant=value))
            worker.deliver(handler, message)
        if worker.interval_entries():
            worker.fire_interval()
    # then every call ran once, and each batch holds calls of one key
    ran = [r for batch in worker.pool.batches for r in batch]
    assert len(ran) == len(arguments)
    for batch in worker.pool.batches:
        keys = {key_of(r.args[0], r.kwargs["tenant"]) for r in batch}
        assert len(keys) == 1, keys
