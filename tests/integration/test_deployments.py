"""Batching on the deployments people run: quorum queues, mingle, green pools, ...

Each test starts real workers the way a deployment does, on RabbitMQ
(classic and quorum queues) and Redis, at Celery's default settings unless
the test is about a setting.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import celery
import pytest
from kombu.utils.uuid import uuid

from tests.app import create_app
from tests.conftest import (
    BROKERS,
    Worker,
    require_server,
    start_subprocess_worker,
    stop_subprocess_worker,
    wait_for,
)
from tests.fault.conftest import exit_code, run_counts, states

CELERY_VERSION = tuple(int(part) for part in celery.__version__.split(".")[:2])

#: A worker consuming a quorum queue, as Celery 5.5+ declares one: the
#: default queue of type quorum on a topic exchange (which Celery's native
#: delayed delivery needs for ETA and countdown).
QUORUM = {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"}

needs_quorum_support = pytest.mark.skipif(
    CELERY_VERSION < (5, 5), reason="Celery declares quorum queues from 5.5 on"
)

#: (broker, worker settings) of each queue kind.
QUEUES = {
    "rabbitmq-classic": ("rabbitmq", {}),
    "rabbitmq-quorum": ("rabbitmq", QUORUM),
    "redis": ("redis", {}),
}


def queue_kind(kind: str) -> Any:
    marks = [needs_quorum_support] if kind == "rabbitmq-quorum" else []
    return pytest.param(kind, id=kind, marks=marks)


def batch_sizes(worker: Worker, ids: set[str]) -> list[int]:
    """The size of each batch that ran calls of ``ids``, one entry per batch."""
    per_size = Counter(
        int(size) for task_id, size, _ in worker.journal.events("run") if task_id in ids
    )
    return sorted(
        size for size, calls in per_size.items() for _ in range(calls // size)
    )


def all_succeeded(worker: Worker, ids: list[str]) -> bool:
    return states(worker, ids) == ["SUCCESS"] * len(ids)


@pytest.fixture
def journal(journal_dir: str) -> str:
    return os.path.join(journal_dir, f"deploy-{uuid()[:8]}.journal")


@pytest.fixture
def backlog(journal: str) -> Iterator[Any]:
    """Queue calls before a worker starts, then start it on that queue."""
    started: list[Worker] = []
    apps: list[Any] = []

    def fill(
        kind: str, task: str, count: int, **worker: Any
    ) -> tuple[Worker, list[str]]:
        broker, conf = QUEUES[kind]
        url, backend = BROKERS[broker]
        require_server(url)
        queue = f"q-{uuid()}"
        app = create_app(
            broker=url, backend=backend, journal=journal, queue=queue, **conf
        )
        apps.append(app)
        sender = app.tasks[task]
        ids = [sender.delay(n).id for n in range(count)]
        options = {"pool": "solo", **worker}
        started.append(
            start_subprocess_worker(
                broker, options.pop("pool"), journal, queue=queue, conf=conf, **options
            )
        )
        return started[-1], ids

    yield fill
    for worker in started:
        stop_subprocess_worker(worker)
    for app in apps:
        app.close()


# -- batch tasks consume with a window of their own ---------------------------


@pytest.mark.parametrize(
    "kind", [queue_kind(k) for k in ("rabbitmq-classic", "rabbitmq-quorum", "redis")]
)
def test_a_backlog_runs_in_full_batches_at_default_settings(
    backlog: Any, kind: str
) -> None:
    # given 500 calls of a task with flush_every=50 and flush_interval=5 queued
    # before a solo worker with Celery's default prefetch (4) starts: on a
    # quorum queue Celery uses per-consumer QoS, which a basic.qos sent
    # after the consumer started does not reach
    worker, ids = backlog(kind, "tests.fifty", 500)
    # when the worker drains the queue
    wait_for(
        lambda: (
            len(run_counts(worker, ids)) == 500
            and all(run_counts(worker, ids).values())
        ),
        timeout=30,
        what="all 500 calls to run",
    )
    # then every call ran once, in batches that filled to flush_every
    assert run_counts(worker, ids) == dict.fromkeys(ids, 1)
    sizes = batch_sizes(worker, set(ids))
    assert statistics.median(sizes) == 50, sizes


@needs_quorum_support
def test_two_batch_tasks_on_a_quorum_queue_both_fill(journal: str) -> None:
    # given a prefork worker at default settings on a quorum queue, and a
    # backlog of two batch tasks with flush_every=100, interleaved
    worker = start_subprocess_worker(
        "rabbitmq", "prefork", journal, concurrency=2, conf=QUORUM
    )
    try:
        big, big2 = worker.app.tasks["tests.big"], worker.app.tasks["tests.big2"]
        for _ in range(300):
            big.delay()
            big2.delay()

        def sizes(kind: str) -> list[int]:
            return [int(fields[1]) for fields in worker.journal.events(kind)]

        # when both have drained
        wait_for(lambda: sum(sizes("batch")) >= 300, timeout=60, what="tests.big")
        wait_for(lambda: sum(sizes("batch2")) >= 300, timeout=60, what="tests.big2")
        # then both ran in batches of flush_every, neither starving
        for kind in ("batch", "batch2"):
            assert sum(sizes(kind)) == 300
            assert statistics.median(sizes(kind)) == 100, sizes(kind)
    finally:
        stop_subprocess_worker(worker)


# -- the one-frame ack with mingle on -----------------------------------------


def test_a_worker_started_beside_another_acks_its_batches_in_one_frame(
    journal: str,
) -> None:
    # given a worker started the default way (mingle on) while another one
    # runs: mingle's replies arrive on its task channel, and need no ack
    trace = {"CB_TEST_TRACE_ACKS": "1"}
    first = start_subprocess_worker(
        "rabbitmq", "solo", journal, celery_defaults=True, extra_env=trace
    )
    second = start_subprocess_worker(
        "rabbitmq",
        "solo",
        journal,
        queue=first.queue,
        celery_defaults=True,
        extra_env=trace,
    )
    try:
        assert "mingle: sync with" in second.log(), second.log()
        # when the first one has stopped (leaving the queue) and the second
        # runs two batches of five
        assert exit_code(first) == 0, first.log()
        collect = second.app.tasks["tests.collect"]
        ids = [collect.delay(n).id for n in range(10)]
        wait_for(lambda: states(second, ids) == ["SUCCESS"] * 10, what="ten calls")
        assert second.process is not None
        pid = str(second.process.pid)
        frames = [
            (int(tag), multiple == "1")
            for who, tag, multiple in second.journal.events("ackframe")
            if who == pid
        ]
        # then the batches went out in one basic.ack frame each at most (one
        # for both, if both were due together), not one frame per message
        assert frames, second.log()
        assert len(frames) <= 2 and all(multiple for _, multiple in frames), frames
        assert max(tag for tag, _ in frames) > 10  # mingle's reply came first
    finally:
        stop_subprocess_worker(second)
        stop_subprocess_worker(first)


# -- ETA on quorum queues -----------------------------------------------------


@needs_quorum_support
def test_countdown_calls_on_a_quorum_queue_run_once_and_not_early(journal: str) -> None:
    # given a worker on a quorum queue, whose countdown calls Celery routes
    # through its native delayed delivery (RabbitMQ holds them)
    worker = start_subprocess_worker("rabbitmq", "prefork", journal, conf=QUORUM)
    try:
        timed = worker.app.tasks["tests.timed"]
        sent = time.time()
        ids = [timed.apply_async((n,), countdown=2).id for n in range(6)]
        # when they are due
        wait_for(
            lambda: states(worker, ids) == ["SUCCESS"] * 6, timeout=30, what="six calls"
        )
        # then each ran once, none before its countdown, and they joined batches
        assert run_counts(worker, ids) == dict.fromkeys(ids, 1)
        ran_at = {task_id: float(at) for task_id, at in worker.journal.events("timed")}
        early = {
            task_id: ran_at[task_id] - sent
            for task_id in ids
            if ran_at[task_id] < sent + 2
        }
        assert not early, early
        assert max(batch_sizes(worker, set(ids))) > 1
    finally:
        stop_subprocess_worker(worker)


# -- soft shutdown ------------------------------------------------------------


@pytest.mark.skipif(
    CELERY_VERSION < (5, 5), reason="soft shutdown is new in Celery 5.5"
)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_soft_shutdown_gives_buffered_calls_back_to_run_once_elsewhere(
    journal: str, broker: str
) -> None:
    # given a worker with a soft shutdown window of 3 s, and calls waiting in
    # a buffer (flush_every=100, flush_interval=30) that nothing else flushes
    conf = {
        "worker_soft_shutdown_timeout": 3,
        "worker_enable_soft_shutdown_on_idle": True,
    }
    first = start_subprocess_worker(broker, "prefork", journal, conf=conf)
    second: Worker | None = None
    try:
        task = first.app.tasks["tests.fault_shutdown"]
        ids = [task.delay(n).id for n in range(5)]
        wait_for(
            lambda: set(ids) <= set(first.journal.ids("received")),
            what="five calls received",
        )
        # when it gets a cold shutdown, which the soft window precedes
        started = time.monotonic()
        assert exit_code(first, signal.SIGQUIT) == 0, first.log()
        # then it waited out the window, ran none of them, and they went back
        # to the broker: a second worker runs each exactly once
        assert time.monotonic() - started >= 3, first.log()
        assert "Initiating Soft Shutdown" in first.log()
        assert run_counts(first, ids) == dict.fromkeys(ids, 0)
        second = start_subprocess_worker(broker, "prefork", journal, queue=first.queue)
        # (each delivery is one "received" line: five to each worker)
        wait_for(
            lambda: Counter(second.journal.ids("received")) == dict.fromkeys(ids, 2),
            what="the second worker to receive the five calls",
        )
        assert exit_code(second) == 0, second.log()
        assert run_counts(second, ids) == dict.fromkeys(ids, 1)
        assert states(second, ids) == ["SUCCESS"] * 5
    finally:
        for worker in (first, second):
            if worker is not None:
                stop_subprocess_worker(worker)


# -- worker_max_tasks_per_child counts batches --------------------------------


def test_max_tasks_per_child_counts_batches_not_calls(journal: str) -> None:
    # given a prefork worker of one process replaced after 2 tasks
    worker = start_subprocess_worker(
        "redis",
        "prefork",
        journal,
        concurrency=1,
        conf={"worker_max_tasks_per_child": 2},
    )
    try:
        collect = worker.app.tasks["tests.collect"]
        pids = []
        # when three batches of five calls run one after the other
        for batch in range(3):
            ids = [collect.delay(n).id for n in range(batch * 5, batch * 5 + 5)]
            wait_for(partial(all_succeeded, worker, ids), what=f"batch {batch}")
            pids.append(
                {
                    fields[2]
                    for fields in worker.journal.events("run")
                    if fields[0] in ids
                }
            )
        # then the first two batches (ten calls) ran in one process, and the
        # third in its replacement: a batch is one task to the pool
        assert all(len(p) == 1 for p in pids), pids
        assert pids[0] == pids[1] != pids[2], pids
    finally:
        stop_subprocess_worker(worker)
