"""Linking a batch's span to each call's, where OpenTelemetry is installed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_otel: Any
try:  # an optional integration: nothing to do without OpenTelemetry
    import opentelemetry.propagate
    import opentelemetry.trace

    _otel = opentelemetry
except ImportError:  # pragma: no cover - exercised where it is not installed
    _otel = None

__all__ = ["link_calls", "record_failure"]


def link_calls(calls: Iterable[Any]) -> int:
    """Link the current span to the span each call was sent from; return how many.

    With ``opentelemetry-instrumentation-celery``, the worker's
    ``task_prerun`` starts one span per batch (the batch runs between one
    ``task_prerun`` and one ``task_postrun``). Each call was sent with its
    own trace context in its message headers; a link per call ties the
    batch's span to every trace that fed it. ``calls`` are the batch's
    :class:`~celery_batches.SimpleRequest` objects.
    """
    if _otel is None:
        return 0
    trace, propagate = _otel.trace, _otel.propagate
    span = trace.get_current_span()
    add_link = getattr(span, "add_link", None)  # OpenTelemetry API 1.23+
    if add_link is None or not span.is_recording():
        return 0
    linked = 0
    for call in calls:
        # The message headers are in the call's request dict.
        context = propagate.extract(call.request_dict)
        sent_from = trace.get_current_span(context).get_span_context()
        if sent_from.is_valid:
            add_link(sent_from, {"messaging.message.id": call.id})
            linked += 1
    return linked


def record_failure(exc: BaseException) -> None:
    """Mark the current span (the batch's) failed with ``exc``, if one records.

    The instrumentation marks a task's span failed on ``task_failure`` for
    that task's id; a batch's calls fail under their own ids, so the
    batch's span is marked here, once, when its body raised.
    """
    if _otel is None:
        return
    span = _otel.trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(_otel.trace.Status(_otel.trace.StatusCode.ERROR, repr(exc)))
