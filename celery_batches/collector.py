"""The worker-side owner of one batch task's buffer, timer and prefetch."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Callable

from celery.utils.log import get_logger
from celery.worker.state import revoked as revoked_tasks
from celery.worker.state import task_ready, task_reserved

from ._compat import narrow_prefetch
from .buffer import BatchBuffer
from .dispatch import dispatch_batch
from .request import SimpleRequest
from .signals import batch_flushed

if TYPE_CHECKING:
    from celery.concurrency.base import BasePool
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request

    from .task import Batches

__all__ = ["BatchCollector", "collectors_of"]

logger = get_logger(__name__)

KeyFunction = Callable[["Request"], Hashable]


def collectors_of(consumer: Consumer) -> dict[str, BatchCollector]:
    """Return the collectors of ``consumer``, by task name."""
    registry: dict[str, BatchCollector] | None = getattr(
        consumer, "_batch_collectors", None
    )
    if registry is None:
        registry = {}
        consumer._batch_collectors = registry
    return registry


def _key_function(task: Batches) -> KeyFunction | None:
    # Read from the class: a plain function set by the task decorator would
    # come back from the instance as a bound method.
    batch_key = getattr(type(task), "batch_key", None)
    if batch_key is None:
        return None
    if isinstance(batch_key, str):
        name = batch_key

        def by_keyword(request: Request) -> Hashable:
            return request.kwargs.get(name)  # type: ignore[no-any-return]

        return by_keyword
    if not callable(batch_key):
        raise TypeError(
            f"{task.name}.batch_key must be a callable or a keyword name, "
            f"not {batch_key!r}"
        )
    user_key: Callable[[SimpleRequest], Hashable] = batch_key

    def by_callable(request: Request) -> Hashable:
        # The key function sees what the body will see; keep the snapshot
        # so the flush does not build it a second time.
        simple = SimpleRequest.from_request(request)
        request._batches_simple = simple
        return user_key(simple)

    return by_callable


class BatchCollector:
    """Buffers one batch task's requests in the worker and flushes them.

    Flushes a key's requests when ``flush_every`` of them wait, and every
    waiting request each ``flush_interval`` seconds. While a key has
    requests waiting, the consumer's prefetch window is widened by twice
    ``flush_every`` so the broker can deliver a full batch at Celery's
    default prefetch settings, and narrowed again when they are flushed.
    """

    def __init__(self, task: Batches, consumer: Consumer) -> None:
        self.task = task
        self.consumer = consumer
        self.buffer: BatchBuffer[Request] = BatchBuffer(int(task.flush_every))
        self.flush_interval = float(task.flush_interval)
        #: How much a waiting key widens the prefetch window: room for one
        #: batch to fill while the one before it still counts against the
        #: window (until the pool accepts it, or until it ends with
        #: ``acks_late``). With only ``flush_every`` the broker stops after
        #: a flush until those acks are out, and the consumer sits idle.
        self.widening = 2 * self.buffer.flush_every
        self.key_of = _key_function(task)
        # The flush timer of non-event-loop pools runs in its own thread.
        self.lock = threading.RLock()
        self._timer_entry: Any = None
        self._boosted: set[Hashable] = set()
        processes = getattr(consumer.pool, "num_processes", None) or 1
        #: At most this many keys widen the prefetch window at once, so the
        #: number of messages held in memory stays bounded with many keys.
        self.max_boosted_keys = max(2, int(processes) + 1)
        self._held: dict[str, tuple[Request, Any]] = {}
        self.revoked_tasks = revoked_tasks

    # -- prefetch ---------------------------------------------------------

    def _boost(self, key: Hashable) -> None:
        # Celery's consumer does the same for ETA tasks: the broker keeps
        # delivering while messages wait in memory instead of in the pool.
        if key in self._boosted or len(self._boosted) >= self.max_boosted_keys:
            return
        qos = self.consumer.qos
        if qos is not None:
            self._boosted.add(key)
            qos.increment_eventually(self.widening)

    def _unboost(self, key: Hashable) -> None:
        if key in self._boosted:
            self._boosted.discard(key)
            qos = self.consumer.qos
            if qos is not None:
                floor = getattr(self.consumer, "initial_prefetch_count", 1) or 1
                narrow_prefetch(qos, self.widening, int(floor))

    # -- buffering --------------------------------------------------------

    def add(self, request: Request, key: Hashable = None, reason: str = "size") -> None:
        """Buffer ``request`` under ``key``; flush the key's batch if it is full."""
        with self.lock:
            buffer = self.buffer
            if not buffer.pending(key):
                self._boost(key)
            batch = buffer.add(request, key)
            if batch is not None:
                self._unboost(key)
                if buffer.pending(key):
                    self._boost(key)
            if not buffer:
                self._cancel_timer()
            elif self._timer_entry is None:
                self._arm_timer()
        if batch is not None:
            self.dispatch(batch, key, reason)

    def _arm_timer(self) -> None:
        self._timer_entry = self.consumer.timer.call_repeatedly(
            self.flush_interval, self.on_interval, priority=5
        )

    def _cancel_timer(self) -> None:
        entry, self._timer_entry = self._timer_entry, None
        if entry is not None:
            try:
                self.consumer.timer.cancel(entry)
            except Exception:
                logger.debug("Cannot cancel flush timer", exc_info=True)

    def on_interval(self) -> None:
        """Timer callback: flush every waiting request."""
        self.flush_all("interval")

    # -- ETA --------------------------------------------------------------

    def hold(self, request: Request, eta: float, key: Hashable = None) -> None:
        """Keep ``request`` out of the buffer until its ETA (a timestamp)."""
        with self.lock:
            entry = self.consumer.timer.call_at(
                eta, self.on_eta_due, (request, key), priority=6
            )
            self._held[request.id] = (request, entry)
            qos = self.consumer.qos
            if qos is not None:
                qos.increment_eventually()

    def on_eta_due(self, request: Request, key: Hashable = None) -> None:
        """Timer callback: an ETA request joins the buffer."""
        with self.lock:
            if self._held.pop(request.id, None) is None:
                return  # discarded by a connection loss meanwhile
            qos = self.consumer.qos
            if qos is not None:
                qos.decrement_eventually()
        task_reserved(request)
        self.add(request, key, reason="eta")

    # -- flushing ---------------------------------------------------------

    def dispatch(
        self,
        batch: list[Request],
        key: Hashable,
        reason: str,
        pool: BasePool | None = None,
    ) -> None:
        """Send ``batch`` to the pool, leaving out revoked and expired requests.

        ``pool`` overrides the worker's pool (used at shutdown).
        """
        revoked = self.revoked_tasks
        live = [
            request
            for request in batch
            if not ((request.expires or request.id in revoked) and request.revoked())
        ]
        if not live:
            return
        if pool is None:
            self.task.flush(live)
        else:
            dispatch_batch(self.task, live, pool, hostname=live[0].hostname)
        if batch_flushed.receivers:
            batch_flushed.send(
                sender=self.task,
                size=len(live),
                key=key,
                reason=reason,
                request_ids=[request.id for request in live],
            )

    def flush_all(self, reason: str, pool: BasePool | None = None) -> int:
        """Flush every waiting request now; return how many were sent.

        ``pool`` overrides the worker's pool (used at shutdown).
        """
        with self.lock:
            batches = list(self.buffer.drain())
            for key, _ in batches:
                self._unboost(key)
            self._cancel_timer()
        for key, batch in batches:
            self.dispatch(batch, key, reason, pool)
        return sum(len(batch) for _, batch in batches)

    def discard_all(self) -> int:
        """Forget every waiting and held request; return how many.

        Used when the broker connection is lost: the messages' delivery tags
        died with the channel and the broker delivers them again.
        """
        with self.lock:
            waiting = self.buffer.clear()
            held = [request for request, _ in self._held.values()]
            for _, entry in self._held.values():
                try:
                    self.consumer.timer.cancel(entry)
                except Exception:
                    logger.debug("Cannot cancel ETA timer", exc_info=True)
            self._held.clear()
            self._boosted.clear()
            self._cancel_timer()
        for request in (*waiting, *held):
            task_ready(request)
        return len(waiting) + len(held)
