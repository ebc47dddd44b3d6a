"""What the pool sends back for a batch always pickles."""

from __future__ import annotations

import pickle
import threading

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
