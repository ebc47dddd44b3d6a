"""Settling the calls of one batch, each once, as a plain task's would be settled."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery import signals, states
from celery.app.trace import (
    LOG_RETRY,
    LOG_SUCCESS,
    get_log_policy,
    task_has_custom,
)
from celery.exceptions import (
    Ignore,
    InvalidTaskError,
    MaxRetriesExceededError,
    Reject,
    Retry,
)
from celery.utils.log import get_logger
from celery.utils.saferepr import saferepr
from celery.utils.serialization import get_pickleable_etype, get_pickleable_exception
from celery.utils.time import get_exponential_backoff_interval
from kombu.utils.encoding import safe_str

from .errors import ResultShapeError
from .request import RetryRequested
from .results import ResultWriter

if TYPE_CHECKING:
    from datetime import datetime

    from celery.app.task import Task

    from .request import SimpleRequest

__all__ = [
    "BatchOutcomes",
    "Outcome",
    "exception_info",
    "unwrap_exception",
]

logger = get_logger(__name__)

#: Each call's outcome is logged here, in the formats and at the levels of
#: Celery's tracer (which logs a plain task's on ``celery.app.trace``), so a
#: call's lines read as a plain task's. A logger of its own: error trackers
#: such as Sentry ignore ``celery.app.trace`` (they catch a plain task's
#: exception where it is raised) but would miss a call failed by its value.
task_logger = get_logger("celery_batches.calls")

#: Task handler methods a Batches subclass may override, run per call.
HANDLERS = ("on_success", "on_failure", "on_retry", "after_return")

#: What the pool hands back to the worker for one request:
#: ``(failed, retval, runtime)``, the shape Celery's own tracer returns, so the
#: worker-side :class:`~celery.worker.request.Request` handlers apply as they are.
Outcome = tuple[int, Any, float]


class BatchOutcomes:
    """The outcome of each call of one batch, and where it is stored.

    Every result, failure, retry, ``Reject`` and ``Ignore`` of a call goes
    through here, once: a second outcome for a call is refused with a
    warning, so the first one stands. While the batch runs, the SUCCESS
    results of a Redis backend are collected and written together when
    :meth:`store` is called (one ``MGET`` and one pipeline); everything else,
    and anything settled after :meth:`store`, is stored at once.
    """

    __slots__ = (
        "_handlers",
        "_stored_later",
        "_writer",
        "retry_here",
        "store_results",
        "task",
    )

    def __init__(
        self,
        task: Task,
        *,
        bulk: bool = True,
        store_results: bool = True,
        retry_here: bool = False,
    ) -> None:
        #: The batch task.
        self.task = task
        #: Whether a retry runs in this process once the batch has ended
        #: (``Batches.apply()``, as Celery's ``apply()`` runs an eager
        #: task's retry) instead of being sent to the broker.
        self.retry_here = retry_here
        #: Whether results, failures and retries go to the result backend
        #: (eager calls store them only with ``task_store_eager_result``).
        self.store_results = store_results
        self._writer = (
            ResultWriter.for_backend(task.backend) if bulk and store_results else None
        )
        # Calls settled as SUCCESS whose result the writer holds, with it.
        self._stored_later: list[tuple[SimpleRequest, Any]] = []
        # The handlers the task overrides: only those cost a call.
        self._handlers = {
            name: getattr(task, name)
            for name in HANDLERS
            if task_has_custom(task, name)
        }

    # -- one call ----------------------------------------------------------

    def success(self, request: SimpleRequest, result: Any) -> None:
        """Store ``result`` as the call's result, with a plain task's side effects.

        ``link`` callbacks and the next step of a chain are sent, the result
        stored and ``task_success`` fired. If the result cannot be stored
        (the serializer refuses it) or a callback cannot be sent, the call
        fails with that error instead, as a plain task does, and no other
        call of the batch is affected.
        """
        if request._refuses("a new result"):
            return
        try:
            deferred = self._send_callbacks_and_store(request, result)
        # The user's value, signatures and result backend are all involved
        # here: whatever fails, this call (and only it) is stored as failed.
        except Exception as exc:  # noqa: BLE001
            logger.error(
                "Cannot store the result of %s[%s]: %r; it fails instead",
                request.name,
                request.id,
                exc,
            )
            self.failure(request, exc)
            return
        request._settle(states.SUCCESS, result)
        if deferred:
            # Its result is written with the batch's, in store(): what Celery
            # runs once a task's result is stored (on_success reading it back,
            # say) waits for that.
            self._stored_later.append((request, result))
        else:
            self._succeeded(request, result)

    def _succeeded(self, request: SimpleRequest, result: Any) -> None:
        """Run what follows a stored SUCCESS: handlers and ``task_success``."""
        self._handle(
            request, "on_success", result, request.id, request.args, request.kwargs
        )
        if signals.task_success.receivers:
            with _as_current(self.task, request):
                signals.task_success.send(sender=self.task, result=result)
        self._after_return(request, states.SUCCESS, result)

    def _send_callbacks_and_store(self, request: SimpleRequest, result: Any) -> bool:
        """Send the call's callbacks and store (or collect) its result.

        Returns ``True`` if the result was collected, to be stored by
        :meth:`store`.
        """
        task = self.task
        app = task.app
        # Celery's tracer sends callbacks and the next chain step before it
        # stores the result; keep that order so a reader of the result never
        # sees SUCCESS before the chain moved on.
        callbacks = request._context_value("callbacks")
        chain = request._context_value("chain")
        if callbacks or chain:
            # As Celery's tracer: a call whose message names no root (task
            # protocol 1 carries none) is its own root, not the batch's.
            root_id = request._context_value("root_id") or request.id
            # The call is the current task while they are sent, as a plain
            # task is: they are its children, stored with its result (not
            # the batch's).
            with _as_current(task, request):
                for callback in callbacks or ():
                    app.signature(callback).apply_async(
                        (result,), parent_id=request.id, root_id=root_id
                    )
                if chain:
                    next_step = app.signature(chain[-1])
                    next_step.apply_async(
                        (result,),
                        chain=chain[:-1],
                        parent_id=request.id,
                        root_id=root_id,
                    )
        writer = self._writer
        if writer is not None and writer.accepts(request):
            # Encodes now, so a value the serializer refuses fails here, for
            # this call, not when the batch's results are written.
            writer.add(request, result)
            return True
        task.backend.mark_as_done(
            request.id,
            result,
            request=request.context,
            store_result=self.store_results and not request.ignore_result,
        )
        return False

    def failure(
        self,
        request: SimpleRequest,
        exc: BaseException,
        traceback: str | None = None,
        einfo: ExceptionInfo | None = None,
    ) -> None:
        """Store ``exc`` as the call's failure and fire ``task_failure``."""
        if request._refuses("a failure"):
            return
        task = self.task
        if einfo is None:
            einfo = exception_info(exc)
        if traceback is None:
            traceback = einfo.traceback
        try:
            task.backend.mark_as_failure(
                request.id,
                exc,
                traceback,
                request=request.context,
                store_result=self.store_results
                and (task.store_errors_even_if_ignored or not request.ignore_result),
            )
        # The result backend (or an errback it sends) failed: the outcome is
        # a failure all the same, and the worker settles the message by it.
        except Exception:
            logger.error(
                "Cannot store the failure of %s[%s]",
                request.name,
                request.id,
                exc_info=True,
            )
        request._settle(states.FAILURE, einfo)
        self._log_failure(request, exc, einfo)
        self._handle(
            request, "on_failure", exc, request.id, request.args, request.kwargs, einfo
        )
        if signals.task_failure.receivers:
            with _as_current(task, request):
                signals.task_failure.send(
                    sender=task,
                    task_id=request.id,
                    exception=exc,
                    args=request.args,
                    kwargs=request.kwargs,
                    traceback=einfo.tb,
                    einfo=einfo,
                )
        self._after_return(request, states.FAILURE, exc)

    def retry(
        self,
        request: SimpleRequest,
        *,
        countdown: float | None = None,
        eta: datetime | str | None = None,
        exc: BaseException | str | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Send the call again, with its own id, to run later.

        See :meth:`SimpleRequest.retry <celery_batches.SimpleRequest.retry>`.
        """
        if request._refuses("a retry"):
            return
        task = self.task
        ctx = request.context
        # As Celery's Task.retry: a string is the reason's message, not an
        # exception to store as it is.
        message = exc if isinstance(exc, str) else None
        error = None if isinstance(exc, str) else exc
        try:
            retries = int(ctx.retries or 0)
        except (TypeError, ValueError):
            self.failure(
                request,
                InvalidTaskError(
                    f"{request.name}[{request.id}] cannot be retried: its retries "
                    f"header is {ctx.retries!r:.40}, not a number"
                ),
            )
            return
        limit = task.max_retries if max_retries is None else max_retries
        if limit is not None and retries >= limit:
            self.failure(
                request,
                error
                or MaxRetriesExceededError(
                    message
                    or f"Can't retry {request.name}[{request.id}] "
                    f"args:{request.args} kwargs:{request.kwargs}"
                ),
            )
            return
        if countdown is None and eta is None:
            countdown = _default_delay(task, retries)
        try:
            self._send_again(request, countdown=countdown, eta=eta, retries=retries + 1)
        # The broker refused the retry (or the call's options are corrupt):
        # the call cannot run again, so it fails, as a plain task whose
        # retry cannot be sent fails.
        except Exception as send_error:  # noqa: BLE001
            logger.error(
                "Cannot send the retry of %s[%s]: %r",
                request.name,
                request.id,
                send_error,
            )
            self.failure(request, send_error)
            return
        if error is not None:
            reason: BaseException = error
        elif message is not None:
            reason = RetryRequested(message)
        else:
            reason = RetryRequested.after(countdown, eta)
        if self.store_results and not request.ignore_result:
            try:
                task.backend.mark_as_retry(request.id, reason, request=ctx)
            # The retry is on its way already: failing to record RETRY in the
            # user's result backend must not fail the call a second way.
            except Exception:
                logger.error(
                    "Cannot store RETRY for %s[%s]",
                    request.name,
                    request.id,
                    exc_info=True,
                )
        request._settle(states.RETRY, reason)
        # safe_str: the reason is the user's exception, and its __str__ may
        # raise; the retry is sent already, and how the reason prints must
        # not fail this call, nor the ones of the batch not retried yet.
        shown: str = safe_str(reason)  # type: ignore[no-untyped-call]
        task_logger.info(
            LOG_RETRY.strip(), {"id": request.id, "name": request.name, "exc": shown}
        )
        if "on_retry" in self._handlers:
            self._handle(
                request,
                "on_retry",
                reason,
                request.id,
                request.args,
                request.kwargs,
                exception_info(Retry(exc=reason)),
            )
        if signals.task_retry.receivers:
            signals.task_retry.send(sender=task, request=ctx, reason=reason, einfo=None)

    def _send_again(self, request: SimpleRequest, **options: Any) -> None:
        """Send the call again, with ``options``, or keep it to run here.

        With ``retry_here``, the retry runs in this process once the batch
        has ended (:func:`~celery_batches.eager.eager_result`), as Celery's
        ``apply()`` runs an eager task's retry: never through a broker the
        caller may not have.
        """
        again = self.task.signature_from_request(
            request.context,
            request.args,
            request.kwargs,
            task_id=request.id,
            **options,
        )
        if self.retry_here:
            request._eager_retry = again
        else:
            again.apply_async()

    def predicate(self, request: SimpleRequest, exc: Reject | Ignore) -> None:
        """Leave the call to the worker's own handling of ``Reject``/``Ignore``.

        Nothing is stored here: as for a plain task, the worker rejects (or
        requeues) or acks the message, and stores what its Celery version
        stores for it.
        """
        if request._refuses(type(exc).__name__):
            return
        state = states.REJECTED if isinstance(exc, Reject) else states.IGNORED
        request._settle(state, exc)

    def _handle(self, request: SimpleRequest, name: str, *args: Any) -> None:
        """Run the task's handler ``name`` for ``request``, if overridden."""
        handler = self._handlers.get(name)
        if handler is None:
            return
        try:
            with _as_current(self.task, request):
                handler(*args)
        # The user's handler runs here; as Celery does for on_success, a
        # handler that raises is logged and the call keeps its outcome.
        except Exception:
            logger.exception(
                "Task %s[%s] %s handler raised", request.name, request.id, name
            )

    def _after_return(self, request: SimpleRequest, state: str, retval: Any) -> None:
        # Celery skips after_return for RETRY, REJECTED and IGNORED; so do we.
        self._handle(
            request,
            "after_return",
            state,
            retval,
            request.id,
            request.args,
            request.kwargs,
            None,
        )

    def _log_failure(
        self, request: SimpleRequest, exc: BaseException, einfo: ExceptionInfo
    ) -> None:
        """Log a failed call as Celery logs a failed task (same format and level).

        A body that raised fails each call of its batch with the same
        exception: each call's line has its traceback, as each of as many
        plain tasks would (an error tracker reporting log records, such as
        Sentry's, reports the one exception once).
        """
        policy = get_log_policy(self.task, einfo, exc)
        if not task_logger.isEnabledFor(policy.severity):
            return
        context = {
            "hostname": request.hostname,
            "id": request.id,
            "name": request.name,
            "exc": saferepr(exc),
            "traceback": einfo.traceback,
            "args": _shown(request, "argsrepr", request.args),
            "kwargs": _shown(request, "kwargsrepr", request.kwargs),
            "description": policy.description,
            "internal": einfo.internal,
        }
        task_logger.log(
            policy.severity,
            policy.format.strip(),
            context,
            exc_info=(type(exc), exc, exc.__traceback__) if policy.traceback else None,
            extra={"data": context},
        )

    def log_successes(self, requests: list[SimpleRequest], runtime: float) -> None:
        """Log each call settled as SUCCESS as Celery logs a task that succeeded."""
        if not task_logger.isEnabledFor(logging.INFO):
            return
        maxsize = getattr(self.task, "resultrepr_maxsize", 1024)
        for request in requests:
            settlement = request._settlement
            if settlement is None or settlement[0] != states.SUCCESS:
                continue
            context = {
                "id": request.id,
                "name": request.name,
                "return_value": saferepr(settlement[1], maxsize),
                "runtime": runtime,
                "args": _shown(request, "argsrepr", request.args),
                "kwargs": _shown(request, "kwargsrepr", request.kwargs),
            }
            task_logger.info(LOG_SUCCESS.strip(), context, extra={"data": context})

    # -- the whole batch ---------------------------------------------------

    def distribute(
        self,
        requests: list[SimpleRequest],
        retval: Any,
        *,
        calls: list[SimpleRequest] | None = None,
    ) -> ResultShapeError | None:
        """Settle each call with its value from a ``per_request_results`` body.

        ``requests`` is the body's list as the body left it, which a
        sequence of values pairs with, in order; a mapping pairs by id with
        ``calls``, every call of the batch (default: ``requests``), so what
        the body did to its list does not matter to it.

        Returns:
            A :exc:`~celery_batches.errors.ResultShapeError` if ``retval`` is
            not one value per call (nothing is settled then), else ``None``.
        """
        if calls is not None and isinstance(retval, Mapping):
            requests = calls
        if all(request.settled for request in requests):
            # The body settled every call itself: its return value is not a
            # result of any of them, whatever it is.
            return None
        pairs, error = _pair(self.task.name, requests, retval)
        if error is not None:
            return error
        if isinstance(retval, Mapping):
            missing = [r for r in requests if r.id not in retval and not r.settled]
            if missing:
                gap = KeyError(
                    f"{self.task.name} returned no result for request "
                    f"{missing[0].id!r} ({len(missing)} of {len(requests)} missing)"
                )
                for request in missing:
                    self.failure(request, gap)
        for request, value in pairs:
            if request.settled:
                continue
            if isinstance(value, (Reject, Ignore)):
                self.predicate(request, value)
            elif isinstance(value, BaseException):
                self.failure(request, value)
            else:
                self.success(request, value)
        return None

    def fail_unsettled(self, requests: list[SimpleRequest], exc: BaseException) -> None:
        """Fail every call of ``requests`` not settled yet with ``exc``."""
        einfo = exception_info(exc)
        for request in requests:
            if not request.settled:
                self.failure(request, exc, einfo=einfo)

    def retry_unsettled(
        self,
        requests: list[SimpleRequest],
        exc: BaseException | str | None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Send every call of ``requests`` not settled yet again.

        ``options`` are the ``countdown``, ``eta`` and ``max_retries`` of the
        retry (default: the task's ``retry_kwargs``); Celery's other retry
        options (queue, priority, ...) keep each call's own routing.
        """
        if options is None:
            options = dict(getattr(self.task, "retry_kwargs", None) or {})
        when = {
            key: options[key]
            for key in ("countdown", "eta", "max_retries")
            if key in options
        }
        for request in requests:
            if not request.settled:
                self.retry(request, exc=exc, **when)

    def reject_unsettled(
        self, requests: list[SimpleRequest], exc: Reject | Ignore
    ) -> None:
        """Leave every call not settled yet to the worker's ``Reject``/``Ignore``."""
        for request in requests:
            if not request.settled:
                self.predicate(request, exc)

    def store(self) -> None:
        """Write the results collected for one round trip; later ones go at once.

        Then run what follows each of those calls' SUCCESS (its
        ``on_success`` and ``after_return``, ``task_success``), now that
        its result can be read back.
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.flush()
        stored, self._stored_later = self._stored_later, []
        for request, result in stored:
            self._succeeded(request, result)

    def outcome(self, request: SimpleRequest, runtime: float) -> Outcome:
        """The ``(failed, retval, runtime)`` the worker settles the message by."""
        settlement = request._settlement
        if settlement is None:
            return (0, None, runtime)
        state, value = settlement
        if state == states.SUCCESS:
            # Cut as Celery's tracer cuts it: it crosses the pool's pipe and
            # goes out whole in every task-succeeded event.
            maxsize = getattr(self.task, "resultrepr_maxsize", 1024)
            return (0, saferepr(value, maxsize), runtime)
        if state == states.RETRY:
            retry = Retry(exc=get_pickleable_exception(value))
            return (1, _pickleable(exception_info(retry)), runtime)
        if state in (states.REJECTED, states.IGNORED):
            # Internal, as Celery's tracer marks them: the worker handles the
            # predicate itself and logs no failure for it.
            return (1, _predicate_info(value), runtime)
        return (1, _pickleable(value), runtime)


def _pair(
    name: str, requests: list[SimpleRequest], retval: Any
) -> tuple[list[tuple[SimpleRequest, Any]], ResultShapeError | None]:
    """Pair each request with its value in ``retval``, or say why not."""
    if isinstance(retval, Mapping):
        known = {r.id for r in requests}
        unknown = [key for key in retval if key not in known]
        if unknown:
            return [], ResultShapeError(
                f"{name} returned results for unknown request ids "
                f"{unknown[:5]!r}; per_request_results expects a mapping of "
                "request.id to value, or a sequence of one value per request"
            )
        return [(r, retval[r.id]) for r in requests if r.id in retval], None
    if isinstance(retval, Sequence) and not isinstance(retval, (str, bytes, bytearray)):
        if len(retval) != len(requests):
            return [], ResultShapeError(
                f"{name} returned {len(retval)} results for a batch of "
                f"{len(requests)} requests; per_request_results expects one "
                "value per request, in order, or a mapping of request.id to value"
            )
        return list(zip(requests, retval)), None
    return [], ResultShapeError(
        f"{name} returned {type(retval).__name__}; per_request_results expects "
        "a sequence of one value per request, in order, or a mapping of "
        "request.id to value"
    )


def _shown(request: SimpleRequest, header: str, value: Any) -> str:
    # As Celery's tracer: the argsrepr/kwargsrepr the call was sent with
    # first, which may hide what the arguments hold (Celery's documented way
    # to keep secrets out of logs and error trackers).
    shown = request.request_dict.get(header)
    return shown if isinstance(shown, str) and shown else saferepr(value)


def _default_delay(task: Task, retries: int) -> float:
    # Celery sets the backoff attributes only on tasks that name them; its
    # own defaults are False, 600 and True.
    backoff = getattr(task, "retry_backoff", False)
    if backoff:
        return float(
            get_exponential_backoff_interval(
                factor=int(backoff),
                retries=retries,
                maximum=getattr(task, "retry_backoff_max", 600),
                full_jitter=getattr(task, "retry_jitter", True),
            )
        )
    return float(task.default_retry_delay)


class _as_current:
    """Push the call's context as ``task.request`` while its signal is sent."""

    __slots__ = ("request", "task")

    def __init__(self, task: Task, request: SimpleRequest) -> None:
        self.task = task
        self.request = request

    def __enter__(self) -> None:
        self.task.request_stack.push(self.request.context)

    def __exit__(self, *exc_info: object) -> None:
        self.task.request_stack.pop()


def exception_info(exc: BaseException) -> ExceptionInfo:
    """Return an :class:`ExceptionInfo` for ``exc``, raised or not."""
    if exc.__traceback__ is None:
        # Raised and caught at once, only for the traceback ExceptionInfo
        # reads from sys.exc_info().
        try:
            raise exc
        except BaseException:  # noqa: BLE001
            return ExceptionInfo()
    return ExceptionInfo((type(exc), exc, exc.__traceback__))


def unwrap_exception(exc: BaseException) -> BaseException:
    """Return the user's exception from one billiard wrapped with its traceback."""
    # billiard >= 4.1 wraps ExceptionInfo.exception to carry the traceback
    # across processes; older releases have no wrapper.
    inner = getattr(exc, "exc", None)
    if isinstance(inner, BaseException) and type(exc).__name__ == (
        "ExceptionWithTraceback"
    ):
        return inner
    return exc


def _pickleable(einfo: ExceptionInfo) -> ExceptionInfo:
    # The pool pickles what a job returns; an exception whose arguments do
    # not pickle would otherwise lose the whole batch's outcomes.
    einfo.exception = get_pickleable_exception(einfo.exception)
    einfo.type = get_pickleable_etype(einfo.type)
    return einfo


def _predicate_info(exc: Reject | Ignore) -> ExceptionInfo:
    """An internal ExceptionInfo of ``exc`` that survives the trip to the worker."""
    if isinstance(exc, Reject) and not _pickles(exc):
        exc = Reject(saferepr(exc.reason), requeue=exc.requeue)
    elif isinstance(exc, Ignore) and not _pickles(exc):
        exc = Ignore()
    einfo = exception_info(exc)
    einfo.internal = True
    return einfo


def _pickles(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    # Anything a user's object raises while (un)pickling means "no".
    except Exception:  # noqa: BLE001
        return False
    return True
