"""Look up many keys with one service call per batch; each caller gets its own.

``get_user.delay(42).get()`` returns user 42, but the worker asks the user
service once for every id in the batch. Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 \\
    CELERY_RESULT_BACKEND=redis://localhost:6379/1 \\
    celery -A batched_lookup worker
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("batched_lookup")


class UserService:
    """Stands in for a remote API with a bulk endpoint; counts its calls."""

    def __init__(self, users: dict[int, dict[str, Any]]) -> None:
        self.users = users
        #: How many times the service was called: one per batch.
        self.calls = 0

    def get_many(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Return the users among ``ids`` that exist, by id."""
        self.calls += 1
        return {uid: self.users[uid] for uid in ids if uid in self.users}


service = UserService({1: {"name": "Ada"}, 2: {"name": "Grace"}, 3: {"name": "Edsger"}})


@app.task(base=Batches, flush_every=50, flush_interval=0.5)
def get_user(requests: list[SimpleRequest]) -> None:
    """Fetch all the users the batch asks for at once, then answer each call.

    If the service call raises, every call of the batch fails with its error.
    """
    users = service.get_many({request.args[0] for request in requests})
    for request in requests:
        user_id = request.args[0]
        if user_id in users:
            request.mark_as_done(users[user_id])
        else:
            request.mark_as_failure(LookupError(f"no user {user_id!r}"))
