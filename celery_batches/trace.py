"""Running one batch inside the pool: its body, its signals, each call's outcome."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from weakref import WeakSet

from celery import current_app, signals, states
from celery.app import trace as celery_trace
from celery.app.trace import task_has_custom
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.log import get_logger
from celery.utils.nodenames import gethostname
from kombu.utils.uuid import uuid

from ._compat import current_task_stack
from .errors import BatchRetry, ResultShapeError
from .outcome import BatchOutcomes, Outcome
from .telemetry import link_calls, record_failure

if TYPE_CHECKING:
    from celery.app.task import Task

    from .request import SimpleRequest

__all__ = ["execute_batch", "retry_running_batch", "run_batch"]

logger = get_logger(__name__)


def run_batch(
    task: Task,
    requests: list[SimpleRequest],
    *,
    eager: bool = False,
    hostname: str | None = None,
    store_results: bool = True,
) -> tuple[Any, list[Outcome]]:
    """Run the body of ``task`` once for ``requests`` and settle every request.

    ``store_results=False`` settles the calls without writing to the result
    backend (eager calls, unless ``task_store_eager_result`` is set).

    Returns:
        The body's return value (``None`` if it raised) and one
        :data:`~celery_batches.outcome.Outcome` per request, in order. Each
        call's runtime is its share of the batch's (the batch's divided by
        its size), so that runtimes summed over calls, as Flower sums
        them, count the batch once.
    """
    batch_id = uuid()
    outcomes = BatchOutcomes(task, store_results=store_results)
    for request in requests:
        request._task = task
        request._outcomes = outcomes
    body = _body_of(task)
    args = [requests]
    task.push_request(
        id=batch_id,
        args=args,
        kwargs={},
        hostname=hostname or gethostname(),
        called_directly=False,
        is_eager=eager,
        delivery_info={"is_eager": eager},
        _batch_outcomes=outcomes,
    )
    push_task, pop_task = current_task_stack()
    push_task(task)
    start = time.monotonic()
    runtime = 0.0
    try:
        if signals.task_prerun.receivers:
            signals.task_prerun.send(
                sender=task, task_id=batch_id, task=task, args=args, kwargs={}
            )
            # The span a tracing integration started for the batch, if any,
            # gets a link to each call's.
            link_calls(requests)
        try:
            retval, failed_exc = _call_body(task, body, requests, outcomes)
        # Settling the batch failed in our code (or Celery's), not in the
        # body: say so loudly, fail what is still unsettled, and hand the
        # worker one outcome per request as usual. Escaping here would fail
        # every call of the batch, settled or not, a second time.
        except Exception as exc:
            logger.critical(
                "celery_batches: internal error settling a batch of %d %s "
                "requests; the unsettled ones fail",
                len(requests),
                task.name,
                exc_info=True,
            )
            outcomes.fail_unsettled(requests, exc)
            retval, failed_exc = None, exc
        # Results collected for one round trip are stored before the batch
        # counts as done: with acks_late, before its messages are acked.
        outcomes.store()
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
    share = runtime / len(requests) if requests else runtime
    outcomes.log_successes(requests, share)
    return retval, [outcomes.outcome(request, share) for request in requests]


def _call_body(
    task: Task, body: Any, requests: list[SimpleRequest], outcomes: BatchOutcomes
) -> tuple[Any, BaseException | None]:
    """Call the batch body; settle what it leaves unsettled."""
    # A list of its own: a body may sort or empty what it is given. Its
    # return value pairs with that list as the body left it, while the
    # outcomes go back to the worker in the order of its messages.
    batch = list(requests)
    try:
        if task_has_custom(task, "before_start"):
            # Once per batch, with the batch's id: its calls start together.
            task.before_start(task.request.id, (requests,), {})
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
        outcomes.reject_unsettled(requests, exc)
        return None, exc
    # The user's batch body runs here: whatever it raises settles every
    # request it left unsettled (failure, or retry for autoretry_for), and
    # the worker goes on with the next batch.
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, Retry):
            # The reason given to self.retry(exc=...), if any: past
            # max_retries a call fails with it, else with
            # MaxRetriesExceededError, as Celery's Task.retry does.
            options = exc.options if isinstance(exc, BatchRetry) else None
            outcomes.retry_unsettled(requests, exc.exc, options)
        elif _wants_autoretry(task, exc):
            outcomes.retry_unsettled(requests, exc)
        else:
            record_failure(exc)
            # Each call's own line carries the traceback (outcome.py).
            logger.warning(
                "Batch of %d %s requests raised %r; the calls it left "
                "unsettled fail with it",
                len(requests),
                task.name,
                exc,
            )
            outcomes.fail_unsettled(requests, exc)
        return None, exc
    if getattr(task, "per_request_results", False):
        error = outcomes.distribute(batch, retval)
        if error is None and not all(request.settled for request in requests):
            error = ResultShapeError(
                f"{task.name} returned no value for "
                f"{sum(not request.settled for request in requests)} requests "
                "it took out of its list"
            )
        if error is not None:
            logger.error("%s", error)
            outcomes.fail_unsettled(requests, error)
            return retval, error
    if signals.task_success.receivers:
        signals.task_success.send(sender=task, result=retval)
    return retval, None


def retry_running_batch(
    task: Task, exc: BaseException | None, options: dict[str, Any]
) -> bool:
    """Send every unsettled call of the batch ``task`` runs here again.

    What ``self.retry(throw=False)`` does in a batch body. Returns ``False``
    if ``task`` runs no batch in this thread.
    """
    outcomes = getattr(task.request, "_batch_outcomes", None)
    args = task.request.args
    if outcomes is None or not args or not isinstance(args[0], list):
        return False
    outcomes.retry_unsettled(args[0], exc, options)
    return True


def _wants_autoretry(task: Task, exc: BaseException) -> bool:
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    if not autoretry_for or not isinstance(exc, autoretry_for):
        return False
    dont = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    return not (dont and isinstance(exc, dont))


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


#: The batch tasks whose tracer was built in this process.
_traced: WeakSet[Task] = WeakSet()


def _body_of(task: Task) -> Any:
    """The batch body of ``task``, as Celery's own tracer would call it.

    Celery's tracer entry point, ``celery.app.trace.build_tracer``, is where
    integrations hook in (sentry-sdk wraps the task's ``run`` there, to
    report what it raises); a prefork pool process never builds a tracer
    for a batch task otherwise, so it is built here once per process. It
    is looked up at call time, so that a patched one is the one called.
    """
    if task not in _traced:
        # Once per task in this process, whatever Celery built before (its
        # consumer may hold the build_tracer of before the integration).
        celery_trace.build_tracer(task.name, task, app=task.app)
        _traced.add(task)
    if task_has_custom(task, "__call__"):
        return task.__call__
    # Celery's autoretry_for wraps run and keeps the body as _orig_run; the
    # batch handles autoretry_for itself, per call.
    return getattr(task, "_orig_run", task.run)


def execute_batch(
    task_name: str, requests: list[SimpleRequest], hostname: str | None = None
) -> list[Outcome]:
    """Pool entry point: run the batch task ``task_name`` for ``requests``.

    Module level so that the prefork pool can pickle a reference to it.
    """
    task = current_app.tasks[task_name]
    return run_batch(task, requests, hostname=hostname)[1]
