"""A broker restart while calls wait in the buffer and more are being sent."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu
import pytest
from celery.result import AsyncResult

from tests.harness.brokers import REDIS_BACKEND, redis_urls
from tests.harness.journal import Flush
from tests.harness.servers import RabbitNode, RedisServer
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers

pytestmark = pytest.mark.fault

#: Kombu's Redis transport gives an unacked message back to the queue once
#: it is ``visibility_timeout`` old, checked every ``unacked_restore_interval``
#: seconds. 5 s stays well above the 2 s a call may wait in the buffer.
QUICK_RESTORE = {
    "broker_transport_options": {
        "visibility_timeout": 5,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
}

DROPPED = (
    "Broker connection lost: dropped 3 buffered tests.fault_restart requests; "
    "the broker will deliver them again"
)


#: How long the dropped calls may take to come back. Kombu 5.7 scans for
#: expired unacked messages every ``unacked_restore_interval``; older Kombu
#: every 10 s but acts on every tenth scan only, so up to 100 s after the
#: visibility timeout.
REDELIVERY_TIMEOUT = 40 if kombu.VERSION >= (5, 7) else 150


class Sender(threading.Thread):
    """Sends calls while the broker is down, retrying until it is back."""

    def __init__(self, worker: Worker, args: range) -> None:
        super().__init__(daemon=True)
        self.task = worker.tasks.fault_restart
        self.args = args
        self.results: list[AsyncResult] = []
        self.error: BaseException | None = None
        #: Set once a send failed because the broker was down.
        self.refused = threading.Event()

    def _on_error(self, exc: BaseException, interval: float) -> None:
        self.refused.set()

    def run(self) -> None:
        policy: dict[str, Any] = {
            "max_retries": 120,
            "interval_start": 0,
            "interval_step": 0.25,
            "interval_max": 0.25,
            "errback": self._on_error,
        }
        try:
            for arg in self.args:
                self.results.append(
                    self.task.apply_async((arg,), retry=True, retry_policy=policy)
                )
        # Whatever ends the thread is the test's to report: the main thread
        # asserts there was none.
        except BaseException as exc:
            self.error = exc


def _buffer_three(worker: Worker) -> list[str]:
    task = worker.tasks.fault_restart
    ids = [task.delay(i).id for i in range(3)]
    worker.wait_received(ids)
    return ids


def _flushes(worker: Worker) -> list[Flush]:
    return worker.flushes(worker.tasks.fault_restart)


def _check_survived(worker: Worker) -> None:
    # Celery 5.7 ended the worker here before BatchesStep guarded the Redis
    # channel's close (_compat.survive_collected_redis_transport).
    assert worker.process is not None
    assert worker.process.poll() is None, worker.log()


def _drop_and_recover(
    worker: Worker,
    stop: Callable[[], None],
    start: Callable[[], None],
    *,
    send_while_down: bool,
) -> None:
    # given a worker with 3 calls waiting in the buffer of a task that
    # flushes 8 calls, or every 2 s
    ids = _buffer_three(worker)

    # when the broker goes away while they wait (and, if it is down for a
    # while, 3 more calls are being sent meanwhile), and comes back
    stop()
    wait_for(
        lambda: DROPPED in worker.log() or worker.process.poll() is not None,  # type: ignore[union-attr]
        what="buffered calls dropped",
    )
    _check_survived(worker)
    sender = Sender(worker, range(3, 6))
    if send_while_down:
        sender.start()
        wait_for(sender.refused.is_set, what="a send to fail while the broker is down")
    start()
    if not send_while_down:
        sender.start()
    sender.join(60)
    assert not sender.is_alive() and sender.error is None, sender.error
    ids += [r.id for r in sender.results]

    # then the worker gets the dropped calls again, re-arms its flush timer
    # and runs every call exactly once
    def stored() -> bool:
        _check_survived(worker)
        return worker.states(ids) == ["SUCCESS"] * 6

    wait_for(stored, timeout=REDELIVERY_TIMEOUT, what="6 calls stored")
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    assert {flush.reason for flush in _flushes(worker)} == {"interval"}
    assert sum(flush.size for flush in _flushes(worker)) == 6

    # and it keeps batching: 8 more calls run as one full batch, once each
    task = worker.tasks.fault_restart
    more_ids = [task.delay(i).id for i in range(8)]
    wait_for(
        lambda: worker.states(more_ids) == ["SUCCESS"] * 8,
        timeout=30,
        what="8 more calls stored",
    )
    assert worker.run_counts(ids + more_ids) == dict.fromkeys(ids + more_ids, 1)
    last = _flushes(worker)[-1]
    assert (last.size, last.reason) == (8, "size")


def _own_redis_worker(workers: Workers, server: RedisServer, pool: str) -> Worker:
    return workers.start(
        "own-redis",
        pool,
        urls=redis_urls(server, server.fresh_db()),
        conf=QUICK_RESTORE,
    )


def test_redis_restart_drops_buffered_calls_and_runs_each_once(
    workers: Workers, own_redis: RedisServer
) -> None:
    worker = _own_redis_worker(workers, own_redis, "prefork")
    _drop_and_recover(
        worker,
        lambda: own_redis.stop(save=True),
        own_redis.start,
        send_while_down=True,
    )


def test_redis_connection_kill_drops_buffered_calls_and_runs_each_once(
    workers: Workers, own_redis: RedisServer
) -> None:
    # The lighter variant of a restart: the server stays up and closes every
    # client connection (CLIENT KILL), so the worker reconnects at once.
    worker = _own_redis_worker(workers, own_redis, "prefork")

    def kill_connections() -> None:
        own_redis.client().client_kill_filter(_type="normal", skipme=True)

    _drop_and_recover(worker, kill_connections, lambda: None, send_while_down=False)


def test_rabbitmq_restart_drops_buffered_calls_and_runs_each_once(
    workers: Workers, own_rabbit: RabbitNode
) -> None:
    worker = workers.start(
        "own-rabbitmq", "prefork", urls=(own_rabbit.url, REDIS_BACKEND)
    )
    _drop_and_recover(
        worker, own_rabbit.stop_app, own_rabbit.start_app, send_while_down=True
    )


def test_a_worker_whose_batch_acks_failed_in_a_redis_restart_consumes_again(
    workers: Workers, gate: Path, own_redis: RedisServer
) -> None:
    # given a prefork worker (-c 2, prefetch window 4 x 2 = 8) on our own
    # Redis without remote control (so only its fetching connection can
    # notice a lost server), running two gated batches of 4 late-acked
    # calls: its whole window delivered and unacked, no BRPOP pending
    gate.touch()
    worker = workers.start(
        "redis",
        "prefork",
        urls=redis_urls(own_redis, own_redis.fresh_db()),
        conf={"worker_enable_remote_control": False},
    )
    task = worker.tasks.fault_late_lost
    ids = [task.delay(i).id for i in range(8)]
    wait_for(lambda: all(worker.run_counts(ids).values()), what="both batches")
    quiet_since = [time.monotonic()]

    def no_fetch_for_a_while() -> bool:
        # kombu's last BRPOP returns empty within a second and, with the
        # window full, is not sent again
        clients = own_redis.client().client_list()
        if any(c["cmd"] == "brpop" and "b" in c["flags"] for c in clients):
            quiet_since[0] = time.monotonic()
        return time.monotonic() - quiet_since[0] > 1.5

    wait_for(no_fetch_for_a_while, what="no BRPOP pending")

    # when Redis stops (its data saved) while both batches end, so that
    # their grouped acks fail, and then starts again
    own_redis.stop(save=True)
    gate.unlink()

    def failed_acks() -> int:
        found = re.findall(r"Couldn't ack a batch of (\d+) messages", worker.log())
        return sum(int(count) for count in found)

    # (a batch is more messages than fit the window's free room once its
    # ack failed: 4 of 8 here)
    wait_for(lambda: failed_acks() >= 4, what="a batch's grouped ack to fail")
    own_redis.start()

    # then the worker fetches again: a call sent now runs (the failed acks
    # used to leave 8 messages counted as delivered, the window full for
    # good, and the lost connection unnoticed)
    later = task.delay(99).id
    wait_for(
        lambda: worker.run_counts([later])[later] == 1,
        timeout=30,
        what="the call sent after the restart to run",
    )
    assert worker.process is not None and worker.process.poll() is None
