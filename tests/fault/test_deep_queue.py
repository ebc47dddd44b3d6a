"""A deep queue at Celery's default prefetch settings still fills batches."""

from __future__ import annotations

import pytest

from tests.harness.journal import Run
from tests.harness.wait import wait_for
from tests.harness.worker import Workers

pytestmark = pytest.mark.fault

CALLS = 3000


#: Seconds the worker may take for the whole queue; a healthy one needs 2 to 8.
DEADLINE = 15

# With the solo pool on RabbitMQ, kombu 5.7's event loop used to sleep a
# whole flush_interval with AMQP frames already read (22-31 s for this
# queue); celery_batches' BatchesStep now wakes the hub when callbacks are
# pending, and this deadline guards that.


@pytest.mark.parametrize(
    ("broker", "pool"),
    [
        pytest.param("rabbitmq", "prefork", id="rabbitmq-prefork"),
        pytest.param("redis", "prefork", id="redis-prefork"),
        pytest.param("redis", "solo", id="redis-solo"),
        pytest.param("rabbitmq", "solo", id="rabbitmq-solo"),
    ],
)
def test_deep_queue_runs_every_call_once_in_full_batches(
    workers: Workers, broker: str, pool: str
) -> None:
    # given 3,000 calls waiting in the queue of a task with flush_every=100,
    # sent before any worker runs
    sender = workers.client(broker)
    task = sender.tasks.fault_deep
    with sender.app.producer_or_acquire() as producer:
        ids = [task.apply_async((i,), producer=producer).id for i in range(CALLS)]

    # when a worker with Celery's default prefetch settings starts on it
    worker = workers.start(broker, pool, queue=sender.queue)

    # then every call runs exactly once, in batches of close to 100, within
    # the deadline
    def all_ran() -> bool:
        return len(set(worker.journal.ids(Run))) >= CALLS

    wait_for(all_ran, timeout=DEADLINE, interval=0.2, what=f"{CALLS} calls to run")
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    sizes = [flush.size for flush in worker.flushes(task)]
    assert sum(sizes) == CALLS
    mean = sum(sizes) / len(sizes)
    assert mean >= 90, (mean, sizes)
