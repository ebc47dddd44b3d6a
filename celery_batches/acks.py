"""Acknowledging a batch's messages in one go instead of one by one.

Celery acks each message on its own: a ``basic.ack`` frame each on
RabbitMQ, a round trip to the server each on Redis. A batch's messages are
acked at the same moment, so this module acks them together where the
transport allows it, with the same outcome on the broker:

- **RabbitMQ** (py-amqp): AMQP lets a consumer ack every outstanding
  delivery up to a tag with one frame (``multiple=True``). Done blindly that
  would also ack messages of other tasks the worker still holds, so the
  task consumer's channel keeps a :class:`SettledTags` ledger of the
  delivery tags already acked or rejected on it. A batch goes in one frame
  only when every tag below its highest one is in the batch or settled
  already; otherwise (a plain task with ``acks_late`` still running, a
  request waiting for its ETA) its messages are acked one by one.
- **Redis**: each ack removes the message from the transport's unacked
  index; the batch's removals go to the server in one pipeline.

Other transports keep Celery's own acks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from celery.utils.log import get_logger

from ._compat import (
    acks_plainly,
    redis_channel_class,
    redis_forget_delivered,
    redis_group_ackable,
    redis_remove_from_unacked,
)

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request
    from kombu.message import Message

__all__ = [
    "AMQPAcker",
    "GroupAcker",
    "RedisAcker",
    "SettledTags",
    "ack_together",
    "install_group_acks",
]

logger = get_logger(__name__)

#: Attribute of a channel that holds its :class:`GroupAcker`.
ACKER_ATTRIBUTE = "_celery_batches_acker"

#: Runs of tags settled out of order that a ledger keeps before it gives up.
#: There is one run per gap, that is per older message still unacked (held
#: for its ETA, running with ``acks_late``), so a worker near this many is
#: one with an unlimited prefetch window.
MAX_RUNS = 65_536


class SettledTags:
    """The delivery tags of one AMQP channel that are acked or rejected.

    Tags are numbered from 1 per channel in delivery order. ``through`` is
    the highest tag with every tag up to it settled. Tags settled past a
    gap are kept as runs of consecutive tags, so memory grows with the
    number of gaps, not with the number of tags: a message held an hour for
    its ETA costs one run however many messages are acked meanwhile.

    A tag is settled once: the broker closes a channel that acks or rejects
    a tag twice, and the ledger goes with it.
    """

    __slots__ = ("_earlier_settled", "_ends", "_lock", "_starts", "through", "usable")

    def __init__(self, *, earlier_settled: bool = False) -> None:
        self.through = 0
        #: Whether every delivery made before the ledger saw its first one
        #: needed no ack (see :meth:`delivered`).
        self._earlier_settled = earlier_settled
        #: First tag of each run past ``through`` -> its last tag, and back.
        self._starts: dict[int, int] = {}
        self._ends: dict[int, int] = {}
        #: False once the ledger cannot be trusted for this channel.
        self.usable = True
        self._lock = threading.Lock()

    @property
    def runs(self) -> list[tuple[int, int]]:
        """The runs of settled tags past ``through``, as (first, last), in order."""
        with self._lock:
            return sorted(self._starts.items())

    def settle(self, tag: int, multiple: bool = False) -> None:
        """Record that ``tag`` (and every tag below it if ``multiple``) is settled."""
        with self._lock:
            starts, ends = self._starts, self._ends
            if multiple:
                if tag == 0:
                    # "Everything outstanding": the ledger cannot tell
                    # which tags that was.
                    self._give_up()
                    return
                if tag > self.through:
                    self.through = tag
                    for first, last in list(starts.items()):
                        if first <= tag:
                            del starts[first], ends[last]
                            self.through = max(self.through, last)
            elif tag > self.through and tag not in starts and tag not in ends:
                # Join the runs just below and just above, if there are any.
                first = ends.pop(tag - 1, tag)
                starts.pop(first, None)
                last = starts.pop(tag + 1, tag)
                ends.pop(last, None)
                starts[first] = last
                ends[last] = first
            # Runs that now follow ``through`` directly extend it.
            while (run_end := starts.pop(self.through + 1, None)) is not None:
                del ends[run_end]
                self.through = run_end
            if len(starts) > MAX_RUNS:
                self._give_up()

    def delivered(self, tag: int, *, needs_ack: bool) -> None:
        """Record a delivery on the channel as it arrives.

        A delivery to a consumer that acks nothing (``no_ack``: Celery's
        mingle and broadcast replies, for instance) is settled at once:
        nobody will ack it, and it must not hold back the one-frame ack of
        later tags for ever. The first delivery seen also tells which tags
        the channel delivered before the ledger watched it; if those were
        all to no-ack consumers (the ledger was told so), they are settled.
        """
        with self._lock:
            if self._earlier_settled:
                self._earlier_settled = False
                if self.through == 0 and not self._starts and tag > 1:
                    self.through = tag - 1
        if not needs_ack:
            self.settle(tag)

    def _give_up(self) -> None:
        self.usable = False
        self._starts = {}
        self._ends = {}

    def coverable(self, tags: list[int]) -> int:
        """Return how many of the ascending ``tags`` one multiple ack may cover.

        That is the longest prefix such that every tag up to its last one
        is either in the prefix or already settled.
        """
        with self._lock:
            if not self.usable:
                return 0
            starts = self._starts
            expected = self.through + 1
            covered = 0
            for tag in tags:
                while expected < tag:
                    last = starts.get(expected)
                    if last is None:
                        return covered
                    expected = last + 1
                if tag != expected or tag in starts:
                    # Already settled, or given twice: not ours to ack.
                    return covered
                expected += 1
                covered += 1
            return covered


class GroupAcker:
    """Acks several messages of one channel with fewer round trips."""

    __slots__ = ("_lock", "_pending", "call_soon", "connection_errors")

    def __init__(
        self,
        call_soon: Callable[[Callable[[], Any]], Any],
        connection_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        #: Runs a callback in the consumer's thread, as Celery runs its acks.
        self.call_soon = call_soon
        #: What a lost connection raises: logged, not raised, as kombu does.
        self.connection_errors = connection_errors
        #: Messages waiting for the scheduled ack, or None if none is.
        self._pending: list[Message] | None = None
        # Batches are accepted in pool threads with the threads pool.
        self._lock = threading.Lock()

    def submit(self, messages: list[Message]) -> None:
        """Ack ``messages`` soon, in the consumer's thread, with any others due.

        Every batch accepted before the ack runs goes in the same round trip:
        Kombu's event loop runs its pending callbacks in no set order, so two
        acks scheduled apart could go out newest first, and the newer batch
        could then not be covered by one frame.
        """
        with self._lock:
            pending = self._pending
            if pending is not None:
                pending.extend(messages)
                return
            self._pending = list(messages)
        try:
            self.call_soon(self._send_pending)
        except BaseException:
            with self._lock:
                self._pending = None
            raise

    def _send_pending(self) -> None:
        with self._lock:
            messages, self._pending = self._pending or [], None
        if messages:
            self.ack(messages)

    @property
    def usable(self) -> bool:
        """False if this channel's messages must keep Celery's own acks."""
        return True

    def ack(self, messages: list[Message]) -> None:
        """Ack ``messages``; runs in the consumer's thread."""
        raise NotImplementedError

    def _ack_each(self, messages: Iterable[Message]) -> None:
        for message in messages:
            if not message.acknowledged:
                message.ack_log_error(  # type: ignore[no-untyped-call]
                    logger, self.connection_errors
                )

    def _sent(self, send: Callable[[], Any], count: int, channel: Any) -> bool:
        """Run ``send``, which acks ``count`` messages; return whether it did.

        Errors are handled as kombu's ack_log_error handles them: a lost
        connection is logged (the messages come back after the reconnect,
        which the consumer is about to do), a broken pipe is raised too. A
        channel that a reconnect closed meanwhile (Kombu's Redis channel
        then fails with ``AttributeError``) is a lost connection as well:
        raised, it would end the worker.
        """
        try:
            send()
        except BrokenPipeError:
            self._failed(count)
            raise
        except self.connection_errors:
            self._failed(count)
            return False
        except AttributeError:
            if not _closed(channel):
                raise
            self._failed(count)
            return False
        return True

    def _failed(self, count: int) -> None:
        logger.critical("Couldn't ack a batch of %d messages", count, exc_info=True)


class AMQPAcker(GroupAcker):
    """Acks a batch with one ``multiple=True`` frame where the ledger allows."""

    __slots__ = ("ledger",)

    def __init__(self, ledger: SettledTags, *args: Any) -> None:
        super().__init__(*args)
        self.ledger = ledger

    @property
    def usable(self) -> bool:
        return self.ledger.usable

    def ack(self, messages: list[Message]) -> None:
        messages.sort(key=_delivery_tag)
        covered = self.ledger.coverable([m.delivery_tag for m in messages])
        if covered > 1:
            last = messages[covered - 1]
            if not self._sent(
                partial(last.channel.basic_ack, last.delivery_tag, multiple=True),
                covered,
                last.channel,
            ):
                return
        else:
            covered = 0
        self._ack_each(messages[covered:])


class RedisAcker(GroupAcker):
    """Acks a batch with one pipeline to the Redis server."""

    __slots__ = ()

    def ack(self, messages: list[Message]) -> None:
        qos = messages[0].channel.qos
        tags = [message.delivery_tag for message in messages]
        if not self._sent(
            partial(redis_remove_from_unacked, qos, tags), len(tags), qos.channel
        ):
            # The messages stay in Redis's unacked index, from where the
            # transport restores them after its visibility_timeout. Forget
            # them here all the same: counted as delivered they would fill
            # the prefetch window for good, and a consumer that cannot
            # fetch never notices its connection is gone (a batch is more
            # messages than Celery's whole window).
            for tag in tags:
                redis_forget_delivered(qos, tag)
            return
        for tag in tags:
            # What the Redis QoS.ack does after its own round trip.
            redis_forget_delivered(qos, tag)


def install_group_acks(channel: Any, consumer: Consumer) -> GroupAcker | None:
    """Let batches of ``channel``'s messages be acked together; return how.

    Returns ``None`` (and leaves the channel alone) for transports whose
    acks stay Celery's. On RabbitMQ this must run before the channel
    delivers anything: a tag settled before the ledger exists counts as
    unsettled for ever, which is safe but keeps every batch on that
    channel to one frame per message.
    """
    acker: GroupAcker | None = getattr(channel, ACKER_ATTRIBUTE, None)
    if acker is not None:
        return acker
    call_soon = getattr(consumer, "call_soon_ack", None) or consumer.call_soon
    errors = tuple(consumer.connection_errors)
    if _is_amqp(channel):
        acker = AMQPAcker(_track_settlements(channel), call_soon, errors)
    elif _is_redis(channel):
        acker = RedisAcker(call_soon, errors)
    else:
        return None
    setattr(channel, ACKER_ATTRIBUTE, acker)
    return acker


def _is_amqp(channel: Any) -> bool:
    try:
        from amqp.channel import Channel
    except ImportError:  # pragma: no cover - py-amqp comes with kombu
        return False
    return isinstance(channel, Channel)


def _is_redis(channel: Any) -> bool:
    redis_channel = redis_channel_class()
    return (
        redis_channel is not None
        and isinstance(channel, redis_channel)
        and redis_group_ackable(channel)
    )


def _track_settlements(channel: Any) -> SettledTags:
    """Wrap ``channel``'s ack, reject, recover and deliveries so a ledger sees each."""
    no_ack_consumers: set[str] = channel.no_ack_consumers
    # Installed before the worker consumes tasks, after Celery's mingle
    # step read its replies on this channel without acks. If no consumer
    # that acks exists yet, every tag delivered so far was such a reply.
    acking = set(channel.callbacks) - no_ack_consumers
    ledger = SettledTags(earlier_settled=not acking)
    _watch_deliveries(channel, ledger)
    basic_ack = channel.basic_ack
    basic_reject = channel.basic_reject

    # Every ack and reject on the channel goes through these, Celery's and
    # other tasks' included, so the ledger sees every settled tag. A tag is
    # recorded only once its frame was written.
    def tracked_ack(delivery_tag: int, multiple: bool = False, *args: Any) -> Any:
        result = basic_ack(delivery_tag, multiple, *args)
        ledger.settle(delivery_tag, multiple)
        return result

    def tracked_reject(delivery_tag: int, requeue: bool, *args: Any) -> Any:
        result = basic_reject(delivery_tag, requeue, *args)
        ledger.settle(delivery_tag)
        return result

    def untracking(recover: Callable[..., Any]) -> Callable[..., Any]:
        # A recover redelivers every unacked message under new tags.
        def recover_and_forget(*args: Any, **kwargs: Any) -> Any:
            ledger.settle(0, multiple=True)
            return recover(*args, **kwargs)

        return recover_and_forget

    channel.basic_ack = tracked_ack
    channel.basic_reject = tracked_reject
    for name in ("basic_recover", "basic_recover_async"):
        recover = getattr(channel, name, None)
        if recover is not None:
            setattr(channel, name, untracking(recover))
    return ledger


def _watch_deliveries(channel: Any, ledger: SettledTags) -> None:
    """Tell ``ledger`` of every delivery on ``channel``, no-ack or not.

    py-amqp hands each delivery to the callback its consumer registered
    with ``basic_consume`` (``Channel.callbacks``, public); each is wrapped,
    the ones registered later too.
    """
    no_ack_consumers: set[str] = channel.no_ack_consumers
    callbacks: dict[str, Callable[[Any], Any]] = channel.callbacks

    def watching(callback: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def on_delivery(message: Any) -> Any:
            info = message.delivery_info
            ledger.delivered(
                info["delivery_tag"],
                needs_ack=info.get("consumer_tag") not in no_ack_consumers,
            )
            return callback(message)

        return on_delivery

    for consumer_tag, callback in list(callbacks.items()):
        callbacks[consumer_tag] = watching(callback)
    basic_consume = channel.basic_consume

    def watched_consume(*args: Any, **kwargs: Any) -> Any:
        # basic_consume(queue, consumer_tag, no_local, no_ack, exclusive,
        # nowait, callback, ...): kombu passes the callback by keyword.
        if kwargs.get("callback") is not None:
            kwargs["callback"] = watching(kwargs["callback"])
        elif len(args) > 6 and args[6] is not None:
            args = (*args[:6], watching(args[6]), *args[7:])
        return basic_consume(*args, **kwargs)

    channel.basic_consume = watched_consume


def ack_together(requests: Iterable[Request]) -> None:
    """Acknowledge ``requests`` with as few round trips as is safe.

    Each request this takes is marked acknowledged at once, so Celery's
    handlers do not ack it again; the acks are sent from the consumer's
    thread, as Celery sends its own. Requests it does not take (no group
    acker for their channel, already acknowledged) are left to Celery.
    """
    groups: dict[int, tuple[GroupAcker, list[Request]]] = {}
    for request in requests:
        if request.acknowledged:
            continue
        channel = request.message.channel
        acker: GroupAcker | None = getattr(channel, ACKER_ATTRIBUTE, None)
        if acker is None or not acker.usable or not acks_plainly(request):
            continue
        group = groups.get(id(acker))
        if group is None:
            group = groups[id(acker)] = (acker, [])
        group[1].append(request)
    for acker, taken in groups.values():
        acker.submit([request.message for request in taken])
        # Only once the acks are on their way: if scheduling them failed,
        # Celery's handlers still ack each request.
        for request in taken:
            request.acknowledged = True


def _closed(channel: Any) -> bool:
    """Return ``True`` if ``channel`` was closed (or lost its connection)."""
    return bool(getattr(channel, "closed", False)) or (
        getattr(channel, "connection", True) is None
    )


def _delivery_tag(message: Message) -> int:
    return message.delivery_tag  # type: ignore[no-any-return]
