"""The ceiling: a bare Kombu consumer that decodes and acks each message.

Usage: ``python bare_consumer.py URL QUEUE COUNT JOURNAL TIMEOUT PREFETCH MAX_SECONDS
[QUEUE_TYPE [ACKS]]``

Drains ``COUNT`` messages from ``QUEUE`` (or as many as it can in
``MAX_SECONDS`` after the first one, if not zero), acking each one, and appends a
``start end count`` lines to ``JOURNAL`` (the format the Celery workers
write), then exits. No Celery on the path: only what any consumer of
the broker must do. ``ACKS`` = ``noack`` consumes with ``no_ack`` (the
broker forgets each message as it sends it): the ceiling of a consumer
that does no bookkeeping at all.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import Any

from kombu import Connection, Consumer, Exchange, Queue

__all__ = ["main"]


def main(argv: list[str]) -> int:
    url, queue_name, count_arg, journal, timeout_arg, prefetch_arg, cap_arg = argv[:7]
    count, timeout, prefetch = int(count_arg), float(timeout_arg), int(prefetch_arg)
    cap = float(cap_arg) or float("inf")
    # A quorum queue must be declared with the arguments it was made with;
    # its consumer gets a per-consumer window (kombu's default), which is
    # what a quorum queue allows.
    queue_type = argv[7] if len(argv) > 7 else ""
    no_ack = len(argv) > 8 and argv[8] == "noack"
    queue = Queue(
        queue_name,
        Exchange(queue_name, type="direct"),
        queue_name,
        durable=True,
        queue_arguments={"x-queue-type": queue_type} if queue_type else None,
    )
    seen = 0
    first_start = first_end = last = 0.0

    def on_message(body: Any, message: Any) -> None:
        nonlocal seen, first_start, first_end, last
        if not seen:
            first_start = time.time()
        # The same per-message work as the Celery setups, on the decoded body.
        args = body[0] if isinstance(body, (list, tuple)) else body["args"]
        int(args[0]) * 2 + 1
        if not no_ack:
            message.ack()
        seen += 1
        last = time.time()
        if seen == 1:
            first_end = last

    deadline = time.monotonic() + timeout
    with (
        Connection(url) as conn,
        Consumer(
            conn.default_channel,
            queues=[queue],
            callbacks=[on_message],
            prefetch_count=prefetch,
            accept=["json"],
            no_ack=no_ack,
        ),
    ):
        while (
            seen < count
            and time.monotonic() < deadline
            and not (seen and time.time() - first_end >= cap)
        ):
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=1)
    if seen and seen < count:
        # Ended by the cap (or the timeout): the window ends now.
        last = time.time()
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # Two "executions", as the journal's reader expects: the first
        # message, then all the others.
        os.write(fd, b"%.6f %.6f 1\n" % (first_start, first_end))
        if seen > 1:
            os.write(fd, b"%.6f %.6f %d\n" % (first_end, last, seen - 1))
    finally:
        os.close(fd)
    return 0 if seen > 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
