"""Warm shutdown (SIGTERM) with calls in the buffer and calls held for an ETA."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis

from tests.harness.brokers import redis_urls
from tests.harness.journal import Run
from tests.harness.servers import RedisServer
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers

pytestmark = pytest.mark.fault

BROKERS_AND_POOLS = [
    pytest.param("redis", "solo", id="redis-solo"),
    pytest.param("redis", "prefork", id="redis-prefork"),
    pytest.param("rabbitmq", "solo", id="rabbitmq-solo"),
    pytest.param("rabbitmq", "prefork", id="rabbitmq-prefork"),
    pytest.param("redis", "gevent", id="redis-gevent"),
    pytest.param("rabbitmq", "eventlet", id="rabbitmq-eventlet"),
]


def _shutdown_flushes(worker: Worker) -> list[int]:
    flushes = worker.flushes(worker.tasks.fault_shutdown)
    return [flush.size for flush in flushes if flush.reason == "shutdown"]


@pytest.mark.parametrize(("broker", "pool"), BROKERS_AND_POOLS)
def test_warm_shutdown_runs_every_buffered_call_before_exit(
    workers: Workers, broker: str, pool: str
) -> None:
    # given a worker with 20 calls waiting in the buffer of a batch task whose
    # size (100) and interval (30 s) are not reached before the SIGTERM
    worker = workers.start(broker, pool)
    hold = worker.tasks.fault_shutdown
    results = [hold.delay(i) for i in range(20)]
    ids = [r.id for r in results]
    worker.wait_received(ids)
    assert not worker.journal.ids(Run), "calls ran before the shutdown"

    # when the worker gets SIGTERM
    code = worker.exit()

    # then, by the time the process has exited, every call ran exactly once,
    # in one batch flushed for the shutdown, and its result is stored
    assert code == 0, worker.log()
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    assert _shutdown_flushes(worker) == [20]
    assert worker.states(ids) == ["SUCCESS"] * 20
    assert [r.result for r in results] == list(range(20))


@pytest.mark.parametrize("pool", ["prefork", "solo"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_restart_after_warm_shutdown_runs_each_call_exactly_once(
    workers: Workers, broker: str, pool: str
) -> None:
    # given a worker holding 5 buffered calls and 3 calls waiting for their
    # ETA (countdown 4 s)
    first = workers.start(broker, pool)
    hold, collect = first.tasks.fault_hold, first.tasks.collect
    buffered = [hold.delay(i) for i in range(5)]
    held = [collect.apply_async((i,), countdown=4) for i in range(3)]
    ids = [r.id for r in (*buffered, *held)]
    first.wait_received(ids)
    first_pids = first.pids()

    # when it gets SIGTERM, and a new worker starts on the same queue
    assert first.exit() == 0, first.log()
    log = first.log()
    assert re.search(r"Warm shutdown: flushed 5 buffered tests\.fault_hold ", log), log
    assert re.search(
        r"Warm shutdown: flushed 0 buffered tests\.collect requests; "
        r"3 requests waiting for their ETA go back to the broker",
        log,
    ), log
    second = workers.start(broker, pool, queue=first.queue)

    # then every call runs exactly once in all, and the held ones run in the
    # new worker, once their ETA has come
    def all_ready() -> bool:
        return all(s in {"SUCCESS", "FAILURE"} for s in second.states(ids))

    wait_for(all_ready, timeout=40, what="every call to be stored")
    assert second.states(ids) == ["SUCCESS"] * 8
    assert second.run_counts(ids) == dict.fromkeys(ids, 1)
    runs_by_id = {run.id: run.pid for run in second.journal.records(Run)}
    assert not {runs_by_id[r.id] for r in held} & first_pids
    assert [r.result for r in held] == [0, 1, 2]


@pytest.mark.parametrize("broker", ["own-redis", "rabbitmq"])
def test_late_acked_batches_that_ran_are_not_delivered_again(
    workers: Workers, broker: str, request: pytest.FixtureRequest
) -> None:
    # given a prefork worker that ran two full batches of a late-acked task
    options: dict[str, Any] = {}
    server: RedisServer | None = None
    if broker == "own-redis":
        # A database of its own: Kombu keeps every queue's unacked messages
        # in one hash per database.
        server = request.getfixturevalue("own_redis")
        db = server.fresh_db()
        options = {"urls": redis_urls(server, db)}
    first = workers.start(broker, "prefork", **options)
    task = first.tasks.fault_late_requeue
    ids = [task.delay(i).id for i in range(8)]
    wait_for(lambda: first.states(ids) == ["SUCCESS"] * 8, what="both batches")

    # when it gets SIGTERM
    assert first.exit() == 0, first.log()

    # then the acks of both batches reached the broker: on Redis nothing is
    # left in the transport's unacked index (from where it would come back
    # after the visibility timeout)
    if server is not None:
        index = redis.Redis(port=server.port, db=db, socket_timeout=2)
        assert index.hlen("unacked") == 0
    # and a new worker on the same queue runs none of them again (one more
    # call, sent after anything that went back, shows it has caught up)
    second = workers.start(broker, "prefork", queue=first.queue, **options)
    last = task.delay(8).id
    wait_for(lambda: second.states([last]) == ["SUCCESS"], timeout=40,
             what="the call sent after the restart")  # fmt: skip
    assert second.run_counts(ids) == dict.fromkeys(ids, 1)
