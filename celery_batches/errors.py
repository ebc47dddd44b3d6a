"""The exceptions celery-batches raises, in one documented hierarchy.

.. code-block:: text

    BatchesError
    ├── InvalidBatchSetting        (also a ValueError)
    └── ResultShapeError           (also a TypeError and a ValueError)

Catch :exc:`BatchesError` for anything this library raises on its own
behalf; errors from Celery, the broker or the result backend pass through
unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchesError", "InvalidBatchSetting", "ResultShapeError"]


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
