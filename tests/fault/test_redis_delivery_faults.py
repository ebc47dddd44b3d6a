"""Batch delivery on Redis: a killed worker, Sentinel, a key prefix, a refused script.

Every worker here runs at default settings, so with batch delivery: the
Redis server's count of ``EVALSHA`` and ``EVAL`` calls shows that the
script took the messages (it is the server of this session's own, which
nothing else uses).
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer

from tests.harness.brokers import REDIS_BACKEND, redis_urls, require_binary
from tests.harness.servers import RedisSentinel, RedisServer
from tests.harness.wait import wait_for
from tests.harness.worker import Workers

pytestmark = pytest.mark.fault

VISIBILITY_TIMEOUT = 2
#: Longer than tests.fault_hold's flush_interval (3 s).
HOLD_RESTORE_TIMEOUT = 4
QUICK_RESTORE = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}


def _script_calls(server: RedisServer) -> int:
    stats: dict[str, Any] = server.client().info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0))
        for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


def test_kill_9_with_fetched_calls_runs_each_once_after_the_visibility_timeout(
    workers: Workers, own_redis: RedisServer
) -> None:
    # given a worker that took 60 calls in batches and holds them, unacked,
    # in its buffer (tests.fault_hold flushes after 3 s)
    db = own_redis.fresh_db()
    urls = redis_urls(own_redis, db)
    first = workers.start("redis", "solo", urls=urls)
    task = first.tasks.fault_hold
    before = _script_calls(own_redis)
    results = [task.delay(n) for n in range(60)]
    ids = [r.id for r in results]
    client = own_redis.client(db)
    wait_for(lambda: client.zcard("unacked_index") == 60, what="60 unacked calls")
    assert _script_calls(own_redis) > before
    # when it is killed with SIGKILL before running them, and another worker
    # starts on the queue once their visibility timeout has passed
    first.kill()
    assert first.run_counts(ids) == dict.fromkeys(ids, 0)
    time.sleep(VISIBILITY_TIMEOUT + 0.5)
    second = workers.start(
        "redis",
        "solo",
        urls=urls,
        queue=first.queue,
        # A visibility timeout past fault_hold's 3 s: the calls this worker
        # takes back are not restored again while they wait in its buffer
        # (which would leave copies in flight when the test counts acks).
        conf={
            "broker_transport_options": {
                **QUICK_RESTORE,
                "visibility_timeout": HOLD_RESTORE_TIMEOUT,
            }
        },
    )
    # then every call comes back and runs, exactly once
    wait_for(lambda: second.states(ids) == ["SUCCESS"] * 60, timeout=60, what="results")
    assert [r.get(timeout=10) for r in results] == list(range(60))
    assert second.run_counts(ids) == dict.fromkeys(ids, 1)
    wait_for(lambda: client.zcard("unacked_index") == 0, what="every call acked")


def test_a_key_prefix_keeps_every_key_of_a_worker_under_it(
    workers: Workers, own_redis: RedisServer
) -> None:
    # given a worker whose transport prefixes every key
    db = own_redis.fresh_db()
    options = {"broker_transport_options": {"global_keyprefix": "cbpfx:"}}
    worker = workers.start(
        "redis", "solo", urls=redis_urls(own_redis, db), conf=options
    )
    client = own_redis.client(db)
    task = worker.tasks.fault_hold
    before = _script_calls(own_redis)
    # when 30 calls are sent and held in its buffer
    results = [task.delay(n) for n in range(30)]
    wait_for(lambda: client.zcard("cbpfx:unacked_index") == 30, what="30 unacked")
    # then the script took them, every key the transport wrote is under the
    # prefix, and the calls run
    assert _script_calls(own_redis) > before
    assert [r.get(timeout=30) for r in results] == list(range(30))
    keys = {key.decode() for key in client.scan_iter(count=1000)}
    assert keys and all(key.startswith("cbpfx:") for key in keys), keys


def test_a_server_refusing_the_script_still_delivers_each_call(
    workers: Workers, own_redis: RedisServer
) -> None:
    # given a Redis user that may run loaded scripts only (EVALSHA, which
    # Kombu's own locks need, but not EVAL): the batch delivery script is
    # not loaded, so the server refuses it
    db = own_redis.fresh_db()
    admin = own_redis.client()
    admin.script_flush()
    admin.acl_setuser(
        "noscript",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-eval"],
    )
    url = f"redis://noscript:pw@127.0.0.1:{own_redis.port}/{db}"
    try:
        worker = workers.start("redis", "solo", urls=(url, REDIS_BACKEND))
        task = worker.tasks.collect
        # when calls of a batch task are sent
        results = [task.delay(n, 1) for n in range(12)]
        # then they all run, and the worker says it delivers one message
        # per round trip from now on
        assert [r.get(timeout=30) for r in results] == [n + 1 for n in range(12)]
        assert "refused the batch delivery script" in worker.log()
    finally:
        admin.acl_deluser("noscript")


def test_a_server_that_forgot_the_script_is_sent_it_again(
    own_redis: RedisServer,
) -> None:
    # given 40 messages, and a server whose script cache is emptied (as by
    # a restart, or a failover to a replica) after a first fetch
    db = own_redis.fresh_db()
    url = own_redis.url(db)
    queue = Queue("forgetful", Exchange("forgetful"), routing_key="forgetful")
    with Connection(url) as conn:
        producer = Producer(conn.default_channel)
        queue(conn.default_channel).declare()
        for n in range(40):
            producer.publish({"n": n}, exchange="", routing_key="forgetful")
    taken: list[int] = []

    def on_message(body: Any, message: Any) -> None:
        taken.append(body["n"])
        message.ack()

    ours = "celery_batches.redis_transport:Transport"
    with (
        Connection(url, transport=ours) as conn,
        Consumer(
            conn.channel(),
            [queue],
            callbacks=[on_message],
            prefetch_count=10,
            accept=["json"],
        ),
    ):
        deadline = time.monotonic() + 20
        while len(taken) < 40 and time.monotonic() < deadline:
            if len(taken) == 10:
                own_redis.client().script_flush()
            with suppress(socket.timeout):
                conn.drain_events(timeout=0.5)
    # then the consumer took them all, in order
    assert taken == list(range(40))


@pytest.fixture
def sentinel(own_redis: RedisServer) -> Iterator[RedisSentinel]:
    require_binary("redis-sentinel")
    with tempfile.TemporaryDirectory(prefix="cbfault-sentinel-") as directory:
        watcher = RedisSentinel(Path(directory), own_redis)
        watcher.start()
        try:
            yield watcher
        finally:
            watcher.stop()


def test_a_worker_on_redis_sentinel_delivers_in_batches(
    workers: Workers, own_redis: RedisServer, sentinel: RedisSentinel
) -> None:
    # given a worker whose broker is found through Redis Sentinel
    db = own_redis.fresh_db()
    options = {"broker_transport_options": {"master_name": sentinel.master_name}}
    worker = workers.start(
        "redis", "solo", urls=(sentinel.url(db), REDIS_BACKEND), conf=options
    )
    before = _script_calls(own_redis)
    # when calls of a batch task and of a plain task are sent
    collect = worker.tasks.collect
    total = worker.tasks.total
    batched = [collect.delay(n, n) for n in range(15)]
    plain = [total.delay([n, 1]) for n in range(5)]
    # then all run, with the master's script taking the messages
    assert [r.get(timeout=30) for r in batched] == [2 * n for n in range(15)]
    assert [r.get(timeout=30) for r in plain] == [n + 1 for n in range(5)]
    assert _script_calls(own_redis) > before
    assert own_redis.client(db).zcard("unacked_index") == 0
