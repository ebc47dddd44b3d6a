"""Kombu's Redis transport, delivering many messages per round trip.

:class:`Transport` (and :class:`SentinelTransport` for ``sentinel://``)
subclass Kombu's and change two things, both through the methods Kombu's
own channel calls:

* **Batch delivery.** Once a message arrived, the channel asks for up to
  what its prefetch window has room for (at most ``batch_fetch_limit``,
  a transport option, default 200) with one call of
  :data:`~celery_batches.redis_fetch.FETCH_SCRIPT`, which also records
  them as unacked. Only an idle channel waits with ``BRPOP``, as Kombu's
  does. Priorities, the rotation between queues, ``global_keyprefix``,
  ``no_ack`` consumers and the unacked bookkeeping (so the
  ``visibility_timeout`` restore) stay Kombu's.
* **Bulk publishing.** Inside :meth:`Channel.bulk`, the messages published
  on the channel go into one pipeline, executed when the caller says
  (:mod:`celery_batches.bulk` uses it).

If the server refuses the script (scripting disabled, an ACL), the channel
logs it once and goes on as Kombu's own. Every private name of Kombu used
here has a canary test in ``tests/unit/test_redis_transport.py``. This
module needs redis-py: it is imported only for a Redis broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time
from typing import Any

from celery.utils.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from kombu.utils.scheduling import priority_cycle, round_robin_cycle
from redis.exceptions import NoScriptError

from ._compat import redis_remove_from_unacked
from .redis_fetch import FETCH_SCRIPT, FETCH_SHA, Fetched, fetch_arguments, read_reply

__all__ = [
    "DEFAULT_FETCH_LIMIT",
    "BatchDelivery",
    "Channel",
    "QoS",
    "SentinelChannel",
    "SentinelTransport",
    "Transport",
    "supported",
]

logger = get_logger(__name__)

#: Default of the ``batch_fetch_limit`` transport option: most messages one
#: round trip takes. It bounds the time the script holds the server (about
#: 2 ms for 200 messages of 1 KiB).
DEFAULT_FETCH_LIMIT = 200

SCRIPT_REFUSED = (
    "Redis refused the batch delivery script (%s); this channel delivers "
    "one message per round trip from now on, as Kombu's own transport does"
)
SCRIPT_STOPPED = (
    "Redis stopped the batch delivery script early (%s); the messages not "
    "taken stay in their queue"
)
NOT_JSON = (
    "Dropped a message from queue %r that is not a Kombu message (%r); "
    "Kombu's own transport loses it the same way: %.200r"
)
RESTORED = (
    "Delivering a batch failed at message %d of %d; the %d not delivered "
    "go back to their queue"
)


class QoS(kombu_redis.QoS):
    """Kombu's unacked bookkeeping, minus the round trip a fetch already made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        #: Delivery tags the fetch script recorded as unacked already.
        self.prerecorded: set[str] = set()

    def append(self, message: Any, delivery_tag: Any) -> None:
        prerecorded = self.prerecorded
        if delivery_tag in prerecorded:
            prerecorded.discard(delivery_tag)
            # Only the in-memory part of Kombu's append: the hash and the
            # index were written by the script, in the same round trip
            # that popped the message.
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        super().append(message, delivery_tag)  # type: ignore[no-untyped-call]


def _rotates(cycle: Any) -> bool | None:
    """Whether ``cycle`` rotates after each message; ``None`` if unknown."""
    rotate = type(cycle).rotate
    if rotate is round_robin_cycle.rotate:
        return True
    if rotate is priority_cycle.rotate:
        return False
    return None


class BatchDelivery:
    """The batch delivery and bulk publishing, mixed into Kombu's channels."""

    #: Most messages one fetch takes, whatever the prefetch window allows.
    #: Transport option ``batch_fetch_limit``; default 200.
    batch_fetch_limit = DEFAULT_FETCH_LIMIT

    from_transport_options: tuple[str, ...] = (
        *kombu_redis.Channel.from_transport_options,
        "batch_fetch_limit",
    )

    # Each of these is Kombu's, set in Kombu's __init__ (see the class of
    # the channel this is mixed into).
    _in_poll: Any
    _queue_cycle: Any
    active_queues: list[str]
    client: Any
    connection: Any
    connection_errors: tuple[type[BaseException], ...]
    global_keyprefix: str
    priority_steps: list[int]
    qos: Any
    unacked_key: str
    unacked_index_key: str
    ResponseError: type[Exception]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._no_ack_queues: set[str] = set()
        #: The fetch in flight: its queues, count and arguments.
        self._fetch_sent: tuple[list[str], int, list[Any]] | None = None
        #: Whether the next read starts with the script (messages are
        #: arriving) rather than a blocking BRPOP (the queues were empty).
        self._fetch_next = False
        self._fetch_refused = False
        #: The pipeline of the running bulk publish, if any.
        self._bulk_pipe: Any = None
        self._bulk_client: Any = None
        self._putting: Any = None
        #: ``(queue, message)`` of each ``_put`` into the bulk pipeline, for
        #: the bulk publisher to read (it empties the list as it pleases).
        self.bulk_puts: list[tuple[str, Any]] = []
        super().__init__(*args, **kwargs)

    # -- which queues are acked --------------------------------------------

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # virtual.Channel.basic_consume(queue, no_ack, callback, consumer_tag)
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else (args[0] if args else 0)
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, *args, **kwargs)  # type: ignore[misc]

    # -- batch delivery ---------------------------------------------------

    def _fetch_count(self) -> int:
        room = self.qos.can_consume_max_estimate()
        limit = max(int(self.batch_fetch_limit or 1), 1)
        if room is None:  # no prefetch limit
            return limit
        return max(min(int(room), limit), 1)

    def _can_fetch(self) -> bool:
        return (
            self._fetch_next
            and not self._fetch_refused
            and isinstance(self.qos, QoS)
            and _rotates(self._queue_cycle) is not None
        )

    def _brpop_start(self, *args: Any, **kwargs: Any) -> Any:
        if not self._can_fetch():
            return super()._brpop_start(*args, **kwargs)  # type: ignore[misc]
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        count = self._fetch_count()
        prefix = self.global_keyprefix or ""
        q_for_pri = self._q_for_pri  # type: ignore[attr-defined]
        arguments = fetch_arguments(
            count=count,
            queues=queues,
            # The keys Kombu's BRPOP names, in its order, level by level.
            priority_keys=[
                [prefix + q_for_pri(queue, pri) for queue in queues]
                for pri in self.priority_steps
            ],
            acked=[queue not in self._no_ack_queues for queue in queues],
            rotate=bool(_rotates(self._queue_cycle)),
            unacked_key=prefix + self.unacked_key,
            unacked_index_key=prefix + self.unacked_index_key,
            now=time(),
        )
        connection = self.client.connection
        self._in_poll = connection
        # Kombu 5.7 checks the connection of a command in flight by this.
        self._brpop_sent_at = monotonic()
        self._fetch_sent = (queues, count, arguments)
        connection.send_command("EVALSHA", FETCH_SHA, *arguments)
        return None

    def _brpop_read(self, **options: Any) -> Any:
        sent = self._fetch_sent
        if sent is None:
            try:
                delivered = super()._brpop_read(**options)  # type: ignore[misc]
            except Empty:
                self._fetch_next = False
                raise
            # A message arrived on an idle queue: more may follow, and the
            # next ones are taken many at a time.
            self._fetch_next = True
            return delivered
        self._fetch_sent = None
        queues, count, arguments = sent
        try:
            reply = self._fetch_reply(arguments, **options)
        finally:
            self._in_poll = None
            # Kombu 5.7: the connection is idle now, the moment to send a
            # pending re-authentication.
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)
            if flush_reauth is not None:
                flush_reauth()
        if reply is None:
            self._fetch_next = False
            raise Empty()
        fetched, error = read_reply(reply, queues)
        if error:
            logger.warning(SCRIPT_STOPPED, error)
        # A full fetch leaves more waiting, most likely; a short one
        # emptied the queues, so the next read waits with BRPOP.
        self._fetch_next = len(fetched) >= count and not error
        if not fetched:
            raise Empty()
        self._deliver_fetched(fetched)
        return True

    def _fetch_reply(self, arguments: list[Any], **options: Any) -> Any:
        """Read the script's reply; ``None`` if the server refused the script."""
        client = self.client
        connection = client.connection
        try:
            try:
                return client.parse_response(connection, "EVALSHA", **options)
            except NoScriptError:
                # Not in the server's script cache (a restart, a failover
                # to a replica): EVAL sends the body and caches it.
                connection.send_command("EVAL", FETCH_SCRIPT, *arguments)
                return client.parse_response(connection, "EVAL", **options)
        except self.connection_errors:
            # As Kombu's BRPOP read: the next poll reconnects. The messages
            # the script took are in the unacked index, and come back after
            # the visibility_timeout.
            connection.disconnect()
            raise
        except self.ResponseError as exc:
            self._fetch_refused = True
            logger.warning(SCRIPT_REFUSED, exc)
            return None

    def _deliver_fetched(self, fetched: list[Fetched]) -> None:
        prerecorded: set[str] = self.qos.prerecorded
        deliver = self.connection._deliver
        rotate = self._queue_cycle.rotate
        tags = [item.recorded_tag for item in fetched if item.recorded_tag]
        prerecorded.update(tags)
        done = 0
        try:
            for done, item in enumerate(fetched, 1):  # noqa: B007
                try:
                    payload = loads(bytes_to_str(item.raw))  # type: ignore[no-untyped-call]
                except ValueError as exc:
                    self._drop(item, exc)
                    continue
                rotate(item.queue)
                deliver(payload, item.queue)
        except BaseException:
            # Celery's consumer handles a message's errors itself; whatever
            # still escapes must not strand the rest, which no one would
            # deliver until the visibility_timeout.
            self._give_back(fetched[done:], done, len(fetched))
            raise
        finally:
            # Tags of messages that never reached qos.append (a queue
            # cancelled meanwhile) must not linger.
            prerecorded.difference_update(tags)

    def _drop(self, item: Fetched, exc: Exception) -> None:
        logger.error(NOT_JSON, item.queue, exc, item.raw)
        if item.recorded_tag:
            redis_remove_from_unacked(self.qos, [item.recorded_tag])

    def _give_back(self, rest: list[Fetched], done: int, total: int) -> None:
        if not rest:
            return
        logger.error(RESTORED, done, total, len(rest))
        # restore_by_tag puts each at the head of its queue: last one first,
        # so that they come out in the order they left.
        for item in reversed(rest):
            if not item.recorded_tag:
                continue
            try:
                self.qos.restore_by_tag(item.recorded_tag)
            except self.connection_errors:
                # Still in the unacked index: back after the visibility_timeout.
                logger.warning("Cannot restore %s", item.recorded_tag, exc_info=True)

    def _poll_error(self, type: str, **options: Any) -> Any:
        if type == "BRPOP" and self._fetch_sent is not None:
            return self._brpop_read(**options)
        return super()._poll_error(type, **options)  # type: ignore[misc]

    # -- bulk publishing --------------------------------------------------

    @contextmanager
    def bulk(self) -> Iterator[Any]:
        """Collect what is published on this channel in one Redis pipeline.

        Yields the pipeline (redis-py's, not transactional): the caller
        executes it, once or per chunk, and learns from its replies which
        commands the server carried out. Routing (exchanges, priorities,
        fanout) stays Kombu's; only the final ``LPUSH`` or ``PUBLISH`` of
        each message (and the ``PEXPIRE`` of a queue declared with
        ``x-expires``) waits in the pipeline. Each ``_put`` is noted in
        :attr:`bulk_puts`.
        """
        if self._bulk_pipe is not None:
            raise RuntimeError("a bulk publish is already running on this channel")
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
        self._bulk_pipe, self._bulk_client = pipe, _BulkClient(pipe)
        self.bulk_puts = []
        try:
            yield pipe
        finally:
            self._bulk_pipe = self._bulk_client = None
            self.bulk_puts = []
            pipe.reset()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        putting = self._putting
        if client is None and putting is not None:
            yield putting
            return
        with super().conn_or_acquire(client) as acquired:  # type: ignore[misc]
            yield acquired

    def _put(self, queue: str, message: Any, **kwargs: Any) -> Any:
        if self._bulk_pipe is not None:
            self.bulk_puts.append((queue, message))
        return self._into_bulk(super()._put, queue, message, **kwargs)  # type: ignore[misc]

    def _put_fanout(
        self, exchange: str, message: Any, routing_key: str, **kwargs: Any
    ) -> Any:
        return self._into_bulk(
            super()._put_fanout,  # type: ignore[misc]
            exchange,
            message,
            routing_key,
            **kwargs,
        )

    def _into_bulk(self, put: Any, *args: Any, **kwargs: Any) -> Any:
        if self._bulk_pipe is None:
            return put(*args, **kwargs)
        # Kombu's _put/_put_fanout write through conn_or_acquire(); while
        # they run, that is the bulk pipeline.
        self._putting = self._bulk_client
        try:
            return put(*args, **kwargs)
        finally:
            self._putting = None


class _BulkClient:
    """The bulk pipeline, as Kombu's ``_put`` sees its client.

    Kombu 5.7 writes to a queue declared with ``x-expires`` through a
    pipeline of the client's (``LPUSH`` and a ``PEXPIRE`` per priority):
    that pipeline is the bulk one, and executing it waits for the bulk's
    own execution, so every message keeps its place.
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    @contextmanager
    def pipeline(self, *args: Any, **kwargs: Any) -> Iterator[_HeldPipeline]:
        yield _HeldPipeline(self._pipe)


class _HeldPipeline(_BulkClient):
    def execute(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []


class Channel(BatchDelivery, kombu_redis.Channel):  # type: ignore[misc]
    """Kombu's Redis channel with batch delivery and bulk publishing."""

    QoS = QoS


class SentinelChannel(BatchDelivery, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """Kombu's Redis Sentinel channel with batch delivery and bulk publishing."""

    QoS = QoS
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.SentinelChannel.from_transport_options,
        "batch_fetch_limit",
    )


class Transport(kombu_redis.Transport):
    """Kombu's Redis transport, with :class:`Channel`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """Kombu's Redis Sentinel transport, with :class:`SentinelChannel`."""

    Channel = SentinelChannel


#: What :class:`BatchDelivery` relies on in Kombu's Redis channel and QoS
#: (checked on Kombu 5.2 to 5.7; each has a canary test).
_CHANNEL_NEEDS = (
    "_brpop_start",
    "_brpop_read",
    "_poll_error",
    "_put",
    "_put_fanout",
    "_q_for_pri",
    "conn_or_acquire",
    "basic_consume",
    "priority_steps",
    "unacked_key",
    "unacked_index_key",
    "global_keyprefix",
)
_QOS_NEEDS = ("restore_by_tag", "pipe_or_acquire", "append")


def supported() -> bool:
    """Return ``True`` if this Kombu has everything batch delivery relies on."""
    return (
        all(hasattr(kombu_redis.Channel, name) for name in _CHANNEL_NEEDS)
        and all(hasattr(kombu_redis.QoS, name) for name in _QOS_NEEDS)
        and hasattr(virtual.QoS, "can_consume_max_estimate")
        and hasattr(virtual.Transport, "_deliver")
    )
