"""``kill -9`` of a worker, or of the pool child running a late-acked batch."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness.brokers import redis_urls
from tests.harness.journal import Failure, Plain, Run
from tests.harness.servers import RedisServer
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers

pytestmark = pytest.mark.fault

#: Lets the next worker on our own Redis restore unacked messages within
#: seconds instead of an hour.
VISIBILITY_TIMEOUT = 2
QUICK_RESTORE = {
    "broker_transport_options": {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
}


def _runs(worker: Worker, ids: list[str]) -> list[Run]:
    return [run for run in worker.journal.records(Run) if run.id in ids]


def _all_running(worker: Worker, ids: list[str]) -> bool:
    return {run.id for run in _runs(worker, ids)} == set(ids)


def _settled(worker: Worker, ids: list[str]) -> bool:
    return all(state in {"SUCCESS", "FAILURE"} for state in worker.states(ids))


def _wait_until_unacked_expired(server: RedisServer, db: int) -> None:
    """Wait until every unacked message in ``db`` is past the visibility timeout."""
    index = redis.Redis(port=server.port, db=db, socket_timeout=2)

    def expired() -> bool:
        # Scored by the time each message was delivered.
        entries = index.zrange("unacked_index", 0, -1, withscores=True)
        newest = max((float(entry[1]) for entry in entries), default=None)
        return newest is not None and time.time() - newest > VISIBILITY_TIMEOUT

    wait_for(expired, what="the unacked messages to pass their visibility timeout")


@pytest.mark.parametrize("broker", ["rabbitmq", "own-redis"])
def test_kill_9_of_worker_redelivers_late_acked_batch(
    workers: Workers, gate: Path, request: pytest.FixtureRequest, broker: str
) -> None:
    # given a prefork worker running a batch of 4 late-acked calls, held
    # inside the body
    first_options: dict[str, Any] = {}
    second_options: dict[str, Any] = {}
    if broker == "own-redis":
        server: RedisServer = request.getfixturevalue("own_redis")
        db = server.fresh_db()
        urls = redis_urls(server, db)
        first_options = {"urls": urls}
        second_options = {"urls": urls, "conf": QUICK_RESTORE}
    gate.touch()
    first = workers.start(broker, "prefork", **first_options)
    task = first.tasks.fault_late_requeue
    results = [task.delay(i) for i in range(4)]
    ids = [r.id for r in results]
    wait_for(lambda: _all_running(first, ids), what="the batch to be running")
    first_pids = first.pids()

    # when the whole worker is killed with SIGKILL, and a new one starts on
    # the same queue
    first.kill()
    gate.unlink()
    if broker == "own-redis":
        # Kombu before 5.7 scans for expired unacked messages when the new
        # worker starts and then only every 100 s: let them expire first.
        _wait_until_unacked_expired(server, db)
    second = workers.start(broker, "prefork", queue=first.queue, **second_options)

    # then the broker delivers the killed batch's messages again, and the new
    # worker runs every call (at least once) and stores its result
    wait_for(lambda: _settled(second, ids), timeout=40, what="results")
    assert second.states(ids) == ["SUCCESS"] * 4
    assert [r.result for r in results] == [0, 1, 2, 3]
    counts = second.run_counts(ids)
    assert all(count >= 2 for count in counts.values()), counts
    rerun_pids = {run.pid for run in _runs(second, ids)} - first_pids
    assert rerun_pids, "no call ran in the new worker"


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_killed_child_requeues_batch_with_reject_on_worker_lost(
    workers: Workers, gate: Path, broker: str
) -> None:
    # given a prefork worker whose child runs a batch of 4 late-acked calls
    # of a task with reject_on_worker_lost=True, held inside the body
    gate.touch()
    worker = workers.start(broker, "prefork")
    task = worker.tasks.fault_late_requeue
    results = [task.delay(i) for i in range(4)]
    ids = [r.id for r in results]
    wait_for(lambda: _all_running(worker, ids), what="the batch to be running")
    (child,) = {run.pid for run in _runs(worker, ids)}

    # when that child is killed with SIGKILL
    os.kill(child, signal.SIGKILL)
    gate.unlink()

    # then the messages go back to the queue and run again, to SUCCESS
    wait_for(lambda: _settled(worker, ids), timeout=40, what="results")
    assert worker.states(ids) == ["SUCCESS"] * 4
    assert [r.result for r in results] == [0, 1, 2, 3]
    counts = worker.run_counts(ids)
    assert all(count >= 2 for count in counts.values()), counts
    assert "WorkerLostError" in worker.log() or "exited prematurely" in worker.log()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_killed_child_fails_batch_without_reject_on_worker_lost(
    workers: Workers, gate: Path, broker: str
) -> None:
    # given a prefork worker whose child runs a batch of 4 late-acked calls
    # of a task without reject_on_worker_lost, held inside the body
    gate.touch()
    worker = workers.start(broker, "prefork")
    task = worker.tasks.fault_late_lost
    results = [task.delay(i) for i in range(4)]
    ids = [r.id for r in results]
    wait_for(lambda: _all_running(worker, ids), what="the batch to be running")
    (child,) = {run.pid for run in _runs(worker, ids)}

    # when that child is killed with SIGKILL
    os.kill(child, signal.SIGKILL)
    gate.unlink()

    # then every call is stored as FAILURE with WorkerLostError, ran once,
    # and its message is gone from the broker (acked, not requeued)
    wait_for(lambda: _settled(worker, ids), timeout=40, what="results")
    assert worker.states(ids) == ["FAILURE"] * 4
    assert {type(r.result).__name__ for r in results} == {"WorkerLostError"}
    assert set(worker.journal.ids(Failure)) >= set(ids)
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)


def test_batch_acks_leave_an_older_running_message_unacked(
    workers: Workers, gate: Path
) -> None:
    # given a prefork worker on RabbitMQ running a plain late-acked task, its
    # message unacked, and then a full batch of 8 early-acked calls that
    # runs to the end meanwhile
    gate.touch()
    first = workers.start("rabbitmq", "prefork")
    plain = first.tasks.fault_plain_late.delay(7)
    wait_for(lambda: first.journal.records(Plain), what="the plain task to run")
    batch_task = first.tasks.fault_restart
    ids = [batch_task.delay(i).id for i in range(8)]
    wait_for(lambda: first.states(ids) == ["SUCCESS"] * 8, what="the batch")

    # when the worker is killed with SIGKILL and a new one starts on its
    # queue, and one more call is sent after the redelivered messages
    first.kill()
    gate.unlink()
    second = workers.start("rabbitmq", "prefork", queue=first.queue)
    last = batch_task.delay(8).id
    wait_for(lambda: second.states([last]) == ["SUCCESS"], timeout=40,
             what="the call sent after the kill")  # fmt: skip

    # then the plain task's message came back and ran again, while the
    # batch's messages, acked before the kill, did not
    wait_for(lambda: plain.state == "SUCCESS", timeout=40, what="the plain task")
    assert len(second.journal.records(Plain)) == 2
    assert second.run_counts(ids) == {task_id: 1 for task_id in ids}
