"""What the pool sends back for a batch always pickles."""

from __future__ import annotations

import pickle
import sys
import threading

import pytest
from celery import Celery
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.eager import eager_request
from celery_batches.trace import run_batch


class Unpicklable(Exception):
    """An exception whose constructor pickle cannot call back."""

    def __init__(self, code: int, lock: object) -> None:
        super().__init__(code)
        self.lock = lock


def test_outcomes_pickle_for_retries_failures_and_successes(app: Celery) -> None:
    # given a batch that retries one request, fails one with an exception
    # that cannot be pickled, and succeeds with one
    @app.task(base=Batches, name="unit.outcomes", shared=False)
    def body(requests: list[SimpleRequest]) -> None:
        retry, fail, done = requests
        retry.retry(countdown=60)
        fail.mark_as_failure(Unpicklable(3, threading.Lock()))
        done.mark_as_done({"ok": True})

    requests = [eager_request(body, uuid(), (n,), {}, {}) for n in range(3)]
    # when it runs, as in a prefork child
    _, outcomes = run_batch(body, requests)
    # then what goes back to the worker survives the pipe
    failed = [flag for flag, _, _ in pickle.loads(pickle.dumps(outcomes))]
    assert failed == [1, 1, 0]


def test_a_batch_runs_without_the_redis_client(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given an install without the redis client (`pip install .`, as for
    # RabbitMQ), where Celery's Redis backend module cannot be imported
    monkeypatch.setitem(sys.modules, "celery.backends.redis", None)
    monkeypatch.setitem(sys.modules, "redis", None)

    @app.task(base=Batches, name="unit.no_redis", shared=False)
    def body(requests: list[SimpleRequest]) -> list[int]:
        return [request.args[0] * 2 for request in requests]

    body.per_request_results = True
    requests = [eager_request(body, uuid(), (n,), {}, {}) for n in range(3)]
    # when a batch runs
    _, outcomes = run_batch(body, requests)
    # then every call succeeds, its result stored by the app's own backend
    assert [flag for flag, _, _ in outcomes] == [0, 0, 0]
    assert [body.AsyncResult(r.id).get(timeout=5) for r in requests] == [0, 2, 4]
