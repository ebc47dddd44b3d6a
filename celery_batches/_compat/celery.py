"""Celery's private names the package relies on, each with what is known of it.

Every access to something Celery does not document lives here, so that a
reader can see all of them at once, and a Celery release that changes one
fails its canary test (``tests/unit/test_compat.py``) instead of failing
quietly. See the table in :mod:`celery_batches._compat`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from celery._state import _task_stack
from celery.worker import state as worker_state

if TYPE_CHECKING:
    from celery.app.task import Context
    from celery.worker.request import Request

__all__ = [
    "MessageCall",
    "acks_plainly",
    "current_task_stack",
    "message_options",
    "needs_revoke_check",
    "per_consumer_qos",
    "recording_task_messages",
    "request_context",
    "request_context_or_none",
]


def request_context(request: Request) -> dict[str, Any]:
    """Return the request dict with callbacks, errbacks, chain and chord.

    The message's embedded options ride in the decoded body; Celery's own
    ``execute_using_pool`` folds them into the request dict the same way.
    ``Request._payload`` is private but present from 5.2 to 5.7; this runs
    once per message, and building Celery's ``Request._context`` instead
    would cost a throw-away ``Context`` each time.
    """
    request_dict: dict[str, Any] = request.request_dict
    options = message_options(request)
    if options:
        request_dict.update(options)
    return request_dict


def message_options(request: Request) -> Any:
    """Return the options part of ``request``'s body (callbacks, chain, ...).

    ``Request._payload`` is private but present from 5.2 to 5.7 (the
    decoded ``(args, kwargs, options)``); it is read once per message.
    """
    return request._payload[2]


def request_context_or_none(request: Request) -> Context | None:
    """Return Celery's ``Request._context`` of ``request``, or ``None``.

    ``None`` when the message's options part cannot be read (a poison
    message being failed): the failure is then stored without the
    request's extra fields, but stored.
    """
    try:
        context: Context = request._context
        return context
    except (TypeError, ValueError, AttributeError):
        return None


#: Stamps revoked with ``revoke_by_stamped_headers`` (Celery 5.3+; Celery 5.2
#: has no such revoke, so an empty mapping stands in for it).
_revoked_stamps: dict[str, Any] = getattr(worker_state, "revoked_stamps", {})


def needs_revoke_check() -> bool:
    """Return ``True`` if some stamp is revoked, so each request must be asked.

    Celery's strategy asks ``Request.revoked()`` only for a request with
    ``expires`` or a revoked id, since a revoke by stamped header needs a
    look at every request's stamps. A waiting batch call gets that look
    when it is flushed, as a plain task gets it before it runs, but only
    while a stamp is revoked: the common case stays one dict lookup.
    """
    return bool(_revoked_stamps)


def current_task_stack() -> tuple[Callable[[Any], None], Callable[[], Any]]:
    """Return ``push`` and ``pop`` of the stack behind ``current_task``.

    ``celery._state._task_stack`` is private but unchanged from 5.2 to 5.7;
    Celery's tracer pushes the running task onto it, and so do we.
    """
    return _task_stack.push, _task_stack.pop


def per_consumer_qos(consumer: Any) -> bool:
    """Return ``True`` if a new prefetch count will not reach the task consumer.

    That is when Celery consumes from RabbitMQ with per-consumer QoS: Celery
    5.5+ switches to it when ``worker_detect_quorum_queues`` finds a quorum
    queue among the worker's queues (RabbitMQ refuses the channel-wide,
    "global" QoS on quorum queues). A ``basic.qos`` sent after
    ``basic.consume`` then only applies to consumers started later, so the
    window of the running consumer is fixed when it starts. This repeats the
    test ``Tasks.qos_global`` makes (Celery 5.5-5.7) without its log line;
    Celery 5.2-5.4 know no quorum queues and always use global QoS on
    RabbitMQ 3.3+. Transports other than AMQP apply a new count at once.
    """
    connection = getattr(consumer, "connection", None)
    if connection is None or connection.transport.driver_type != "amqp":
        return False
    if connection.qos_semantics_matches_spec:
        # A broker with the spec's semantics (not RabbitMQ 3.3+): Celery's
        # non-global basic.qos is per channel there, and applies at once.
        return False
    app = consumer.app
    # Unknown (None) on Celery < 5.5, which has no such setting.
    if not app.conf.get("worker_detect_quorum_queues"):
        return False
    from celery.utils.quorum_queues import detect_quorum_queues

    return bool(detect_quorum_queues(app, "amqp")[0])


def acks_plainly(request: Request) -> bool:
    """Return ``True`` if acking ``request`` is only acking its message.

    Celery 5.3+ chains a prefetch-count restore onto the ack (and reject)
    promise of a message received after a reconnect, while its prefetch
    count is reduced (``Consumer._restore_prefetch_count_after_connection_restart``);
    such a request must keep Celery's own ack, or the count never comes
    back. A vine promise shows a chained callback in ``_svpending`` /
    ``_lvpending`` (private, vine 5.0-5.1). Fails safe: if vine changes,
    the request keeps Celery's own ack.
    """
    on_ack: Any = request._on_ack
    try:
        return on_ack._svpending is None and not on_ack._lvpending
    except AttributeError:
        return False


class MessageCall(NamedTuple):
    """One call ``send_task`` made to ``app.amqp``, as it was made."""

    #: ``"create_task_message"`` or ``"send_task_message"``.
    what: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_recording: ContextVar[list[MessageCall] | None] = ContextVar(
    "celery_batches_recording", default=None
)
_install_lock = threading.Lock()
_RECORDED = ("create_task_message", "send_task_message")


def _recorder(what: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def record(*args: Any, **kwargs: Any) -> Any:
        calls = _recording.get()
        if calls is not None:
            calls.append(MessageCall(what, args, dict(kwargs)))
        return original(*args, **kwargs)

    record.__wrapped__ = original  # type: ignore[attr-defined]
    record._celery_batches_recorder = True  # type: ignore[attr-defined]
    return record


@contextmanager
def recording_task_messages(amqp: Any) -> Iterator[list[MessageCall]]:
    """Record, in this context only, what ``send_task`` asks of ``amqp``.

    ``Celery.send_task`` (5.2-5.7) builds a message with
    ``amqp.create_task_message(task_id, name, args, kwargs, ...)`` and hands
    it to ``amqp.send_task_message(producer, name, message, **options)``;
    both are public attributes of Celery's ``AMQP``, cached per app. Each is
    wrapped once, in place, by a function that records its arguments while
    a context of this function runs (a ``ContextVar``: other threads and
    tasks are not recorded) and otherwise only calls through. Yields the
    list the calls are appended to; the wrapped originals stay reachable as
    ``amqp.<name>.__wrapped__``. Fails safe: if Celery stops making these
    calls, nothing is recorded and the caller sees an empty list.
    """
    with _install_lock:
        for name in _RECORDED:
            current = getattr(amqp, name)
            if not getattr(current, "_celery_batches_recorder", False):
                # kombu's cached_property stores what is set in the
                # instance's cache, where the next lookup finds it.
                setattr(amqp, name, _recorder(name, current))
    calls: list[MessageCall] = []
    token = _recording.set(calls)
    try:
        yield calls
    finally:
        _recording.reset(token)
