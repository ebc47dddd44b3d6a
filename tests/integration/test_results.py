"""Per-request results go to a Redis backend in bulk, and correctly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.eager import eager_request
from celery_batches.trace import run_batch
from tests.harness.brokers import REDIS_BACKEND, require_server


@pytest.fixture
def app() -> Iterator[Celery]:
    require_server(REDIS_BACKEND)
    app = Celery("results", backend=REDIS_BACKEND, set_as_current=False)
    app.conf.result_expires = 300
    yield app
    app.close()


def _commands(app: Celery) -> dict[str, int]:
    stats: dict[str, Any] = app.backend.client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


def test_a_batch_stores_every_result_without_a_read_per_request(app: Celery) -> None:
    @app.task(base=Batches, per_request_results=True, shared=False)
    def double(requests: list[SimpleRequest]) -> list[int]:
        return [r.args[0] * 2 for r in requests]

    # given a batch of 50 calls, one of which already has a SUCCESS result
    # (a redelivered message whose first run completed)
    ids = [uuid() for _ in range(50)]
    app.backend.mark_as_done(ids[0], "first run")
    requests = [eager_request(double, i, (n,), {}, {}) for n, i in enumerate(ids)]
    before = _commands(app)
    # when the batch runs
    run_batch(double, requests)
    after = _commands(app)
    # then every result is stored, the earlier SUCCESS is kept, and the
    # backend was read once for the whole batch, not once per request
    assert app.AsyncResult(ids[0]).get(timeout=5) == "first run"
    assert [app.AsyncResult(i).get(timeout=5) for i in ids[1:]] == [
        n * 2 for n in range(1, 50)
    ]
    assert after.get("cmdstat_mget", 0) - before.get("cmdstat_mget", 0) == 1
    assert after.get("cmdstat_get", 0) - before.get("cmdstat_get", 0) == 0
    assert app.backend.client.ttl(app.backend.get_key_for_task(ids[1])) > 0


def test_chord_members_and_failures_take_the_per_result_path(app: Celery) -> None:
    @app.task(base=Batches, per_request_results=True, shared=False)
    def mixed(requests: list[SimpleRequest]) -> list[Any]:
        return [ValueError("no") if r.args[0] else r.args[0] for r in requests]

    ids = [uuid(), uuid()]
    requests = [eager_request(mixed, i, (n,), {}, {}) for n, i in enumerate(ids)]
    run_batch(mixed, requests)
    assert app.AsyncResult(ids[0]).get(timeout=5) == 0
    failed = app.AsyncResult(ids[1])
    assert failed.state == states.FAILURE and isinstance(failed.result, ValueError)
