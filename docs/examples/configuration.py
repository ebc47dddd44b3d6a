"""Every option of a batch task that matters, set in one place.

Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 \\
    CELERY_RESULT_BACKEND=redis://localhost:6379/1 \\
    celery -A configuration worker
"""

from __future__ import annotations

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("configuration")

# [settings]
app.conf.update(
    # Celery's default. celery-batches 0.11 needed 0 here for full batches;
    # this release widens the window itself while calls wait (0 still works).
    worker_prefetch_multiplier=4,
    # Late-acked messages of a failed or timed-out batch are acked (the
    # default), rather than rejected.
    task_acks_on_failure_or_timeout=True,
    # Send task-received/started/succeeded/... events for every call.
    worker_send_task_events=True,
)
# [/settings]


class PaymentService:
    """Stands in for a payment provider with a bulk charge endpoint."""

    def __init__(self) -> None:
        #: One entry per bulk call: the account and the amounts charged.
        self.charges: list[tuple[str, list[int]]] = []

    def charge_many(self, account: str, amounts: list[int]) -> list[str]:
        """Charge every amount to ``account``; return one receipt each."""
        self.charges.append((account, amounts))
        first = sum(len(batch) for _, batch in self.charges[:-1])
        return [f"{account}-{n}" for n in range(first, first + len(amounts))]


payments = PaymentService()


@app.task(
    base=Batches,
    # A batch runs when 200 calls of one account wait, or every 2.5 s.
    flush_every=200,
    flush_interval=2.5,
    # The body returns one value per call: each is that call's result.
    per_request_results=True,
    # Calls are batched per value of their `account` keyword.
    batch_key="account",
    # Ack each message after its batch ran; requeue the batch's messages if
    # the pool process running it dies.
    acks_late=True,
    reject_on_worker_lost=True,
    # Limits for the whole batch, in seconds.
    soft_time_limit=50,
    time_limit=60,
    # A ConnectionError retries every call of the batch, at most 5 times,
    # 10 s later.
    autoretry_for=(ConnectionError,),
    max_retries=5,
    retry_kwargs={"countdown": 10},
)
def charge(requests: list[SimpleRequest]) -> list[str]:
    """Charge the batch's amounts to its account in one provider call."""
    account = requests[0].kwargs["account"]
    return payments.charge_many(account, [r.kwargs["amount"] for r in requests])
