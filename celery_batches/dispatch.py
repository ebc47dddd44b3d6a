"""Handing a ready batch to the pool and settling its messages afterwards."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from billiard.einfo import ExceptionInfo
from celery.exceptions import InvalidTaskError
from celery.utils.log import get_logger
from celery.worker.state import task_ready

from ._compat import request_context_or_none
from .acks import ack_together
from .outcome import Outcome
from .request import SimpleRequest
from .trace import execute_batch, run_batch

if TYPE_CHECKING:
    from celery.app.task import Task
    from celery.concurrency.base import BasePool
    from celery.worker.request import Request

__all__ = [
    "BatchJob",
    "dispatch_batch",
    "fail_request",
    "flushing_into",
    "inline_pool",
    "snapshot_of",
    "uses_processes",
]

logger = get_logger(__name__)

#: Serializers whose decoded values are plain data that always pickle.
_PLAIN_CONTENT_TYPES = frozenset(
    {
        "application/json",
        "application/x-msgpack",
        "application/x-yaml",
        "application/data",
    }
)


class BatchJob:
    """The worker-side handle of one batch while the pool runs it.

    The pool calls back once per batch; each callback is fanned out to
    every request's own Celery handler, so acks, ``task-*`` events,
    ``inspect active`` and failure handling stay exactly Celery's.
    """

    __slots__ = ("acks_late", "requests", "task_name")

    def __init__(
        self, task_name: str, requests: list[Request], acks_late: bool = False
    ) -> None:
        self.task_name = task_name
        self.requests = requests
        self.acks_late = acks_late

    def _each(self, method: str, *args: Any) -> None:
        for request in self.requests:
            # Celery's per-request handler talks to the broker and the
            # backend; one that fails must not keep the others from acking.
            try:
                getattr(request, method)(*args)
            except Exception:
                logger.exception(
                    "Error in %s of %s[%s]", method, request.name, request.id
                )

    def _ack_together(self, requests: list[Request]) -> None:
        try:
            ack_together(requests)
        except Exception:
            # Whatever it did not take, Celery's handlers ack one by one.
            logger.exception("Cannot ack a batch of %s together", self.task_name)

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        """The pool started the batch: ack early-acked messages, emit events."""
        if not self.acks_late:
            # Before Celery's handlers, which then find them acknowledged.
            self._ack_together(self.requests)
        self._each("on_accepted", pid, time_accepted)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """A time limit of the batch was exceeded."""
        if soft:
            logger.warning(
                "Soft time limit (%ss) exceeded for a batch of %d %s requests",
                timeout,
                len(self.requests),
                self.task_name,
            )
            return
        logger.error(
            "Hard time limit (%ss) exceeded for a batch of %d %s requests",
            timeout,
            len(self.requests),
            self.task_name,
        )
        self._each("on_timeout", False, timeout)

    def on_success(self, outcomes: list[Outcome]) -> None:
        """The batch ran: settle each message by its own outcome."""
        if self.acks_late:
            # Succeeded requests are acked together before Celery's
            # handlers run; failed ones follow Celery's failure rules.
            self._ack_together(
                [
                    request
                    for request, outcome in zip(self.requests, outcomes)
                    if not outcome[0]
                ]
            )
        for request, outcome in zip(self.requests, outcomes):
            try:
                request.on_success(outcome)
            except Exception:
                logger.exception("Error settling %s[%s]", request.name, request.id)

    def on_failure(self, exc_info: ExceptionInfo) -> None:
        """The pool lost the batch (worker lost, hard time limit, terminated)."""
        self._each("on_failure", exc_info)


def uses_processes(pool: BasePool) -> bool:
    """Return ``True`` if ``pool`` runs jobs in child processes."""
    from celery.concurrency.prefork import TaskPool

    return isinstance(pool, TaskPool)


def inline_pool() -> BasePool:
    """Return a pool that runs each job at once in the calling thread."""
    from celery.concurrency.solo import TaskPool

    return TaskPool(limit=1)


def _unpicklable(request: Request, simple: SimpleRequest) -> Exception | None:
    # Plain decoded data always pickles (but for nesting deeper than the
    # recursion limit, caught when the batch fails to pickle); only other
    # serializers can hand the worker objects that do not.
    if request.content_type in _PLAIN_CONTENT_TYPES:
        return None
    try:
        pickle.dumps(simple, protocol=pickle.HIGHEST_PROTOCOL)
    # Unpicklable user objects raise whatever their __reduce__ raises.
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


#: The pool the batches flushed in this context go to. The collector sets
#: it around each flush, so that ``Batches.flush``, the public hook every
#: flush goes through, dispatches to the worker's pool (or, at a prefork
#: warm shutdown, to one in the main process) without reaching for it.
_flush_pool: ContextVar[BasePool | None] = ContextVar(
    "celery_batches_flush_pool", default=None
)


#: The requests the flush in this context has settled so far: handed to the
#: pool, or failed on their own (arguments that do not pickle).
_flush_taken: ContextVar[list[Request] | None] = ContextVar(
    "celery_batches_flush_taken", default=None
)


@contextmanager
def flushing_into(pool: BasePool) -> Iterator[list[Request]]:
    """Within the block, batches flushed in this context run in ``pool``.

    Yields the list of the requests handed to the pool (or failed on their
    own) within the block, so that an error raised after a batch was
    handed over fails only the requests that were not.
    """
    taken: list[Request] = []
    token = _flush_pool.set(pool)
    taken_token = _flush_taken.set(taken)
    try:
        yield taken
    finally:
        _flush_taken.reset(taken_token)
        _flush_pool.reset(token)


def _took(requests: list[Request]) -> None:
    taken = _flush_taken.get()
    if taken is not None:
        taken.extend(requests)


#: The SimpleRequest made of a worker request before its batch was flushed
#: (by a batch_key function, which sees what the body will see), so that
#: the flush does not make it a second time.
_snapshots: WeakKeyDictionary[Request, SimpleRequest] = WeakKeyDictionary()


def snapshot_of(request: Request, *, keep: bool = True) -> SimpleRequest:
    """Return the :class:`~celery_batches.SimpleRequest` of ``request``, made once.

    ``keep=False`` (the flush) takes it without keeping it any longer.
    """
    snapshot = _snapshots.pop(request, None) if not keep else _snapshots.get(request)
    if snapshot is None:
        snapshot = SimpleRequest.from_request(request)
        if keep:
            _snapshots[request] = snapshot
    return snapshot


def dispatch_batch(
    task: Task,
    requests: list[Request],
    pool: BasePool | None = None,
    *,
    hostname: str | None = None,
) -> Any:
    """Run ``requests`` as one batch of ``task`` in ``pool``.

    ``pool`` defaults to the one the worker is flushing into (see
    :func:`flushing_into`). Requests whose arguments cannot be sent to a
    pool process are failed and rejected on their own; the rest run.

    Returns:
        What ``pool.apply_async`` returned, or ``None`` if nothing was left
        to run.

    Raises:
        RuntimeError: outside a worker's flush: there is no pool to run in.
    """
    if pool is None:
        pool = _flush_pool.get()
        if pool is None:
            raise RuntimeError(f"{task.name}.flush() is only available in a worker")
    in_processes = uses_processes(pool)
    runnable: list[Request] = []
    simple: list[SimpleRequest] = []
    for request in requests:
        snapshot = snapshot_of(request, keep=False)
        if in_processes:
            error = _unpicklable(request, snapshot)
            if error is not None:
                _fail_unpicklable(task, request, error)
                continue
        runnable.append(request)
        simple.append(snapshot)
    if not runnable:
        return None
    try:
        return _apply(task, pool, runnable, simple, in_processes, hostname)
    except _PICKLING_ERRORS as exc:
        if not in_processes:
            raise
        return _apply_without_unpicklable(task, pool, runnable, simple, exc, hostname)


def _apply_without_unpicklable(
    task: Task,
    pool: BasePool,
    runnable: list[Request],
    simple: list[SimpleRequest],
    failure: BaseException,
    hostname: str | None,
) -> Any:
    """Send the batch again without the calls that do not pickle.

    One call's arguments did not pickle after all: JSON-decoded values
    nested deeper than pickle's recursion limit do that. It fails alone and
    the rest run, as a plain task would have failed alone.
    """
    keep = []
    for request, snapshot in zip(runnable, simple):
        error = _pickling_error(snapshot)
        if error is None:
            keep.append((request, snapshot))
        else:
            _fail_unpicklable(task, request, error)
    if not keep:
        return None
    if len(keep) == len(runnable):
        raise failure  # no one call's fault: the caller fails the batch
    return _apply(
        task,
        pool,
        [request for request, _ in keep],
        [snapshot for _, snapshot in keep],
        True,
        hostname,
    )


#: What pickling a batch for a pool process raises when one call's
#: arguments cannot be pickled.
_PICKLING_ERRORS = (pickle.PicklingError, RecursionError, TypeError, AttributeError)


def _apply(
    task: Task,
    pool: BasePool,
    runnable: list[Request],
    simple: list[SimpleRequest],
    in_processes: bool,
    hostname: str | None,
) -> Any:
    job = BatchJob(task.name, runnable, bool(task.acks_late))
    target = execute_batch if in_processes else _execute_in_process
    handed = pool.apply_async(
        target,
        args=(task.name if in_processes else task, simple, hostname),
        accept_callback=job.on_accepted,
        timeout_callback=job.on_timeout,
        callback=job.on_success,
        error_callback=job.on_failure,
        soft_timeout=task.soft_time_limit,
        timeout=task.time_limit,
        correlation_id=runnable[0].id,
    )
    _took(runnable)
    return handed


def _pickling_error(snapshot: SimpleRequest) -> Exception | None:
    try:
        pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
    except _PICKLING_ERRORS as exc:
        return exc
    return None


def _fail_unpicklable(task: Task, request: Request, error: Exception) -> None:
    fail_request(
        task,
        request,
        InvalidTaskError(
            f"arguments of {request.name}[{request.id}] cannot be "
            f"sent to the pool: {error!r}"
        ),
    )
    _took([request])


def _execute_in_process(
    task: Task, requests: list[SimpleRequest], hostname: str | None = None
) -> list[Outcome]:
    return run_batch(task, requests, hostname=hostname)[1]


def fail_request(task: Task, request: Request, exc: BaseException) -> None:
    """Store ``exc`` as the failure of ``request`` and reject its message.

    For a request that can no longer run: FAILURE is stored (an
    :exc:`~celery.exceptions.InvalidTaskError` naming the cause) and the
    message is rejected without requeue, so the broker does not deliver it
    again.
    """
    error = (
        exc
        if isinstance(exc, InvalidTaskError)
        else InvalidTaskError(
            f"{request.name}[{request.id}] cannot run in a batch: {exc!r}"
        )
    )
    logger.error("Rejecting %s[%s]: %s", request.name, request.id, error)
    try:
        task.backend.mark_as_failure(
            request.id,
            error,
            request=request_context_or_none(request),
            store_result=True,
        )
    # The result backend is the user's server: failing to store there must
    # not keep the message from being rejected below.
    except Exception:
        logger.error(
            "Cannot store the failure of %s[%s]",
            request.name,
            request.id,
            exc_info=True,
        )
    task_ready(request)
    request.reject(requeue=False)
