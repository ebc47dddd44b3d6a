"""The quarantine of private names: version switches, and a canary per name."""

from __future__ import annotations

from types import SimpleNamespace

import celery
import kombu
from celery import Celery
from kombu.asynchronous import Hub

from celery_batches._compat import (
    ticks_after_ready_callbacks,
    wake_hub_with_pending_callbacks,
)


def test_no_tick_for_a_hub_without_a_waker() -> None:
    # kombu 5.5 has the ready set and its lock, but no waker to wake
    hub = SimpleNamespace(_pop_ready=lambda: set(), _ready=set(), _ready_lock=None)
    assert wake_hub_with_pending_callbacks(hub, lambda: None) is None


def test_the_tick_never_fails_on_this_kombus_hub() -> None:
    hub = Hub()
    try:
        tick = wake_hub_with_pending_callbacks(hub, lambda: None)
        if tick is not None:
            hub.call_soon(lambda: None)
            tick()  # wakes the waker if there is one; must not raise
    finally:
        hub.close()


def test_ticks_run_again_after_ready_callbacks_only_on_kombu_5_2() -> None:
    # Kombu 5.2's loop runs its ticks before its ready callbacks, so a
    # ready callback that frees the prefetch window must run the ticks again
    # (the Redis transport sends its next BRPOP from one); later Kombu runs
    # ready callbacks first.
    hub = Hub()
    try:
        order: list[str] = []
        hub.on_tick.add(lambda: order.append("tick"))
        hub.call_soon(lambda: order.append("ready"))
        next(hub.create_loop())
        again = ticks_after_ready_callbacks(hub)
        if KOMBU >= (5, 3):
            assert order[:2] == ["ready", "tick"]
            assert again is None
        else:
            assert order[:2] == ["tick", "ready"]
            assert again is not None
            again()
            assert order[2:] == ["tick"]
    finally:
        hub.close()


# -- canaries: one per private name in celery_batches._compat ---------------
#
# Each fails, in the tox environment of a Celery/Kombu/py-amqp/vine release
# that changed the name, where the package would otherwise fall back quietly
# (or fail somewhere far from the cause).

CELERY = tuple(int(part) for part in celery.__version__.split(".")[:2])
KOMBU = tuple(int(part) for part in kombu.__version__.split(".")[:2])


def test_canary_celery_task_stack() -> None:
    from celery._state import _task_stack

    assert callable(_task_stack.push) and callable(_task_stack.pop)


def test_canary_celery_request_payload_and_context(app: Celery) -> None:
    # given a worker request built from Celery's own test message
    from celery.contrib.testing.mocks import TaskMessage
    from celery.worker.request import Request

    @app.task(shared=False)
    def add(x: int) -> int:
        return x

    message = TaskMessage(add.name, args=(1,), kwargs={})
    request = Request(message, app=app, task=add)
    # then the decoded body is (args, kwargs, options), and the context reads
    args, kwargs, options = request._payload
    assert (args, kwargs) == ([1], {}) or (args, kwargs) == ((1,), {})
    assert options is None or isinstance(options, dict)
    assert request._context.id == request.id


def test_canary_celery_revoked_stamps() -> None:
    from celery.worker import state

    assert isinstance(getattr(state, "revoked_stamps", None), dict) == (
        CELERY >= (5, 3)
    )


def test_canary_celery_quorum_detection() -> None:
    # what per_consumer_qos repeats of Tasks.qos_global
    from celery.worker.consumer.tasks import Tasks

    assert hasattr(Tasks, "qos_global") == (CELERY >= (5, 5))
    if CELERY >= (5, 5):
        from celery.utils.quorum_queues import detect_quorum_queues

        assert callable(detect_quorum_queues)


def test_canary_vine_promise_pending_callbacks() -> None:
    from vine import promise

    p = promise(lambda: None)
    assert p._svpending is None and not p._lvpending
    p.then(lambda *a: None)
    assert p._svpending is not None or p._lvpending


def test_canary_kombu_qos_mutex() -> None:
    from kombu.common import QoS

    assert hasattr(QoS(lambda **kw: None, 4), "_mutex")


def test_canary_kombu_hub_ready_and_waker() -> None:
    hub = Hub()
    try:
        # what wake_hub_with_pending_callbacks needs, from Kombu 5.7 on
        # (before, it installs no tick, and needs nothing)
        needed = ("_ready", "_pop_ready", "_waker")
        assert all(hasattr(hub, name) for name in needed) == (KOMBU >= (5, 7))
    finally:
        hub.close()


def test_canary_kombu_redis_qos_bookkeeping() -> None:
    from kombu.transport.redis import QoS as RedisQoS
    from kombu.transport.virtual.base import QoS as VirtualQoS

    for name in ("pipe_or_acquire", "restore_unacked"):
        assert callable(getattr(RedisQoS, name)), name
    # redis_remove_from_unacked names the keys Kombu's QoS removes a tag from
    source = inspect_source(RedisQoS._remove_from_indices)
    assert "zrem(self.unacked_index_key, delivery_tag)" in source
    assert "hdel(self.unacked_key, delivery_tag)" in source
    assert callable(VirtualQoS.ack)


def test_canary_celery_green_timers_keep_their_entry() -> None:
    # cancel_timer_entry reads the greenlet's `entry` (gevent and eventlet)
    import inspect

    from celery.concurrency import eventlet, gevent

    for module in (gevent, eventlet):
        source = inspect.getsource(module.Timer._enter)
        assert "g.entry = entry" in source, module.__name__


def test_canary_py_amqp_channel_consumers() -> None:
    from amqp.channel import Channel

    source = inspect_source(Channel.basic_consume)
    assert "self.callbacks[consumer_tag]" in source
    assert "no_ack_consumers" in source


def inspect_source(function: object) -> str:
    import inspect

    return inspect.getsource(function)  # type: ignore[arg-type]


def test_canary_celery_send_task_asks_amqp_for_message_and_send() -> None:
    # recording_task_messages relies on send_task calling
    # create_task_message(task_id, name, args, kwargs, ...) and then
    # send_task_message(producer, name, message, **options) on app.amqp
    from celery_batches._compat import recording_task_messages

    app = Celery("canary", broker="memory://", set_as_current=False)

    @app.task(shared=False)
    def add(x: int, y: int = 0) -> int:
        return x + y

    with app.producer_or_acquire() as producer:
        with recording_task_messages(app.amqp) as calls:
            add.apply_async((1,), {"y": 2}, task_id="canary-id", producer=producer)
        created, sent = calls
        assert created.what == "create_task_message"
        assert created.args[:4] == ("canary-id", add.name, (1,), {"y": 2})
        assert sent.what == "send_task_message"
        assert sent.args[0] is producer and sent.args[1] == add.name
    # and outside the context nothing is recorded
    add.apply_async((3,))
    assert len(calls) == 2
    app.close()


def test_canary_py_amqp_writes_through_the_transports_write() -> None:
    # amqp_publishes_held swaps the transport's _write, which py-amqp sets
    # to the socket's sendall when it connects and calls for every frame
    from amqp import method_framing, transport

    assert "self._write = self.sock.sendall" in inspect_source(
        transport.TCPTransport._setup_transport
    )
    assert "self._write(s)" in inspect_source(transport._AbstractTransport.write)
    assert "write = transport.write" in inspect_source(method_framing.frame_writer)


def test_canary_kombu_connection_makes_its_transport_lazily() -> None:
    from kombu.connection import Connection

    from celery_batches._compat import transport_created

    connection = Connection("memory://")
    assert connection._transport is None and not transport_created(connection)
    connection.transport  # noqa: B018
    assert transport_created(connection)
    connection.release()
