"""The test's side of a queue: send calls and raw messages, see what became of them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from tests.harness.app import create_app
from tests.harness.brokers import servers_for
from tests.harness.journal import Flush, Journal, Received, Run
from tests.harness.tasks import Tasks
from tests.harness.wait import wait_for

__all__ = ["Client", "RawMessage", "close_app"]


@dataclass(frozen=True)
class RawMessage:
    """A message published as it is, bypassing Celery's own encoding."""

    body: bytes
    headers: dict[str, Any]
    content_type: str = "application/json"


@dataclass(eq=False)
class Client:
    """An app sending to one queue, and the journal its workers write.

    :class:`~tests.harness.worker.Worker` is a client too, of the queue it
    consumes; a bare client sends calls before any worker runs.
    """

    #: ``memory``, ``redis``, ``rabbitmq``, or a label for a private server.
    broker: str
    app: Celery
    queue: str
    journal: Journal
    #: The test app's tasks; ``None`` for an app the test brought itself.
    _tasks: Tasks | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        broker: str,
        journal: str,
        *,
        queue: str | None = None,
        conf: dict[str, Any] | None = None,
        urls: tuple[str, str] | None = None,
    ) -> Client:
        """A client of the test app on ``broker`` (skips if its server is down).

        ``urls`` (broker, result backend) replaces the servers of ``broker``.
        """
        url, backend = urls if urls is not None else servers_for(broker)
        queue = queue or f"q-{uuid()}"
        app, tasks = create_app(
            broker=url, backend=backend, journal=journal, queue=queue, **(conf or {})
        )
        return cls(broker, app, queue, Journal(journal), tasks)

    @property
    def tasks(self) -> Tasks:
        """The test app's tasks, bound to this client's app."""
        if self._tasks is None:
            raise AttributeError(f"{self.app.main!r} is not the test app")
        return self._tasks

    # -- what became of the calls ------------------------------------------

    def states(self, ids: Iterable[str]) -> list[str]:
        """The backend state of each of ``ids``."""
        return [AsyncResult(task_id, app=self.app).state for task_id in ids]

    def results(self, ids: Iterable[str]) -> list[Any]:
        """The stored result (or exception) of each of ``ids``."""
        return [AsyncResult(task_id, app=self.app).result for task_id in ids]

    def wait_for_states(
        self, ids: list[str], expected: list[str], timeout: float = 30
    ) -> None:
        """Wait until ``ids`` have the ``expected`` states; fail naming those seen."""
        try:
            wait_for(
                lambda: self.states(ids) == expected,
                timeout=timeout,
                what=f"states {expected}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; states now {self.states(ids)}") from None

    def runs(self, task_id: str) -> int:
        """How many times a batch body ran ``task_id``."""
        return self.journal.ids(Run).count(task_id)

    def run_counts(self, ids: Iterable[str]) -> dict[str, int]:
        """How many times the batch bodies ran each of ``ids``."""
        runs = Counter(self.journal.ids(Run))
        return {task_id: runs[task_id] for task_id in ids}

    def received(self, ids: Iterable[str]) -> bool:
        """Whether ``task_received`` was sent for every one of ``ids``."""
        return set(ids) <= set(self.journal.ids(Received))

    def wait_received(self, ids: list[str], timeout: float = 20) -> None:
        """Wait until the worker has received every one of ``ids``."""
        wait_for(
            lambda: self.received(ids),
            timeout=timeout,
            what=f"{len(ids)} calls to be received",
        )

    def flushes(self, task: Task | None = None) -> list[Flush]:
        """Every ``batch_flushed`` so far, or only those of ``task``."""
        return [
            flush
            for flush in self.journal.records(Flush)
            if task is None or flush.task == task.name
        ]

    # -- the queue on the broker -------------------------------------------

    def queue_depth(self) -> int:
        """How many messages wait in the queue on the broker."""
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            if conn.transport.driver_type == "redis":
                # A Redis list exists only while it holds messages, so a
                # passive declare of an empty queue fails with NOT_FOUND.
                return int(channel._size(self.queue))
            declared = channel.queue_declare(self.queue, passive=True)
            return int(declared.message_count)

    def headers(self, task: Task, task_id: Any, **changes: Any) -> dict[str, Any]:
        """Protocol 2 headers of a call of ``task``, as Celery writes them, changed.

        ``task_id`` may be of any type, to send an id that is not a string.
        """
        message_id = task_id if isinstance(task_id, str) else uuid()
        message = self.app.amqp.as_task_v2(message_id, task.name, args=(1,), kwargs={})
        headers = dict(message.headers)
        headers["id"] = task_id
        headers.update(changes)
        return headers

    def publish(self, *messages: RawMessage) -> None:
        """Publish ``messages`` to the queue as they are, in order, on one connection.

        Headers, body and content type are sent unchecked: a test may send
        what Celery itself never would.
        """
        with self.app.connection_for_write() as conn:
            producer = conn.Producer()
            for message in messages:
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=self.queue,
                    headers=message.headers,
                    content_type=message.content_type,
                    content_encoding="utf-8",
                    retry=True,
                )

    def delete_queue(self) -> None:
        """Delete the queue on the broker, and close the app's connections."""
        try:
            with self.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(self.queue)
        # Cleanup after the test: a queue already gone, or a broker the test
        # stopped, leaves nothing to delete.
        except Exception:
            pass
        close_app(self.app)


def close_app(app: Celery) -> None:
    """Close ``app``'s connections, its Redis result backend's included.

    ``app.close()`` leaves the backend's sockets to the garbage collector,
    where older Celery and redis-py warn about unclosed sockets at a random
    later test.
    """
    # None if never made; Celery 5.2 keeps it in a thread-local only.
    backend = getattr(app, "_backend", None) or getattr(app._local, "backend", None)
    client = getattr(backend, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()
    app.close()
