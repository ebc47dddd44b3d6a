"""Running a batch task's body in this process, for ``apply()`` and tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import states
from celery.result import EagerResult
from celery.utils.functional import maybe_list
from celery.utils.nodenames import gethostname

from .outcome import unwrap_exception
from .request import SimpleRequest

if TYPE_CHECKING:
    from celery.app.task import Task

__all__ = ["eager_request", "eager_result"]


def eager_request(
    task: Task,
    task_id: str,
    args: tuple[Any, ...] | list[Any] | None,
    kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> SimpleRequest:
    """Build the request of an eager call of ``task``."""
    args = list(args or ())
    kwargs = dict(kwargs or {})
    hostname = gethostname()
    delivery_info = {
        "is_eager": True,
        "exchange": options.get("exchange"),
        "routing_key": options.get("routing_key"),
        "priority": options.get("priority"),
    }
    ignore_result = bool(options.get("ignore_result", task.ignore_result))
    request_dict = {
        "id": task_id,
        "task": task.name,
        "args": args,
        "kwargs": kwargs,
        "is_eager": True,
        "delivery_info": delivery_info,
        "hostname": hostname,
        "ignore_result": ignore_result,
        "retries": options.get("retries", 0),
        "callbacks": maybe_list(options.get("link")),
        "errbacks": maybe_list(options.get("link_error")),
        "root_id": task_id,
    }
    return SimpleRequest(
        task_id,
        task.name,
        args,
        kwargs,
        delivery_info,
        hostname,
        ignore_result,
        None,
        None,
        request_dict,
    )


def eager_result(request: SimpleRequest, retval: Any, *, throw: bool) -> EagerResult:
    """Turn a settled (or unsettled) eager request into an EagerResult."""
    outcome = request._settlement
    if outcome is None:
        return EagerResult(request.id, retval, states.SUCCESS)
    state, value = outcome
    retry = request._eager_retry
    if state == states.RETRY and retry is not None:
        # As Celery's Task.apply: the retry runs now, in this process, and
        # its outcome is the call's.
        result: EagerResult = retry.apply(throw=throw)
        return result
    if state == states.FAILURE:
        exc = value.exception
        exc = unwrap_exception(exc)
        if throw:
            raise exc
        return EagerResult(request.id, exc, state, traceback=value.traceback)
    return EagerResult(request.id, value, state)
