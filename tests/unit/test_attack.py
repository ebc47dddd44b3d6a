"""Pure-logic defects found by attacking the worker, held as failing tests.

Each is marked ``xfail`` (strict) until the package is fixed; the reason
names the defect.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from tests.unit.conftest import FakeWorker, make_message

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
