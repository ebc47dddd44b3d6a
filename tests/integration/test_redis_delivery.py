"""Batch delivery on Redis takes what Kombu would, in its order, with its bookkeeping.

Each test consumes with a bare Kombu consumer on celery-batches' transport
(``celery_batches.redis_transport``) and, where it matters, with Kombu's own
on the same messages: what they deliver, in which order, and what they
leave in Redis must agree. The keys of each test live under a
``global_keyprefix`` of their own, so that nothing here touches the unacked
messages of other users of the shared server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer
from kombu.utils.uuid import uuid

from celery_batches.redis_fetch import FETCH_SCRIPT, fetch_arguments
from tests.harness.brokers import REDIS_URL, require_server

OURS = "celery_batches.redis_transport:Transport"
QUEUES = ("qa", "qb", "qc")


@pytest.fixture
def prefix() -> Iterator[str]:
    require_server(REDIS_URL)
    prefix = f"cbtest-{uuid()}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _connection(prefix: str, transport: str | None = None, **options: Any) -> Any:
    return Connection(
        REDIS_URL,
        transport=transport,
        transport_options={"global_keyprefix": prefix, **options},
    )


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name), routing_key=name, max_priority=9)


def _publish(prefix: str, messages: list[tuple[str, int, str]]) -> None:
    """Publish ``(queue, priority, label)`` each, in order."""
    with _connection(prefix) as conn:
        producer = Producer(conn.default_channel)
        for name in QUEUES:
            _queue(name)(conn.default_channel).declare()
        for queue, priority, label in messages:
            producer.publish(
                {"label": label},
                exchange="",
                routing_key=queue,
                priority=priority,
                serializer="json",
            )


def _consume(
    prefix: str,
    transport: str | None,
    expected: int,
    *,
    prefetch: int = 0,
    ack: bool = True,
    no_ack: bool = False,
    **options: Any,
) -> list[str]:
    """Consume ``expected`` messages from every queue; return their labels."""
    labels: list[str] = []
    with _connection(prefix, transport, **options) as conn:
        channel = conn.channel()

        def on_message(body: Any, message: Any) -> None:
            labels.append(body["label"])
            if ack and not no_ack:
                message.ack()

        with Consumer(
            channel,
            [_queue(name) for name in QUEUES],
            callbacks=[on_message],
            no_ack=no_ack,
            prefetch_count=prefetch,
            accept=["json"],
        ):
            deadline = time.monotonic() + 20
            while len(labels) < expected and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout):
                    conn.drain_events(timeout=0.5)
        channel.close()
    return labels


_publishes = st.lists(
    st.tuples(st.sampled_from(QUEUES), st.sampled_from([0, 3, 5, 9])),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(publishes=_publishes)
def test_messages_come_in_the_order_kombu_delivers_them(
    prefix: str, publishes: list[tuple[str, int]]
) -> None:
    # given messages in three queues at mixed priorities, published twice
    labelled = [(q, p, f"{q}-{p}-{n}") for n, (q, p) in enumerate(publishes)]
    # when Kombu's own consumer takes them one by one, and ours in batches
    _publish(prefix, labelled)
    kombus = _consume(prefix, None, len(labelled))
    _publish(prefix, labelled)
    ours = _consume(prefix, OURS, len(labelled))
    # then both took every message, in the same order: priority first,
    # then the queues in turn
    assert ours == kombus
    assert sorted(ours) == sorted(label for _, _, label in labelled)


def test_fetched_messages_are_unacked_as_kombu_records_them(prefix: str) -> None:
    # given 30 messages, 10 of them consumed and left unacked by Kombu's
    # transport and 20 by ours (a window of 20, so that it takes them in
    # one fetch after the first)
    _publish(prefix, [("qa", 0, f"m{n}") for n in range(30)])
    client = redis.Redis.from_url(REDIS_URL)
    # when each consumer stops without acking (the channel is closed
    # without restoring, as a killed worker's would be)
    with _connection(prefix) as conn:
        kombu_channel = conn.channel()
        _take_unacked(kombu_channel, 10)
        kombus = client.hgetall(f"{prefix}unacked")
        kombu_channel.qos.restore_at_shutdown = False
    with _connection(prefix, OURS) as conn:
        our_channel = conn.channel()
        _take_unacked(our_channel, 20)
        ours = {
            tag: entry
            for tag, entry in client.hgetall(f"{prefix}unacked").items()
            if tag not in kombus
        }
        our_channel.qos.restore_at_shutdown = False
    # then the unacked hash holds every message of both, each as
    # [message, exchange, routing key] alike, and the index one score each
    assert len(kombus) == 10 and len(ours) == 20
    for entry in [*kombus.values(), *ours.values()]:
        message, exchange, routing_key = json.loads(entry)
        assert (exchange, routing_key) == ("", "qa")
        tags: Any = [*kombus, *ours]
        assert message["properties"]["delivery_tag"] in {t.decode() for t in tags}
    index: Any = client.zrange(f"{prefix}unacked_index", 0, -1, withscores=True)
    assert {tag for tag, _ in index} == set(kombus) | set(ours)
    assert all(abs(score - time.time()) < 60 for _, score in index)
    client.close()


def _take_unacked(channel: Any, count: int) -> list[Any]:
    taken: list[Any] = []
    with Consumer(
        channel,
        [_queue("qa")],
        callbacks=[lambda body, message: taken.append(message)],
        prefetch_count=count,
        accept=["json"],
    ):
        deadline = time.monotonic() + 10
        while len(taken) < count and time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout):
                channel.connection.client.drain_events(timeout=0.5)
    assert len(taken) == count
    return taken


def test_the_prefetch_window_bounds_each_fetch(prefix: str) -> None:
    # given 50 messages and a consumer with a window of 7 that acks nothing
    _publish(prefix, [("qa", 0, f"m{n}") for n in range(50)])
    # when it consumes for a while
    labels = _consume(prefix, OURS, 50, prefetch=7, ack=False)
    # then it was handed exactly 7, the first 7
    assert labels == [f"m{n}" for n in range(7)]


def test_no_ack_consumers_leave_nothing_unacked(prefix: str) -> None:
    # given 25 messages, consumed without acks
    _publish(prefix, [("qb", 0, f"m{n}") for n in range(25)])
    labels = _consume(prefix, OURS, 25, no_ack=True)
    # then all came, and none is recorded as unacked
    assert labels == [f"m{n}" for n in range(25)]
    client = redis.Redis.from_url(REDIS_URL)
    assert client.hlen(f"{prefix}unacked") == 0
    assert client.zcard(f"{prefix}unacked_index") == 0
    client.close()


def test_a_message_taken_for_a_connection_that_died_comes_back(prefix: str) -> None:
    # given 5 messages, and Kombu's own BRPOP sent on a connection that
    # dies before it reads the reply: that message is gone for good
    _publish(prefix, [("qa", 0, f"m{n}") for n in range(5)])
    client = redis.Redis.from_url(REDIS_URL)
    queue = f"{prefix}qa"
    _send_and_die(["BRPOP", queue, "1"])
    assert client.llen(queue) == 4
    assert client.hlen(f"{prefix}unacked") == 0
    # when the fetch script is sent on a connection that dies the same way
    arguments = fetch_arguments(
        count=10,
        queues=["qa"],
        priority_keys=[[queue]],
        acked=[True],
        rotate=True,
        unacked_key=f"{prefix}unacked",
        unacked_index_key=f"{prefix}unacked_index",
        now=time.time() - 10,
    )
    _send_and_die(["EVAL", FETCH_SCRIPT, *arguments])
    # then the four messages it took are in the unacked index, and Kombu's
    # visibility_timeout restore puts them back in their queue
    assert client.llen(queue) == 0
    assert client.zcard(f"{prefix}unacked_index") == 4
    with _connection(prefix, None, visibility_timeout=1) as conn:
        conn.default_channel.qos.restore_visible(num=10, interval=1)
    assert client.llen(queue) == 4
    labels = _consume(prefix, OURS, 4)
    assert labels == ["m1", "m2", "m3", "m4"]
    client.close()


def _send_and_die(command: list[Any]) -> None:
    """Send ``command`` to the server and close the socket unread."""
    payload = [f"*{len(command)}\r\n".encode()]
    for part in command:
        data = part if isinstance(part, bytes) else str(part).encode()
        payload.append(b"$%d\r\n%s\r\n" % (len(data), data))
    host, port = "127.0.0.1", 6379
    url = REDIS_URL.split("://", 1)[1].split("/", 1)[0]
    if ":" in url:
        host, port_text = url.rsplit(":", 1)
        port = int(port_text)
    db = int(REDIS_URL.rsplit("/", 1)[1] or 0)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%d\r\n" % (len(str(db)), db))
        sock.sendall(b"".join(payload))
        # The server runs the command whether or not anyone reads the reply.
        time.sleep(0.3)
