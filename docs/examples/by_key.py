"""Batch calls by key: a batch never mixes two tenants, or two mail domains.

Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 celery -A by_key worker
"""

from __future__ import annotations

from collections import Counter

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("by_key")


class UsageStore:
    """Units used per tenant; stands in for one database per tenant."""

    def __init__(self) -> None:
        self.units: Counter[str] = Counter()
        #: One entry per write: the tenant written to.
        self.writes: list[str] = []

    def add(self, tenant: str, units: int) -> None:
        """Add ``units`` to ``tenant`` in one write."""
        self.units[tenant] += units
        self.writes.append(tenant)


usage = UsageStore()


# Calls are grouped by their `tenant` keyword argument: every call of a
# batch has the same tenant, so the batch makes one write to one database.
@app.task(
    base=Batches,
    flush_every=50,
    flush_interval=2,
    batch_key="tenant",
    ignore_result=True,
)
def record_usage(requests: list[SimpleRequest]) -> None:
    """Add up the units of the batch and write them to its tenant at once."""
    tenant = requests[0].kwargs["tenant"]
    usage.add(tenant, sum(request.kwargs["units"] for request in requests))


def mail_domain(request: SimpleRequest) -> str:
    """The batch key of ``verify_mailbox``: the domain of the address."""
    return str(request.args[0]).rpartition("@")[2].lower()


#: One entry per SMTP session: the domain and the addresses checked in it.
smtp_sessions: list[tuple[str, list[str]]] = []


@app.task(
    base=Batches,
    flush_every=20,
    flush_interval=2,
    batch_key=mail_domain,
    per_request_results=True,
)
def verify_mailbox(requests: list[SimpleRequest]) -> list[bool]:
    """Check every address of one domain in one SMTP session.

    The stand-in check refuses addresses with a ``+`` tag.
    """
    domain = mail_domain(requests[0])
    addresses = [request.args[0] for request in requests]
    smtp_sessions.append((domain, addresses))
    return ["+" not in address for address in addresses]
