"""Signals sent by the batching worker."""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["batch_flushed"]

#: Sent in the worker's main process each time a batch is handed to the pool.
#:
#: Sender is the task; keyword arguments: ``size`` (requests in the batch),
#: ``key`` (the batch key, ``None`` without ``batch_key``), ``reason``
#: (``"size"``, ``"interval"``, ``"shutdown"`` or ``"eta"``) and
#: ``request_ids`` (the task ids in the batch, in order).
batch_flushed = Signal(
    name="batch_flushed",
    providing_args={"size", "key", "reason", "request_ids"},
)
