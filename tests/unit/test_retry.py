"""Retrying requests without a countdown uses the task's own delay settings."""

from __future__ import annotations

from celery import Celery, signals

from celery_batches import Batches, SimpleRequest
from celery_batches.testing import apply_batch
from tests.unit.conftest import recording


def test_retry_without_countdown_uses_default_retry_delay(app: Celery) -> None:
    # given a task that retries each request without saying when
    @app.task(base=Batches, shared=False, default_retry_delay=42)
    def body(requests: list[SimpleRequest]) -> None:
        for request in requests:
            request.retry()

    # when it runs
    with recording(signals.before_task_publish) as published:
        results = apply_batch(body, [1, 2])
    # then each request is RETRY and re-sent 42 seconds out, once
    assert [r.state for r in results] == ["RETRY", "RETRY"]
    assert len(published) == 2
    assert all(p["headers"]["eta"] for p in published)


def test_autoretry_without_retry_kwargs_retries_each_request(app: Celery) -> None:
    @app.task(base=Batches, shared=False, autoretry_for=(KeyError,))
    def body(requests: list[SimpleRequest]) -> None:
        raise KeyError("flaky")

    assert [r.state for r in apply_batch(body, [1, 2])] == ["RETRY", "RETRY"]


def test_a_settled_request_is_not_retried(app: Celery) -> None:
    @app.task(base=Batches, shared=False)
    def body(requests: list[SimpleRequest]) -> None:
        for request in requests:
            request.mark_as_done("done")
            request.retry(countdown=1)

    with recording(signals.before_task_publish) as published:
        results = apply_batch(body, [1])
    assert [r.get() for r in results] == ["done"]
    assert published == []
