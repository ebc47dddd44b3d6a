"""Acking a batch in one go on real RabbitMQ and Redis servers, and only the batch.

These drive :func:`celery_batches.acks.ack_together` on messages consumed
from a real broker, then ask the broker what is left in the queue.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.utils.uuid import uuid
from vine import promise

from celery_batches.acks import ack_together, install_group_acks
from tests.harness.brokers import AMQP_URL, REDIS_URL, require_server

URLS = {"rabbitmq": AMQP_URL, "redis": REDIS_URL}


class Taken:
    """What ack_together reads from a worker Request."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.acknowledged = False
        self._on_ack = promise(message.ack)


class Received:
    """Six messages taken from a queue on a channel that acks in groups."""

    def __init__(self, conn: Connection, queue: Queue) -> None:
        self.channel = channel = conn.channel()
        #: (delivery tag, multiple) of each basic.ack sent (RabbitMQ).
        self.frames: list[tuple[int, bool]] = []
        #: Redis pipelines opened to ack.
        self.pipelines = 0
        if conn.transport.driver_type == "amqp":
            basic_ack = channel.basic_ack

            def counting_ack(tag: int, multiple: bool = False, *args: Any) -> Any:
                self.frames.append((tag, multiple))
                return basic_ack(tag, multiple, *args)

            channel.basic_ack = counting_ack
        else:
            qos = channel.qos
            pipe_or_acquire = qos.pipe_or_acquire

            def counting_pipe(pipe: Any = None, *args: Any, **kwargs: Any) -> Any:
                if pipe is None:  # else it adds to a pipeline it was given
                    self.pipelines += 1
                return pipe_or_acquire(pipe, *args, **kwargs)

            qos.pipe_or_acquire = counting_pipe
        consumer_double = SimpleNamespace(
            call_soon=lambda callback: callback(), connection_errors=()
        )
        assert install_group_acks(channel, consumer_double) is not None
        self.messages: list[Message] = []
        consumer = Consumer(
            channel,
            [queue],
            accept=["json"],
            prefetch_count=6,
            callbacks=[lambda _, message: self.messages.append(message)],
        )
        consumer.consume()
        while len(self.messages) < 6:
            try:
                conn.drain_events(timeout=5)
            except socket.timeout:
                break
        assert len(self.messages) == 6


@pytest.fixture(params=["rabbitmq", "redis"])
def broker(request: pytest.FixtureRequest) -> str:
    require_server(URLS[request.param])
    return str(request.param)


@pytest.fixture
def queue(broker: str) -> Iterator[Queue]:
    name = f"cb-acks-{uuid()[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), name)
    with Connection(URLS[broker]) as conn:
        producer = conn.Producer()
        for n in range(6):
            producer.publish(n, exchange=queue.exchange, routing_key=name,
                             declare=[queue], serializer="json")  # fmt: skip
    yield queue
    with Connection(URLS[broker]) as conn:
        queue(conn.default_channel).delete()


def _left_in(url: str, queue: Queue) -> list[int]:
    """Return the bodies the broker holds now, read on a fresh connection.

    Closing the consuming connection gives its unacked messages back to
    the queue (RabbitMQ before the close completes, Kombu's Redis transport
    as it closes the channel), so they are all there to read.
    """
    bodies: list[int] = []
    with Connection(url) as conn:
        bound = queue(conn.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            bodies.append(message.decode())
    return sorted(bodies)


def test_a_batch_is_acked_in_one_go(broker: str, queue: Queue) -> None:
    # given six messages received on a channel that acks in groups
    with Connection(URLS[broker]) as conn:
        received = Received(conn, queue)
        requests = [Taken(m) for m in received.messages]
        received.pipelines = 0  # receiving opened some
        # when they are acked together
        ack_together(requests)
        # then one basic.ack through the last tag went out (RabbitMQ), or one
        # pipeline (Redis), and each request is acknowledged (so Celery acks
        # none again; the messages' own state is Kombu's, left alone)
        if broker == "rabbitmq":
            assert received.frames == [(received.messages[-1].delivery_tag, True)]
        else:
            assert received.pipelines == 1
            qos = received.channel.qos
            with received.channel.conn_or_acquire() as client:
                unacked = [
                    client.hexists(qos.unacked_key, m.delivery_tag)
                    for m in received.messages
                ]
            assert unacked == [False] * 6
        assert all(r.acknowledged for r in requests)
    # and once the connection is gone, the broker holds none of them
    assert _left_in(URLS[broker], queue) == []


def test_an_older_unacked_message_is_left_unacked(broker: str, queue: Queue) -> None:
    # given six messages received, the first held by someone else (a plain
    # task still running with acks_late)
    with Connection(URLS[broker]) as conn:
        received = Received(conn, queue)
        # when the other five are acked together
        ack_together([Taken(m) for m in received.messages[1:]])
        # then on RabbitMQ they went out one by one, none with multiple=True
        if broker == "rabbitmq":
            assert [multiple for _, multiple in received.frames] == [False] * 5
        first = received.messages[0].decode()
    # and the broker delivers the first message again, and only it
    assert _left_in(URLS[broker], queue) == [first]


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_batch_covers_tags_another_batch_already_acked(
    broker: str, queue: Queue
) -> None:
    # given six messages whose odd and even deliveries belong to two keys
    with Connection(AMQP_URL) as conn:
        received = Received(conn, queue)
        first, second = received.messages[0::2], received.messages[1::2]
        # when the first key's batch is acked (gaps: one at a time), then
        # the second key's batch
        ack_together([Taken(m) for m in first])
        ack_together([Taken(m) for m in second])
        # then the second batch filled the gaps and went in one frame
        assert received.frames[-1] == (second[-1].delivery_tag, True)
        assert len(received.frames) == 4
    # and nothing is left on the broker
    assert _left_in(AMQP_URL, queue) == []
