"""Insert rows in one transaction per batch; each call gets its own row id.

``log_event.delay("signup", {"plan": "pro"}).get()`` returns the id of the
row it inserted, while the worker inserts a whole batch of events in one
transaction. Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 \\
    CELERY_RESULT_BACKEND=redis://localhost:6379/1 \\
    celery -A bulk_insert worker
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("bulk_insert")

#: The SQLite database file: ``$EVENTS_DB``, else ``events.sqlite3``.
DATABASE = os.environ.get("EVENTS_DB", "events.sqlite3")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
)
"""

INSERT = "INSERT INTO events (kind, data) VALUES (?, ?)"


# per_request_results: the body returns one value per request, in order,
# and each becomes the result of its own call.
@app.task(base=Batches, flush_every=100, flush_interval=1, per_request_results=True)
def log_event(requests: list[SimpleRequest]) -> list[int]:
    """Insert one row per call, all in one transaction; return the row ids.

    If one insert fails, the transaction rolls back and every call of the
    batch fails with that error: none of their rows is stored.
    """
    # closing() closes the connection; `with db` commits (or rolls back).
    with closing(sqlite3.connect(DATABASE)) as db, db:
        db.execute(SCHEMA)
        row_ids = []
        for request in requests:
            kind, data = request.args
            row_ids.append(db.execute(INSERT, (kind, json.dumps(data))).lastrowid)
        return row_ids
