"""The Redis transport's arguments and replies, and a canary per Kombu name it uses.

The canaries fail in the tox environment of a Kombu release that changed
what :mod:`celery_batches.redis_transport` relies on, instead of batch
delivery going wrong quietly. Each reads Kombu's source where behaviour,
not only a name, is what is relied on.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("redis")

from kombu.connection import Connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from celery_batches import redis_transport
from celery_batches.delivery import (
    BATCH_TRANSPORTS,
    batch_delivery_enabled,
    use_batch_transport,
)
from celery_batches.errors import InvalidBatchSetting
from celery_batches.redis_fetch import fetch_arguments, read_reply


def _source(function: object) -> str:
    return " ".join(inspect.getsource(function).split())  # type: ignore[arg-type]


# -- arguments and replies --------------------------------------------------


def test_the_script_gets_its_keys_level_by_level() -> None:
    arguments = fetch_arguments(
        count=50,
        queues=["a", "b"],
        priority_keys=[["a", "b"], ["a:3", "b:3"]],
        acked=[True, False],
        rotate=True,
        unacked_key="unacked",
        unacked_index_key="unacked_index",
        now=12.5,
    )
    assert arguments == [
        6,
        "unacked",
        "unacked_index",
        "a",
        "b",
        "a:3",
        "b:3",
        50,
        2,
        2,
        "12.5",
        "1",
        "1",
        "0",
    ]


def test_a_reply_becomes_one_fetched_message_each() -> None:
    fetched, error = read_reply([b"", 2, b"tag-1", b"{}", 1, None, b"[]"], ["a", "b"])
    assert error == ""
    assert [(f.queue, f.recorded_tag, f.raw) for f in fetched] == [
        ("b", "tag-1", b"{}"),
        ("a", None, b"[]"),
    ]
    assert read_reply([b"OOM command not allowed"], ["a"]) == (
        [],
        "OOM command not allowed",
    )
    assert read_reply(None, ["a"]) == ([], "")


# -- choosing the transport ---------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "rediss", "sentinel"])
def test_kombus_redis_urls_get_our_transport(scheme: str) -> None:
    connection = Connection(f"{scheme}://127.0.0.1:6379/0")
    assert use_batch_transport(connection)
    assert connection.transport_cls == BATCH_TRANSPORTS[scheme]


def test_other_transports_and_made_ones_are_left_alone() -> None:
    amqp = Connection("amqp://127.0.0.1//")
    assert not use_batch_transport(amqp) and amqp.transport_cls == "amqp"
    chosen = Connection("redis://", transport="kombu.transport.redis:Transport")
    assert not use_batch_transport(chosen)
    made = Connection("redis://127.0.0.1:6379/0")
    made.transport  # noqa: B018 - made before it could be switched
    assert not use_batch_transport(made) and made.transport_cls == "redis"


def test_the_setting_is_a_bool() -> None:
    assert batch_delivery_enabled({}) is True
    assert batch_delivery_enabled({"batches_redis_delivery": False}) is False
    with pytest.raises(InvalidBatchSetting, match="batches_redis_delivery"):
        batch_delivery_enabled({"batches_redis_delivery": "no"})


# -- canaries: one per private Kombu name the transport relies on ----------


def test_canary_every_name_is_there() -> None:
    assert redis_transport.supported()


def test_canary_brpop_start_names_the_keys_level_by_level() -> None:
    # what _brpop_start of ours mirrors: every queue at the first priority
    # level, then every queue at the next, in the cycle's order
    source = _source(kombu_redis.Channel._brpop_start)
    assert "self._queue_cycle.consume(len(self.active_queues))" in source
    assert (
        "[self._q_for_pri(queue, pri) for pri in self.priority_steps "
        "for queue in queues]"
    ) in source
    assert "self._in_poll = self.client.connection" in source
    assert "send_command(" in source


def test_canary_brpop_read_rotates_and_delivers() -> None:
    source = _source(kombu_redis.Channel._brpop_read)
    assert "self._queue_cycle.rotate(dest)" in source
    assert "self.connection._deliver(loads(bytes_to_str(item)), dest)" in source
    assert "self._in_poll = None" in source
    assert "def _brpop_read(self, **options)" in source


def test_canary_the_poller_reads_through_the_channels_handlers() -> None:
    assert "chan.handlers[type]()" in _source(kombu_redis.MultiChannelPoller)
    assert "'BRPOP': self._brpop_read" in _source(kombu_redis.Channel.__init__)
    assert "channel._brpop_start()" in _source(
        kombu_redis.MultiChannelPoller._register_BRPOP
    )


def test_canary_the_unacked_record_is_what_the_script_writes() -> None:
    # [message, exchange, routing_key] in the hash, the delivery time in
    # the index, as the script writes them
    source = _source(kombu_redis.QoS.append)
    assert "dumps([message._raw, EX, RK])" in source
    assert "delivery['exchange'], delivery['routing_key']" in source
    assert "time()" in source
    assert callable(kombu_redis.QoS.restore_by_tag)
    assert "restore_visible" in _source(kombu_redis.QoS)


def test_canary_a_message_is_recorded_before_the_consumer_sees_it() -> None:
    # the virtual channel's callback appends to the QoS, then calls back
    source = _source(virtual.Channel.basic_consume)
    assert "self.qos.append(message, message.delivery_tag)" in source
    assert "if not no_ack:" in source
    assert callable(virtual.QoS.can_consume_max_estimate)
    assert callable(virtual.Transport._deliver)


def test_canary_publishing_goes_through_conn_or_acquire() -> None:
    for method in (kombu_redis.Channel._put, kombu_redis.Channel._put_fanout):
        assert "with self.conn_or_acquire() as client:" in _source(method)
    signature = inspect.signature(kombu_redis.Channel.conn_or_acquire)
    assert list(signature.parameters) == ["self", "client"]


def test_canary_queue_cycles_rotate_as_known() -> None:
    from kombu.utils.scheduling import cycle_by_name

    assert redis_transport._rotates(cycle_by_name("round_robin")()) is True
    assert redis_transport._rotates(cycle_by_name("priority")()) is False
    assert redis_transport._rotates(cycle_by_name("sorted")()) is False


def test_canary_poll_error_reads_the_pending_reply() -> None:
    source = _source(kombu_redis.Channel._poll_error)
    assert "def _poll_error(self, type, **options)" in source
