"""The soak's private brokers: start, inject a fault, tell what is left to deliver.

Each wraps a server of ``tests/harness/servers.py`` (the fault tests' own), so the
shared servers on 127.0.0.1:6379 and :5672 are never restarted or cut off.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from tests.harness.servers import RabbitNode, RedisServer, ServerError

__all__ = ["BROKER_NAMES", "Broker", "PrivateRabbit", "PrivateRedis", "start_broker"]

#: The brokers the soak runs on, in the order ``--broker all`` runs them.
BROKER_NAMES = ("redis", "rabbitmq")


class Broker(Protocol):
    """What the soak needs of a broker it owns."""

    #: ``redis`` or ``rabbitmq``.
    name: str

    @property
    def url(self) -> str: ...

    #: ``broker_transport_options`` for the worker.
    worker_options: dict[str, Any]
    #: Transport options for the publisher's connection.
    publisher_options: dict[str, Any]
    #: Whether a message on its way to a worker is lost if the worker's
    #: connection dies (see ``soak_ledger``).
    loses_in_flight: bool

    def kill_connections(self) -> None:
        """Close every client connection, as a network fault or a proxy would."""

    def restart(self) -> None:
        """Stop the broker with its data kept and start it again; wait for it."""

    def pending(self, queue: str) -> tuple[int, int]:
        """Return (ready, unacked) messages of ``queue``."""
        ...

    def log_tail(self) -> str: ...

    def stop(self) -> None: ...


class PrivateRedis:
    """A ``redis-server`` of the soak's own, on a free port."""

    name = "redis"
    #: ``BRPOP`` takes the message off the list before Kombu records it as
    #: unacked, from the worker.
    loses_in_flight = True

    #: Kombu's Redis transport delivers an unacked message again only once
    #: it is ``visibility_timeout`` old (1 hour by default), found by a scan
    #: every ``unacked_restore_interval`` (kombu 5.7) whose every
    #: ``unacked_restore_throttle``-th run acts. 10 s stays well above the
    #: 0.5 s flush interval plus a batch's run time, even with a backlog.
    worker_options: dict[str, Any] = {  # noqa: RUF012 - read only
        "visibility_timeout": 10,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    #: A publish to a server that went away fails instead of hanging.
    publisher_options: dict[str, Any] = {  # noqa: RUF012 - read only
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
    }

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="cbsoak-redis-"))
        self.server = RedisServer(self.directory)
        self.server.start()

    @property
    def url(self) -> str:
        return self.server.url(0)

    def kill_connections(self) -> None:
        # TYPE normal: every client but replicas and pub/sub ones; our own
        # connection is skipped (SKIPME yes is the default).
        self.server.client().client_kill_filter(_type="normal")

    def restart(self) -> None:
        self.server.restart()

    def pending(self, queue: str) -> tuple[int, int]:
        client = self.server.client()
        # Kombu keeps a queue's messages in one list per priority step,
        # named after the queue.
        ready = sum(int(client.llen(key)) for key in client.scan_iter(f"{queue}*"))
        unacked = 0
        for value in client.hvals("unacked"):
            _message, _exchange, routing_key = json.loads(value)
            unacked += routing_key == queue
        return ready, unacked

    def log_tail(self) -> str:
        return self.server.log_tail()

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of the soak's own, with its own name, ports and data."""

    name = "rabbitmq"
    #: A delivery is unacked on the broker until the consumer settles it.
    loses_in_flight = False
    worker_options: dict[str, Any] = {}  # noqa: RUF012 - read only
    #: Confirms: a publish that returned is on the broker, so a call that
    #: never runs is the worker's doing, not a frame lost in a closed socket.
    publisher_options: dict[str, Any] = {"confirm_publish": True}  # noqa: RUF012

    def __init__(self) -> None:
        self.node = RabbitNode(prefix="cbsoak")
        try:
            self.node.start()
        except BaseException:
            self.node.stop()
            raise

    @property
    def url(self) -> str:
        return self.node.url

    def _ctl(self, *args: str) -> str:
        done = self.node.ctl_run(*args, timeout=60)
        if done.returncode != 0:
            raise ServerError(f"rabbitmqctl {' '.join(args)}: {done.stderr}")
        return done.stdout

    def kill_connections(self) -> None:
        self._ctl("close_all_connections", "--vhost", "/", "soak: connection-kill")

    def restart(self) -> None:
        # The Erlang VM stays up; durable queues and persistent messages
        # survive, as they would a node restart.
        self.node.stop_app()
        self.node.start_app()

    def pending(self, queue: str) -> tuple[int, int]:
        out = self._ctl(
            "list_queues",
            "--quiet",
            "--no-table-headers",
            "--vhost",
            "/",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == queue:
                return int(fields[1]), int(fields[2])
        return 0, 0

    def log_tail(self) -> str:
        return self.node.log_tail()

    def stop(self) -> None:
        self.node.stop()


def start_broker(name: str) -> Broker:
    """Start a private broker ``name`` (one of :data:`BROKER_NAMES`)."""
    if name == "redis":
        return PrivateRedis()
    if name == "rabbitmq":
        return PrivateRabbit()
    raise ValueError(f"unknown broker {name!r}")
