"""The in-memory buffer of waiting requests and its count-based flush rule."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["BatchBuffer"]

T = TypeVar("T")


class BatchBuffer(Generic[T]):
    """Requests waiting to run, one FIFO per batch key.

    A key's FIFO is handed out as a batch when it holds ``flush_every``
    items; :meth:`drain` hands out everything else, in batches of at most
    ``flush_every``. A key whose FIFO empties is forgotten, so keys leave no
    memory behind. Not thread-safe: the caller holds a lock where the flush
    timer runs in a thread of its own.
    """

    __slots__ = ("_count", "_queues", "flush_every")

    def __init__(self, flush_every: int) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, not {flush_every!r}")
        #: Number of waiting requests of one key that makes a batch.
        self.flush_every = flush_every
        self._queues: dict[Hashable, deque[T]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def keys(self) -> list[Hashable]:
        """Return the keys that have waiting requests."""
        return list(self._queues)

    def pending(self, key: Hashable = None) -> int:
        """Return how many requests of ``key`` are waiting."""
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def add(self, item: T, key: Hashable = None) -> list[T] | None:
        """Buffer ``item`` under ``key``; return a full batch if one is ready."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(item)
        self._count += 1
        if len(queue) >= self.flush_every:
            return self.take(key)
        return None

    def take(self, key: Hashable = None) -> list[T]:
        """Remove and return the oldest ``flush_every`` requests of ``key``.

        Returns fewer if fewer wait, and an empty list if none do.
        """
        queue = self._queues.get(key)
        if not queue:
            return []
        size = min(len(queue), self.flush_every)
        batch = [queue.popleft() for _ in range(size)]
        if not queue:
            del self._queues[key]
        self._count -= size
        return batch

    def drain(self) -> Iterator[tuple[Hashable, list[T]]]:
        """Remove every waiting request, as ``(key, batch)`` pairs.

        Batches hold at most ``flush_every`` requests; a key with more
        waiting yields several batches.
        """
        for key in list(self._queues):
            while key in self._queues:
                yield key, self.take(key)

    def clear(self) -> list[T]:
        """Remove and return every waiting request (all keys)."""
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        self._count = 0
        return items
