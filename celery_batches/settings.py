"""Checking a batch task's options, so a bad value fails early and says why."""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidBatchSetting

__all__ = [
    "DEFAULT_PREFETCH_LIMIT",
    "MAX_FLUSH_INTERVAL",
    "MAX_PREFETCH_LIMIT",
    "batch_key_of",
    "check_options",
    "prefetch_limit",
]

#: Longest ``flush_interval`` accepted, in seconds (a year): beyond it the
#: timers' arithmetic loses precision and no batch would ever flush anyway.
MAX_FLUSH_INTERVAL = 365 * 24 * 3600.0

#: Default of the ``batches_prefetch_limit`` setting: how many messages, in
#: all, the batch tasks of one worker may add to its prefetch window.
DEFAULT_PREFETCH_LIMIT = 10_000

#: Largest ``batches_prefetch_limit`` accepted. AMQP's prefetch count is a
#: 16-bit field and kombu sends anything above 65,535 as 0, which means
#: *unlimited*; the margin leaves room for Celery's own window.
MAX_PREFETCH_LIMIT = 60_000


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but flush_every=True is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    task: str,
    *,
    flush_every: Any,
    flush_interval: Any,
    per_request_results: Any,
    batch_key: Any,
) -> None:
    """Raise :exc:`~celery_batches.errors.InvalidBatchSetting` for a bad option.

    Arguments:
        task: the task's name, for the message.
        flush_every: an ``int`` of at least 1.
        flush_interval: a positive, finite number of seconds (``int`` or
            ``float``), at most :data:`MAX_FLUSH_INTERVAL`.
        per_request_results: a ``bool``.
        batch_key: ``None``, the name of a keyword argument, or a callable.
    """
    if not _is_int(flush_every) or flush_every < 1:
        raise InvalidBatchSetting(
            task, "flush_every", flush_every, "must be an int of at least 1"
        )
    if (
        not isinstance(flush_interval, (int, float))
        or isinstance(flush_interval, bool)
        or not math.isfinite(flush_interval)
        or not 0 < flush_interval <= MAX_FLUSH_INTERVAL
    ):
        raise InvalidBatchSetting(
            task,
            "flush_interval",
            flush_interval,
            "must be a number of seconds greater than 0 and at most "
            f"{MAX_FLUSH_INTERVAL:.0f} (a year)",
        )
    if not isinstance(per_request_results, bool):
        raise InvalidBatchSetting(
            task, "per_request_results", per_request_results, "must be True or False"
        )
    named = isinstance(batch_key, str) and bool(batch_key)
    if batch_key is not None and not named and not callable(batch_key):
        raise InvalidBatchSetting(
            task,
            "batch_key",
            batch_key,
            "must be None, the name of a keyword argument, or a callable "
            "taking a SimpleRequest",
        )


def batch_key_of(task: Any) -> Any:
    """Return the ``batch_key`` option of a task class or instance, unbound.

    A function set as a class attribute comes back from an instance as a
    bound method, so it is read from the class unless the instance has a
    value of its own.
    """
    if isinstance(task, type):
        return task.__dict__.get("batch_key", getattr(task, "batch_key", None))
    return vars(task).get("batch_key", getattr(type(task), "batch_key", None))


def prefetch_limit(conf: Any) -> int:
    """Return the ``batches_prefetch_limit`` setting of an app's ``conf``.

    Raises:
        InvalidBatchSetting: if it is not an int from 0 to
            :data:`MAX_PREFETCH_LIMIT`.
    """
    value = conf.get("batches_prefetch_limit", DEFAULT_PREFETCH_LIMIT)
    if value is None:
        return DEFAULT_PREFETCH_LIMIT
    if not _is_int(value) or not 0 <= value <= MAX_PREFETCH_LIMIT:
        raise InvalidBatchSetting(
            "worker",
            "batches_prefetch_limit",
            value,
            f"must be an int from 0 to {MAX_PREFETCH_LIMIT}",
        )
    return int(value)
