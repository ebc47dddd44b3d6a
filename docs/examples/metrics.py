"""Prometheus metrics of batch flushes, with ``prometheus_client``.

Needs ``pip install prometheus-client`` (0.17 or newer). Import this module
from the module your worker loads (``celery -A``): its receivers must be
connected in the worker's main process, where ``batch_flushed`` and
``task_received`` are sent, and it serves ``/metrics`` from there once the
worker is ready. Everything is counted in that one process, whatever the
pool, so prometheus_client's multiprocess mode is not needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any
from wsgiref.simple_server import WSGIServer

from celery import signals
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from celery_batches import Batches
from celery_batches.signals import batch_flushed

#: Where :func:`start_metrics_server` serves ``/metrics``; "0.0.0.0" lets a
#: Prometheus server on another host scrape it.
METRICS_ADDRESS = "127.0.0.1"
METRICS_PORT = 9808

# A registry of its own keeps these apart from anything else the process
# registers; pass prometheus_client.REGISTRY to serve them with the rest.
registry = CollectorRegistry()

flushes = Counter(
    "celery_batches_flushes",
    "Batches handed to the pool, by task and why they were flushed.",
    ["task", "reason"],
    registry=registry,
)
batch_size = Histogram(
    "celery_batches_batch_size",
    "Calls per batch.",
    ["task"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
    registry=registry,
)
oldest_wait = Histogram(
    "celery_batches_oldest_wait_seconds",
    "How long the oldest call of a batch waited in the worker for its batch.",
    ["task"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=registry,
)

# batch_flushed names the calls of a batch, not when they arrived: keep the
# time each call of a batch task was received until its batch is flushed.
# Received in the consumer, flushed by the consumer or the flush timer's
# thread (on transports without an event loop): hence the lock.
received_at: dict[str, float] = {}
lock = threading.Lock()

#: A call the worker dropped without flushing or revoking it (its broker
#: connection was lost, and the broker gave the message to another worker)
#: is forgotten after this many seconds, in a sweep at most once a minute.
FORGET_AFTER = 3600.0
next_sweep = 0.0


@signals.task_received.connect(weak=False)
def on_task_received(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """Note when a call of a batch task reached the worker."""
    if isinstance(request.task, Batches):
        with lock:
            received_at[request.id] = time.monotonic()


@batch_flushed.connect(weak=False)
def on_batch_flushed(
    sender: Any,
    size: int,
    key: Hashable,
    reason: str,
    request_ids: list[str],
    **kwargs: Any,
) -> None:
    """Count the batch, its size, and how long its oldest call waited."""
    task = sender.name
    flushes.labels(task=task, reason=reason).inc()
    batch_size.labels(task=task).observe(size)
    global next_sweep
    now = time.monotonic()
    with lock:
        arrivals = [received_at.pop(i) for i in request_ids if i in received_at]
        if now >= next_sweep:
            next_sweep = now + 60
            for task_id, at in list(received_at.items()):
                if now - at > FORGET_AFTER:
                    del received_at[task_id]
    if arrivals:
        oldest_wait.labels(task=task).observe(now - min(arrivals))


@signals.task_revoked.connect(weak=False)
def on_task_revoked(request: Any = None, **kwargs: Any) -> None:
    """Forget a call revoked or expired while it waited: it is never flushed."""
    with lock:
        received_at.pop(getattr(request, "id", None), None)


#: The server :func:`start_metrics_server` started, if any.
metrics_server: WSGIServer | None = None


@signals.worker_ready.connect(weak=False)
def start_metrics_server(sender: Any = None, **kwargs: Any) -> None:
    """Serve ``/metrics`` from the worker's main process once it is ready."""
    global metrics_server
    metrics_server, _ = start_http_server(
        METRICS_PORT, addr=METRICS_ADDRESS, registry=registry
    )
