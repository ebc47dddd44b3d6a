"""Publishing many calls of a task in as few round trips as the broker allows.

``task.apply_async`` costs a round trip per call on Redis (an ``LPUSH``),
and Celery's work to build each message. :func:`apply_many` publishes a
list of calls in chunks: one pipeline per chunk on Redis, one socket write
per chunk on RabbitMQ (see :mod:`celery_batches.publisher`). Each message is
the one ``apply_async`` would send with the same options: same headers,
properties, routing, priority, ``countdown``/``eta``, ``expires``, links;
``before_task_publish`` and ``after_task_publish`` fire for each, so any
worker consumes them, a plain Celery task's too.

How: the first call is ``task.apply_async`` itself, and what Celery's
``send_task`` asks of ``app.amqp`` for it is recorded (the arguments of
``create_task_message`` and ``send_task_message``). Those do not depend on
the call's arguments, so the other calls repeat them with their own task
id, ``args`` and ``kwargs``: Celery still builds and sends each message,
without working out the same options again. Where they could depend on the
arguments (a ``shadow_name``, pydantic arguments, a router function, an
``apply_async`` of the task's own), every call is ``apply_async``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from celery import signals
from celery.app.routes import MapRoute
from celery.app.task import Task

from ._compat import MessageCall, recording_task_messages
from .errors import BulkPublishError
from .publisher import BulkPublisher, bulk_publisher
from .template import Template, uuid4_strings

if TYPE_CHECKING:
    from celery.result import AsyncResult, ResultSet

__all__ = ["DEFAULT_CHUNK_SIZE", "apply_many", "delay_many"]

#: Calls published per round trip (a pipeline, a socket write) by default.
DEFAULT_CHUNK_SIZE = 1000

#: ``apply_async`` options that ``apply_many`` sets itself.
_OWN_OPTIONS = ("task_id", "producer", "connection", "publisher")

Call = tuple[Sequence[Any], Mapping[str, Any]]


def delay_many(task: Any, calls: Iterable[Sequence[Any]]) -> ResultSet:
    """Publish ``task(*args)`` for each ``args`` in ``calls``.

    ``delay_many(task, [(1,), (2,)])`` is what ``task.delay(1)`` and
    ``task.delay(2)`` send, in fewer round trips. See :func:`apply_many`.

    Arguments:
        task: a Celery task (a batch task or a plain one).
        calls: the positional arguments of each call, a tuple or list each.

    Returns:
        A :class:`~celery.result.ResultSet` of one
        :class:`~celery.result.AsyncResult` per call, in call order.

    Raises:
        TypeError: if a call is not a tuple or list.
        BulkPublishError: if not every call could be published.
    """
    pairs: list[tuple[Sequence[Any] | None, Mapping[str, Any] | None]] = []
    for index, args in enumerate(calls):
        if not isinstance(args, (tuple, list)):
            raise TypeError(
                f"call {index} of delay_many must be a tuple of positional "
                f"arguments, e.g. (1,), not {args!r}"
            )
        pairs.append((args, {}))
    return apply_many(task, pairs)


def apply_many(
    task: Any,
    calls: Iterable[tuple[Sequence[Any] | None, Mapping[str, Any] | None]],
    *,
    task_ids: Sequence[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **options: Any,
) -> ResultSet:
    """Publish one call of ``task`` per ``(args, kwargs)`` pair in ``calls``.

    Each message is what ``task.apply_async(args, kwargs, **options)``
    sends; they go to the broker ``chunk_size`` at a time, one round trip
    per chunk where the broker allows (a pipeline on Redis, one socket
    write on RabbitMQ), in call order. ``after_task_publish`` fires when a
    message is handed to the transport, before its chunk is sent. With
    ``task_always_eager`` each call runs at once, as ``apply_async`` does.

    Arguments:
        task: a Celery task (a batch task or a plain one).
        calls: ``(args, kwargs)`` per call; either may be ``None``.
        task_ids: the id of each call (default: new ones).
        chunk_size: calls per round trip; an ``int`` of at least 1.
        **options: ``apply_async``'s options (``countdown``, ``eta``,
            ``expires``, ``priority``, ``queue``, ``link``, ...), the same
            for every call.

    Returns:
        A :class:`~celery.result.ResultSet` of one
        :class:`~celery.result.AsyncResult` per call, in call order.

    Raises:
        TypeError: for a call that is no ``(args, kwargs)`` pair, or an
            option ``apply_many`` sets itself (``task_id``, ``producer``).
        ValueError: if ``task_ids`` does not hold one id per call, or
            ``chunk_size`` is not a positive ``int``.
        BulkPublishError: if not every call could be published; it says
            which were, and the error that stopped it is its ``__cause__``.
    """
    # A task defined before its app is finalized is a lazy proxy.
    task = getattr(task, "_get_current_object", lambda: task)()
    pairs = _pairs(calls)
    ids = _ids(task_ids, len(pairs))
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int of at least 1, not {chunk_size!r}")
    for name in _OWN_OPTIONS:
        if name in options:
            raise TypeError(
                f"apply_many() sets {name} itself"
                + (": pass task_ids=[...] instead" if name == "task_id" else "")
            )
    app = task._get_app()
    if app.conf.task_always_eager:
        return app.ResultSet(
            [
                task.apply_async(args, kwargs, task_id=task_id, **options)
                for task_id, (args, kwargs) in zip(ids, pairs)
            ]
        )
    results: list[AsyncResult | None] = [None] * len(pairs)
    with bulk_publisher(app) as publisher:
        sender = _Sender(task, options, publisher)
        for start in range(0, len(pairs), chunk_size):
            chunk = range(start, min(start + chunk_size, len(pairs)))
            _publish_chunk(task, sender, publisher, chunk, pairs, ids, results)
    return app.ResultSet(results)


def _pairs(calls: Iterable[Any]) -> list[Call]:
    pairs: list[Call] = []
    for index, call in enumerate(calls):
        if not isinstance(call, (tuple, list)) or len(call) != 2:
            raise TypeError(
                f"call {index} of apply_many must be an (args, kwargs) pair, "
                f"not {call!r}"
            )
        args, kwargs = call
        if args is not None and not isinstance(args, (tuple, list)):
            raise TypeError(f"call {index}: args must be a tuple or list, not {args!r}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"call {index}: kwargs must be a mapping, not {kwargs!r}")
        pairs.append((args or (), kwargs or {}))
    return pairs


def _ids(task_ids: Sequence[str] | None, count: int) -> list[str]:
    if task_ids is None:
        # What apply_async uses (str(uuid4())), made in one go.
        return uuid4_strings(count)
    ids = list(task_ids)
    if len(ids) != count:
        raise ValueError(f"task_ids holds {len(ids)} ids for {count} calls")
    return ids


def _publish_chunk(
    task: Any,
    sender: _Sender,
    publisher: BulkPublisher,
    chunk: range,
    pairs: list[Call],
    ids: list[str],
    results: list[AsyncResult | None],
) -> None:
    # Every chunk before this one was published whole, or this one would
    # not have started.
    before = list(range(chunk.start))
    current = chunk.start
    try:
        for current in chunk:
            args, kwargs = pairs[current]
            publisher.begin()
            results[current] = sender.send(ids[current], args, kwargs)
            publisher.end()
    except Exception as exc:
        # What is held is dropped; what went out (published one by one, or
        # before a declare) is published.
        sent, partly = publisher.discard()
        published = before + list(range(chunk.start, chunk.start + sent))
        uncertain = [current] if partly and _maybe_sent(publisher, exc) else []
        raise _error(task, results, ids, published, uncertain, exc) from exc
    flushed = publisher.flush()
    if flushed.refused or flushed.uncertain:
        published = before + [chunk[i] for i in flushed.published]
        uncertain = [chunk[i] for i in flushed.uncertain]
        raise _error(
            task, results, ids, published, uncertain, flushed.error
        ) from flushed.error


def _maybe_sent(publisher: BulkPublisher, exc: Exception) -> bool:
    # A connection that failed while the message was written may have
    # carried it; any other error came before it was sent.
    connection = publisher.producer.connection
    errors = (*connection.connection_errors, *connection.channel_errors)
    return isinstance(exc, errors)


def _error(
    task: Any,
    results: list[AsyncResult | None],
    ids: list[str],
    published: list[int],
    uncertain: list[int],
    exc: BaseException | None,
) -> BulkPublishError:
    settled = set(published) | set(uncertain)
    unpublished = [i for i in range(len(ids)) if i not in settled]
    every = [r if r is not None else task.AsyncResult(i) for r, i in zip(results, ids)]
    return BulkPublishError(
        f"published {len(published)} of {len(ids)} calls of {task.name}; "
        f"{len(uncertain)} may or may not have reached the broker, "
        f"{len(unpublished)} did not: {exc!r}",
        results=every,
        published=published,
        uncertain=uncertain,
        unpublished=unpublished,
    )


class _Sender:
    """Publishes one call after another, each the cheapest exact way known.

    The first call is ``apply_async``, recorded; the next ones repeat what
    Celery did for it (:func:`_replayer`); on Redis, from the third on, a
    :class:`~celery_batches.template.Template` learnt from the first two
    renders the message directly, where nothing observes the publishing
    (no publish signal receivers, no ``task-sent`` event) and nothing in
    the message comes from the clock.
    """

    def __init__(
        self, task: Any, options: dict[str, Any], publisher: BulkPublisher
    ) -> None:
        self.task = task
        self.options = options
        self.publisher = publisher
        self.producer = publisher.producer
        self.sent = 0
        self._replay: _Replay | None = None
        self._render: Callable[[str, Any, Any], AsyncResult] | None = None
        self._first_puts: list[tuple[str, Any]] = []

    def send(self, task_id: str, args: Any, kwargs: Any) -> AsyncResult:
        render = self._render
        if render is not None:
            return render(task_id, args, kwargs)
        self.sent += 1
        replay = self._replay
        if replay is not None:
            result, message = replay.send(task_id, args, kwargs)
            if self.sent == 2:
                self._render = self._templated(replay, message, (task_id, args, kwargs))
            return result
        task = self.task
        if self.sent > 1 or not _replayable(task):
            return task.apply_async(
                args, kwargs, task_id=task_id, producer=self.producer, **self.options
            )
        amqp = task._get_app().amqp
        with recording_task_messages(amqp) as calls:
            result = task.apply_async(
                args, kwargs, task_id=task_id, producer=self.producer, **self.options
            )
        self._first_puts = self.publisher.puts()
        self._replay = _replayer(task, self.producer, self.options, calls, task_id)
        return result

    def _templated(
        self, replay: _Replay, message: Any, call: tuple[str, Any, Any]
    ) -> Callable[[str, Any, Any], AsyncResult] | None:
        first, second = self._first_puts, self.publisher.puts()
        body = message.body
        if (
            # Protocol 2's (args, kwargs, embed); protocol 1 is left to Celery.
            not isinstance(body, tuple)
            or len(body) != 3
            or len(first) != 1
            or len(second) != 1
            or first[0][0] != second[0][0]
            or message.sent_event is not None
            or "countdown" in self.options
            or isinstance(self.options.get("expires"), (int, float))
            or _observed()
        ):
            return None
        key = self.publisher.list_key()
        if key is None:
            return None
        template = Template.learn(
            first=first[0][1],
            second=second[0][1],
            call=call,
            embed=body[2],
            amqp=self.task._get_app().amqp,
            encode_body=self.publisher.encode_body,
        )
        if template is None:
            return None
        push, render, finish = self.publisher.push, template.render, replay.finish
        check = replay.check

        def send(task_id: str, args: Any, kwargs: Any) -> AsyncResult:
            if check is not None:
                check(*(args or ()), **(kwargs or {}))
            push(key, render(task_id, args, kwargs))
            return finish(task_id)

        return send


def _observed() -> bool:
    """Whether anything listens to Celery's publishing of a task message."""
    # task_sent: deprecated, still sent by Celery 5.
    names = ("before_task_publish", "after_task_publish", "task_sent")
    return any(getattr(getattr(signals, n, None), "receivers", None) for n in names)


def _replayable(task: Any) -> bool:
    """Whether Celery builds every call's message from the same options."""
    cls = type(task)
    routes = getattr(task._get_app().amqp.router, "routes", None) or ()
    return (
        cls.apply_async is Task.apply_async
        and cls.shadow_name is Task.shadow_name
        and getattr(task, "_dump_pydantic_arguments", None) is None
        # A router function may route by the arguments; a mapping cannot.
        and all(isinstance(route, MapRoute) for route in routes)
    )


class _Replay:
    """Publishes a call as Celery's ``send_task`` did a recorded one."""

    def __init__(
        self,
        task: Any,
        producer: Any,
        options: dict[str, Any],
        created: MessageCall,
        sent: MessageCall,
    ) -> None:
        app = task._get_app()
        amqp = app.amqp
        self.name = task.name
        self.producer = producer
        self.create = getattr(
            amqp.create_task_message, "__wrapped__", amqp.create_task_message
        )
        self.send_message = getattr(
            amqp.send_task_message, "__wrapped__", amqp.send_task_message
        )
        self.create_rest, self.create_kwargs = created.args[4:], created.kwargs
        send_kwargs = dict(sent.kwargs)
        # The first call declared the queue on this connection and no I/O
        # happens while messages are held: neither needs doing per call.
        send_kwargs["declare"] = []
        # No retry on a lost connection: a chunk is sent as one write, so a
        # retry could send again calls the broker took. BulkPublishError
        # says which calls were sent, may have been, and were not.
        send_kwargs["retry"] = False
        self.send_kwargs = send_kwargs
        #: ``ignore_result`` as send_task worked it out for every call.
        self.ignore_result = bool(self.create_kwargs.get("ignore_result", False))
        self.on_task_call = app.backend.on_task_call
        self.parent = (
            app.current_worker_task if options.get("add_to_parent", True) else None
        )
        #: What apply_async checks the arguments with, if the task is typed.
        self.check = getattr(task, "__header__", None) if task.typing else None
        self.result_of: Callable[[str], AsyncResult] = task.AsyncResult
        if type(task).AsyncResult is Task.AsyncResult:
            # What Task.AsyncResult makes, without looking it all up per call.
            self.result_of = partial(
                app.AsyncResult, backend=task.backend, task_name=task.name
            )

    def send(self, task_id: str, args: Any, kwargs: Any) -> tuple[AsyncResult, Any]:
        """Publish the call; return its result and Celery's message."""
        if self.check is not None:
            self.check(*(args or ()), **(kwargs or {}))
        name = self.name
        message = self.create(
            task_id, name, args, kwargs, *self.create_rest, **self.create_kwargs
        )
        self.send_message(self.producer, name, message, **self.send_kwargs)
        return self.finish(task_id), message

    def finish(self, task_id: str) -> AsyncResult:
        """What send_task does once the call's message is on its way."""
        if not self.ignore_result:
            self.on_task_call(self.producer, task_id)
        result = self.result_of(task_id)
        result.ignored = self.ignore_result
        if self.parent is not None:
            self.parent.add_trail(result)
        return result


def _replayer(
    task: Any,
    producer: Any,
    options: dict[str, Any],
    calls: list[MessageCall],
    task_id: str,
) -> _Replay | None:
    """Return what publishes a call as ``calls`` did ``task_id``'s.

    ``None`` if ``calls`` do not hold exactly what ``send_task`` does for
    one call: then every call goes through ``apply_async``.
    """
    name = task.name
    created = [
        c
        for c in calls
        if c.what == "create_task_message" and c.args[:2] == (task_id, name)
    ]
    if len(created) != 1:
        return None
    # create_task_message(task_id, name, args, kwargs, countdown, eta, ...):
    # a countdown the caller did not give was worked out from the clock
    # (send_task does so for an eta on quorum queues, native delayed
    # delivery, Celery 5.5+); repeated, it would move every later call's
    # eta, and its routing key, by the time since the first call.
    countdown = created[0].args[4] if len(created[0].args) > 4 else None
    if countdown is not None and options.get("countdown") is None:
        return None
    after = calls[calls.index(created[0]) + 1 :]
    sent = [
        c
        for c in after
        if c.what == "send_task_message" and c.args[0] is producer and c.args[1] == name
    ]
    if not sent:
        return None
    return _Replay(task, producer, options, created[0], sent[0])
