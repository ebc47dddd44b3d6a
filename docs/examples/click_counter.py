"""Count clicks per URL, with one store update per batch instead of per click.

Your web app calls ``count_click.delay(url=request.url)`` on every click;
the worker counts a whole batch of clicks per URL and adds the counts to
the store at once. Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 celery -A click_counter worker
"""

from __future__ import annotations

from collections import Counter

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("click_counter")


class ClickStore:
    """Click counts per URL; stands in for Redis or a database table."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        #: How many updates the store received: one per batch.
        self.updates = 0

    def add(self, clicks: Counter[str]) -> None:
        """Add ``clicks`` in one update (with Redis: one pipeline of HINCRBY)."""
        self.counts.update(clicks)
        self.updates += 1


store = ClickStore()


# Flush after 100 clicks or every 10 seconds, whichever comes first.
@app.task(base=Batches, flush_every=100, flush_interval=10, ignore_result=True)
def count_click(requests: list[SimpleRequest]) -> None:
    """Count the batch's clicks per URL and add them to the store at once."""
    clicks = Counter(request.kwargs["url"] for request in requests)
    store.add(clicks)
