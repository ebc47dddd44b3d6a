"""Ask running workers which calls wait in their buffers and which run now.

The same as ``celery -A yourapp inspect reserved`` and ``inspect active``,
from Python, for a health check or an admin page.
"""

from __future__ import annotations

from celery import Celery


def waiting_calls(app: Celery, timeout: float = 1.0) -> dict[str, list[str]]:
    """Return the ids of the calls waiting in each worker's buffers, by worker.

    A worker that does not answer within ``timeout`` seconds is left out; a
    worker running a batch on the solo pool cannot answer until it is done.
    """
    replies = app.control.inspect(timeout=timeout).reserved() or {}
    return {
        worker: [request["id"] for request in requests]
        for worker, requests in replies.items()
    }


def running_calls(app: Celery, timeout: float = 1.0) -> dict[str, list[str]]:
    """Return the ids of the calls whose batch is running, by worker."""
    replies = app.control.inspect(timeout=timeout).active() or {}
    return {
        worker: [request["id"] for request in requests]
        for worker, requests in replies.items()
    }
