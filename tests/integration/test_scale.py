"""Scale-out and fairness: several workers, several batch tasks, default settings."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.conftest import (
    Worker,
    start_subprocess_worker,
    stop_subprocess_worker,
    wait_for,
)

REAL_BROKERS = ["redis", "rabbitmq"]


@pytest.fixture(params=REAL_BROKERS)
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_two_workers_share_one_queue_and_run_each_call_once(
    broker: str, journal_dir: str
) -> None:
    # given two worker processes consuming the same queue
    journal = os.path.join(journal_dir, f"scale-{broker}.journal")
    first = start_subprocess_worker(broker, "solo", journal)
    second = start_subprocess_worker(broker, "solo", journal, queue=first.queue)
    try:
        task = first.app.tasks["tests.collect"]
        # when many calls are sent
        results = [task.delay(i) for i in range(200)]
        # then every call has its result, ran exactly once, and both workers
        # took a share, each in batches of its own
        assert [r.get(timeout=60) for r in results] == list(range(200))
        ids = {r.id for r in results}
        runs = [f for f in first.journal.events("run") if f[0] in ids]
        assert Counter(f[0] for f in runs) == Counter({i: 1 for i in ids})
        pids = {int(f[2]) for f in runs}
        assert first.process is not None and second.process is not None
        assert pids == {first.process.pid, second.process.pid}
        assert max(int(f[1]) for f in runs) == 5
    finally:
        stop_subprocess_worker(second)
        stop_subprocess_worker(first)


@pytest.fixture
def backlog_worker(broker: str, journal_dir: str) -> Iterator[Worker]:
    journal = os.path.join(journal_dir, f"backlog-{broker}.journal")
    # Celery's default prefetch: multiplier 4 on two processes.
    w = start_subprocess_worker(broker, "prefork", journal, concurrency=2)
    try:
        yield w
    finally:
        stop_subprocess_worker(w)


def test_two_batch_tasks_fill_full_batches_at_default_prefetch(
    backlog_worker: Worker,
) -> None:
    app = backlog_worker.app
    # given a backlog of two batch tasks, interleaved, at default settings
    big, big2 = app.tasks["tests.big"], app.tasks["tests.big2"]
    for _ in range(300):
        big.delay()
        big2.delay()

    def sizes(kind: str) -> list[int]:
        return [int(f[1]) for f in backlog_worker.journal.events(kind)]

    # then both drain, in batches that fill to flush_every, neither starving
    wait_for(lambda: sum(sizes("batch")) >= 300, timeout=60, what="tests.big done")
    wait_for(lambda: sum(sizes("batch2")) >= 300, timeout=60, what="tests.big2 done")
    assert sum(sizes("batch")) == 300 and sum(sizes("batch2")) == 300
    for kind in ("batch", "batch2"):
        assert sum(sizes(kind)) / len(sizes(kind)) >= 90, sizes(kind)
