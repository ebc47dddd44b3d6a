"""The exceptions celery-batches raises, in one documented hierarchy.

.. code-block:: text

    BatchesError
    ├── InvalidBatchSetting        (also a ValueError)
    ├── ResultShapeError           (also a TypeError and a ValueError)
    └── BulkPublishError           (apply_many could not publish every call)

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

__all__ = [
    "BatchRetry",
    "BatchesError",
    "BulkPublishError",
    "InvalidBatchSetting",
    "ResultShapeError",
]


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


class BulkPublishError(BatchesError):
    """:func:`~celery_batches.bulk.apply_many` stopped before every call was published.

    Says which calls reached the broker, by their position in ``calls``
    (``0`` is the first), so that exactly the others can be sent again::

        try:
            task.apply_many(calls)
        except BulkPublishError as exc:
            task.apply_many([calls[i] for i in exc.unpublished])

    The error that stopped it is the ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        results: list[Any],
        published: list[int],
        uncertain: list[int],
        unpublished: list[int],
    ) -> None:
        super().__init__(message)
        #: One :class:`~celery.result.AsyncResult` per call, in call order.
        self.results = results
        #: Positions of the calls the broker has.
        self.published = published
        #: Positions of the calls that may or may not have reached it: the
        #: connection broke while they were being written.
        self.uncertain = uncertain
        #: Positions of the calls that were never sent, or that the broker
        #: refused.
        self.unpublished = unpublished

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_bulk_error,
            (
                str(self),
                [getattr(r, "id", r) for r in self.results],
                self.published,
                self.uncertain,
                self.unpublished,
            ),
        )


def _rebuild_bulk_error(
    message: str,
    results: list[Any],
    published: list[int],
    uncertain: list[int],
    unpublished: list[int],
) -> BulkPublishError:
    return BulkPublishError(
        message,
        results=results,
        published=published,
        uncertain=uncertain,
        unpublished=unpublished,
    )


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
