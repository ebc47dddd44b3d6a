"""Record when each user was last seen, with one ``executemany`` per batch.

Your app calls ``seen.delay(user_id, time.time())`` on every request; the
worker keeps each user's latest time in the batch and writes them all to
SQLite with a single statement. Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 celery -A last_seen worker
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("last_seen")

#: The SQLite database file: ``$LAST_SEEN_DB``, else ``last_seen.sqlite3``.
DATABASE = os.environ.get("LAST_SEEN_DB", "last_seen.sqlite3")

SCHEMA = """
CREATE TABLE IF NOT EXISTS last_seen (
    user_id INTEGER PRIMARY KEY,
    seen_at REAL NOT NULL
)
"""

# A batch can run after a later one (several pool processes, retries): an
# older time never overwrites a newer one.
UPSERT = """
INSERT INTO last_seen (user_id, seen_at) VALUES (?, ?)
ON CONFLICT (user_id) DO UPDATE SET seen_at = excluded.seen_at
WHERE excluded.seen_at > last_seen.seen_at
"""


@app.task(base=Batches, flush_every=500, flush_interval=5, ignore_result=True)
def seen(requests: list[SimpleRequest]) -> None:
    """Store the latest time each user of the batch was seen."""
    latest: dict[int, float] = {}
    for request in requests:
        user_id, seen_at = request.args
        latest[user_id] = max(seen_at, latest.get(user_id, seen_at))
    # closing() closes the connection; `with db` commits (or rolls back).
    with closing(sqlite3.connect(DATABASE)) as db, db:
        db.execute(SCHEMA)
        db.executemany(UPSERT, latest.items())
