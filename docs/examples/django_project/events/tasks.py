"""The batch task, found by the Celery app's ``autodiscover_tasks()``."""

from __future__ import annotations

from celery import shared_task
from celery.utils.log import get_task_logger
from django.db import transaction

from celery_batches import Batches, SimpleRequest

from .models import Event

logger = get_task_logger(__name__)


@shared_task(base=Batches, flush_every=100, flush_interval=1, per_request_results=True)
def record_event(requests: list[SimpleRequest]) -> list[int]:
    """Insert a row per call, a batch at a time; each call gets its row's id.

    Callers send ``record_event.delay(kind, **payload)``, one call per event.
    """
    events = [
        Event(kind=request.args[0], payload=request.kwargs) for request in requests
    ]
    # One transaction per batch: its rows commit together, with one commit
    # instead of one per call, or not at all, and then every call of the
    # batch fails with the error.
    with transaction.atomic():
        Event.objects.bulk_create(events)
    logger.info("inserted %d events in one transaction", len(events))
    # bulk_create sets each object's primary key on PostgreSQL, MariaDB
    # 10.5+ and SQLite 3.35+.
    return [event.pk for event in events]
