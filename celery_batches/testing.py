"""Run a batch task's body on a list of calls, in process, for unit tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from kombu.utils.uuid import uuid

from .eager import eager_request, eager_result
from .trace import run_batch

if TYPE_CHECKING:
    from celery.app.task import Task
    from celery.result import EagerResult

__all__ = ["Call", "apply_batch", "call"]


class Call(NamedTuple):
    """One call of a batch task: positional and keyword arguments, and options."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]


def call(*args: Any, **kwargs: Any) -> Call:
    """Describe one call: ``call(1, 2, x=3)`` is ``task.delay(1, 2, x=3)``."""
    return Call(args, kwargs, {})


def _as_call(item: Call | tuple[Any, ...] | Mapping[str, Any] | Any) -> Call:
    if isinstance(item, Call):
        return item
    if isinstance(item, tuple):
        return Call(item, {}, {})
    if isinstance(item, Mapping):
        return Call((), dict(item), {})
    return Call((item,), {}, {})


def apply_batch(
    task: Task,
    calls: Iterable[Call | tuple[Any, ...] | Mapping[str, Any] | Any],
    *,
    throw: bool = False,
    store: bool | None = None,
) -> list[EagerResult]:
    """Run ``task``'s body once, in this process, with one request per call.

    The batch runs as the worker would run it: signals fire, requests the
    body settles keep their outcome, ``per_request_results`` is honoured, and
    a body that raises fails every request it left unsettled. No worker,
    broker or result backend is needed: as for Celery's eager calls,
    nothing is stored unless ``store`` (default: the app's
    ``task_store_eager_result``) asks for it; then results and failures
    reach the result backend as they would in a worker.

    Arguments:
        task: the batch task.
        calls: one item per call: a :func:`call`, a tuple of positional
            arguments, a mapping of keyword arguments, or a single argument.
        throw: raise the first failed request's exception instead of
            returning its result.
        store: store each call's result, failure or retry in the result
            backend (default: ``task_store_eager_result``, off by default).

    Returns:
        One :class:`~celery.result.EagerResult` per call, in order.
    """
    requests = []
    for item in calls:
        spec = _as_call(item)
        requests.append(
            eager_request(task, uuid(), spec.args, spec.kwargs, spec.options)
        )
    if store is None:
        store = bool(getattr(task, "store_eager_result", False))
    retval, _ = run_batch(task, requests, eager=True, store_results=store)
    return [eager_result(request, retval, throw=throw) for request in requests]
