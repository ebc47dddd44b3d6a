"""Every call a first-class task to the tools around Celery.

Sentry and OpenTelemetry with the real packages and their in-process
transports and exporters (each in a process of its own: both patch Celery
process-wide); ``celery inspect batches`` and eager calls against real
workers and backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from celery_batches import Batches, SimpleRequest
from celery_batches.testing import apply_batch
from tests.harness.brokers import ROOT
from tests.harness.wait import wait_for
from tests.harness.worker import start_worker


def traced(integration: str) -> dict[str, Any]:
    """Run the traced worker script with ``integration`` set up; return its report."""
    pytest.importorskip("sentry_sdk" if integration == "sentry" else "opentelemetry")
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.scripts.traced_worker", integration],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.slow
def test_sentry_reports_a_failing_batch_body_and_each_failed_call() -> None:
    # given sentry-sdk with its Celery integration, capturing events in
    # memory, and a worker running a batch whose body raises, and a batch
    # whose body fails one call by its value
    report = traced("sentry")
    events = report["events"]
    # then the body's exception is one event, caught by the Celery
    # integration where the body raised
    body = [
        e for e in events if ["ValueError", "the batch body broke"] in e["exceptions"]
    ]
    assert len(body) == 1, events
    assert body[0]["mechanism"] == ["celery"]
    # and the failed call is an event of its own, naming the call
    failed_call = report["answers"][2]
    calls = [e for e in events if ["KeyError", "2"] in e["exceptions"]]
    assert len(calls) == 1, events
    assert failed_call in calls[0]["message"]


@pytest.mark.slow
def test_opentelemetry_gives_each_batch_a_span_linked_to_each_call() -> None:
    # given opentelemetry-instrumentation-celery with an in-memory exporter,
    # instrumenting both the sender and the worker
    report = traced("opentelemetry")
    spans = report["spans"]
    sent = {s["task_id"]: s["span_id"] for s in spans if s["name"].startswith("apply")}
    runs = [s for s in spans if s["name"].startswith("run/")]
    # then each batch ran in one span, linked to the span each of its calls
    # was sent from
    assert sorted(s["name"] for s in runs) == [
        "run/traced.answers",
        "run/traced.broken",
    ]
    for run in runs:
        calls = (
            report["broken"]
            if run["name"] == "run/traced.broken"
            else report["answers"]
        )
        linked = {link["message_id"]: link["span_id"] for link in run["links"]}
        assert linked == {task_id: sent[task_id] for task_id in calls}
    # and the batch whose body raised is marked failed
    status = {s["name"]: s["status"] for s in runs}
    assert status == {"run/traced.broken": "ERROR", "run/traced.answers": "UNSET"}


# -- celery inspect batches ----------------------------------------------------


@pytest.fixture
def waiting_app() -> Iterator[Celery]:
    app = Celery("inspected", set_as_current=False)

    @app.task(
        base=Batches,
        name="inspected.tenants",
        flush_every=50,
        flush_interval=60,
        batch_key="tenant",
        shared=False,
    )
    def tenants(requests: list[SimpleRequest]) -> None:
        pass

    yield app
    app.close()


def test_inspect_batches_shows_what_waits_per_task_and_key(waiting_app: Celery) -> None:
    # given a worker holding calls of two tenants in their buffers
    app = waiting_app
    with start_worker(
        app=app, pool="solo", batch_options={"flush_interval": 60}
    ) as worker:
        task = app.tasks["inspected.tenants"]
        for tenant, count in (("acme", 3), ("globex", 2)):
            for n in range(count):
                task.delay(n, tenant=tenant)

        def report() -> dict[str, Any] | None:
            replies = app.control.broadcast("batches", reply=True, timeout=1)
            for reply in replies or []:
                (state,) = reply.values()
                tenants = state["tasks"].get("inspected.tenants", {})
                if tenants.get("waiting") == 5:
                    return state  # type: ignore[no-any-return]
            return None

        # when asked what it holds (celery -A app inspect batches)
        state = wait_for(report, what="five calls waiting")
    assert state is not None
    # then it shows each key's calls, how long they waited, the next flush
    tenants = state["tasks"]["inspected.tenants"]
    keys = {entry["key"]: entry for entry in tenants["keys"]}
    assert {key: entry["waiting"] for key, entry in keys.items()} == {
        "acme": 3,
        "globex": 2,
    }
    for entry in keys.values():
        assert 0 <= entry["oldest_wait"] < 60
        assert 0 < entry["next_flush_in"] <= 60
    assert tenants["flush_every"] == 50 and tenants["flush_interval"] == 60
    # and the prefetch budget the worker has
    assert state["prefetch"]["limit"] == 10_000
    assert worker.flushes() == []


# -- eager calls ---------------------------------------------------------------


def eager_app(**conf: Any) -> Celery:
    # A result backend that cannot be reached: an eager call that tried to
    # store its result would wait out the connection retries.
    app = Celery("eager", set_as_current=False)
    app.conf.update({"result_backend": "redis://127.0.0.1:9/0", **conf})

    @app.task(base=Batches, name="eager.double", per_request_results=True, shared=False)
    def double(requests: list[SimpleRequest]) -> list[int]:
        return [2 * r.args[0] for r in requests]

    return app


def test_eager_calls_store_nothing_by_default() -> None:
    # given a batch task whose app's result backend cannot be reached, and
    # Celery's default task_store_eager_result (False)
    app = eager_app()
    task = app.tasks["eager.double"]
    started = time.monotonic()
    # when it is applied eagerly, and its body run by the testing helper
    result = task.apply((21,))
    results = apply_batch(task, [1, 2])
    # then both answer at once, without touching the backend
    assert result.get() == 42
    assert [r.get() for r in results] == [2, 4]
    assert time.monotonic() - started < 5


def test_eager_calls_store_their_results_when_asked() -> None:
    # given task_store_eager_result=True and a backend that can be reached
    app = eager_app(task_store_eager_result=True, result_backend="cache+memory://")
    task = app.tasks["eager.double"]
    # when a call is applied eagerly and a batch run by the helper
    result = task.apply((21,))
    results = apply_batch(task, [1, 2])
    # then each result is in the backend, as Celery stores an eager result
    assert AsyncResult(result.id, app=app).get(timeout=5) == 42
    assert [AsyncResult(r.id, app=app).get(timeout=5) for r in results] == [2, 4]


def test_eager_failures_propagate_as_celery_says() -> None:
    def failing(requests: list[SimpleRequest]) -> None:
        raise LookupError("nope")

    app = Celery("eager", set_as_current=False)
    app.conf.task_eager_propagates = True
    app.task(base=Batches, name="eager.failing", shared=False)(failing)
    task = app.tasks["eager.failing"]
    with pytest.raises(LookupError, match="nope"):
        task.apply((1,))
    app.conf.task_eager_propagates = False
    assert isinstance(task.apply((1,)).result, LookupError)
