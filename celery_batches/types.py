"""The shapes the layers of the package agree on, as typing Protocols.

A module may only import modules below it. Where a lower module needs to
call into something defined higher up (the task class, the outcome
recorder), it names the shape it needs here, and the higher module hands
it an object of that shape.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from datetime import datetime

    from celery import Celery
    from celery.backends.base import Backend
    from celery.worker.request import Request

__all__ = ["BatchTask", "KeyFunction", "Outcomes"]

#: Computes the batch key of a worker request (see ``Batches.batch_key``).
KeyFunction = Callable[["Request"], Hashable]


class BatchTask(Protocol):
    """What the worker side needs of a batch task (a ``Batches`` instance)."""

    name: str
    app: Celery
    flush_every: int
    flush_interval: float
    acks_late: bool
    soft_time_limit: float | None
    time_limit: float | None
    send_events: bool
    #: The worker-side request class (Celery's ``Task.Request``).
    Request: Any

    @property
    def backend(self) -> Backend: ...

    def flush(self, requests: list[Request]) -> Any:
        """Run ``requests`` as one batch (the public ``Batches.flush`` hook)."""


class Outcomes(Protocol):
    """Settles calls of a batch; what :class:`~celery_batches.SimpleRequest` uses.

    ``request`` is the :class:`~celery_batches.SimpleRequest` being settled
    (typed ``Any`` here: this module sits below the request model).
    """

    def success(self, request: Any, result: Any) -> None:
        """Store ``result`` as the call's result."""

    def failure(
        self,
        request: Any,
        exc: BaseException,
        traceback: str | None = None,
    ) -> None:
        """Store ``exc`` as the call's failure."""

    def retry(
        self,
        request: Any,
        *,
        countdown: float | None = None,
        eta: datetime | str | None = None,
        exc: BaseException | str | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Send the call again to run later."""
