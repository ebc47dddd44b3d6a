"""apply_many and delay_many publish what apply_async would, in fewer round trips."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery, signals
from celery.result import ResultSet
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.bulk import _observed, apply_many, delay_many
from celery_batches.errors import BulkPublishError
from celery_batches.template import Template
from tests.harness.brokers import AMQP_URL, REDIS_URL, require_server
from tests.harness.journal import Run
from tests.harness.wait import wait_for
from tests.harness.worker import Worker

BROKER_URLS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}

#: Headers Celery computes from the clock when the message is built.
CLOCK_HEADERS = ("eta", "expires")


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    url = BROKER_URLS[request.param]
    require_server(url)
    return url


@pytest.fixture
def app(broker_url: str) -> Iterator[Celery]:
    app = Celery("bulk", broker=broker_url, set_as_current=False)
    queue = f"bulk-{uuid()}"
    other = f"{queue}-other"
    queues = [
        Queue(queue, Exchange(queue), routing_key=queue, max_priority=10),
        Queue(other, Exchange(other), routing_key=other, max_priority=10),
    ]
    app.conf.update(task_default_queue=queue, task_queues=queues)
    with Connection(broker_url) as conn:
        for declared in queues:
            declared(conn.default_channel).declare()
    yield app
    with Connection(broker_url) as conn:
        for name in (queue, other):
            # It may not exist.
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(name)
    app.close()


def _task(app: Celery, **options: Any) -> Any:
    @app.task(base=Batches, name="bulk.work", shared=False, **options)
    def work(requests: list[SimpleRequest]) -> None:
        pass

    return work


def _drain(app: Celery, queue: str | None = None, *, expect: int = 0) -> list[Any]:
    """The messages waiting in ``queue``, taken off the broker in order.

    Waits (bounded) until ``expect`` arrived: RabbitMQ routes a message
    published without confirms a moment after it was written.
    """
    name = queue or app.conf.task_default_queue
    messages: list[Any] = []
    with Connection(app.conf.broker_url) as conn:
        channel = conn.default_channel

        def taken() -> bool:
            while True:
                message = channel.basic_get(name, no_ack=True)
                if message is None:
                    return len(messages) >= expect
                messages.append(message)

        # basic_get is a round trip per message: give a long queue time.
        timeout = 10 + expect / 100
        wait_for(taken, timeout=timeout, what=f"{expect} messages in {name}")
    return messages


def _close_in_time(first: Any, second: Any) -> bool:
    if first is None or second is None:
        return first == second
    return abs(
        datetime.fromisoformat(first) - datetime.fromisoformat(second)
    ) < timedelta(seconds=5)


def _assert_same_message(sent: Any, bulk: Any) -> None:
    """``bulk`` is ``sent`` but for its delivery tag and the clock's reading."""
    sent_headers, bulk_headers = dict(sent.headers), dict(bulk.headers)
    for name in CLOCK_HEADERS:
        assert _close_in_time(
            sent_headers.pop(name, None), bulk_headers.pop(name, None)
        )
    assert bulk_headers == sent_headers
    assert bulk.body == sent.body
    assert (bulk.content_type, bulk.content_encoding) == (
        sent.content_type,
        sent.content_encoding,
    )
    sent_properties, bulk_properties = dict(sent.properties), dict(bulk.properties)
    for properties in (sent_properties, bulk_properties):
        properties.pop("delivery_tag", None)
        properties.pop("application_headers", None)  # the headers, above
    assert bulk_properties == sent_properties
    routing = ("exchange", "routing_key", "priority")
    assert {k: bulk.delivery_info.get(k) for k in routing} == {
        k: sent.delivery_info.get(k) for k in routing
    }


OPTIONS = {
    "none": {},
    "countdown": {"countdown": 30},
    "eta": {"eta": datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)},
    "expires": {"expires": 600},
    "priority": {"priority": 7},
    "headers": {"headers": {"x-tenant": "blue"}},
    "limits": {"time_limit": 20, "soft_time_limit": 10},
    "ignore_result": {"ignore_result": True},
    "compression": {"compression": "zlib"},
    "shadow": {"shadow": "bulk.renamed"},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_each_message_is_what_apply_async_sends(
    app: Celery, options: dict[str, Any]
) -> None:
    # given a batch task, and a call sent with apply_async
    task = _task(app)
    task_id = uuid()
    task.apply_async((1, "two"), {"three": [3]}, task_id=task_id, **options)
    # when the same call is sent with apply_many, with the same id and options
    results = task.apply_many(
        [((1, "two"), {"three": [3]})], task_ids=[task_id], **options
    )
    # then the broker holds the same message twice, but for its delivery tag
    assert [r.id for r in results] == [task_id]
    sent, bulk = _drain(app, expect=2)
    _assert_same_message(sent, bulk)


@pytest.mark.parametrize("protocol", [1, 2])
def test_every_call_is_what_apply_async_sends_for_it(
    app: Celery, protocol: int
) -> None:
    # given a plain task, messages of task protocol 1 or 2, links, and 25
    # calls sent one by one with apply_async
    app.conf.task_protocol = protocol

    @app.task(name="bulk.plain", shared=False)
    def plain(value: int, *, scale: int = 1) -> int:
        return value * scale

    calls = [((n,), {"scale": n % 3}) for n in range(25)]
    ids = [uuid() for _ in calls]
    options = {"link": plain.s(), "link_error": plain.si(0), "priority": 3}
    for task_id, (args, kwargs) in zip(ids, calls):
        plain.apply_async(args, kwargs, task_id=task_id, **options)
    # when the same calls go with the bulk API, in chunks of 10
    results = apply_many(plain, calls, task_ids=ids, chunk_size=10, **options)
    # then each bulk message is the one apply_async sent for that call
    messages = _drain(app, expect=50)
    assert len(messages) == 50
    for sent, bulk in zip(messages[:25], messages[25:]):
        _assert_same_message(sent, bulk)
    assert [r.id for r in results] == ids


ODD_ARGUMENTS: list[tuple[Any, ...]] = [
    (1,),
    ("it's",),
    ("back\\slash", "new\nline", "\u00e9t\u00e9"),
    (None, True, 1.5, -0.0, 10**30),
    ({"nested": [1, {"deep": (2, 3)}]},),
    ("x" * 3000,),
    ([], {}, ()),
    (b"bytes",),
]


def test_calls_of_every_shape_are_what_apply_async_sends(app: Celery) -> None:
    # given calls whose arguments take every path of Celery's argsrepr
    # (flat, quoted, nested, cut short), sent one by one with apply_async
    app.conf.task_serializer = "pickle"
    app.conf.accept_content = ["pickle", "json"]
    task = _task(app)
    calls = [(args, {"k": args[0]} if args else {}) for args in ODD_ARGUMENTS * 3]
    ids = [uuid() for _ in calls]
    for task_id, (args, kwargs) in zip(ids, calls):
        task.apply_async(args, kwargs, task_id=task_id)
    # when the same calls go in bulk
    task.apply_many(calls, task_ids=ids)
    # then each message is the one apply_async sent for that call
    messages = _drain(app, expect=2 * len(calls))
    for sent, bulk in zip(messages[: len(calls)], messages[len(calls) :]):
        _assert_same_message(sent, bulk)


def test_queue_and_routing_options_reach_the_same_queue(app: Celery) -> None:
    # given calls routed to another queue, by name
    task = _task(app)
    other = f"{app.conf.task_default_queue}-other"
    task_id = uuid()
    task.apply_async((1,), task_id=task_id, queue=other)
    # when the same call is sent in bulk
    task.apply_many([((1,), None)], task_ids=[task_id], queue=other)
    # then both are in that queue, alike, and none in the default one
    sent, bulk = _drain(app, other, expect=2)
    _assert_same_message(sent, bulk)
    assert _drain(app) == []


def test_delay_many_sends_delay_calls_and_keeps_their_order(app: Celery) -> None:
    # given a batch task
    task = _task(app)
    # when 30 calls go with delay_many
    results = task.delay_many([(n, f"n{n}") for n in range(30)])
    # then they are a ResultSet, one per call, and arrive in that order
    assert isinstance(results, ResultSet) and len(results) == 30
    messages = _drain(app, expect=30)
    assert [m.headers["id"] for m in messages] == [r.id for r in results]
    assert [m.headers["argsrepr"] for m in messages] == [
        repr((n, f"n{n}")) for n in range(30)
    ]


def test_signals_fire_once_per_call_with_its_own_message(app: Celery) -> None:
    # given receivers of Celery's publish signals
    before: list[str] = []
    after: list[str] = []

    def on_before(headers: dict[str, Any], **kwargs: Any) -> None:
        before.append(headers["id"])
        # a receiver may add a header per message, as tracers do
        headers["x-trace"] = f"trace-{headers['id']}"

    def on_after(headers: dict[str, Any], **kwargs: Any) -> None:
        after.append(headers["id"])

    signals.before_task_publish.connect(on_before, weak=False)
    signals.after_task_publish.connect(on_after, weak=False)
    try:
        # when 12 calls go in bulk, in chunks of 5
        results = _task(app).apply_many([((n,), {}) for n in range(12)], chunk_size=5)
    finally:
        signals.before_task_publish.disconnect(on_before)
        signals.after_task_publish.disconnect(on_after)
    # then each signal fired once per call, and each message carries the
    # header its own receiver call added
    ids = [r.id for r in results]
    assert before == ids and after == ids
    messages = _drain(app, expect=12)
    assert [m.headers["x-trace"] for m in messages] == [f"trace-{i}" for i in ids]


def test_a_router_function_routes_each_call_by_its_arguments(app: Celery) -> None:
    # given a router function that sends odd values to the other queue
    other = f"{app.conf.task_default_queue}-other"

    def by_parity(name: str, args: Any, kwargs: Any, options: Any, **kw: Any) -> Any:
        return {"queue": other} if args and args[0] % 2 else None

    app.conf.task_routes = (by_parity,)
    task = _task(app)
    # when six calls go in bulk
    task.delay_many([(n,) for n in range(6)])
    # then each went where the router sent it
    assert [m.headers["argsrepr"] for m in _drain(app, expect=3)] == [
        "(0,)",
        "(2,)",
        "(4,)",
    ]
    assert [m.headers["argsrepr"] for m in _drain(app, other, expect=3)] == [
        "(1,)",
        "(3,)",
        "(5,)",
    ]


def test_a_shadow_name_is_computed_for_each_call(app: Celery) -> None:
    # given a task class that names each call after its argument
    class Shadowed(Batches):  # type: ignore[misc]
        def shadow_name(self, args: Any, kwargs: Any, options: Any) -> str:
            return f"work-{args[0]}"

    @app.task(base=Shadowed, name="bulk.shadowed", shared=False)
    def shadowed(requests: list[SimpleRequest]) -> None:
        pass

    # when three calls go in bulk
    shadowed.delay_many([(n,) for n in range(3)])
    # then each message carries its own
    assert [m.headers["shadow"] for m in _drain(app, expect=3)] == [
        "work-0",
        "work-1",
        "work-2",
    ]


# -- round trips -----------------------------------------------------------


class _Traffic:
    """Socket writes, and round trips: writes after the last read, counted once."""

    def __init__(self) -> None:
        self.writes = 0
        self.round_trips = 0
        self._reading = True

    def wrote(self) -> None:
        self.writes += 1
        if self._reading:
            self.round_trips += 1
        self._reading = False

    def read(self) -> None:
        self._reading = True


@contextmanager
def _traffic() -> Iterator[_Traffic]:
    """Count every socket's writes and round trips in this block."""
    traffic = _Traffic()
    originals = {
        name: getattr(socket.socket, name) for name in ("sendall", "recv", "recv_into")
    }

    def wrap(name: str) -> Any:
        original = originals[name]
        count = traffic.wrote if name == "sendall" else traffic.read

        def counted(self: socket.socket, *args: Any) -> Any:
            count()
            return original(self, *args)

        return counted

    for name in originals:
        setattr(socket.socket, name, wrap(name))
    try:
        yield traffic
    finally:
        for name, original in originals.items():
            setattr(socket.socket, name, original)


def _fresh(app: Celery) -> Celery:
    """An app of its own on ``app``'s broker and queue, with new connections.

    Kombu pools connections by their parameters, across apps: a transport
    option nobody reads makes them this app's own.
    """
    fresh = Celery("fresh", broker=app.conf.broker_url, set_as_current=False)
    fresh.conf.update(
        task_default_queue=app.conf.task_default_queue,
        task_queues=app.conf.task_queues,
        broker_transport_options={"cb_test_pool": uuid()},
    )
    return fresh


def test_one_round_trip_per_chunk(app: Celery) -> None:
    # given apps whose connections are made while the sockets are watched
    # (py-amqp looks a socket's sendall up when it connects)
    def bulk(calls: int) -> _Traffic:
        fresh = _fresh(app)
        with _traffic() as traffic:
            _task(fresh).apply_many([((n,), {}) for n in range(calls)], chunk_size=500)
        fresh.close()
        return traffic

    def one_by_one(calls: int) -> _Traffic:
        fresh = _fresh(app)
        with _traffic() as traffic:
            for n in range(calls):
                fresh.send_task("bulk.work", (n,))
        fresh.close()
        return traffic

    # when 500 and then 2,000 calls go in chunks of 500, and 10 and then 60
    # one by one
    small, large = bulk(500), bulk(2000)
    few, many = one_by_one(10), one_by_one(60)
    # then 1,500 more calls in bulk took three more round trips on Redis,
    # three more writes on RabbitMQ (which answers no publish); one by one
    # takes one of those per call
    if app.conf.broker_url.startswith("redis"):
        assert large.round_trips - small.round_trips == 3
        assert many.round_trips - few.round_trips >= 45
    else:
        assert large.writes - small.writes == 3
        assert many.writes - few.writes >= 45
    assert len(_drain(app, expect=2570)) == 2570


def test_without_batch_delivery_redis_publishes_one_call_per_round_trip(
    app: Celery,
) -> None:
    if not app.conf.broker_url.startswith("redis"):
        pytest.skip("a setting of celery-batches' Redis transport")

    # given apps that turned batch delivery off
    def bulk(calls: int) -> _Traffic:
        fresh = _fresh(app)
        fresh.conf.batches_redis_delivery = False
        with _traffic() as traffic:
            _task(fresh).apply_many([((n,), {}) for n in range(calls)], chunk_size=500)
        fresh.close()
        return traffic

    # when 10 and then 60 calls go through apply_many
    few, many = bulk(10), bulk(60)
    # then they went through Kombu's own transport, a round trip per call,
    # as apply_async sends them, and every call arrived
    assert many.round_trips - few.round_trips >= 45
    assert len(_drain(app, expect=70)) == 70


# -- errors ----------------------------------------------------------------


def test_an_error_mid_way_says_which_calls_were_published(app: Celery) -> None:
    # given 30 calls, of which the 14th has an argument JSON cannot encode
    task = _task(app)
    calls: list[tuple[Any, ...]] = [(n,) for n in range(30)]
    calls[13] = (object(),)
    # when they go in chunks of 10
    with pytest.raises(BulkPublishError) as raised:
        task.apply_many([(args, {}) for args in calls], chunk_size=10)
    # then the first chunk went out whole and nothing else did, as the
    # error says, with the encoding error as its cause
    error = raised.value
    assert error.published == list(range(10))
    assert error.uncertain == []
    assert error.unpublished == list(range(10, 30))
    assert "EncodeError" in type(error.__cause__).__name__
    assert [m.headers["id"] for m in _drain(app, expect=10)] == [
        error.results[i].id for i in error.published
    ]
    # and sending the unpublished ones again (bar the bad one) completes it
    again = task.apply_many([(calls[i], {}) for i in error.unpublished if i != 13])
    assert len(again) == 19
    assert len(_drain(app, expect=19)) == 19


def test_bad_calls_and_options_are_refused_before_anything_is_sent(app: Celery) -> None:
    task = _task(app)
    with pytest.raises(TypeError, match="call 1 of delay_many"):
        task.delay_many([(1,), 2])
    with pytest.raises(TypeError, match="call 0 of apply_many"):
        task.apply_many([(1,)])
    with pytest.raises(TypeError, match="kwargs must be a mapping"):
        task.apply_many([((1,), [2])])
    with pytest.raises(TypeError, match="task_ids"):
        task.apply_many([((1,), {})], task_id="x")
    with pytest.raises(ValueError, match="2 ids for 1 calls"):
        task.apply_many([((1,), {})], task_ids=["a", "b"])
    with pytest.raises(ValueError, match="chunk_size"):
        task.apply_many([((1,), {})], chunk_size=0)
    assert _drain(app) == []


# -- the messages run ------------------------------------------------------


def test_a_worker_runs_bulk_calls_of_batch_and_plain_tasks(worker: Worker) -> None:
    # given a worker (each broker and pool) with a batch task and a plain one
    collect = worker.tasks.collect
    total = worker.tasks.total
    # when calls of each go in bulk
    batched = collect.delay_many([(n, n) for n in range(12)])
    plain = delay_many(total, [([n, n, n],) for n in range(4)])
    # then every call ran, once, with its own result
    assert batched.get(timeout=30) == [2 * n for n in range(12)]
    assert plain.get(timeout=30) == [3 * n for n in range(4)]
    ids = {r.id for r in batched}
    runs = [i for i in worker.journal.ids(Run) if i in ids]
    assert sorted(runs) == sorted(ids)


def test_eager_apply_many_runs_each_call_now() -> None:
    app = Celery("eager", set_as_current=False)
    app.conf.task_always_eager = True
    ran: list[int] = []

    @app.task(base=Batches, shared=False, per_request_results=True)
    def work(requests: list[SimpleRequest]) -> list[int]:
        ran.extend(r.args[0] for r in requests)
        return [r.args[0] * 2 for r in requests]

    results = work.delay_many([(1,), (2,)])
    assert ran == [1, 2]
    assert [r.get() for r in results] == [2, 4]


def test_redis_refusing_a_write_is_a_refused_call(app: Celery) -> None:
    if not app.conf.broker_url.startswith("redis"):
        pytest.skip("a Redis server's own refusal")
    # given a queue whose Redis key is not a list: the server refuses the
    # LPUSH of every message for it, and only for it
    other = f"{app.conf.task_default_queue}-other"
    client = redis.Redis.from_url(app.conf.broker_url)
    client.set(other, "not a list")
    try:
        task = _task(app)
        # when calls go to that queue
        with pytest.raises(BulkPublishError) as raised:
            task.apply_many([((n,), {}) for n in range(3)], queue=other)
    finally:
        client.delete(other)
        client.close()
    # then the calls to the broken key are unpublished, none uncertain
    error = raised.value
    assert (error.published, error.uncertain, error.unpublished) == ([], [], [0, 1, 2])
    assert "WRONGTYPE" in repr(error.__cause__)


def test_a_key_prefix_and_a_priority_hold_for_every_templated_call(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not broker_url.startswith("redis"):
        pytest.skip("Kombu's Redis key prefix")
    # given an app whose Redis transport prefixes every key, and a record of
    # the templates bulk publishing learns (from the third call on, each
    # message is rendered, not built by Celery)
    prefix = f"cbbulk-{uuid()}:"
    queue = f"bulk-{uuid()}"
    app = Celery("bulk-prefix", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_queues=[Queue(queue, Exchange(queue), routing_key=queue, max_priority=10)],
        broker_transport_options={"global_keyprefix": prefix},
    )
    learnt: list[Template | None] = []
    learn = Template.learn.__func__  # type: ignore[attr-defined]

    def recording(cls: type[Template], /, **kwargs: Any) -> Template | None:
        template: Template | None = learn(cls, **kwargs)
        learnt.append(template)
        return template

    monkeypatch.setattr(Template, "learn", classmethod(recording))
    client = redis.Redis.from_url(broker_url)
    try:
        # when 50 calls go in bulk with a priority, in chunks of 20
        results = _task(app).apply_many(
            [((n,), {}) for n in range(50)], priority=7, chunk_size=20
        )
        # then every key written for them is under the prefix, and a
        # consumer with the same prefix takes every call, in order, with
        # its priority
        keys = {k.decode() for k in client.scan_iter(match=f"*{queue}*", count=1000)}
        assert keys and all(k.startswith(prefix) for k in keys), keys
        with Connection(
            broker_url, transport_options={"global_keyprefix": prefix}
        ) as conn:
            channel = conn.default_channel
            taken = []
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                taken.append(message)
        assert [m.headers["id"] for m in taken] == [r.id for r in results]
        assert {m.properties["priority"] for m in taken} == {7}
        if not _observed():
            # (a publish signal receiver left connected by another test
            # keeps every call on Celery's own path)
            assert learnt and learnt[0] is not None
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
        app.close()
