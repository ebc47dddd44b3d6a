"""The exceptions celery-batches raises, in one documented hierarchy.

.. code-block:: text

    BatchesError
    ├── InvalidBatchSetting        (also a ValueError)
    └── ResultShapeError           (also a TypeError and a ValueError)

    celery.exceptions.Retry
    └── BatchRetry                 (what self.retry() raises in a batch body)

Catch :exc:`BatchesError` for anything this library raises on its own
behalf; errors from Celery, the broker or the result backend pass through
unchanged. :exc:`BatchRetry` is no error but Celery's retry predicate,
carrying what the batch's retry needs.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import Retry

__all__ = ["BatchRetry", "BatchesError", "InvalidBatchSetting", "ResultShapeError"]


class BatchesError(Exception):
    """Base class of every exception celery-batches raises itself."""


class InvalidBatchSetting(BatchesError, ValueError):
    """A batch option or worker setting has a value it cannot work with.

    Raised when the task class is created, and again when a worker starts
    the task (for values changed afterwards, e.g. by ``task_annotations``).
    The message names the task, the option, the value and what is allowed.
    """

    def __init__(self, task: str, option: str, value: Any, allowed: str) -> None:
        self.task = task
        self.option = option
        self.value = value
        self.allowed = allowed
        super().__init__(f"{task}: {option}={value!r} is invalid; {option} {allowed}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-free constructor arguments keep it picklable across the pool.
        return (type(self), (self.task, self.option, self.value, self.allowed))


class ResultShapeError(BatchesError, TypeError, ValueError):
    """A ``per_request_results`` body returned something that is not one value per call.

    The message names the task, the shape expected and the shape returned.
    The calls the body had not settled fail with it; calls it had settled
    keep their outcome. Both a ``TypeError`` (a value of the wrong type) and
    a ``ValueError`` (a sequence of the wrong length), as earlier releases
    raised one or the other.
    """


class BatchRetry(Retry):  # type: ignore[misc]
    """Raised by ``self.retry()`` in a batch body: retry every unsettled call.

    A :exc:`celery.exceptions.Retry`, so code that catches Celery's
    predicate still does; it also carries the batch retry's ``countdown``,
    ``eta`` and ``max_retries``, which the worker applies to each call.
    """

    def __init__(
        self,
        exc: BaseException | str | None = None,
        *,
        countdown: float | None = None,
        eta: Any = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__(exc=exc, when=eta or countdown)
        #: What each call's retry takes: ``countdown``, ``eta``, ``max_retries``.
        self.options = {"countdown": countdown, "eta": eta, "max_retries": max_retries}

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery's Retry pickles (message, exc, when); keep ours whole.
        reason = self.exc if self.exc is not None else self.excs
        return (_rebuild_retry, (reason, self.options))


def _rebuild_retry(exc: Any, options: dict[str, Any]) -> BatchRetry:
    return BatchRetry(exc, **options)
