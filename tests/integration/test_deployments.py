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

from tests.harness.client import Client
from tests.harness.journal import AckFrame, Received, Run, Timed
from tests.harness.params import CELERY_VERSION, QUEUE_KINDS, QUORUM, queue_kind
from tests.harness.wait import wait_for
from tests.harness.worker import Workers

needs_quorum_support = pytest.mark.skipif(
    CELERY_VERSION < (5, 5), reason="Celery declares quorum queues from 5.5 on"
)

#: The deep queue's calls, and the seconds a worker may take for all of
#: them (a healthy one needs 2 to 8).
CALLS = 3000
DEADLINE = 15


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
    ("kind", "pool"),
    [
        queue_kind("rabbitmq-classic", "prefork"),
        queue_kind("redis", "prefork"),
        queue_kind("redis", "solo"),
        queue_kind("rabbitmq-classic", "solo"),
        queue_kind("rabbitmq-quorum", "solo"),
    ],
)
def test_a_deep_queue_runs_every_call_once_in_full_batches(
    workers: Workers, kind: str, pool: str
) -> None:
    # given 3,000 calls of a task with flush_every=100 and flush_interval=2
    # queued before a worker with Celery's default prefetch (4) starts: on
    # a quorum queue Celery uses per-consumer QoS, which a basic.qos sent
    # after the consumer started does not reach
    broker, conf = QUEUE_KINDS[kind]
    sender = workers.client(broker, conf=conf)
    task = sender.tasks.fault_deep
    with sender.app.producer_or_acquire() as producer:
        ids = [task.apply_async((i,), producer=producer).id for i in range(CALLS)]

    # when a worker starts on it
    worker = workers.start(broker, pool, queue=sender.queue, conf=conf)

    # then every call runs exactly once, in batches that fill to
    # flush_every, within the deadline
    def all_ran() -> bool:
        return len(set(worker.journal.ids(Run))) >= CALLS

    wait_for(all_ran, timeout=DEADLINE, interval=0.2, what=f"{CALLS} calls to run")
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    sizes = [flush.size for flush in worker.flushes(task)]
    assert sum(sizes) == CALLS
    mean = sum(sizes) / len(sizes)
    assert mean >= 90, (mean, sizes)
    assert statistics.median(sizes) == 100, sizes


# With the solo pool on RabbitMQ, kombu 5.7's event loop used to sleep a
# whole flush_interval with AMQP frames already read (22-31 s for the deep
# queue); celery_batches' BatchesStep now wakes the hub when callbacks are
# pending, and the deadline above guards that.


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
    # (each delivery is one Received record: five to each worker, and the
    # second must have its five before it is stopped)
    wait_for(
        lambda: Counter(second.journal.ids(Received)) == dict.fromkeys(ids, 2),
        what="the second worker to receive the five calls",
    )
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
