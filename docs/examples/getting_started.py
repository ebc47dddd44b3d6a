"""Getting started: a batch task, and the callers that send it one word each.

Save as getting_started.py; with Redis on localhost, start a worker beside it
with ``celery -A getting_started worker --loglevel=INFO``.
"""

from __future__ import annotations

from celery import Celery
from celery.result import AsyncResult
from celery.utils.log import get_task_logger

from celery_batches import Batches, SimpleRequest

app = Celery(
    "getting_started",
    broker="redis://localhost:6379/0",
    backend="redis://localhost:6379/1",
)

logger = get_task_logger(__name__)


@app.task(base=Batches, flush_every=100, flush_interval=1, per_request_results=True)
def shout(requests: list[SimpleRequest]) -> list[str]:
    """Upper-case each call's word; the worker runs up to 100 calls at once.

    The body is called once per batch with every waiting call. It returns
    one value per call, in order, and with ``per_request_results=True`` each
    value becomes the result of its own call.
    """
    logger.info("one batch of %d calls", len(requests))
    return [request.args[0].upper() for request in requests]


def send_words(words: list[str]) -> list[str]:
    """Call ``shout`` once per word and wait for each call's own result."""
    results = [shout.delay(word) for word in words]
    return [result.get(timeout=30) for result in results]


def state_of(task_id: str) -> str:
    """Return the state of a call, from its id alone (e.g. in another process)."""
    return AsyncResult(task_id, app=app).state
