"""Scale-out and fairness: several workers, several batch tasks, default settings."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
from celery import Task

from tests.harness.journal import Batch, Run
from tests.harness.params import QUEUE_KINDS, queue_kind
from tests.harness.wait import wait_for
from tests.harness.worker import Workers


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_two_workers_share_one_queue_and_run_each_call_once(
    workers: Workers, broker: str
) -> None:
    # given two worker processes consuming the same queue
    first = workers.start(broker, "solo")
    second = workers.start(broker, "solo", queue=first.queue)
    task = first.tasks.collect
    # when many calls are sent
    results = [task.delay(i) for i in range(200)]
    # then every call has its result, ran exactly once, and both workers
    # took a share, each in batches of its own
    assert [r.get(timeout=60) for r in results] == list(range(200))
    ids = {r.id for r in results}
    runs = [run for run in first.journal.records(Run) if run.id in ids]
    assert Counter(run.id for run in runs) == Counter({i: 1 for i in ids})
    assert first.process is not None and second.process is not None
    assert {run.pid for run in runs} == {first.process.pid, second.process.pid}
    assert max(run.size for run in runs) == 5


@pytest.mark.parametrize(
    "kind", [queue_kind(k) for k in ("redis", "rabbitmq-classic", "rabbitmq-quorum")]
)
def test_two_batch_tasks_fill_full_batches_at_default_prefetch(
    workers: Workers, kind: str
) -> None:
    # given a prefork worker of two processes at Celery's default prefetch
    # (multiplier 4), and a backlog of two batch tasks with flush_every=100,
    # interleaved: on a quorum queue, with per-consumer QoS
    broker, conf = QUEUE_KINDS[kind]
    worker = workers.start(broker, "prefork", concurrency=2, conf=conf)
    big, big2 = worker.tasks.big, worker.tasks.big2
    for _ in range(300):
        big.delay()
        big2.delay()

    def sizes(task: Task) -> list[int]:
        return [b.size for b in worker.journal.records(Batch) if b.task == task.name]

    # when both have drained
    wait_for(lambda: sum(sizes(big)) >= 300, timeout=60, what="tests.big done")
    wait_for(lambda: sum(sizes(big2)) >= 300, timeout=60, what="tests.big2 done")
    # then both ran in batches that fill to flush_every, neither starving
    for task in (big, big2):
        assert sum(sizes(task)) == 300
        assert sum(sizes(task)) / len(sizes(task)) >= 90, sizes(task)
        assert statistics.median(sizes(task)) == 100, sizes(task)
