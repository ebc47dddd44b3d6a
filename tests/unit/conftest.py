"""Unit-tier fixtures: an app with no worker, and a consumer double for the strategy.

The strategy is driven the way Celery's own strategy tests drive theirs: a
mock consumer carrying a real :class:`kombu.asynchronous.timer.Timer` (whose
entries a test fires by hand), a real :class:`kombu.common.QoS` (whose value
is the prefetch window the broker would be told), and messages built with
:mod:`celery.contrib.testing.mocks`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from unittest.mock import Mock

import pytest
from celery import Celery, Signature
from celery.contrib.testing.mocks import (
    TaskMessage,
    TaskMessage1,
    task_message_from_sig,
)
from celery.utils.dispatch import Signal
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu.asynchronous.timer import Entry, Timer
from kombu.common import QoS
from kombu.utils.uuid import uuid

from celery_batches import SimpleRequest
from celery_batches.collector import collectors_of

#: Message formats a worker accepts: Celery's protocol 1 and 2, and the
#: hybrid of protocol 2 headers with a protocol 1 body.
PROTOCOLS = ["proto1", "proto2", "hybrid"]


@pytest.fixture
def app() -> Iterator[Celery]:
    """A Celery app with a result backend and a broker but no worker."""
    app = Celery(
        "unit", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    # A queue of its own, so messages this test publishes meet no other test's.
    app.conf.task_default_queue = f"unit-{uuid()}"
    yield app
    app.close()


@pytest.fixture(autouse=True)
def _restore_worker_state() -> Iterator[None]:
    """Leave Celery's module-global worker bookkeeping as the test found it."""
    revoked = set(worker_state.revoked)
    reserved = set(worker_state.reserved_requests)
    requests = set(worker_state.requests)
    yield
    for task_id in set(worker_state.revoked) - revoked:
        worker_state.revoked.discard(task_id)
    for request in set(worker_state.reserved_requests) - reserved:
        worker_state.reserved_requests.discard(request)
    for task_id in set(worker_state.requests) - requests:
        worker_state.requests.pop(task_id, None)


class RecordingPool:
    """Stands in for the worker's pool: keeps each batch instead of running it."""

    #: Read by the collector like a real pool's concurrency.
    num_processes = 1

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def apply_async(
        self, target: Callable[..., Any], args: tuple[Any, ...] = (), **options: Any
    ) -> None:
        self.calls.append({"target": target, "args": args, **options})

    @property
    def batches(self) -> list[list[SimpleRequest]]:
        """Every batch handed to the pool, in order."""
        return [call["args"][1] for call in self.calls]

    def ids(self) -> list[list[str]]:
        """The task ids of every batch handed to the pool."""
        return [[r.id for r in batch] for batch in self.batches]


class FakeWorker:
    """A consumer double that runs the real strategy of batch tasks."""

    hostname = "unit@host"

    def __init__(self, app: Celery, *, prefetch: int = 4) -> None:
        self.app = app
        self.pool = RecordingPool()
        self.timer = Timer()
        #: Every prefetch count the consumer would have sent to the broker.
        self.prefetch_sent: list[int] = []
        self.qos = QoS(self._send_prefetch, prefetch)
        # The consumer tells the broker its window once when it starts.
        self.qos.update()
        # spec=Consumer: like a real consumer, the double has no attribute
        # that nobody set (a bare Mock would answer every getattr).
        consumer = Mock(spec=Consumer, name="consumer")
        consumer.hostname = self.hostname
        consumer.connection_errors = ()
        consumer.pool = self.pool
        consumer.timer = self.timer
        consumer.qos = self.qos
        consumer.controller = Mock(name="controller")
        consumer.controller.state.revoked = worker_state.revoked
        consumer.event_dispatcher = Mock(name="event_dispatcher", enabled=False)
        consumer.blueprint = Mock(name="blueprint")
        consumer.blueprint.steps = {"celery_batches.BatchesStep": Mock()}
        self.consumer = consumer

    def _send_prefetch(self, prefetch_count: int) -> None:
        self.prefetch_sent.append(prefetch_count)

    def sync_prefetch(self) -> None:
        """Tell the broker of a changed window, as the consumer's loop does."""
        if self.qos.prev != self.qos.value:
            self.qos.update()

    def strategy(self, task: Any) -> Callable[..., None]:
        """Start ``task``'s strategy as the worker does for each registered task."""
        return task.start_strategy(self.app, self.consumer)  # type: ignore[no-any-return]

    @staticmethod
    def deliver(handler: Callable[..., None], message: Mock) -> None:
        """Hand ``message`` to ``handler`` as ``Consumer.on_task_received`` does.

        Messages that name their task in the headers (protocol 2 and hybrid)
        are passed undecoded; protocol 1 messages are decoded first.
        """
        payload = None if "task" in (message.headers or {}) else message.payload
        handler(message, payload, message.ack, message.reject, None)

    def interval_entries(self) -> list[Entry]:
        """Live timer entries without arguments: the flush interval."""
        return [
            s.entry
            for s in self.timer.queue
            if not s.entry.canceled and not s.entry.args
        ]

    def eta_entries(self) -> list[Entry]:
        """Live timer entries carrying a request: ETA holds (``inspect scheduled``)."""
        return [
            s.entry for s in self.timer.queue if not s.entry.canceled and s.entry.args
        ]

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the timer, running each entry that comes due."""
        self.run_until(time.monotonic() + seconds)

    def run_until(self, deadline: float) -> None:
        """Run timer entries due by ``deadline`` (monotonic), as the timer's loop does.

        The timer's own iterator pops due entries, skips cancelled ones and
        sees re-armed ones; only its clock is moved. Entries run directly so
        that an error in one fails the test instead of being logged.
        """
        ticks = self.timer.__iter__(nowfun=lambda: deadline)  # type: ignore[call-arg]
        for _ in range(1000):
            _, entry = next(ticks)
            if entry is None:
                return
            entry()
        raise AssertionError("timer entries keep coming due: one is never cancelled")

    def fire_interval(self) -> None:
        """Let time pass until the armed flush interval comes due.

        The timer may first come due for a key whose widening lingers
        after a full batch (``collector.LINGER``); it is then armed again
        for the calls waiting, and this waits for that too.
        """

        def waiting() -> int:
            return sum(len(c.policy) for c in collectors_of(self.consumer).values())

        for _ in range(10):
            armed = [
                s.eta for s in self.timer.queue if s.entry in self.interval_entries()
            ]
            if not armed:
                return
            before = waiting()
            self.run_until(armed[0])
            if not before or waiting() < before:
                return


def make_message(
    app: Celery,
    sig: Signature,
    protocol: str = "proto2",
    *,
    reply_to: str | None = None,
    priority: int | None = None,
) -> Mock:
    """Build the message ``sig.apply_async()`` would send, in ``protocol``.

    The message carries broker delivery info and properties as a real one
    does (Celery's mocks leave them as Mock attributes).
    """
    factory = TaskMessage1 if protocol in ("proto1", "hybrid") else TaskMessage
    message: Mock = task_message_from_sig(app, sig, TaskMessage=factory)
    if protocol == "hybrid":
        message.headers = {"task": message.payload["task"], "id": message.payload["id"]}
    task_id = message.headers.get("id") or message.payload["id"]
    message.delivery_info = {
        "exchange": "",
        "routing_key": app.conf.task_default_queue,
        "redelivered": False,
    }
    message.properties = {
        "reply_to": reply_to,
        "correlation_id": task_id,
        "priority": priority,
    }
    return message


@contextmanager
def recording(signal: Signal) -> Iterator[list[dict[str, Any]]]:
    """Collect the sender and keyword arguments of each ``signal`` sent in the block."""
    sent: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        sent.append({"sender": sender, **kwargs})

    signal.connect(receiver, weak=False)
    try:
        yield sent
    finally:
        signal.disconnect(receiver)


def utc_in(seconds: float) -> datetime:
    """The aware UTC time ``seconds`` from now."""
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


@pytest.fixture
def worker(app: Celery) -> FakeWorker:
    """A consumer double with a prefetch window of 4."""
    return FakeWorker(app)
