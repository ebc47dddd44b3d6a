"""Warm shutdown (SIGTERM) with calls in the buffer and calls held for an ETA."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis

from tests.conftest import Worker, wait_for
from tests.fault.conftest import (
    RedisServer,
    Spawn,
    exit_code,
    redis_urls,
    run_counts,
    states,
    worker_pids,
)

pytestmark = pytest.mark.fault

BROKERS_AND_POOLS = [
    pytest.param("redis", "solo", id="redis-solo"),
    pytest.param("redis", "prefork", id="redis-prefork"),
    pytest.param("rabbitmq", "solo", id="rabbitmq-solo"),
    pytest.param("rabbitmq", "prefork", id="rabbitmq-prefork"),
    pytest.param("redis", "gevent", id="redis-gevent"),
    pytest.param("rabbitmq", "eventlet", id="rabbitmq-eventlet"),
]


def _received(worker: Worker, ids: list[str]) -> bool:
    return set(ids) <= set(worker.journal.ids("received"))


def _shutdown_flushes(worker: Worker, task: str) -> list[int]:
    return [
        int(size)
        for name, size, reason, *_ in worker.journal.events("flush")
        if name == task and reason == "shutdown"
    ]


@pytest.mark.parametrize(("broker", "pool"), BROKERS_AND_POOLS)
def test_warm_shutdown_runs_every_buffered_call_before_exit(
    spawn: Spawn, broker: str, pool: str
) -> None:
    # given a worker with 20 calls waiting in the buffer of a batch task whose
    # size (100) and interval (30 s) are not reached before the SIGTERM
    worker = spawn(broker, pool)
    hold = worker.app.tasks["tests.fault_shutdown"]
    results = [hold.delay(i) for i in range(20)]
    ids = [r.id for r in results]
    wait_for(lambda: _received(worker, ids), what="20 calls received")
    assert not worker.journal.ids("run"), "calls ran before the shutdown"

    # when the worker gets SIGTERM
    code = exit_code(worker)

    # then, by the time the process has exited, every call ran exactly once,
    # in one batch flushed for the shutdown, and its result is stored
    assert code == 0, worker.log()
    assert run_counts(worker, ids) == dict.fromkeys(ids, 1)
    assert _shutdown_flushes(worker, "tests.fault_shutdown") == [20]
    assert states(worker, ids) == ["SUCCESS"] * 20
    assert [r.result for r in results] == list(range(20))


@pytest.mark.parametrize("pool", ["prefork", "solo"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_restart_after_warm_shutdown_runs_each_call_exactly_once(
    spawn: Spawn, broker: str, pool: str
) -> None:
    # given a worker holding 5 buffered calls and 3 calls waiting for their
    # ETA (countdown 4 s)
    first = spawn(broker, pool)
    hold = first.app.tasks["tests.fault_hold"]
    collect = first.app.tasks["tests.collect"]
    buffered = [hold.delay(i) for i in range(5)]
    held = [collect.apply_async((i,), countdown=4) for i in range(3)]
    ids = [r.id for r in (*buffered, *held)]
    wait_for(lambda: _received(first, ids), what="8 calls received")
    first_pids = worker_pids(first)

    # when it gets SIGTERM, and a new worker starts on the same queue
    assert exit_code(first) == 0, first.log()
    log = first.log()
    assert re.search(r"Warm shutdown: flushed 5 buffered tests\.fault_hold ", log), log
    assert re.search(
        r"Warm shutdown: flushed 0 buffered tests\.collect requests; "
        r"3 requests waiting for their ETA go back to the broker",
        log,
    ), log
    second = spawn(broker, pool, queue=first.queue)

    # then every call runs exactly once in all, and the held ones run in the
    # new worker, once their ETA has come
    def all_ready() -> bool:
        return all(s in {"SUCCESS", "FAILURE"} for s in states(second, ids))

    wait_for(all_ready, timeout=40, what="every call to be stored")
    assert states(second, ids) == ["SUCCESS"] * 8
    assert run_counts(second, ids) == dict.fromkeys(ids, 1)
    runs_by_id: dict[str, Any] = {
        task_id: int(pid) for task_id, _, pid in second.journal.events("run")
    }
    assert not {runs_by_id[r.id] for r in held} & first_pids
    assert [r.result for r in held] == [0, 1, 2]


@pytest.mark.parametrize("broker", ["own-redis", "rabbitmq"])
def test_late_acked_batches_that_ran_are_not_delivered_again(
    spawn: Spawn, broker: str, request: pytest.FixtureRequest
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
    first = spawn(broker, "prefork", **options)
    task = first.app.tasks["tests.fault_late_requeue"]
    ids = [task.delay(i).id for i in range(8)]
    wait_for(lambda: states(first, ids) == ["SUCCESS"] * 8, what="both batches")

    # when it gets SIGTERM
    assert exit_code(first) == 0, first.log()

    # then the acks of both batches reached the broker: on Redis nothing is
    # left in the transport's unacked index (from where it would come back
    # after the visibility timeout)
    if server is not None:
        index = redis.Redis(port=server.port, db=db, socket_timeout=2)
        assert index.hlen("unacked") == 0
    # and a new worker on the same queue runs none of them again (one more
    # call, sent after anything that went back, shows it has caught up)
    second = spawn(broker, "prefork", queue=first.queue, **options)
    last = task.delay(8).id
    wait_for(lambda: states(second, [last]) == ["SUCCESS"], timeout=40,
             what="the call sent after the restart")  # fmt: skip
    assert run_counts(second, ids) == dict.fromkeys(ids, 1)
