"""Batching on the deployments people run: quorum queues, mingle, green pools, ...

Each test starts real workers the way a deployment does, on RabbitMQ
(classic and quorum queues) and Redis, at Celery's default settings unless
the test is about a setting.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections import Counter
from functools import partial

import pytest
from celery import Task

from tests.harness.client import Client
from tests.harness.journal import AckFrame, Batch, Run, Timed
from tests.harness.params import CELERY_VERSION, QUEUE_KINDS, QUORUM, queue_kind
from tests.harness.wait import wait_for
from tests.harness.worker import Workers

needs_quorum_support = pytest.mark.skipif(
    CELERY_VERSION < (5, 5), reason="Celery declares quorum queues from 5.5 on"
)


def batch_sizes(client: Client, ids: set[str]) -> list[int]:
    """The size of each batch that ran calls of ``ids``, one entry per batch."""
    per_size = Counter(run.size for run in client.journal.records(Run) if run.id in ids)
    return sorted(
        size for size, calls in per_size.items() for _ in range(calls // size)
    )


def all_succeeded(client: Client, ids: list[str]) -> bool:
    return client.states(ids) == ["SUCCESS"] * len(ids)


# -- batch tasks consume with a window of their own ---------------------------


@pytest.mark.parametrize(
    "kind", [queue_kind(k) for k in ("rabbitmq-classic", "rabbitmq-quorum", "redis")]
)
def test_a_backlog_runs_in_full_batches_at_default_settings(
    workers: Workers, kind: str
) -> None:
    # given 500 calls of a task with flush_every=50 and flush_interval=5 queued
    # before a solo worker with Celery's default prefetch (4) starts: on a
    # quorum queue Celery uses per-consumer QoS, which a basic.qos sent
    # after the consumer started does not reach
    broker, conf = QUEUE_KINDS[kind]
    sender = workers.client(broker, conf=conf)
    ids = [sender.tasks.fifty.delay(n).id for n in range(500)]
    worker = workers.start(broker, "solo", queue=sender.queue, conf=conf)
    # when the worker drains the queue
    wait_for(
        lambda: (
            len(worker.run_counts(ids)) == 500 and all(worker.run_counts(ids).values())
        ),
        timeout=30,
        what="all 500 calls to run",
    )
    # then every call ran once, in batches that filled to flush_every
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    sizes = batch_sizes(worker, set(ids))
    assert statistics.median(sizes) == 50, sizes


@needs_quorum_support
def test_two_batch_tasks_on_a_quorum_queue_both_fill(workers: Workers) -> None:
    # given a prefork worker at default settings on a quorum queue, and a
    # backlog of two batch tasks with flush_every=100, interleaved
    worker = workers.start("rabbitmq", "prefork", concurrency=2, conf=QUORUM)
    big, big2 = worker.tasks.big, worker.tasks.big2
    for _ in range(300):
        big.delay()
        big2.delay()

    def sizes(task: Task) -> list[int]:
        return [b.size for b in worker.journal.records(Batch) if b.task == task.name]

    # when both have drained
    wait_for(lambda: sum(sizes(big)) >= 300, timeout=60, what="tests.big")
    wait_for(lambda: sum(sizes(big2)) >= 300, timeout=60, what="tests.big2")
    # then both ran in batches of flush_every, neither starving
    for task in (big, big2):
        assert sum(sizes(task)) == 300
        assert statistics.median(sizes(task)) == 100, sizes(task)


# -- the one-frame ack with mingle on -----------------------------------------


def test_a_worker_started_beside_another_acks_its_batches_in_one_frame(
    workers: Workers,
) -> None:
    # given a worker started the default way (mingle on) while another one
    # runs: mingle's replies arrive on its task channel, and need no ack
    trace = {"CB_TEST_TRACE_ACKS": "1"}
    first = workers.start("rabbitmq", "solo", celery_defaults=True, extra_env=trace)
    second = workers.start(
        "rabbitmq",
        "solo",
        queue=first.queue,
        celery_defaults=True,
        extra_env=trace,
    )
    assert "mingle: sync with" in second.log(), second.log()
    # when the first one has stopped (leaving the queue) and the second
    # runs two batches of five
    assert first.exit() == 0, first.log()
    collect = second.tasks.collect
    ids = [collect.delay(n).id for n in range(10)]
    wait_for(lambda: second.states(ids) == ["SUCCESS"] * 10, what="ten calls")
    assert second.process is not None
    pid = second.process.pid
    frames = [
        (frame.tag, frame.multiple)
        for frame in second.journal.records(AckFrame)
        if frame.pid == pid
    ]
    # then the batches went out in one basic.ack frame each at most (one
    # for both, if both were due together), not one frame per message
    assert frames, second.log()
    assert len(frames) <= 2 and all(multiple for _, multiple in frames), frames
    assert max(tag for tag, _ in frames) > 10  # mingle's reply came first


# -- ETA on quorum queues -----------------------------------------------------


@needs_quorum_support
def test_countdown_calls_on_a_quorum_queue_run_once_and_not_early(
    workers: Workers,
) -> None:
    # given a worker on a quorum queue, whose countdown calls Celery routes
    # through its native delayed delivery (RabbitMQ holds them)
    worker = workers.start("rabbitmq", "prefork", conf=QUORUM)
    timed = worker.tasks.timed
    sent = time.time()
    ids = [timed.apply_async((n,), countdown=2).id for n in range(6)]
    # when they are due
    wait_for(
        lambda: worker.states(ids) == ["SUCCESS"] * 6, timeout=30, what="six calls"
    )
    # then each ran once, none before its countdown, and they joined batches
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    ran_at = {record.id: record.at for record in worker.journal.records(Timed)}
    early = {
        task_id: ran_at[task_id] - sent for task_id in ids if ran_at[task_id] < sent + 2
    }
    assert not early, early
    assert max(batch_sizes(worker, set(ids))) > 1


# -- soft shutdown ------------------------------------------------------------


@pytest.mark.skipif(
    CELERY_VERSION < (5, 5), reason="soft shutdown is new in Celery 5.5"
)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_soft_shutdown_gives_buffered_calls_back_to_run_once_elsewhere(
    workers: Workers, broker: str
) -> None:
    # given a worker with a soft shutdown window of 3 s, and calls waiting in
    # a buffer (flush_every=100, flush_interval=30) that nothing else flushes
    conf = {
        "worker_soft_shutdown_timeout": 3,
        "worker_enable_soft_shutdown_on_idle": True,
    }
    first = workers.start(broker, "prefork", conf=conf)
    task = first.tasks.fault_shutdown
    ids = [task.delay(n).id for n in range(5)]
    first.wait_received(ids)
    # when it gets a cold shutdown, which the soft window precedes
    started = time.monotonic()
    assert first.exit(signal.SIGQUIT) == 0, first.log()
    # then it waited out the window, ran none of them, and they went back
    # to the broker: a second worker runs each exactly once
    assert time.monotonic() - started >= 3, first.log()
    assert "Initiating Soft Shutdown" in first.log()
    assert first.run_counts(ids) == dict.fromkeys(ids, 0)
    second = workers.start(broker, "prefork", queue=first.queue)
    assert second.exit() == 0, second.log()
    assert second.run_counts(ids) == dict.fromkeys(ids, 1)
    assert second.states(ids) == ["SUCCESS"] * 5


# -- worker_max_tasks_per_child counts batches --------------------------------


def test_max_tasks_per_child_counts_batches_not_calls(workers: Workers) -> None:
    # given a prefork worker of one process replaced after 2 tasks
    worker = workers.start(
        "redis",
        "prefork",
        concurrency=1,
        conf={"worker_max_tasks_per_child": 2},
    )
    collect = worker.tasks.collect
    pids = []
    # when three batches of five calls run one after the other
    for batch in range(3):
        ids = [collect.delay(n).id for n in range(batch * 5, batch * 5 + 5)]
        wait_for(partial(all_succeeded, worker, ids), what=f"batch {batch}")
        pids.append({run.pid for run in worker.journal.records(Run) if run.id in ids})
    # then the first two batches (ten calls) ran in one process, and the
    # third in its replacement: a batch is one task to the pool
    assert all(len(p) == 1 for p in pids), pids
    assert pids[0] == pids[1] != pids[2], pids
