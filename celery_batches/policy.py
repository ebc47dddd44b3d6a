"""When a batch task's waiting calls flush: the rules, with no worker in them.

Plain objects that take the time as an argument and return decisions; the
collector applies them to the worker's timer, prefetch window and pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from .buffer import BatchBuffer

__all__ = ["FlushPolicy", "HeldCalls"]

T = TypeVar("T")
H = TypeVar("H")

#: Keys that come due within this many seconds of each other flush together
#: (at most a tenth of ``flush_interval``): one timer turn instead of many,
#: for calls of several keys that arrived together.
COALESCE = 0.05


class FlushPolicy(Generic[T]):
    """The waiting calls of one batch task, and when each key's flush is due.

    * **Size**: a key's oldest ``flush_every`` calls flush as soon as that
      many wait (:meth:`add` returns them).
    * **Interval**: a key's calls flush once its oldest waiting call has
      waited ``flush_interval`` seconds (:meth:`due`), all of them, in
      batches of at most ``flush_every``. :meth:`next_due` says when that
      is next the case, for the one timer the worker arms.
    * **Drain**: everything, at shutdown (:meth:`drain`).

    Not thread-safe: the caller holds a lock where the flush timer runs in
    a thread of its own.
    """

    __slots__ = ("_since", "buffer", "coalesce", "flush_interval")

    def __init__(self, flush_every: int, flush_interval: float) -> None:
        #: The calls, one FIFO per key (the count rule).
        self.buffer: BatchBuffer[T] = BatchBuffer(flush_every)
        #: Seconds the oldest call of a key waits before the key flushes.
        self.flush_interval = float(flush_interval)
        #: Keys due this close together flush together.
        self.coalesce = min(COALESCE, self.flush_interval / 10)
        # When each waiting call arrived, per key, in the buffer's order.
        self._since: dict[Hashable, deque[float]] = {}

    def __len__(self) -> int:
        return len(self.buffer)

    def __bool__(self) -> bool:
        return bool(self.buffer)

    def pending(self, key: Hashable = None) -> int:
        """Return how many calls of ``key`` wait."""
        return self.buffer.pending(key)

    def add(self, item: T, key: Hashable, now: float) -> list[T] | None:
        """Add ``item``, arrived at ``now``, under ``key``; return a full batch."""
        since = self._since.get(key)
        if since is None:
            since = self._since[key] = deque()
        since.append(now)
        batch = self.buffer.add(item, key)
        if batch is not None:
            self._forget(key, len(batch))
        return batch

    def _forget(self, key: Hashable, count: int) -> None:
        since = self._since[key]
        for _ in range(count):
            since.popleft()
        if not since:
            del self._since[key]

    def waiting(self) -> list[tuple[Hashable, int, float]]:
        """Each key with calls waiting: ``(key, how many, when the oldest came)``."""
        return [
            (key, len(since), since[0]) for key, since in self._since.items() if since
        ]

    def next_due(self) -> float | None:
        """Return when the next key comes due (``None``: nothing waits)."""
        if not self._since:
            return None
        return min(since[0] for since in self._since.values()) + self.flush_interval

    def due(self, now: float) -> list[tuple[Hashable, list[T]]]:
        """Take every call of each key whose oldest call waited long enough.

        Returns ``(key, batch)`` pairs, batches of at most ``flush_every``.
        """
        horizon = now + self.coalesce - self.flush_interval
        keys = [key for key, since in self._since.items() if since[0] <= horizon]
        return [pair for key in keys for pair in self._take_all(key)]

    def _take_all(self, key: Hashable) -> list[tuple[Hashable, list[T]]]:
        batches = []
        while self.buffer.pending(key):
            batch = self.buffer.take(key)
            self._forget(key, len(batch))
            batches.append((key, batch))
        return batches

    def drain(self) -> list[tuple[Hashable, list[T]]]:
        """Take every waiting call, as ``(key, batch)`` pairs."""
        return [pair for key in list(self._since) for pair in self._take_all(key)]

    def clear(self) -> list[T]:
        """Forget every waiting call; return them."""
        self._since.clear()
        return self.buffer.clear()


class HeldCalls(Generic[T, H]):
    """Calls held until their ETA, each with what it holds (a timer entry ...).

    Kept by identity, not by task id: two messages may carry the same id (a
    redelivery, or an id reused on purpose), and each is a call of its own
    to run and settle.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[int, tuple[T, H]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, item: T, handle: H) -> None:
        """Hold ``item`` until :meth:`release`; ``handle`` is kept with it."""
        self._held[id(item)] = (item, handle)

    def release(self, item: T) -> H | None:
        """Stop holding ``item``; return its handle, or ``None`` if not held."""
        held = self._held.pop(id(item), None)
        return None if held is None else held[1]

    def clear(self) -> list[tuple[T, H]]:
        """Stop holding every call; return each with its handle."""
        held = list(self._held.values())
        self._held.clear()
        return held
