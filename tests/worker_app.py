"""Entry point of worker subprocesses: ``celery -A tests.worker_app worker``."""

from __future__ import annotations

import json
import os

from tests.app import Journal, create_app

if os.environ.get("CB_TEST_TRACE_ACKS"):
    # Journal every basic.ack frame this worker sends (tag, multiple), to
    # count how many frames a batch took. Patched on the class before the
    # worker opens a channel, so it is what every channel calls.
    from amqp.channel import Channel

    _basic_ack = Channel.basic_ack
    _frames = Journal(os.environ["CB_TEST_JOURNAL"])

    def _traced_ack(
        self: Channel, delivery_tag: int, multiple: bool = False, *args: object
    ) -> object:
        _frames.write("ackframe", os.getpid(), delivery_tag, int(bool(multiple)))
        return _basic_ack(self, delivery_tag, multiple, *args)

    Channel.basic_ack = _traced_ack

app = create_app(
    broker=os.environ["CB_TEST_BROKER"],
    backend=os.environ["CB_TEST_BACKEND"],
    journal=os.environ["CB_TEST_JOURNAL"],
    queue=os.environ["CB_TEST_QUEUE"],
    **json.loads(os.environ.get("CB_TEST_CONF", "{}")),
)
