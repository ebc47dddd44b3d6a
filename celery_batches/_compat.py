"""Every switch on the Celery version, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from celery._state import _task_stack
from celery.utils.log import get_logger
from celery.worker import state as worker_state

if TYPE_CHECKING:
    from celery.app.task import Context
    from celery.worker.request import Request

__all__ = [
    "cancel_timer_entry",
    "current_task_stack",
    "message_options",
    "narrow_prefetch",
    "needs_revoke_check",
    "per_consumer_qos",
    "request_context",
    "request_context_or_none",
    "survive_collected_redis_transport",
    "wake_hub_with_pending_callbacks",
]

logger = get_logger(__name__)

UNRESTORED = (
    "Lost the Redis connection with %d unacked messages: they stay in the "
    "transport's unacked index and are delivered again after the "
    "visibility_timeout"
)


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


def wake_hub_with_pending_callbacks(
    hub: Any, qos_of: Callable[[], Any]
) -> Callable[[], None] | None:
    """Return a tick callback that keeps ``hub`` from sleeping on ready work.

    kombu 5.7's event loop runs its ready callbacks, then computes the poll
    timeout from its timers only: a callback that re-schedules itself with
    ``call_soon`` meanwhile (the AMQP reader does, once per frame, while
    py-amqp still holds frames in memory) waits for the next timer, up to a
    whole ``flush_interval`` with a solo pool on RabbitMQ. The same holds
    for a prefetch window we widened: Celery sends it to the broker between
    two turns of the loop, so the loop must not sleep first. The tick runs
    just before the poll; waking the hub's own waker makes the poll return
    at once. Older kombu has no waker and runs ticks before the ready
    callbacks, so there is nothing to do (``None``).

    Arguments:
        hub: the worker's event loop.
        qos_of: returns the consumer's current prefetch window (it is
            replaced on every reconnect).
    """
    # kombu 5.5 already has _pop_ready and _ready_lock but no waker yet.
    if not all(hasattr(hub, name) for name in ("_pop_ready", "_ready", "_waker")):
        return None

    def tick() -> None:
        waker = getattr(hub, "_waker", None)
        if waker is None:
            return
        qos = qos_of()
        if hub._ready or (qos is not None and qos.prev != qos.value):
            waker.wake()

    return tick


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


def cancel_timer_entry(timer: Any, entry: Any) -> None:
    """Cancel ``entry``, which ``timer.call_at``/``call_repeatedly`` returned.

    The gevent and eventlet pools' timers return a greenlet whose
    ``entry`` is Kombu's timer entry, and cancel by killing that greenlet.
    Killed from inside itself (the flush timer cancels itself when its
    flush empties the buffer), gevent's greenlet dies on the spot, halfway
    through the flush: the batches drained so far were never run nor acked.
    A repeating entry also moves to a new greenlet each time it fires, so
    killing the first one does not stop it. Marking Kombu's entry cancelled
    stops the repeats on every pool; the greenlet is killed only when it is
    not the one running. (Celery 5.2-5.7 use these timers for gevent and
    eventlet.)
    """
    inner = getattr(entry, "entry", None)
    if inner is None:
        timer.cancel(entry)
        return
    inner.cancel()
    from greenlet import getcurrent  # gevent and eventlet both run on it

    if entry is not getcurrent():
        timer.cancel(entry)


def narrow_prefetch(qos: Any, n: int, floor: int) -> None:
    """Take ``n`` off the prefetch window ``qos``, but not below ``floor``.

    ``QoS.decrement_eventually`` stops at 1. Celery 5.7 sets the window
    itself while it restores the prefetch count after a reconnect, which
    can drop a widening we made; taking ``n`` off afterwards would then
    leave the worker fetching one message at a time. ``floor`` is the
    consumer's own window, so the window never ends below it.
    """
    with qos._mutex:
        if qos.value:
            qos.value = max(qos.value - n, floor, 1)


def survive_collected_redis_transport(channel: Any) -> None:
    """Keep closing ``channel`` after a lost Redis connection from ending the worker.

    Celery 5.7's consumer, on a lost connection, first collects the
    connection (which drops the transport's client settings) and then
    closes it. Closing a Redis channel gives its unacked messages back to
    the queue, and building the client for that reads the dropped settings:
    ``AttributeError``, which ends the worker (with plain tasks too, when
    any are prefetched). A batch task nearly always has unacked messages in
    its buffer, so for its channel that error is taken for what it means,
    the server cannot be reached: the messages stay in Redis's unacked
    index, from where the transport delivers them again after its
    ``visibility_timeout``, as it would after a crash.
    """
    try:
        from kombu.transport.redis import Channel as RedisChannel
    except ImportError:  # pragma: no cover - kombu always has it
        return
    if not isinstance(channel, RedisChannel):
        return
    qos = channel.qos
    restore = qos.restore_unacked

    def restore_unacked(client: Any = None) -> Any:
        try:
            return restore(client)
        except AttributeError:
            if getattr(channel.connection, "client", None) is not None:
                raise
            delivered = qos._delivered
            logger.warning(UNRESTORED, len(delivered))
            # This channel is gone; forgetting them keeps kombu's own
            # "restored once" check from failing on a second close.
            delivered.clear()
            return None

    qos.restore_unacked = restore_unacked
