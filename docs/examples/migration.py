"""Batch tasks written for celery-batches 0.11 run unchanged.

Nothing here uses an option that 0.11 lacked. Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 \\
    CELERY_RESULT_BACKEND=redis://localhost:6379/1 \\
    celery -A migration worker
"""

from __future__ import annotations

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("migration")


# The 0.11 way of giving each call a result: store it through the backend,
# passing the request so that rpc://, chords and extended results work.
@app.task(base=Batches, flush_every=100, flush_interval=10)
def square(requests: list[SimpleRequest]) -> None:
    """Store the square of each call's argument as that call's result."""
    for request in requests:
        app.backend.mark_as_done(request.id, request.args[0] ** 2, request=request)


#: The batch sizes ``count_words`` saw, for the example's test.
batch_sizes: list[int] = []


# A body that stores nothing: its calls' results stay PENDING, as in 0.11.
# The return value only reaches the task_success signal.
@app.task(base=Batches, flush_every=100, flush_interval=10)
def count_words(requests: list[SimpleRequest]) -> int:
    """Count the words of the batch's texts (written to a report, say)."""
    batch_sizes.append(len(requests))
    return sum(len(request.args[0].split()) for request in requests)


#: Rows ``import_rows`` stored.
imported: list[str] = []


# A body that raises: 0.11 left every call of the batch PENDING; now each
# call the body did not settle is stored as FAILURE with the exception.
@app.task(base=Batches, flush_every=100, flush_interval=10)
def import_rows(requests: list[SimpleRequest]) -> None:
    """Import the batch's rows all or nothing: an empty row fails the batch."""
    rows = [request.args[0] for request in requests]
    if not all(rows):
        raise ValueError("empty row in batch")
    imported.extend(rows)
