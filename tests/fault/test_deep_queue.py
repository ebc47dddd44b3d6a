"""A deep queue at Celery's default prefetch settings still fills batches."""

from __future__ import annotations

from collections import Counter

import pytest
from kombu.utils.uuid import uuid

from tests.app import create_app
from tests.conftest import BROKERS, require_server, wait_for
from tests.fault.conftest import Spawn

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
    spawn: Spawn, journal_path: str, broker: str, pool: str
) -> None:
    # given 3,000 calls waiting in the queue of a task with flush_every=100,
    # sent before any worker runs
    url, backend = BROKERS[broker]
    require_server(url)
    queue = f"q-{uuid()}"
    sender = create_app(broker=url, backend=backend, journal=journal_path, queue=queue)
    task = sender.tasks["tests.fault_deep"]
    with sender.producer_or_acquire() as producer:
        ids = [task.apply_async((i,), producer=producer).id for i in range(CALLS)]
    sender.close()

    # when a worker with Celery's default prefetch settings starts on it
    worker = spawn(broker, pool, queue=queue)

    # then every call runs exactly once, in batches of close to 100, within
    # the deadline
    def all_ran() -> bool:
        return len(set(worker.journal.ids("run"))) >= CALLS

    wait_for(all_ran, timeout=DEADLINE, interval=0.2, what=f"{CALLS} calls to run")
    runs = Counter(worker.journal.ids("run"))
    assert runs == Counter(dict.fromkeys(ids, 1))
    sizes = [
        int(size)
        for name, size, *_ in worker.journal.events("flush")
        if name == "tests.fault_deep"
    ]
    assert sum(sizes) == CALLS
    mean = sum(sizes) / len(sizes)
    assert mean >= 90, (mean, sizes)
