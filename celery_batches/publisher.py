"""Where the messages of a bulk publish wait, so that many go out together.

:func:`bulk_publisher` hands out a kombu ``Producer`` whose messages are
held until :meth:`BulkPublisher.flush`:

* **Redis:** in one pipeline, on a connection of celery-batches' Redis
  transport (:meth:`celery_batches.redis_transport.Channel.bulk`); the
  pipeline's replies say which messages the server took.
* **RabbitMQ (py-amqp):** the frames are written to the socket with one
  ``sendall`` per flush instead of one per message.
* **Anything else** (and RabbitMQ with publisher confirms): each message
  is published as it comes, as ``apply_async`` does.

Every message is published by Kombu's own ``Producer.publish``, so it is
what ``apply_async`` would have sent; only when it leaves changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from kombu import pools
from kombu.utils.json import dumps

from ._compat import amqp_publishes_held
from .delivery import batch_delivery_enabled, use_batch_transport

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["BulkPublisher", "Flushed", "bulk_publisher"]


class Flushed(NamedTuple):
    """What became of the calls of one flush, by their position in it."""

    #: Calls the broker has.
    published: list[int]
    #: Calls the broker refused (an error reply for one of its messages).
    refused: list[int]
    #: Calls whose fate is unknown: the connection failed while they were
    #: written.
    uncertain: list[int]
    #: The error behind ``refused`` or ``uncertain``, if any.
    error: BaseException | None = None


class BulkPublisher:
    """Publishes calls' messages through :attr:`producer`, held until flushed.

    A call is everything published between :meth:`begin` and :meth:`end`
    (its task message, and a ``task-sent`` event if Celery sends one).
    """

    def __init__(self, producer: Any) -> None:
        #: The kombu ``Producer`` to publish the calls' messages with.
        self.producer = producer
        #: Calls since the last flush.
        self.pending = 0

    def begin(self) -> None:
        """A call starts publishing."""

    def puts(self) -> list[tuple[str, Any]]:
        """The ``(queue, message)`` the transport wrote for the call so far.

        Only where messages are Kombu's Redis envelopes; else empty.
        """
        return []

    def list_key(self) -> Any:
        """The list the call's one message went to, if that is all it wrote.

        ``None`` unless Kombu's Redis transport wrote exactly one ``LPUSH``
        of one message for the call so far.
        """
        return None

    def push(self, key: Any, message: Any) -> None:
        """Hold ``message`` (Kombu's envelope) for list ``key`` (Redis only)."""
        raise NotImplementedError

    def encode_body(self, body: bytes, encoding: str | None) -> tuple[Any, Any]:
        """Encode a message body as the transport does (Redis only)."""
        raise NotImplementedError

    def end(self) -> None:
        """The call that began has published all its messages."""
        self.pending += 1

    def flush(self) -> Flushed:
        """Send what is held; say what became of each call since the last flush."""
        count, self.pending = self.pending, 0
        return Flushed(list(range(count)), [], [])

    def discard(self) -> tuple[int, bool]:
        """Drop what is held, after a call failed to publish.

        Returns:
            How many calls since the last flush went out, and whether the
            one that failed may have gone out too (some of its messages).
        """
        count, self.pending = self.pending, 0
        return count, True


#: A call whose message waits in the pipeline's grouped ``LPUSH``.
_GROUPED = (-1, -1)


class _RedisPublisher(BulkPublisher):
    def __init__(self, producer: Any, pipe: Any) -> None:
        super().__init__(producer)
        self.pipe = pipe
        self.channel = producer.channel
        #: Per call since the last flush, its commands in the pipeline.
        self.spans: list[tuple[int, int]] = []
        self._start = 0
        self._pushed = False
        #: Messages pushed (push()) since the last flush, and their list.
        self._group: list[Any] = []
        self._group_key: Any = None

    def begin(self) -> None:
        self._start = len(self.pipe.command_stack)
        self._pushed = False
        self.channel.bulk_puts.clear()

    def puts(self) -> list[tuple[str, Any]]:
        return list(self.channel.bulk_puts)

    def list_key(self) -> Any:
        # Kombu's _put wrote one LPUSH of one message for the call: the
        # list (prefix included) its next calls' messages go to alike.
        stack = self.pipe.command_stack[self._start :]
        if len(stack) != 1:
            return None
        args = stack[0][0]
        if len(args) != 3 or str(args[0]).upper() != "LPUSH":
            return None
        return args[1]

    def push(self, key: Any, message: Any) -> None:
        if self._group and key != self._group_key:
            raise ValueError("one bulk pushes to one list")
        self._group_key = key
        # As Kombu's _put encodes it.
        self._group.append(dumps(message))  # type: ignore[no-untyped-call]
        self._pushed = True

    def encode_body(self, body: bytes, encoding: str | None) -> tuple[Any, Any]:
        return self.channel.encode_body(body, encoding)  # type: ignore[no-any-return]

    def end(self) -> None:
        if self._pushed:
            self.spans.append(_GROUPED)
        else:
            self.spans.append((self._start, len(self.pipe.command_stack)))
        self.pending += 1

    def flush(self) -> Flushed:
        spans, self.spans, self.pending = self.spans, [], 0
        group, self._group = self._group, []
        if not spans:
            return Flushed([], [], [])
        if group:
            # One LPUSH of many values is many LPUSHes in one: the server
            # pushes them in order, and the client encodes and reads back
            # one command instead of one each. The key is the prefixed
            # one Kombu's _put wrote, so it is not prefixed again.
            self.pipe.pipeline_execute_command("LPUSH", self._group_key, *group)
            spans = [
                (len(self.pipe.command_stack) - 1, len(self.pipe.command_stack))
                if span == _GROUPED
                else span
                for span in spans
            ]
        try:
            # Not retried by redis-py (bulk_publisher checks): a pipeline
            # sent again after a broken connection could run twice.
            replies = self.pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - the connection failed mid-way
            return Flushed([], [], list(range(len(spans))), exc)
        published, refused = [], []
        error: BaseException | None = None
        for index, (start, stop) in enumerate(spans):
            failed = [r for r in replies[start:stop] if isinstance(r, Exception)]
            if failed:
                refused.append(index)
                error = error or failed[0]
            else:
                published.append(index)
        return Flushed(published, refused, [], error)

    def discard(self) -> tuple[int, bool]:
        self.spans, self.pending, self._group = [], 0, []
        self.pipe.reset()
        return 0, False


class _AMQPPublisher(BulkPublisher):
    def __init__(self, producer: Any) -> None:
        super().__init__(producer)
        self._flush_writes: Callable[[], None] = _nothing
        self._discard_writes: Callable[[], None] = _nothing
        self._in_call = False
        #: Calls whose frames went out before the flush (see written_early).
        self._sent = 0
        self._sent_partly = False

    def held(self, flush: Callable[[], None], discard: Callable[[], None]) -> None:
        self._flush_writes, self._discard_writes = flush, discard

    def written_early(self) -> None:
        # Another frame (a first declare) had to go out: what was held
        # went before it.
        self._sent = self.pending
        self._sent_partly = self._in_call

    def begin(self) -> None:
        self._in_call = True

    def end(self) -> None:
        self._in_call = False
        self.pending += 1

    def flush(self) -> Flushed:
        count, sent = self.pending, self._sent
        self.pending, self._sent, self._sent_partly = 0, 0, False
        if not count:
            return Flushed([], [], [])
        try:
            self._flush_writes()
        except Exception as exc:  # noqa: BLE001 - the connection failed mid-way
            return Flushed(list(range(sent)), [], list(range(sent, count)), exc)
        return Flushed(list(range(count)), [], [])

    def discard(self) -> tuple[int, bool]:
        sent, partly = self._sent, self._sent_partly
        self.pending, self._sent, self._sent_partly = 0, 0, False
        self._in_call = False
        self._discard_writes()
        return sent, partly


def _nothing() -> None:
    pass


def _retries_writes(channel: Any) -> bool:
    """Whether redis-py would send a failed pipeline again (then not held)."""
    kwargs = channel.pool.connection_kwargs
    return bool(
        kwargs.get("retry_on_timeout")
        or kwargs.get("retry_on_error")
        or kwargs.get("retry") is not None
    )


@contextmanager
def bulk_publisher(app: Celery) -> Iterator[BulkPublisher]:
    """Yield a :class:`BulkPublisher` on ``app``'s broker.

    On Redis the connection comes from Kombu's pool of connections of
    celery-batches' transport (sized like Celery's, ``broker_pool_limit``),
    unless ``batches_redis_delivery`` is ``False``; otherwise the producer
    comes from Celery's producer pool, as for ``apply_async``.
    """
    connection = app.connection_for_write()
    # batches_redis_delivery = False keeps Kombu's own Redis transport for
    # publishing too: one LPUSH per call, as apply_async sends.
    if batch_delivery_enabled(app.conf) and use_batch_transport(connection):
        with _redis_publisher(app, connection) as publisher:
            yield publisher
        return
    connection.release()
    with app.producer_or_acquire() as producer:
        publisher = _AMQPPublisher(producer)
        with amqp_publishes_held(
            producer.channel, producer.connection, publisher.written_early
        ) as held:
            if held is None:
                yield BulkPublisher(producer)
            else:
                publisher.held(*held)
                yield publisher


@contextmanager
def _redis_publisher(app: Celery, connection: Any) -> Iterator[BulkPublisher]:
    app.pool  # noqa: B018 - sets Kombu's pool limit from broker_pool_limit
    # Celery 5.7's setting; older ones wait for a free connection.
    timeout = app.conf.get("broker_pool_acquire_timeout")
    with pools.connections[connection].acquire(block=True, timeout=timeout) as conn:
        channel = conn.default_channel
        producer = app.amqp.Producer(channel, auto_declare=False)
        bulk = getattr(channel, "bulk", None)
        if bulk is None or _retries_writes(channel):
            yield BulkPublisher(producer)
            return
        with bulk() as pipe:
            yield _RedisPublisher(producer, pipe)
