"""Running a batch: stored states, signals, retries, and eager calls.

``run_batch`` is what the pool runs; these tests call it directly with an app
whose results go to the in-memory cache backend and whose messages go to the
in-memory broker, so what a user would see is read back from those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery, current_task, signals, states
from celery.exceptions import MaxRetriesExceededError
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import run_batch
from tests.unit.conftest import recording


def calls(task: Any, *arguments: Any, retries: int = 0) -> list[SimpleRequest]:
    """One SimpleRequest per item of ``arguments``, as a worker hands them over."""
    queue = task.app.conf.task_default_queue
    requests = []
    for value in arguments:
        task_id = uuid()
        delivery_info = {
            "exchange": "",
            "routing_key": queue,
            "priority": None,
            "redelivered": False,
        }
        request_dict = {
            "id": task_id,
            "task": task.name,
            "args": [value],
            "kwargs": {},
            "retries": retries,
            "root_id": task_id,
            "delivery_info": delivery_info,
        }
        requests.append(
            SimpleRequest(
                task_id,
                task.name,
                [value],
                {},
                delivery_info,
                "unit@host",
                False,
                None,
                None,
                request_dict,
            )
        )
    return requests


def result_of(app: Celery, request: SimpleRequest) -> tuple[str, Any]:
    result = app.AsyncResult(request.id)
    return result.state, result.result


def batch_task(app: Celery, body: Any, **options: Any) -> Any:
    """Register ``body`` as a batch task of ``app``; return the task the worker runs.

    The worker looks tasks up in ``app.tasks``; the decorator's return value
    is a lazy proxy of that task.
    """
    name = f"unit.trace.{uuid()}"
    app.task(base=Batches, name=name, shared=False, **options)(body)
    return app.tasks[name]


@contextmanager
def published(app: Celery) -> Iterator[list[dict[str, Any]]]:
    """Collect the headers of every task message published inside the block."""
    sent: list[dict[str, Any]] = []

    def on_publish(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        if headers is not None:
            sent.append(dict(headers))

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        yield sent
    finally:
        signals.before_task_publish.disconnect(on_publish)


def queued_ids(app: Celery) -> list[str]:
    """Take every message waiting in the app's queue; return their task ids."""
    ids: list[str] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        while True:
            message = channel.basic_get(app.conf.task_default_queue, no_ack=True)
            if message is None:
                return ids
            ids.append(message.headers["id"])


# -- per_request_results ------------------------------------------------------


def test_a_sequence_of_results_stores_one_per_request_in_order(app: Celery) -> None:
    # given a batch task whose body returns one value per request
    def body(requests: list[SimpleRequest]) -> list[int]:
        return [r.args[0] * 10 for r in requests]

    task = batch_task(app, body, per_request_results=True)
    requests = calls(task, 1, 2, 3)
    # when a batch of three runs
    run_batch(task, requests)
    # then each call has its own value as result
    assert [result_of(app, r) for r in requests] == [
        (states.SUCCESS, 10),
        (states.SUCCESS, 20),
        (states.SUCCESS, 30),
    ]


def test_a_mapping_of_results_stores_each_by_request_id(app: Celery) -> None:
    def body(requests: list[SimpleRequest]) -> dict[str, Any]:
        return {r.id: f"for {r.args[0]}" for r in reversed(requests)}

    task = batch_task(app, body, per_request_results=True)
    requests = calls(task, "a", "b")
    run_batch(task, requests)
    assert [result_of(app, r) for r in requests] == [
        (states.SUCCESS, "for a"),
        (states.SUCCESS, "for b"),
    ]


def too_few(requests: list[SimpleRequest]) -> Any:
    return [1]


def too_many(requests: list[SimpleRequest]) -> Any:
    return [1, 2, 3, 4]


def an_unknown_id(requests: list[SimpleRequest]) -> Any:
    return {"nobody": 1}


def an_extra_id(requests: list[SimpleRequest]) -> Any:
    return {**{r.id: 1 for r in requests}, "extra": 2}


def a_number(requests: list[SimpleRequest]) -> Any:
    return 42


def a_string(requests: list[SimpleRequest]) -> Any:
    return "abc"


@pytest.mark.parametrize(
    ("returned", "why"),
    [
        (too_few, "returned 1 results for a batch of 3"),
        (too_many, "returned 4 results for a batch of 3"),
        (an_unknown_id, "unknown request ids"),
        (an_extra_id, "unknown request ids"),
        (a_number, "returned int"),
        (a_string, "returned str"),
    ],
    ids=lambda value: value.__name__ if callable(value) else "",
)
def test_results_that_do_not_match_the_batch_fail_every_request_saying_why(
    app: Celery, returned: Any, why: str
) -> None:
    # given a per_request_results body whose return value does not fit
    task = batch_task(app, returned, per_request_results=True)
    requests = calls(task, 1, 2, 3)
    # when the batch runs
    run_batch(task, requests)
    # then every request fails with an error saying what was wrong
    for request in requests:
        state, error = result_of(app, request)
        assert state == states.FAILURE
        assert why in str(error)
        assert "per_request_results" in str(error)


def test_an_exception_as_a_value_fails_only_its_request(app: Celery) -> None:
    # given a body that returns an exception instance for the second call
    def body(requests: list[SimpleRequest]) -> list[Any]:
        return [1, KeyError("no such key"), 3]

    task = batch_task(app, body, per_request_results=True)
    requests = calls(task, "a", "b", "c")
    # when the batch runs
    with recording(signals.task_failure) as failures:
        run_batch(task, requests)
    # then only that request failed, with that exception
    (first, second, third) = (result_of(app, r) for r in requests)
    assert first == (states.SUCCESS, 1)
    assert third == (states.SUCCESS, 3)
    assert second[0] == states.FAILURE
    assert isinstance(second[1], KeyError)
    assert [f["task_id"] for f in failures] == [requests[1].id]


def test_a_body_that_raises_fails_unsettled_requests_and_keeps_settled_ones(
    app: Celery,
) -> None:
    # given a body that settles the first call and then raises
    def body(requests: list[SimpleRequest]) -> None:
        requests[0].mark_as_done("kept")
        raise ValueError("boom")

    task = batch_task(app, body)
    requests = calls(task, 1, 2, 3)
    # when the batch runs
    run_batch(task, requests)
    # then the first keeps its result and the others failed with the error
    assert result_of(app, requests[0]) == (states.SUCCESS, "kept")
    for request in requests[1:]:
        result = app.AsyncResult(request.id)
        assert result.state == states.FAILURE
        assert isinstance(result.result, ValueError)
        assert "boom" in result.traceback


def test_without_per_request_results_the_body_settles_what_it_wants(
    app: Celery,
) -> None:
    def body(requests: list[SimpleRequest]) -> str:
        requests[0].mark_as_done("done")
        requests[1].mark_as_failure(KeyError("failed"))
        return "whole batch"

    task = batch_task(app, body)
    requests = calls(task, 1, 2, 3)
    retval, _ = run_batch(task, requests)
    assert retval == "whole batch"
    assert result_of(app, requests[0]) == (states.SUCCESS, "done")
    assert app.AsyncResult(requests[1].id).state == states.FAILURE
    # a call the body left alone has no result stored
    assert app.AsyncResult(requests[2].id).state == states.PENDING


# -- signals and context --------------------------------------------------------


def test_prerun_and_postrun_fire_once_per_batch(app: Celery) -> None:
    # given a batch task
    def body(requests: list[SimpleRequest]) -> str:
        return "ran"

    task = batch_task(app, body)
    requests = calls(task, 1, 2, 3)
    # when a batch of three runs
    with recording(signals.task_prerun) as pre, recording(signals.task_postrun) as post:
        run_batch(task, requests)
    prerun = [s for s in pre if s["sender"].name == task.name]
    postrun = [s for s in post if s["sender"].name == task.name]
    # then each fires once, for the batch: its own id and the requests as args
    assert len(prerun) == len(postrun) == 1
    batch_id = prerun[0]["task_id"]
    assert batch_id not in {r.id for r in requests}
    assert postrun[0]["task_id"] == batch_id
    assert prerun[0]["args"] == [requests]
    assert postrun[0]["retval"] == "ran"
    assert postrun[0]["state"] == states.SUCCESS


def test_task_success_fires_once_for_the_batch_and_once_per_settled_request(
    app: Celery,
) -> None:
    # given a per_request_results body and a receiver noting whose context it runs in
    def body(requests: list[SimpleRequest]) -> list[int]:
        return [r.args[0] + 1 for r in requests]

    task = batch_task(app, body, per_request_results=True)
    requests = calls(task, 1, 2)
    seen: list[tuple[str, Any]] = []

    def on_success(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
        if sender is not None and sender.name == task.name:
            seen.append((sender.request.id, result))

    # when the batch runs
    signals.task_success.connect(on_success, weak=False)
    try:
        with recording(signals.task_prerun) as prerun:
            run_batch(task, requests)
    finally:
        signals.task_success.disconnect(on_success)
    (batch_id,) = [s["task_id"] for s in prerun if s["sender"].name == task.name]
    # then it fired once per request, in that request's context, with its
    # value, and once for the batch with the body's return value
    assert seen == [(requests[0].id, 2), (requests[1].id, 3), (batch_id, [2, 3])]


def test_task_failure_fires_once_per_failed_request_with_its_own_id(
    app: Celery,
) -> None:
    def body(requests: list[SimpleRequest]) -> None:
        raise ValueError("boom")

    task = batch_task(app, body)
    requests = calls(task, 1, 2)
    with recording(signals.task_failure) as failures:
        run_batch(task, requests)
    mine = [f for f in failures if f["sender"].name == task.name]
    assert [f["task_id"] for f in mine] == [r.id for r in requests]
    assert all(isinstance(f["exception"], ValueError) for f in mine)
    assert [f["args"] for f in mine] == [[1], [2]]


def test_current_task_inside_the_body_is_the_batch_task(app: Celery) -> None:
    # given a body that looks at current_task
    seen: dict[str, Any] = {}

    def body(requests: list[SimpleRequest]) -> None:
        seen["name"] = current_task.name
        seen["id"] = current_task.request.id

    task = batch_task(app, body)
    requests = calls(task, 1)
    # when it runs
    with recording(signals.task_prerun) as prerun:
        run_batch(task, requests)
    # then current_task was the batch task, running the batch's own request
    assert seen["name"] == task.name
    assert seen["id"] == prerun[-1]["task_id"]
    # and afterwards it is gone again
    assert getattr(current_task, "name", None) != task.name


# -- retries ------------------------------------------------------------------


def test_autoretry_for_retries_every_unsettled_request(app: Celery) -> None:
    # given a body that settles its first call and then hits a retryable error
    def body(requests: list[SimpleRequest]) -> None:
        requests[0].mark_as_done("settled")
        raise ConnectionError("backend away")

    task = batch_task(
        app, body, autoretry_for=(ConnectionError,), retry_kwargs={"countdown": 30}
    )
    requests = calls(task, 1, 2, 3)
    # when the batch runs with a real broker (not eager)
    before = datetime.now(timezone.utc)
    with published(app) as sent, recording(signals.task_retry) as retried:
        run_batch(task, requests)
    # then each unsettled call is published again, alone, with its own id,
    # one more retry and an ETA 30 s away; the settled one is not
    unsettled = [r.id for r in requests[1:]]
    assert [h["id"] for h in sent] == unsettled
    assert [h["task"] for h in sent] == [task.name, task.name]
    assert [h["retries"] for h in sent] == [1, 1]
    for headers in sent:
        eta = datetime.fromisoformat(headers["eta"])
        assert before + timedelta(seconds=29) < eta
        assert eta < datetime.now(timezone.utc) + timedelta(seconds=31)
    assert queued_ids(app) == unsettled
    # and they are stored as RETRY with the error, task_retry firing for each
    assert result_of(app, requests[0]) == (states.SUCCESS, "settled")
    for request in requests[1:]:
        state, reason = result_of(app, request)
        assert state == states.RETRY
        assert isinstance(reason, ConnectionError)
    assert [s["request"].id for s in retried] == unsettled


def test_an_error_outside_autoretry_for_fails_the_requests(app: Celery) -> None:
    def body(requests: list[SimpleRequest]) -> None:
        raise ValueError("not retryable")

    task = batch_task(
        app,
        body,
        autoretry_for=(Exception,),
        dont_autoretry_for=(ValueError,),
    )
    requests = calls(task, 1)
    with published(app) as sent:
        run_batch(task, requests)
    assert sent == []
    assert app.AsyncResult(requests[0].id).state == states.FAILURE


def test_retry_past_max_retries_fails_with_max_retries_exceeded(app: Celery) -> None:
    # given calls already retried twice, of a task allowing two retries
    def body(requests: list[SimpleRequest]) -> None:
        for request in requests:
            request.retry(countdown=1)

    task = batch_task(app, body, max_retries=2)
    requests = calls(task, 1, 2, retries=2)
    # when the body asks to retry them
    with published(app) as sent:
        run_batch(task, requests)
    # then nothing is published and each fails with MaxRetriesExceededError
    assert sent == []
    for request in requests:
        state, error = result_of(app, request)
        assert state == states.FAILURE
        assert isinstance(error, MaxRetriesExceededError)


def test_retry_max_retries_argument_overrides_the_task(app: Celery) -> None:
    # given calls retried twice, of a task allowing two retries
    def body(requests: list[SimpleRequest]) -> None:
        requests[0].retry(countdown=1, max_retries=5)
        requests[1].retry(countdown=1, max_retries=1, exc=KeyError("gave up"))

    task = batch_task(app, body, max_retries=2)
    requests = calls(task, 1, 2, retries=2)
    with published(app) as sent:
        run_batch(task, requests)
    # then the call allowed five retries goes again, with retries 3
    assert [(h["id"], h["retries"]) for h in sent] == [(requests[0].id, 3)]
    assert app.AsyncResult(requests[0].id).state == states.RETRY
    # and the call allowed one fails with the exception it was given
    state, error = result_of(app, requests[1])
    assert state == states.FAILURE
    assert isinstance(error, KeyError)


def test_self_retry_in_the_body_retries_every_unsettled_request(app: Celery) -> None:
    # given a bound body that settles one call and asks Celery to retry
    def body(self: Any, requests: list[SimpleRequest]) -> None:
        requests[0].mark_as_done("settled")
        self.retry(countdown=5)

    task = batch_task(app, body, bind=True)
    requests = calls(task, 1, 2)
    # when the batch runs in a worker (not eager)
    with published(app) as sent:
        run_batch(task, requests)
    # then the unsettled call is published again on its own, and nothing else
    assert [h["id"] for h in sent] == [requests[1].id]
    assert app.AsyncResult(requests[1].id).state == states.RETRY
    assert result_of(app, requests[0]) == (states.SUCCESS, "settled")


# -- eager calls ----------------------------------------------------------------


def test_apply_returns_the_calls_own_result(app: Celery) -> None:
    # given a per_request_results batch task
    def body(requests: list[SimpleRequest]) -> list[int]:
        return [r.args[0] * 10 for r in requests]

    task = batch_task(app, body, per_request_results=True)
    # when it is applied eagerly
    result = task.apply((4,))
    # then the result is this call's value, not the batch's list
    assert result.state == states.SUCCESS
    assert result.get() == 40


def test_delay_under_task_always_eager_returns_the_value_marked_done(
    app: Celery,
) -> None:
    def body(requests: list[SimpleRequest]) -> str:
        for request in requests:
            request.mark_as_done(f"done {request.args[0]}")
        return "batch"

    task = batch_task(app, body)
    app.conf.task_always_eager = True
    result = task.delay(7)
    assert result.get() == "done 7"


@pytest.mark.parametrize("how", ["marked", "raised"])
def test_apply_with_throw_raises_the_calls_failure(app: Celery, how: str) -> None:
    # given a batch task whose call fails (marked by the body, or raised)
    def body(requests: list[SimpleRequest]) -> None:
        if how == "raised":
            raise KeyError("the failure")
        requests[0].mark_as_failure(KeyError("the failure"))

    task = batch_task(app, body)
    # when it is applied with throw=True, the failure is raised
    with pytest.raises(KeyError, match="the failure"):
        task.apply((1,), throw=True)
    # and task_eager_propagates does the same
    app.conf.task_eager_propagates = True
    with pytest.raises(KeyError, match="the failure"):
        task.apply((1,))
    # and without either, the result holds the failure
    app.conf.task_eager_propagates = False
    result = task.apply((1,))
    assert result.state == states.FAILURE
    assert isinstance(result.result, KeyError)


def test_apply_of_an_unsettled_call_returns_what_the_body_returned(
    app: Celery,
) -> None:
    # given a body that settles nothing (celery-batches 0.11 behaviour)
    def body(requests: list[SimpleRequest]) -> str:
        return f"batch of {len(requests)}"

    task = batch_task(app, body)
    # when applied, the EagerResult holds the body's return value
    result = task.apply((1,))
    assert result.state == states.SUCCESS
    assert result.get() == "batch of 1"


def test_apply_describes_an_eager_delivery_with_the_options_given(
    app: Celery,
) -> None:
    # given a body that records what its request was told
    seen: list[SimpleRequest] = []

    def body(requests: list[SimpleRequest]) -> None:
        seen.extend(requests)

    task = batch_task(app, body)
    # when applied with routing options and a task id
    result = task.apply(
        (1,), {"k": 2}, exchange="ex", routing_key="rk", priority=7, task_id="my-id"
    )
    # then the request is eager, routed as asked, and has that id
    (request,) = seen
    assert request.delivery_info == {
        "is_eager": True,
        "exchange": "ex",
        "routing_key": "rk",
        "priority": 7,
    }
    assert request.id == result.id == "my-id"
    assert list(request.args) == [1]
    assert request.kwargs == {"k": 2}
    assert request.request_dict["is_eager"] is True


def test_apply_async_under_task_always_eager_keeps_task_id_and_routing(
    app: Celery,
) -> None:
    seen: list[SimpleRequest] = []

    def body(requests: list[SimpleRequest]) -> None:
        seen.extend(requests)

    task = batch_task(app, body)
    app.conf.task_always_eager = True
    result = task.apply_async((1,), task_id="eager-id", routing_key="rk", priority=3)
    (request,) = seen
    assert request.id == result.id == "eager-id"
    assert request.delivery_info["is_eager"] is True
    assert request.delivery_info["routing_key"] == "rk"
    assert request.delivery_info["priority"] == 3


def test_apply_with_a_single_link_runs_it_with_the_result(app: Celery) -> None:
    # given a per_request_results batch task and a callback
    def body(requests: list[SimpleRequest]) -> list[int]:
        return [r.args[0] * 2 for r in requests]

    task = batch_task(app, body, per_request_results=True)
    got: list[int] = []

    @app.task(name=f"unit.trace.callback.{uuid()}", shared=False)
    def callback(value: int) -> None:
        got.append(value)

    # when applied eagerly with link=callback.s(), as with any task
    app.conf.task_always_eager = True
    with published(app) as sent:
        result = task.apply_async((3,), link=callback.s())
    # then the call succeeds, the callback ran with its result, and no
    # message was published
    assert result.state == states.SUCCESS
    assert result.result == 6
    assert got == [6]
    assert sent == []


def test_apply_with_a_single_link_error_runs_it_on_failure(app: Celery) -> None:
    # given a batch task whose body raises, and an errback
    def body(requests: list[SimpleRequest]) -> None:
        raise ValueError("failed")

    task = batch_task(app, body)
    failed: list[str] = []

    @app.task(name=f"unit.trace.errback.{uuid()}", shared=False)
    def errback(request: Any, exc: Any, traceback: Any) -> None:
        failed.append(request.id)

    # when applied eagerly with link_error=errback.s()
    with published(app) as sent:
        result = task.apply((1,), link_error=errback.s(), task_id="failing")
    # then the call failed, the errback ran for it, and nothing was published
    assert result.state == states.FAILURE
    assert isinstance(result.result, ValueError)
    assert failed == ["failing"]
    assert sent == []
