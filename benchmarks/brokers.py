"""Finding (or starting) the brokers, and filling and removing queues."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlparse

from kombu import Connection, Exchange, Producer, Queue
from kombu.utils.uuid import uuid

__all__ = [
    "BROKERS",
    "QUEUE_TYPES",
    "delete_queue",
    "delete_results",
    "ensure_broker",
    "publish",
    "queue_size",
    "redis_backend_url",
    "server_version",
]

#: Broker name to URL; the environment variables the test suite reads win.
#: ``rabbitmq-quorum`` is the same server, with quorum queues.
BROKERS = {
    "rabbitmq": os.environ.get(
        "CELERY_BATCHES_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
    ),
    "redis": os.environ.get("CELERY_BATCHES_REDIS_URL", "redis://127.0.0.1:6379/0"),
}
BROKERS["rabbitmq-quorum"] = BROKERS["rabbitmq"]

#: The queue type a broker name stands for, where it is not the default.
QUEUE_TYPES = {"rabbitmq-quorum": "quorum"}


def redis_backend_url() -> str:
    """The result backend URL: the Redis server, database 1."""
    return BROKERS["redis"].rsplit("/", 1)[0] + "/1"


def _port_open(url: str) -> bool:
    parsed = urlparse(url)
    default = 6379 if parsed.scheme.startswith("redis") else 5672
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default), timeout=2
        ):
            return True
    except OSError:
        return False


def _answers(url: str) -> str | None:
    """Return why ``url`` does not answer, or ``None`` if it does."""
    if not _port_open(url):
        return "nothing listens on its port"
    try:
        with Connection(url, connect_timeout=3, transport_options={}) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            if url.startswith("redis"):
                conn.default_channel.client.ping()
    except Exception as exc:
        return repr(exc)
    return None


def _run(cmd: list[str], timeout: float) -> bool:
    try:
        done = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _start(name: str, url: str) -> bool:
    """Try to start the broker; return ``False`` if there was nothing to try."""
    # Only for a machine where the server is installed but not running; a
    # server that already answers is never touched (others share it).
    parsed = urlparse(url)
    if parsed.hostname not in {"127.0.0.1", "localhost", "::1"}:
        return False
    if name == "redis" and shutil.which("redis-server"):
        return _run(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(parsed.port or 6379),
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            timeout=15,
        )
    if name.startswith("rabbitmq") and shutil.which("rabbitmq-server"):
        env = {
            **os.environ,
            # Every listener on loopback, as .ci/run does.
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(parsed.port or 5672),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                "-kernel inet_dist_use_interface {127,0,0,1}"
            ),
        }
        try:
            subprocess.run(
                ["rabbitmq-server", "-detached"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        if shutil.which("rabbitmqctl"):
            _run(["rabbitmqctl", "await_startup", "--timeout", "90"], timeout=100)
        return True
    return False


def ensure_broker(name: str) -> str | None:
    """Make sure broker ``name`` answers; return why not, or ``None``."""
    url = BROKERS[name]
    problem = _answers(url)
    if problem is None:
        return None
    if not _start(name, url):
        return f"{url}: {problem}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _answers(url) is None:
            return None
        time.sleep(1)
    return f"{url}: {problem}"


def task_queue(name: str, queue_type: str | None = None) -> Queue:
    """The queue (and exchange) that Celery declares for ``task_default_queue``.

    ``queue_type="quorum"``: a quorum queue, as Celery 5.5+ declares with
    ``task_default_queue_type = "quorum"``.
    """
    if queue_type is None:
        return Queue(name, Exchange(name, type="direct"), routing_key=name)
    return Queue(
        name,
        Exchange(name, type="direct"),
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": queue_type},
    )


def publish(
    url: str,
    queue: str,
    count: int,
    task_name: str,
    *,
    ids: list[str] | None = None,
    queue_type: str | None = None,
) -> list[str]:
    """Publish ``count`` task messages for ``task_name``; return their ids.

    Messages are built by Celery's own protocol 2 encoder and published the
    way ``send_task`` does, in transport batches where Kombu supports them
    (a Redis pipeline), so filling a queue takes seconds, not minutes.
    """
    from celery import Celery

    app = Celery("bench-publisher", broker=url, set_as_current=False)
    as_task = app.amqp.as_task_v2
    ids = ids if ids is not None else [uuid() for _ in range(count)]
    target = task_queue(queue, queue_type)
    with Connection(url) as conn:
        producer = Producer(conn.default_channel)
        target(producer.channel).declare()
        batch = getattr(producer, "batch", None)
        with batch(max_size=1000) if batch else _nothing():
            for index, task_id in enumerate(ids):
                message = as_task(task_id, task_name, args=(index,))
                producer.publish(
                    message.body,
                    # The default exchange routes by queue name on both
                    # transports; on Redis it also skips a binding look-up
                    # (a round trip) per message.
                    exchange="",
                    routing_key=queue,
                    serializer="json",
                    headers=message.headers,
                    delivery_mode=2,
                    **message.properties,
                )
    app.close()
    return ids


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _bound(url: str, queue: str, action: str, queue_type: str | None = None) -> Any:
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        bound = task_queue(queue, queue_type)(channel)
        if action == "size":
            return bound.queue_declare(passive=True).message_count
        # Kombu's virtual transports (Redis) only delete bindings this
        # connection declared: declare first so that the delete is complete.
        bound.declare()
        bound.purge()
        bound.delete()
        # Celery declared an exchange of the same name; leave nothing behind.
        bound.exchange(channel).delete()
        return None


def queue_size(url: str, queue: str, queue_type: str | None = None) -> int:
    """Number of ready messages in ``queue``."""
    return int(_bound(url, queue, "size", queue_type))


def delete_queue(url: str, queue: str, queue_type: str | None = None) -> None:
    """Delete ``queue`` (and its messages); errors are ignored."""
    with suppress(Exception):
        _bound(url, queue, "delete", queue_type)
    if url.startswith("redis"):
        with suppress(Exception):
            _forget_unacked(url, queue)


def _forget_unacked(url: str, queue: str) -> None:
    # Kombu's Redis transport keeps delivered, unacked messages in one hash
    # shared by every queue, and puts them back in their queue after the
    # visibility timeout. A worker stopped with messages in flight can leave
    # a few there, which would bring a deleted queue back an hour later.
    import json

    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    mine = []
    for tag, value in client.hscan_iter("unacked", count=1000):
        try:
            _message, _exchange, routing_key = json.loads(value)
        except (ValueError, TypeError):
            continue
        if routing_key == queue:
            mine.append(tag)
    if mine:
        client.hdel("unacked", *mine)
        client.zrem("unacked_index", *mine)


def delete_results(url: str, ids: list[str]) -> None:
    """Delete the stored results of ``ids`` from the Redis backend at ``url``."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=10)
        for start in range(0, len(ids), 1000):
            client.delete(*(f"celery-task-meta-{i}" for i in ids[start : start + 1000]))
    except Exception:
        pass


def server_version(name: str) -> str | None:
    """The version the broker ``name`` reports, if it tells."""
    url = BROKERS[name]
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            if name == "redis":
                info = conn.default_channel.client.info("server")
                return f"Redis {info.get('redis_version')}"
            props = conn.connection.server_properties
            product = props.get("product", "AMQP")
            version = props.get("version", "?")
            if isinstance(product, bytes):
                product = product.decode()
            if isinstance(version, bytes):
                version = version.decode()
            return f"{product} {version}"
    except Exception:
        return None
