"""Entry point of worker subprocesses: ``celery -A tests.harness.worker_app worker``.

:func:`tests.harness.worker.start_worker` passes the test app's settings in
``CB_TEST_*`` environment variables.
"""

from __future__ import annotations

import json
import os

from tests.harness.app import create_app
from tests.harness.journal import AckFrame, Journal

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
        _frames.write(AckFrame(pid=os.getpid(), tag=delivery_tag, multiple=multiple))
        return _basic_ack(self, delivery_tag, multiple, *args)

    Channel.basic_ack = _traced_ack

app, tasks = create_app(
    broker=os.environ["CB_TEST_BROKER"],
    backend=os.environ["CB_TEST_BACKEND"],
    journal=os.environ["CB_TEST_JOURNAL"],
    queue=os.environ["CB_TEST_QUEUE"],
    **json.loads(os.environ.get("CB_TEST_CONF", "{}")),
)
