"""Kombu's (and py-amqp's) private names the package relies on.

As :mod:`celery_batches._compat.celery`, for the broker side. See the table
in :mod:`celery_batches._compat`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from celery.utils.log import get_logger

__all__ = [
    "amqp_publishes_held",
    "cancel_timer_entry",
    "narrow_prefetch",
    "redis_channel_class",
    "redis_forget_delivered",
    "redis_group_ackable",
    "redis_remove_from_unacked",
    "survive_collected_redis_transport",
    "ticks_after_ready_callbacks",
    "transport_created",
    "wake_hub_with_pending_callbacks",
]

logger = get_logger(__name__)

UNRESTORED = (
    "Lost the Redis connection with %d unacked messages: they stay in the "
    "transport's unacked index and are delivered again after the "
    "visibility_timeout"
)


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


def ticks_after_ready_callbacks(hub: Any) -> Callable[[], None] | None:
    """Return a callable that runs ``hub``'s tick callbacks again, if it must.

    Kombu 5.2's event loop runs its tick callbacks, then its ready
    callbacks, then polls until the next timer. A ready callback that frees
    the prefetch window (the acks of a batch run by the solo pool) comes
    too late for the Redis transport's tick, which sends the next ``BRPOP``
    only while the window has room: the loop then sleeps until the next
    timer, up to a whole ``flush_interval``, with messages waiting. Running
    the ticks again after such a callback sends that ``BRPOP``; the ticks
    are made to run on every turn of the loop, so once more does no harm.
    Kombu 5.3 and newer run ready callbacks first: ``None``.
    """
    import kombu

    if tuple(kombu.VERSION[:2]) >= (5, 3):
        return None

    def run_ticks() -> None:
        # A copy: a transport removes its tick when its connection closes.
        for tick in list(hub.on_tick):
            tick()

    return run_ticks


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
    redis_channel = redis_channel_class()
    if redis_channel is None or not isinstance(channel, redis_channel):
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


def redis_channel_class() -> Any:
    """Return Kombu's Redis channel class (``None`` without the redis client).

    Kombu 5.2's Redis transport fails to import with ``AttributeError``
    (not ``ImportError``) when redis-py is missing; a worker on another
    broker must not care.
    """
    try:
        from kombu.transport.redis import Channel
    except (ImportError, AttributeError):
        return None
    channel_class: type = Channel
    return channel_class


def redis_group_ackable(channel: Any) -> bool:
    """Return ``True`` if ``channel``'s unacked bookkeeping can be pipelined.

    Kombu's Redis ``QoS`` has had ``pipe_or_acquire``, ``unacked_key`` and
    ``unacked_index_key`` since 4.x (checked on 5.2-5.7). Fails safe:
    without them, a batch keeps Celery's own acks.
    """
    qos = channel.qos
    return all(
        hasattr(qos, name)
        for name in ("pipe_or_acquire", "unacked_key", "unacked_index_key")
    )


def redis_remove_from_unacked(qos: Any, delivery_tags: list[Any]) -> None:
    """Remove ``delivery_tags`` from the transport's unacked index in one pipeline.

    What Kombu's Redis ``QoS.ack`` sends for one message (``ZREM`` from the
    index, ``HDEL`` from the hash, in a transaction), for many: one round
    trip instead of one each, and two commands naming every tag instead of
    two per tag, which the client would otherwise encode and read back one
    by one. ``unacked_key`` and ``unacked_index_key`` are the QoS's public
    names of Kombu's keys (a ``global_keyprefix`` is added by its client).
    """
    if not delivery_tags:
        return
    with qos.pipe_or_acquire() as pipe:
        pipe.zrem(qos.unacked_index_key, *delivery_tags)
        pipe.hdel(qos.unacked_key, *delivery_tags)
        pipe.execute()


def redis_forget_delivered(qos: Any, delivery_tag: Any) -> None:
    """Forget ``delivery_tag`` on the channel, as Kombu's ack does after its round trip.

    The virtual transport's ``QoS.ack`` (public on the base class) drops the
    message from the channel's count of delivered messages, which the
    prefetch window is measured against.
    """
    from kombu.transport.virtual.base import QoS as VirtualQoS

    VirtualQoS.ack(qos, delivery_tag)  # type: ignore[no-untyped-call]


@contextmanager
def amqp_publishes_held(
    channel: Any, connection: Any, on_early_write: Callable[[], None]
) -> Iterator[tuple[Callable[[], None], Callable[[], None]] | None]:
    """Hold the frames of ``channel.basic_publish`` on py-amqp until flushed.

    Yields ``flush`` and ``discard``: ``flush()`` writes every held frame in
    one ``sendall`` (raising what the socket raises), ``discard()`` forgets
    them. Any other write on the connection (a declare, which then waits
    for its reply) first writes what is held, so frames keep their order
    and nothing waits on a frame not sent; ``on_early_write()`` is called
    when that happens. Yields ``None`` where frames
    cannot be held: not py-amqp, or publisher confirms on (Kombu's
    ``confirm_publish`` waits for the broker inside ``basic_publish``).

    py-amqp writes each frame through its transport's ``_write`` (private,
    an instance attribute set when the socket connects, 5.0 to 5.3; a
    method of the SSL transport), from one buffer it reuses: what is held
    is a copy. Both ``_write`` and the channel's ``basic_publish`` are
    replaced on these instances for the duration, and put back after.
    """
    transport = getattr(getattr(connection, "connection", None), "transport", None)
    if (
        transport is None
        or not callable(getattr(transport, "_write", None))
        or connection.transport_options.get("confirm_publish")
        or not callable(getattr(channel, "basic_publish", None))
    ):
        yield None
        return
    own_write = "_write" in vars(transport)
    write = transport._write
    publish = channel.basic_publish
    held: list[bytes] = []
    publishing = [False]

    def flush() -> None:
        if held:
            data = b"".join(held)
            held.clear()
            # Through py-amqp's own write, which marks the transport as
            # disconnected when the socket fails.
            transport.write(data)

    def hold_or_write(data: Any) -> None:
        if publishing[0]:
            held.append(bytes(data))
            return
        if held:
            pending = b"".join(held)
            held.clear()
            write(pending)
            on_early_write()
        write(data)

    def held_publish(*args: Any, **kwargs: Any) -> Any:
        publishing[0] = True
        try:
            return publish(*args, **kwargs)
        finally:
            publishing[0] = False

    transport._write = hold_or_write
    channel.basic_publish = held_publish
    try:
        yield flush, held.clear
    finally:
        if own_write:
            transport._write = write
        else:
            del transport._write
        del channel.basic_publish


def transport_created(connection: Any) -> bool:
    """Return ``True`` once ``connection`` made its transport object.

    Kombu's ``Connection.transport`` makes it on first use and keeps it in
    ``_transport`` (private, 5.2-5.7); until then ``transport_cls`` may
    still be changed. Fails safe: without the attribute, the transport
    counts as made and is left alone.
    """
    return getattr(connection, "_transport", True) is not None
