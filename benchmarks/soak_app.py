"""The Celery app the soak's workers run: two batch tasks that journal each call.

Started as ``celery -A benchmarks.soak_app worker`` and configured by the
environment (``SOAK_*``, set by :mod:`benchmarks.soak_worker`). Each body
appends ``start <id> <pid>`` for every call when it begins and
``done <id> <pid>`` once it has processed the call, so the soak can count,
per call, how many executions began and how many completed. The worker's
main process adds ``received <id> <pid>`` when a call reaches it and
``flushed <pid> <reason> <ids>`` when it hands a batch to its pool.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals

from celery_batches import Batches, SimpleRequest
from celery_batches.signals import batch_flushed

__all__ = ["EARLY", "LATE", "app"]

#: Task names, one per acks mode.
EARLY = "soak.early"
LATE = "soak.late"

_env = os.environ.get
JOURNAL = _env("SOAK_JOURNAL", os.devnull)

app = Celery(
    "soak",
    broker=_env("SOAK_BROKER"),
    backend=_env("SOAK_BACKEND"),
    set_as_current=True,
)
app.conf.update(
    task_default_queue=_env("SOAK_QUEUE", "soak"),
    broker_transport_options=json.loads(_env("SOAK_TRANSPORT_OPTIONS", "{}")),
    broker_connection_retry_on_startup=True,
    # The broker is restarted on purpose: keep trying for as long as the
    # soak keeps the worker, never give up and exit.
    broker_connection_max_retries=None,
    # Celery's default is on. Off, a Redis worker learns of a lost
    # connection only through its BRPOP connection, which Kombu 5.7 closes
    # quietly while the worker may not fetch (``--without-remote-control``
    # shows what follows; benchmarks/README.rst).
    worker_enable_remote_control=_env("SOAK_REMOTE_CONTROL", "1") == "1",
    worker_hijack_root_logger=False,
    result_expires=600,
)


def _write(lines: list[str]) -> None:
    # One write per line with O_APPEND: lines of the two pool processes and
    # of the main process (warm shutdown) never interleave.
    fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for line in lines:
            os.write(fd, line.encode())
    finally:
        os.close(fd)


def _journal(kind: str, requests: list[SimpleRequest]) -> None:
    pid = os.getpid()
    _write([f"{kind} {request.id} {pid}\n" for request in requests])


@signals.task_received.connect(weak=False)
def _on_received(request: Any = None, **kw: Any) -> None:
    # In the main process, once Kombu has delivered the message (on Redis,
    # after it recorded it in its unacked index): from here on the call is
    # celery-batches' to run or to give back.
    if request is not None:
        _write([f"received {request.id} {os.getpid()}\n"])


@batch_flushed.connect(weak=False)
def _on_flushed(
    sender: Any, reason: str = "", request_ids: list[str] | None = None, **kw: Any
) -> None:
    # In the worker's main process: which worker handed a call to its pool,
    # to tell a call lost in a killed worker from one never delivered.
    if request_ids:
        _write([f"flushed {os.getpid()} {reason} {','.join(request_ids)}\n"])


def _run(requests: list[SimpleRequest]) -> list[Any]:
    _journal("start", requests)
    # Long enough that a fault often lands while a batch runs, short enough
    # that the two pool processes keep up with the publisher.
    time.sleep(random.uniform(0.02, 0.05))
    _journal("done", requests)
    return [request.args[0] for request in requests]


@app.task(
    base=Batches,
    name=EARLY,
    flush_every=20,
    flush_interval=0.5,
    per_request_results=True,
    shared=False,
)
def early(requests: list[SimpleRequest]) -> list[Any]:
    """Early acks (Celery's default): acked when the batch starts."""
    return _run(requests)


@app.task(
    base=Batches,
    name=LATE,
    flush_every=20,
    flush_interval=0.5,
    acks_late=True,
    per_request_results=True,
    shared=False,
)
def late(requests: list[SimpleRequest]) -> list[Any]:
    """Late acks: acked once the batch has run and its results are stored."""
    return _run(requests)


@signals.worker_ready.connect(weak=False)
def _on_ready(**kw: Any) -> None:
    # The soak injects faults only into a worker that consumes: the log
    # line Celery writes then is at INFO, which would also log every call.
    ready_file = _env("SOAK_READY_FILE")
    if ready_file:
        Path(ready_file).write_text(f"{os.getpid()}\n")


class _Consumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Keeps the worker's consumer at hand for :func:`_print_consumer_state`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    #: The consumer, once started (again after every reconnect).
    current: Any = None

    def start(self, c: Any) -> None:
        _Consumer.current = c


app.steps["consumer"].add(_Consumer)


def _print_consumer_state(signum: int, frame: Any) -> None:
    """On SIGUSR2, print why the consumer would or would not fetch messages.

    Read from Kombu's private attributes, for a human only: the soak asks
    for it when a worker stopped consuming.
    """
    c = _Consumer.current
    if c is None:
        return
    try:
        channel = c.task_consumer.channel
        qos = channel.qos
        delivered = len(getattr(qos, "_delivered", ()))
        settled = len(getattr(qos, "_dirty", ()))
        state = (
            f"consumer state: prefetch window {c.qos.value}, channel prefetch "
            f"{qos.prefetch_count}, delivered and not acked {delivered - settled} "
            f"(+{settled} acked, not yet forgotten), can consume "
            f"{qos.can_consume()}, fetch outstanding "
            f"{getattr(channel, '_in_poll', '?')!r}, connected "
            f"{c.connection.connected}\n"
        )
    except Exception as exc:
        state = f"consumer state: unreadable ({exc!r})\n"
    # fd 2 is the worker's .out file; Celery replaced sys.stderr by a logger.
    os.write(2, state.encode())


signal.signal(signal.SIGUSR2, _print_consumer_state)


def _watch_parent(parent: int) -> None:
    """Warm-shut this worker down if the soak that started it went away."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
        # A warm shutdown that hangs must not leave an orphan behind.
        time.sleep(30)
        os._exit(1)

    threading.Thread(target=watch, name="soak-parent-watch", daemon=True).start()


if _env("SOAK_PARENT"):
    _watch_parent(int(_env("SOAK_PARENT", "0")))
