"""The worker-side owner of one batch task's buffer, timer and prefetch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable
from weakref import WeakKeyDictionary

from celery.exceptions import InvalidTaskError
from celery.utils.log import get_logger
from celery.utils.saferepr import saferepr
from celery.worker.state import revoked as revoked_tasks
from celery.worker.state import task_ready, task_reserved

from ._compat import (
    cancel_timer_entry,
    narrow_prefetch,
    needs_revoke_check,
    per_consumer_qos,
)
from .buffer import BatchBuffer
from .dispatch import fail_request, flushing_into, snapshot_of
from .policy import FlushPolicy, HeldCalls
from .prefetch import PrefetchBudget
from .request import SimpleRequest
from .settings import batch_key_of, prefetch_limit
from .signals import batch_flushed

if TYPE_CHECKING:
    from celery import Celery
    from celery.concurrency.base import BasePool
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request

    from .types import BatchTask, KeyFunction

__all__ = ["BatchCollector", "WorkerBatches", "collectors_of", "worker_batches"]

logger = get_logger(__name__)


def _does_info() -> bool:
    return bool(logger.isEnabledFor(logging.INFO))


#: Longest repr of a batch key in the flush line, as Celery's default
#: ``argsrepr`` size.
KEY_REPR_MAXSIZE = 1024

#: The largest prefetch count AMQP can carry; kombu sends a larger one as 0,
#: which means *unlimited*, so no widening may take the window past it.
PREFETCH_COUNT_MAX = 0xFFFF

#: Seconds (at most; never past the task's ``flush_interval``) a key that
#: filled a batch keeps its widening of the prefetch window while no call
#: of it waits: a busy key's next call comes long before.
LINGER = 0.25


class WorkerBatches:
    """The batch collectors of one worker consumer and their prefetch budget."""

    __slots__ = ("_static", "budget", "collectors", "dynamic")

    def __init__(self, limit: int) -> None:
        #: Collectors by task name.
        self.collectors: dict[str, BatchCollector] = {}
        #: The prefetch budget every batch task and key of the worker shares.
        self.budget = PrefetchBudget(limit)
        #: Whether a changed prefetch count reaches the running consumer, so
        #: the window is widened while calls wait. If not (RabbitMQ's
        #: per-consumer QoS, used for quorum queues), it is widened once,
        #: when the consumer starts.
        self.dynamic = True
        #: (Celery's own window, the window we set) for the static sizing.
        self._static: tuple[int, int] | None = None

    def prepare_window(self, consumer: Consumer) -> None:
        """Size the window before the task consumer starts, where it must be.

        Runs each time the consumer (re)starts, once per batch task, from
        the task's strategy: Celery builds the strategies just before it
        sends the first prefetch count and starts consuming, so a count set
        here is the one the consumer starts with.
        """
        self.dynamic = not per_consumer_qos(consumer)
        static = self._static
        if self.dynamic and static is None:
            return
        current = int(consumer.initial_prefetch_count or 0)
        # Celery resets the count on a reconnect (and autoscaling changes
        # it); only a count we set ourselves stands for Celery's plus ours.
        base = static[0] if static is not None and current == static[1] else current
        if self.dynamic or not base:
            # Widened while calls wait, or unlimited (0) anyway.
            if static is not None and current == static[1]:
                consumer.initial_prefetch_count = base
            self._static = None
            return
        wants = [collector.widening for collector in self.collectors.values()]
        window = base + self.budget.static_widening(
            wants, room=PREFETCH_COUNT_MAX - base
        )
        consumer.initial_prefetch_count = window
        self._static = (base, window)


#: The batch collectors of each consumer: kept beside the consumer, not on it,
#: and gone with it.
_worker_batches: WeakKeyDictionary[Consumer, WorkerBatches] = WeakKeyDictionary()


def worker_batches(consumer: Consumer, app: Celery | None = None) -> WorkerBatches:
    """Return the batch collectors and budget of ``consumer``, made on first use.

    ``app`` (default: the consumer's) holds the ``batches_prefetch_limit``
    setting.
    """
    batches = _worker_batches.get(consumer)
    if batches is None:
        conf = (app if app is not None else consumer.app).conf
        batches = _worker_batches[consumer] = WorkerBatches(prefetch_limit(conf))
    return batches


def collectors_of(consumer: Consumer) -> dict[str, BatchCollector]:
    """Return the collectors of ``consumer``, by task name."""
    return worker_batches(consumer).collectors


def _split_handed(
    live: list[Request], taken: list[Request]
) -> tuple[list[Request], list[Request]]:
    """Split ``live`` into the requests the flush took and those it left out.

    By identity: two calls may share an id, and only the one taken counts.
    """
    handed = {id(request) for request in taken}
    return (
        [request for request in live if id(request) in handed],
        [request for request in live if id(request) not in handed],
    )


def _key_function(task: BatchTask) -> KeyFunction | None:
    batch_key = batch_key_of(task)
    if batch_key is None:
        return None
    if isinstance(batch_key, str):
        name = batch_key

        def by_keyword(request: Request) -> Hashable:
            return request.kwargs.get(name)  # type: ignore[no-any-return]

        return by_keyword
    user_key: Callable[[SimpleRequest], Hashable] = batch_key

    def by_callable(request: Request) -> Hashable:
        # The key function sees what the body will see; keep the snapshot
        # so the flush does not build it a second time.
        return user_key(snapshot_of(request))

    return by_callable


class BatchCollector:
    """Buffers one batch task's requests in the worker and flushes them.

    Applies the task's :class:`~celery_batches.policy.FlushPolicy` to the
    worker: a key's requests flush when ``flush_every`` of them wait, or
    once its oldest has waited ``flush_interval`` seconds (one timer per
    task, armed for the next key due). While a key has requests waiting,
    the consumer's prefetch window is widened by up to twice
    ``flush_every``, drawn from the worker's
    :class:`~celery_batches.prefetch.PrefetchBudget`, so the broker can
    deliver a full batch at Celery's default prefetch settings; it is
    narrowed again when they are flushed. Every batch goes through the
    task's ``flush`` hook, into ``pool``.
    """

    def __init__(self, task: BatchTask, consumer: Consumer, pool: BasePool) -> None:
        self.task = task
        self.consumer = consumer
        #: Where batches run (a warm shutdown may pass another).
        self.pool = pool
        self.policy: FlushPolicy[Request] = FlushPolicy(
            int(task.flush_every), float(task.flush_interval)
        )
        #: How much a waiting key asks to widen the prefetch window: room for
        #: one batch to fill while the one before it still counts against
        #: the window (until the pool accepts it, or until it ends with
        #: ``acks_late``). With only ``flush_every`` the broker stops after
        #: a flush until those acks are out, and the consumer sits idle.
        self.widening = 2 * int(task.flush_every)
        #: Keys that filled a batch and have nothing waiting, with when they
        #: give their widening back. Narrowing the window at each full
        #: batch and widening it at the next call costs two prefetch
        #: updates per batch (on RabbitMQ, two ``basic.qos`` round trips,
        #: with the broker held to Celery's window between them): a key
        #: that fills batches keeps its widening while it stays busy.
        self.lingering: dict[Hashable, float] = {}
        self.linger = min(float(task.flush_interval), LINGER)
        self.key_of = _key_function(task)
        # The flush timer of non-event-loop pools runs in its own thread.
        self.lock = threading.RLock()
        self._timer_entry: Any = None
        self._timer_due: float | None = None
        self._timer_generation = 0
        self.batches = worker_batches(consumer, task.app)
        self.budget = self.batches.budget
        self.budget.add_task(task.name)
        processes = getattr(pool, "num_processes", None) or 1
        #: At most this many keys of the task widen the window at once: more
        #: would only hold more messages than the pool can run.
        self.max_boosted_keys = max(2, int(processes) + 1)
        #: Calls held for their ETA, with their timer entry and whether they
        #: widened the window.
        self.held: HeldCalls[Request, tuple[Any, bool]] = HeldCalls()
        self.revoked_tasks = revoked_tasks

    @property
    def buffer(self) -> BatchBuffer[Request]:
        """The waiting requests, one FIFO per key."""
        return self.policy.buffer

    # -- prefetch ---------------------------------------------------------

    def _floor(self) -> int:
        return int(getattr(self.consumer, "initial_prefetch_count", 1) or 1)

    def _boost(self, key: Hashable) -> None:
        # Celery's consumer does the same for ETA tasks: the broker keeps
        # delivering while messages wait in memory instead of in the pool.
        qos = self.consumer.qos
        if qos is None or not qos.value or not self.batches.dynamic:
            # No window yet, an unlimited one, or one sized when the
            # consumer started (WorkerBatches.prepare_window).
            return
        room = PREFETCH_COUNT_MAX - qos.value
        want = min(self.widening, room)
        budget = self.budget
        name = self.task.name
        amount = budget.grant(name, key, want, max_keys=self.max_boosted_keys)
        if not amount and self.lingering:
            # Keys that wait for nothing give way to one that waits.
            for idle in list(self.lingering):
                self._unboost(idle)
            amount = budget.grant(name, key, want, max_keys=self.max_boosted_keys)
        if amount:
            qos.increment_eventually(amount)

    def _unboost(self, key: Hashable) -> None:
        self.lingering.pop(key, None)
        amount = self.budget.release(self.task.name, key)
        qos = self.consumer.qos
        if amount and qos is not None:
            narrow_prefetch(qos, amount, self._floor())

    # -- buffering --------------------------------------------------------

    def probe_key(self, key: Hashable) -> None:
        """Raise what keying a buffer by ``key`` would raise, if anything.

        That is a key that cannot be hashed, or cannot be compared with a
        waiting key that shares its hash. The strategy calls this inside its
        guard, so that such a key fails its own message there instead of
        the worker later.
        """
        with self.lock:
            self.policy.pending(key)
            self.budget.granted(self.task.name, key)

    def add(self, request: Request, key: Hashable = None, reason: str = "size") -> None:
        """Buffer ``request`` under ``key``; flush the key's batch if it is full."""
        with self.lock:
            policy = self.policy
            now = monotonic()
            if not policy.pending(key) and self.lingering.pop(key, None) is None:
                self._boost(key)
            batch = policy.add(request, key, now)
            if (
                batch is not None
                and not policy.pending(key)
                and self.budget.granted(self.task.name, key)
            ):
                self.lingering[key] = now + self.linger
            self._rearm()
        if batch is not None:
            self.dispatch(batch, key, reason)

    def _rearm(self) -> None:
        """Arm the flush timer for the next key due, if it is not armed for it."""
        due = self.policy.next_due()
        if self.lingering:
            # At most max_boosted_keys of them: keys without a grant never
            # linger.
            until = min(self.lingering.values())
            due = until if due is None else min(due, until)
        if due == self._timer_due:
            return
        self._cancel_timer()
        if due is None:
            return
        self._timer_generation += 1
        generation = self._timer_generation

        def on_due() -> None:
            self.on_interval(generation, due)

        self._timer_entry = self.consumer.timer.call_at(due, on_due, priority=5)
        self._timer_due = due

    def _cancel_timer(self) -> None:
        entry, self._timer_entry = self._timer_entry, None
        self._timer_due = None
        if entry is not None:
            cancel_timer_entry(self.consumer.timer, entry)

    def on_interval(self, generation: int | None = None, due: float = 0.0) -> None:
        """Timer callback: flush every key whose oldest call waited long enough.

        ``generation`` is that of the timer that fired: a timer of the
        gevent and eventlet pools may fire once more after it was
        cancelled, and such a late call does nothing. ``due`` is when it was
        set to fire: the clock is taken to be at least that far.
        """
        with self.lock:
            if generation is not None and generation != self._timer_generation:
                return
            self._timer_entry = self._timer_due = None
            now = max(monotonic(), due)
            batches = self.policy.due(now)
            for key in {key for key, _ in batches}:
                self._unboost(key)
            for key, until in list(self.lingering.items()):
                if until <= now:
                    self._unboost(key)
            self._rearm()
        for key, batch in batches:
            self.dispatch(batch, key, "interval")

    # -- ETA --------------------------------------------------------------

    def hold(self, request: Request, eta: float, key: Hashable = None) -> None:
        """Keep ``request`` out of the buffer until its ETA (a timestamp)."""
        with self.lock:
            entry = self.consumer.timer.call_at(
                eta, self.on_eta_due, (request, key), priority=6
            )
            qos = self.consumer.qos
            # As Celery does for its ETA tasks, and outside the batch
            # budget: one more message in the window per held call, so held
            # calls never stop the broker delivering others. Never past
            # what AMQP can carry (kombu would send "unlimited").
            widened = bool(
                qos is not None
                and qos.value
                and self.batches.dynamic
                and qos.value < PREFETCH_COUNT_MAX
            )
            if widened:
                qos.increment_eventually()
            self.held.hold(request, (entry, widened))

    def on_eta_due(self, request: Request, key: Hashable = None) -> None:
        """Timer callback: an ETA request joins the buffer."""
        with self.lock:
            handle = self.held.release(request)
            if handle is None:
                return  # discarded by a connection loss meanwhile
            _, widened = handle
            if widened:
                qos = self.consumer.qos
                if qos is not None:
                    narrow_prefetch(qos, 1, self._floor())
        task_reserved(request)
        self.add(request, key, reason="eta")

    # -- flushing ---------------------------------------------------------

    def _live(self, batch: list[Request]) -> list[Request]:
        """Leave out revoked and expired requests (which Celery then settles)."""
        revoked = self.revoked_tasks
        check_stamps = needs_revoke_check()
        return [
            request
            for request in batch
            if not (
                (
                    request.expires
                    or request.id in revoked
                    or (check_stamps and getattr(request, "stamped_headers", None))
                )
                and request.revoked()
            )
        ]

    def dispatch(
        self,
        batch: list[Request],
        key: Hashable,
        reason: str,
        pool: BasePool | None = None,
    ) -> None:
        """Hand ``batch`` to the task's ``flush``, but its revoked and expired calls.

        ``pool`` overrides the collector's (used at shutdown). Never
        raises: a batch that cannot be handed over is failed, so no message
        is left unacked in the worker for ever.
        """
        live = self._live(batch)
        if not live:
            return
        taken: list[Request] = []
        try:
            with flushing_into(self.pool if pool is None else pool) as taken:
                self.task.flush(live)
        # Batches.flush may be overridden by the user; whatever it (or the
        # pool) raises, the requests it did not hand over will not run: each
        # is failed and its message rejected, and the worker goes on with
        # the next batch. Those it handed over (a hook that raises after
        # super().flush()) run, or were failed on their own, already:
        # failing them too would settle them twice.
        except Exception as exc:
            _, left = _split_handed(live, taken)
            logger.error(
                "Error flushing a batch of %d %s requests; %d not handed "
                "to the pool fail",
                len(live),
                self.task.name,
                len(left),
                exc_info=True,
            )
            for request in left:
                fail_request(self.task, request, exc)
            return
        handed, left = _split_handed(live, taken)
        if left:
            # A flush hook that hands over only part of its batch: the calls
            # it left out will never run, and unsettled they would wait
            # unacked in the worker for ever. Fail them, as calls a raising
            # hook did not hand over.
            logger.error(
                "%s.flush() left %d of a batch of %d requests out; they fail",
                self.task.name,
                len(left),
                len(live),
            )
            for request in left:
                fail_request(
                    self.task,
                    request,
                    InvalidTaskError(
                        f"{request.name}[{request.id}] was left out of its "
                        f"batch by {self.task.name}.flush()"
                    ),
                )
            live = handed
            if not live:
                return
        if _does_info():
            # The key may come from what a call was sent with (batch_key of
            # a keyword argument), of any size, or be an object whose repr
            # raises: shown cut and safely, as Celery shows arguments.
            logger.info(
                "Flushed a batch of %d %s calls (%s, key %s)",
                len(live),
                self.task.name,
                reason,
                saferepr(key, KEY_REPR_MAXSIZE),
            )
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

        ``pool`` overrides the collector's (used at shutdown).
        """
        with self.lock:
            batches = self.policy.drain()
            for key in {key for key, _ in batches} | set(self.lingering):
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
            waiting = self.policy.clear()
            held = self.held.clear()
            for _, (entry, _widened) in held:
                cancel_timer_entry(self.consumer.timer, entry)
            # The consumer's window goes with the connection; a new one
            # starts from Celery's own prefetch count.
            self.budget.release_task(self.task.name)
            self.lingering.clear()
            self._cancel_timer()
        for request in (*waiting, *(request for request, _ in held)):
            task_ready(request)
        return len(waiting) + len(held)
