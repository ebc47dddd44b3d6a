"""A batch task on Amazon SQS, with a visibility timeout sized for batches.

Needs ``celery[sqs]`` and AWS credentials; start a worker with
``celery -A transports worker --loglevel=INFO``.
"""

from __future__ import annotations

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("transports", broker="sqs://")


@app.task(
    base=Batches,
    flush_every=100,
    flush_interval=30,
    acks_late=True,
    time_limit=300,
)
def index_documents(requests: list[SimpleRequest]) -> None:
    """Send a batch of documents to a search index in one bulk request."""
    documents = [request.kwargs["document"] for request in requests]
    search_index.bulk(documents)


# [settings]
# SQS hands a message to another consumer once it has been unacked for
# visibility_timeout seconds. A batched call is held unacked while it waits
# in the buffer (up to flush_interval, 30 s) and, with acks_late, while its
# batch runs (up to time_limit, 300 s): 330 s. Twice that leaves room for a
# batch that waits for a free pool process.
app.conf.broker_transport_options = {"visibility_timeout": 660}
# [/settings]


class SearchIndex:
    """Stands in for a search service's client."""

    def __init__(self) -> None:
        self.documents: list[str] = []

    def bulk(self, documents: list[str]) -> None:
        self.documents.extend(documents)


search_index = SearchIndex()
