"""A bulk publish that the broker stops or refuses says which calls it published."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, signals
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.errors import BulkPublishError
from tests.harness.servers import RedisServer

pytestmark = pytest.mark.fault


@pytest.fixture
def own_db(own_redis: RedisServer) -> Iterator[int]:
    db = own_redis.fresh_db()
    yield db
    client = own_redis.client(db)
    # Back to the server's defaults for the next test.
    client.config_set("maxmemory", 0)
    client.flushdb()


def _app(url: str) -> Any:
    app = Celery("bulk-faults", broker=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"bulk-{uuid()}",
        # A refused connection fails at once rather than retrying.
        broker_connection_retry=False,
        broker_connection_max_retries=0,
    )

    @app.task(base=Batches, name="bulk.work", shared=False)
    def work(requests: list[SimpleRequest]) -> None:
        pass

    return app, work


def _ids_in_redis(client: redis.Redis, queue: str) -> list[str]:
    import json

    # Kombu pushes on the left: the oldest message is the last.
    raw = client.lrange(queue, 0, -1)
    return [json.loads(item)["headers"]["id"] for item in reversed(raw)]


def test_redis_out_of_memory_mid_chunk_refuses_exactly_the_rest(
    own_redis: RedisServer, own_db: int
) -> None:
    # given a Redis server that has room for about 40 more messages
    client = own_redis.client(own_db)
    client.config_set("maxmemory-policy", "noeviction")
    app, work = _app(own_redis.url(own_db))
    work.delay_many([(0,)])  # connects, declares
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 40 * 1200)
    queue = app.conf.task_default_queue
    # when 200 calls of about 1 KiB each go in chunks of 100
    payload = "x" * 1000
    with pytest.raises(BulkPublishError) as raised:
        work.apply_many([((n, payload), {}) for n in range(200)], chunk_size=100)
    # then the server took the first calls and refused the others, and the
    # error says exactly which: what is in the queue is what it calls
    # published, in order, and nothing is uncertain
    error = raised.value
    assert 0 < len(error.published) < 100
    assert error.uncertain == []
    assert error.published + error.unpublished == list(range(200))
    assert "OutOfMemory" in type(error.__cause__).__name__
    client.config_set("maxmemory", 0)
    in_queue = _ids_in_redis(client, queue)[1:]
    assert in_queue == [error.results[i].id for i in error.published]
    app.close()


def test_redis_going_away_mid_way_leaves_one_chunk_uncertain(
    own_redis: RedisServer, own_db: int
) -> None:
    # given a receiver that shuts the server down while the third chunk is
    # being built (the first two are in Redis by then)
    app, work = _app(own_redis.url(own_db))
    queue = app.conf.task_default_queue
    seen = [0]

    def stop_server(**kwargs: Any) -> None:
        seen[0] += 1
        if seen[0] == 25:
            own_redis.stop(save=True)

    signals.before_task_publish.connect(stop_server, weak=False)
    try:
        # when 50 calls go in chunks of 10
        with pytest.raises(BulkPublishError) as raised:
            work.apply_many([((n,), {}) for n in range(50)], chunk_size=10)
    finally:
        signals.before_task_publish.disconnect(stop_server)
        process = own_redis.process
        if process is None or process.poll() is not None:
            own_redis.start()
    # then the first two chunks are published, the third is uncertain (its
    # pipeline met a closed connection), the rest were never sent
    error = raised.value
    assert error.published == list(range(20))
    assert error.uncertain == list(range(20, 30))
    assert error.unpublished == list(range(30, 50))
    assert isinstance(error.__cause__, redis.ConnectionError)
    client = own_redis.client(own_db)
    assert _ids_in_redis(client, queue) == [error.results[i].id for i in range(20)]
    app.close()
