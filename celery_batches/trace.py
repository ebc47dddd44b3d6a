"""Running one batch inside the pool: signals, states and stored results."""

from __future__ import annotations

import pickle
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery import current_app, signals, states
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.log import get_logger
from celery.utils.nodenames import gethostname
from celery.utils.saferepr import saferepr
from celery.utils.serialization import (
    get_pickleable_etype,
    get_pickleable_exception,
)
from kombu.utils.uuid import uuid

from ._compat import current_task_stack
from .errors import ResultShapeError
from .results import active_writer, writing_results

if TYPE_CHECKING:
    from celery.app.task import Task

    from .request import SimpleRequest

__all__ = [
    "Outcome",
    "exception_info",
    "execute_batch",
    "retry_unsettled",
    "run_batch",
    "running_batch",
    "settle_failure",
    "settle_success",
    "unwrap_exception",
]

logger = get_logger(__name__)

#: What the pool hands back to the worker for one request:
#: ``(failed, retval, runtime)``, the shape Celery's own tracer returns, so the
#: worker-side :class:`~celery.worker.request.Request` handlers apply as they are.
Outcome = tuple[int, Any, float]


def _push_context(task: Task, request: SimpleRequest) -> None:
    task.request_stack.push(request.context)


def settle_success(task: Task, request: SimpleRequest, result: Any) -> None:
    """Store ``result`` for ``request`` with a plain task's side effects.

    If the result cannot be stored (the result serializer refuses it, a
    ``link`` callback or the next step of a chain cannot be sent), the
    request fails with that error instead, as a plain task does, and the
    other requests of the batch are not affected.
    """
    if request._refuses("a new result"):
        return
    try:
        _send_callbacks_and_store(task, request, result)
    # The user's value, signatures and result backend are all involved
    # here: whatever fails, this request (and only it) is stored as failed.
    except Exception as exc:
        logger.error(
            "Cannot store the result of %s[%s]: %r; it fails instead",
            request.name,
            request.id,
            exc,
        )
        settle_failure(task, request, exc)
        return
    request._outcome = (states.SUCCESS, result)
    if signals.task_success.receivers:
        _push_context(task, request)
        try:
            signals.task_success.send(sender=task, result=result)
        finally:
            task.request_stack.pop()


def _send_callbacks_and_store(task: Task, request: SimpleRequest, result: Any) -> None:
    ctx = request.context
    app = task.app
    # Celery's tracer sends callbacks and the next chain step before it
    # stores the result; keep that order so a reader of the result never
    # sees SUCCESS before the chain moved on.
    callbacks = ctx.callbacks
    if callbacks:
        for callback in callbacks:
            app.signature(callback).apply_async(
                (result,), parent_id=request.id, root_id=ctx.root_id
            )
    chain = ctx.chain
    if chain:
        next_step = app.signature(chain[-1])
        next_step.apply_async(
            (result,), chain=chain[:-1], parent_id=request.id, root_id=ctx.root_id
        )
    writer = active_writer()
    if writer is not None and writer.accepts(request):
        # Encodes now, so a value the serializer refuses fails here, for
        # this request, not when the batch's results are written.
        writer.add(request, result)
    else:
        task.backend.mark_as_done(
            request.id, result, request=ctx, store_result=not request.ignore_result
        )


def settle_failure(
    task: Task,
    request: SimpleRequest,
    exc: BaseException,
    traceback: str | None = None,
    einfo: ExceptionInfo | None = None,
) -> None:
    """Store ``exc`` as the failure of ``request`` and fire ``task_failure``."""
    if request._refuses("a failure"):
        return
    if einfo is None:
        einfo = exception_info(exc)
    if traceback is None:
        traceback = einfo.traceback
    ctx = request.context
    try:
        task.backend.mark_as_failure(
            request.id,
            exc,
            traceback,
            request=ctx,
            store_result=task.store_errors_even_if_ignored or not request.ignore_result,
        )
    # The result backend (or an errback it sends) failed: the outcome is a
    # failure all the same, and the worker settles the message by it.
    except Exception:
        logger.error(
            "Cannot store the failure of %s[%s]",
            request.name,
            request.id,
            exc_info=True,
        )
    request._outcome = (states.FAILURE, einfo)
    if signals.task_failure.receivers:
        _push_context(task, request)
        try:
            signals.task_failure.send(
                sender=task,
                task_id=request.id,
                exception=exc,
                args=request.args,
                kwargs=request.kwargs,
                traceback=einfo.tb,
                einfo=einfo,
            )
        finally:
            task.request_stack.pop()


def exception_info(exc: BaseException) -> ExceptionInfo:
    """Return an :class:`ExceptionInfo` for ``exc``, raised or not."""
    if exc.__traceback__ is None:
        try:
            raise exc
        except BaseException:
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


def _distribute(
    task: Task, requests: list[SimpleRequest], retval: Any
) -> ResultShapeError | None:
    """Store one value per request from the body's return value.

    Returns:
        A :exc:`~celery_batches.errors.ResultShapeError` if ``retval`` is
        not one value per unsettled request (nothing is stored then), else
        ``None``.
    """
    if all(request._outcome is not None for request in requests):
        # The body settled every call itself: its return value is not a
        # result of any of them, whatever it is.
        return None
    if isinstance(retval, Mapping):
        known = {r.id for r in requests}
        unknown = [key for key in retval if key not in known]
        if unknown:
            return ResultShapeError(
                f"{task.name} returned results for unknown request ids "
                f"{unknown[:5]!r}; per_request_results expects a mapping of "
                "request.id to value, or a sequence of one value per request"
            )
        missing = [r for r in requests if r.id not in retval]
        if missing:
            error = KeyError(
                f"{task.name} returned no result for request {missing[0].id!r}"
                f" ({len(missing)} of {len(requests)} missing)"
            )
            for request in missing:
                if request._outcome is None:
                    settle_failure(task, request, error)
        pairs = [(r, retval[r.id]) for r in requests if r.id in retval]
    elif isinstance(retval, Sequence) and not isinstance(
        retval, (str, bytes, bytearray)
    ):
        if len(retval) != len(requests):
            return ResultShapeError(
                f"{task.name} returned {len(retval)} results for a batch of "
                f"{len(requests)} requests; per_request_results "
                "expects one value per request, in order, or a mapping of "
                "request.id to value"
            )
        pairs = list(zip(requests, retval))
    else:
        return ResultShapeError(
            f"{task.name} returned {type(retval).__name__}; per_request_results "
            "expects a sequence of one value per request, in order, or a "
            "mapping of request.id to value"
        )
    for request, value in pairs:
        if request._outcome is not None:
            continue
        if isinstance(value, (Reject, Ignore)):
            _settle_predicate(request, value)
        elif isinstance(value, BaseException):
            settle_failure(task, request, value)
        else:
            settle_success(task, request, value)
    return None


def _settle_predicate(request: SimpleRequest, exc: Reject | Ignore) -> None:
    """Leave ``request`` to the worker's own handling of ``Reject``/``Ignore``.

    Nothing is stored here: as for a plain task, the worker rejects (or
    requeues) or acks the message, and stores what its Celery version
    stores for it.
    """
    state = states.REJECTED if isinstance(exc, Reject) else states.IGNORED
    request._outcome = (state, exc)


def _fail_unsettled(
    task: Task, requests: list[SimpleRequest], exc: BaseException
) -> None:
    einfo = exception_info(exc)
    for request in requests:
        if request._outcome is None:
            settle_failure(task, request, exc, einfo=einfo)


def retry_unsettled(
    task: Task,
    requests: list[SimpleRequest],
    exc: BaseException | None,
    options: dict[str, Any] | None = None,
) -> None:
    """Send every request of ``requests`` the body left unsettled again.

    ``options`` are the ``countdown``, ``eta`` and ``max_retries`` of the
    retry (default: the task's ``retry_kwargs``).
    """
    if options is None:
        options = dict(getattr(task, "retry_kwargs", None) or {})
    # SimpleRequest.retry takes when and how often; other retry options of
    # Celery (queue, priority, ...) keep the request's own routing.
    when = {k: options[k] for k in ("countdown", "eta", "max_retries") if k in options}
    for request in requests:
        if request._outcome is None:
            request.retry(exc=exc, **when)


def running_batch(task: Task) -> list[SimpleRequest]:
    """Return the requests of the batch ``task`` runs in this thread, if any."""
    args = task.request.args
    if args and isinstance(args[0], list):
        return args[0]
    return []


def _wants_autoretry(task: Task, exc: BaseException) -> bool:
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    if not autoretry_for or not isinstance(exc, autoretry_for):
        return False
    dont = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    return not (dont and isinstance(exc, dont))


def run_batch(
    task: Task,
    requests: list[SimpleRequest],
    *,
    eager: bool = False,
    hostname: str | None = None,
) -> tuple[Any, list[Outcome]]:
    """Run the body of ``task`` once for ``requests`` and settle every request.

    Returns:
        The body's return value (``None`` if it raised) and one
        :data:`Outcome` per request, in order.
    """
    batch_id = uuid()
    for request in requests:
        request._task = task
    body = (
        task.__call__
        if _has_custom_call(task)
        else getattr(task, "_orig_run", task.run)
    )
    args = [requests]
    task.push_request(
        id=batch_id,
        args=args,
        kwargs={},
        hostname=hostname or gethostname(),
        called_directly=False,
        is_eager=eager,
        delivery_info={"is_eager": eager},
    )
    push_task, pop_task = current_task_stack()
    push_task(task)
    start = time.monotonic()
    runtime = 0.0
    try:
        # Results collected for one round trip are stored when this block
        # ends, before the batch counts as done: with acks_late, before its
        # messages are acked.
        with writing_results(task.backend):
            if signals.task_prerun.receivers:
                signals.task_prerun.send(
                    sender=task, task_id=batch_id, task=task, args=args, kwargs={}
                )
            try:
                retval, failed_exc = _call_body(task, body, requests)
            # Settling the batch failed in our code (or Celery's), not in the
            # body: say so loudly, fail what is still unsettled, and hand the
            # worker one outcome per request as usual. Escaping here would
            # fail every call of the batch, settled or not, a second time.
            except Exception as exc:
                logger.critical(
                    "celery_batches: internal error settling a batch of %d %s "
                    "requests; the unsettled ones fail",
                    len(requests),
                    task.name,
                    exc_info=True,
                )
                _fail_unsettled(task, requests, exc)
                retval, failed_exc = None, exc
            runtime = time.monotonic() - start
        if signals.task_postrun.receivers:
            signals.task_postrun.send(
                sender=task,
                task_id=batch_id,
                task=task,
                args=args,
                kwargs={},
                retval=failed_exc if failed_exc is not None else retval,
                state=_batch_state(task, failed_exc),
            )
    finally:
        pop_task()
        task.pop_request()
    return retval, [_outcome(r, runtime) for r in requests]


def _call_body(
    task: Task, body: Any, requests: list[SimpleRequest]
) -> tuple[Any, BaseException | None]:
    """Call the batch body; settle what it leaves unsettled if it raises."""
    # A list of its own: a body may sort or empty what it is given. Its
    # return value pairs with that list as the body left it, while the
    # outcomes go back to the worker in the order of its messages.
    batch = list(requests)
    try:
        retval = body(batch)
    except (Reject, Ignore) as exc:
        # As Celery's tracer does for a plain task: nothing is stored in
        # the pool; the worker rejects, requeues or acks each message.
        if isinstance(exc, Reject):
            logger.warning(
                "Batch of %d %s requests rejected: %r", len(requests), task.name, exc
            )
        else:
            logger.info("Batch of %d %s requests ignored", len(requests), task.name)
        for request in requests:
            if request._outcome is None:
                _settle_predicate(request, exc)
        return None, exc
    # The user's batch body runs here: whatever it raises settles every
    # request it left unsettled (failure, or retry for autoretry_for), and
    # the worker goes on with the next batch.
    except Exception as exc:
        if isinstance(exc, Retry):
            # The reason given to self.retry(exc=...), if any: past
            # max_retries a call fails with it, else with
            # MaxRetriesExceededError, as Celery's Task.retry does.
            options = getattr(exc, "batch_retry_options", None)
            retry_unsettled(task, requests, exc.exc, options)
        elif _wants_autoretry(task, exc):
            retry_unsettled(task, requests, exc)
        else:
            logger.error(
                "Batch of %d %s requests raised %r",
                len(requests),
                task.name,
                exc,
                exc_info=True,
            )
            _fail_unsettled(task, requests, exc)
        return None, exc
    if getattr(task, "per_request_results", False):
        error = _distribute(task, batch, retval)
        if error is None:
            taken_out = [r for r in requests if r._outcome is None]
            if taken_out:
                error = ResultShapeError(
                    f"{task.name} returned no value for {len(taken_out)} "
                    "requests it took out of its list"
                )
        if error is not None:
            logger.error("%s", error)
            _fail_unsettled(task, requests, error)
            return retval, error
    if signals.task_success.receivers:
        signals.task_success.send(sender=task, result=retval)
    return retval, None


def _batch_state(task: Task, exc: BaseException | None) -> str:
    if exc is None:
        return str(states.SUCCESS)
    if isinstance(exc, Reject):
        return str(states.REJECTED)
    if isinstance(exc, Ignore):
        return str(states.IGNORED)
    if isinstance(exc, Retry) or _wants_autoretry(task, exc):
        return str(states.RETRY)
    return str(states.FAILURE)


def _outcome(request: SimpleRequest, runtime: float) -> Outcome:
    settled = request._outcome
    if settled is None:
        return (0, None, runtime)
    state, value = settled
    if state == states.SUCCESS:
        return (0, saferepr(value), runtime)
    if state == states.RETRY:
        retry = Retry(exc=get_pickleable_exception(value))
        return (1, _pickleable(exception_info(retry)), runtime)
    if state in (states.REJECTED, states.IGNORED):
        # Internal, as Celery's tracer marks them: the worker handles the
        # predicate itself and logs no failure for it.
        return (1, _predicate_info(value), runtime)
    return (1, _pickleable(value), runtime)


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
    except Exception:
        return False
    return True


def _has_custom_call(task: Task) -> bool:
    from celery.app.task import Task as BaseTask

    return type(task).__call__ is not BaseTask.__call__


def execute_batch(
    task_name: str, requests: list[SimpleRequest], hostname: str | None = None
) -> list[Outcome]:
    """Pool entry point: run the batch task ``task_name`` for ``requests``.

    Module level so that the prefork pool can pickle a reference to it.
    """
    task = current_app.tasks[task_name]
    return run_batch(task, requests, hostname=hostname)[1]
