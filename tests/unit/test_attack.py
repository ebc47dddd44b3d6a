"""Pure-logic defects found by attacking the worker, held as failing tests.

Each is marked ``xfail`` (strict) until the package is fixed; the reason
names the defect.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, signals
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.testing import apply_batch
from celery_batches.trace import run_batch
from tests.unit.conftest import FakeWorker, make_message
from tests.unit.test_trace import calls

#: The largest prefetch count AMQP carries; kombu sends a larger one as 0.
PREFETCH_COUNT_MAX = 0xFFFF


def batch_task(app: Celery, **options: Any) -> Any:
    options = {"flush_every": 3, "flush_interval": 60, **options}

    @app.task(base=Batches, name=f"unit.attack.{uuid()}", shared=False, **options)
    def batch(requests: list[SimpleRequest]) -> None:
        pass

    return batch


def test_calls_held_for_their_eta_never_widen_the_window_past_what_amqp_carries(
    app: Celery,
) -> None:
    # given a worker whose own window is 65,000 (e.g. 650 processes with a
    # prefetch multiplier of 100) and a batch task
    worker = FakeWorker(app, prefetch=65_000)
    task = batch_task(app)
    handler = worker.strategy(task)
    # when 600 calls arrive that wait a minute for their ETA (within the
    # default batches_prefetch_limit of 10,000)
    for n in range(600):
        worker.deliver(handler, make_message(app, task.s(n).set(countdown=60)))
        worker.sync_prefetch()
    # then, as configuration.rst promises, "the window never goes past
    # 65,535": the broker is never told 0, which would lift every limit
    assert len(worker.eta_entries()) == 600
    assert worker.qos.value <= PREFETCH_COUNT_MAX
    assert 0 not in worker.prefetch_sent


class FlushHookError(Exception):
    """What the flush hooks below raise."""


class RaisingBefore(Batches):
    abstract = True

    def flush(self, requests: list[Any]) -> Any:
        raise FlushHookError("before handing the batch over")


class RaisingAfter(Batches):
    abstract = True

    def flush(self, requests: list[Any]) -> Any:
        handed = super().flush(requests)
        self.fail_to_count()
        return handed

    def fail_to_count(self) -> None:
        raise FlushHookError("after handing the batch over")


def hooked_task(app: Celery, base: type[Batches]) -> Any:
    @app.task(
        base=base,
        name=f"unit.attack.{uuid()}",
        shared=False,
        flush_every=2,
        flush_interval=60,
    )
    def hooked(requests: list[SimpleRequest]) -> None:
        pass

    return app.tasks[hooked.name]


def test_a_flush_hook_that_raises_fails_only_the_calls_it_did_not_hand_over(
    app: Celery,
) -> None:
    # given two batch tasks whose flush hook raises, one before it hands the
    # batch to the pool (super().flush), one after
    worker = FakeWorker(app)
    before = hooked_task(app, RaisingBefore)
    after = hooked_task(app, RaisingAfter)
    messages = {}
    for task in (before, after):
        handler = worker.strategy(task)
        messages[task.name] = [make_message(app, task.s(n)) for n in range(2)]
        # when a full batch of each is flushed
        for message in messages[task.name]:
            worker.deliver(handler, message)
    # then the calls not handed over are failed and their messages rejected
    assert [m.reject.call_count for m in messages[before.name]] == [1, 1]
    assert [app.AsyncResult(m.headers["id"]).state for m in messages[before.name]] == [
        "FAILURE"
    ] * 2
    # and the calls handed over are left to the pool: not rejected, nothing
    # stored for them, so they settle once, by their own outcome
    assert worker.pool.ids() == [[m.headers["id"] for m in messages[after.name]]]
    assert [m.reject.call_count for m in messages[after.name]] == [0, 0]
    assert [app.AsyncResult(m.headers["id"]).state for m in messages[after.name]] == [
        "PENDING"
    ] * 2


def test_an_eager_call_that_retries_runs_its_retry_in_process(app: Celery) -> None:
    # given a per_request_results task whose body retries each call on its
    # first run, and answers it on its retry
    @app.task(
        base=Batches,
        name=f"unit.attack.{uuid()}",
        shared=False,
        flush_every=3,
        flush_interval=60,
        per_request_results=True,
        max_retries=3,
    )
    def flaky(requests: list[SimpleRequest]) -> list[Any]:
        answers = []
        for request in requests:
            if not request.request_dict.get("retries"):
                request.retry(countdown=60)
            answers.append(request.args[0] * 10)
        return answers

    task = app.tasks[flaky.name]
    sent: list[str] = []

    def on_publish(sender: Any = None, **kwargs: Any) -> None:
        sent.append(str(sender))

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        # when a call is applied eagerly, as the FAQ shows for a test run
        # "without a worker or a broker"
        one = task.apply((4,))
    finally:
        signals.before_task_publish.disconnect(on_publish)
    # then, as Celery's apply() runs a plain task's retry, the retry runs in
    # the process (no message goes to a broker), and the result is that of
    # the retried run
    assert sent == []
    assert (one.state, one.get()) == ("SUCCESS", 40)


class Grumpy(Exception):
    """An exception whose ``__str__`` raises (it formats an attribute it lacks)."""

    def __str__(self) -> str:
        raise AttributeError("Grumpy has no attribute 'detail'")


def test_a_recording_span_does_not_change_how_a_raising_body_fails_its_calls(
    app: Celery,
) -> None:
    # given a batch running inside a recording OpenTelemetry span, as the
    # Celery instrumentation starts one per batch, and a body that raises
    # an exception whose str() raises
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    tracer = sdk.TracerProvider().get_tracer("attack")

    @app.task(base=Batches, name=f"unit.attack.{uuid()}", shared=False)
    def grumpy(requests: list[SimpleRequest]) -> None:
        raise Grumpy()

    # when the batch runs
    with tracer.start_as_current_span("run/grumpy"):
        results = apply_batch(app.tasks[grumpy.name], [1, 2])
    # then each call fails with the body's exception, as it does with no
    # span: marking the span failed never changes a call's outcome
    assert [r.state for r in results] == ["FAILURE", "FAILURE"]
    assert [type(r.result) for r in results] == [Grumpy, Grumpy]


def test_a_call_with_a_trace_header_of_the_wrong_type_does_not_fail_its_batch(
    app: Celery,
) -> None:
    # given a batch running inside a recording OpenTelemetry span, started
    # from task_prerun as the Celery instrumentation starts it, and two
    # calls, one of which was sent with a traceparent header that is a
    # number (a hand-made message: headers are whatever the sender wrote)
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    tracer = sdk.TracerProvider().get_tracer("attack")

    @app.task(
        base=Batches,
        name=f"unit.attack.{uuid()}",
        shared=False,
        per_request_results=True,
    )
    def echo(requests: list[SimpleRequest]) -> list[Any]:
        return [r.args[0] for r in requests]

    task = app.tasks[echo.name]
    requests = calls(task, 1, 2)
    requests[0].request_dict["traceparent"] = 5

    def on_prerun(**kwargs: Any) -> None:
        pass

    signals.task_prerun.connect(on_prerun, weak=False)
    try:
        # when the batch runs
        with tracer.start_as_current_span("run/echo"):
            _, outcomes = run_batch(task, requests)
    finally:
        signals.task_prerun.disconnect(on_prerun)
    # then both calls get their values: linking the batch's span to each
    # call's is best effort, and a header it cannot read is skipped
    assert [outcome[:2] for outcome in outcomes] == [(0, "1"), (0, "2")]


def test_self_retry_with_a_string_reason_keeps_it_as_request_retry_does(
    app: Celery,
) -> None:
    # given two bound tasks that retry their calls with the reason given as
    # a string, as Celery's Task.retry allows: one raising self.retry(...),
    # one calling request.retry(...) on each call
    @app.task(base=Batches, name=f"unit.attack.{uuid()}", bind=True, shared=False)
    def whole(self: Batches, requests: list[SimpleRequest]) -> None:
        raise self.retry(exc="busy, try later", countdown=5)

    @app.task(base=Batches, name=f"unit.attack.{uuid()}", shared=False)
    def each(requests: list[SimpleRequest]) -> None:
        for request in requests:
            request.retry(exc="busy, try later", countdown=5)

    # when each runs a batch of one call
    reasons = [
        apply_batch(app.tasks[task.name], [1])[0].result for task in (whole, each)
    ]
    # then both calls are RETRY with that string as the reason's message:
    # self.retry() retries each call "as SimpleRequest.retry would"
    assert [str(reason) for reason in reasons] == ["busy, try later"] * 2
