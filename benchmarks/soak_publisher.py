"""The soak's publisher: task messages at a bounded rate, each with its own id.

A publish that raised may or may not have reached the broker (the
connection died under it), so its id is kept apart as *unsure* and never
sent again: a second message with the same id would be counted as a call
that ran twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer
from kombu.utils.uuid import uuid

__all__ = ["Publisher", "task_queue"]

#: Seconds between attempts to reach a broker that is down.
RECONNECT_INTERVAL = 0.2


def task_queue(name: str) -> Queue:
    """The queue (and exchange) that Celery declares for ``task_default_queue``."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


class Publisher(threading.Thread):
    """Sends calls to the given tasks in turn, ``rate`` per second, until stopped."""

    def __init__(
        self,
        *,
        url: str,
        transport_options: dict[str, Any],
        queue: str,
        tasks: list[str],
        rate: float,
    ) -> None:
        super().__init__(name="soak-publisher", daemon=True)
        self.url = url
        self.transport_options = transport_options
        self.queue = queue
        self.tasks = tasks
        self.rate = rate
        #: Ids whose publish returned, by task name.
        self.sent: dict[str, list[str]] = {name: [] for name in tasks}
        #: Ids whose publish raised, by task name.
        self.unsure: dict[str, list[str]] = {name: [] for name in tasks}
        #: When each publish returned (or raised), in ``time.time()``.
        self.sent_at: dict[str, float] = {}
        #: Failed attempts to connect (the broker was down).
        self.refused = 0
        #: Publishes attempted so far; also each call's argument.
        self.attempts = 0
        #: The longest time without a successful publish, in seconds.
        self.longest_stall = 0.0
        self._last_sent = 0.0
        #: What ended the thread, if it was not :meth:`stop`.
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        # Messages are built by Celery's own protocol 2 encoder; the app
        # never connects anywhere.
        self._as_task = Celery("soak-publisher", set_as_current=False).amqp.as_task_v2

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sending and wait (bounded) for the thread to end."""
        self._stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError(f"publisher did not stop within {timeout}s")

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        conn = Connection(
            self.url, connect_timeout=2, transport_options=self.transport_options
        )
        try:
            yield conn
        finally:
            # A connection the broker already closed may fail to close.
            with suppress(Exception):
                conn.release()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self._publish_until_error()
        except BaseException as exc:
            self.error = exc

    def _publish_until_error(self) -> None:
        """Publish over one connection until it fails or the thread is stopped."""
        with self._connection() as conn:
            try:
                conn.connect()
                producer = Producer(conn.default_channel)
                # On RabbitMQ a message for a queue that does not exist yet
                # would be dropped, and confirmed all the same.
                task_queue(self.queue)(producer.channel).declare()
            except Exception:
                self.refused += 1
                self._stop_event.wait(RECONNECT_INTERVAL)
                return
            self._publish(producer)

    def _publish(self, producer: Producer) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            now = time.monotonic()
            if next_at > now:
                self._stop_event.wait(next_at - now)
                continue
            # After a stall (broker down) at most half a second's worth of
            # calls is caught up on: the rate stays bounded.
            next_at = max(next_at + interval, now - 0.5)
            count = self.attempts
            self.attempts += 1
            name = self.tasks[count % len(self.tasks)]
            task_id = uuid()
            message = self._as_task(task_id, name, args=(count,))
            try:
                producer.publish(
                    message.body,
                    # The default exchange routes by queue name on both
                    # transports.
                    exchange="",
                    routing_key=self.queue,
                    serializer="json",
                    headers=message.headers,
                    delivery_mode=2,
                    # Never retried: a retry after a lost reply would send
                    # the call twice.
                    retry=False,
                    timeout=10,
                    **message.properties,
                )
            except Exception:
                self.sent_at[task_id] = time.time()
                self.unsure[name].append(task_id)
                self._stop_event.wait(RECONNECT_INTERVAL)
                return
            self.sent_at[task_id] = time.time()
            self.sent[name].append(task_id)
            done = time.monotonic()
            if self._last_sent:
                self.longest_stall = max(self.longest_stall, done - self._last_sent)
            self._last_sent = done
