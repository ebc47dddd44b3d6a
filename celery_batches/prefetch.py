"""The prefetch budget: how far batch tasks may widen a worker's prefetch window.

Pure bookkeeping with no worker or broker in it: the collectors ask it
before they widen the consumer's window and tell it when they narrow it
again, so its decisions are tested directly.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

__all__ = ["PrefetchBudget"]


class PrefetchBudget:
    """One worker's allowance of extra prefetched messages, shared fairly.

    A batch fills only if the broker may deliver ``flush_every`` messages
    while they wait unacked in memory, so a waiting batch key asks to widen
    the prefetch window (by twice ``flush_every``: one batch filling while
    the one before it is handed over). Every batch task and key of the
    worker draws from this one budget, so the messages held in memory stay
    below::

        the consumer's own window + limit

    Each batch task may use an equal share of ``limit`` (``limit`` divided by
    the number of batch tasks), so one task with many keys cannot keep
    another from filling its batches. Calls held for their ETA are not
    counted here: each widens the window by one, as Celery's own ETA tasks
    do, so that they never stop the broker delivering other calls.

    Thread-safe: the flush timer of some pools runs in a thread of its own.
    """

    __slots__ = ("_grants", "_lock", "_tasks", "_used_by_task", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"a prefetch budget cannot be negative: {limit!r}")
        #: Extra messages the window may hold in all (``batches_prefetch_limit``).
        self.limit = limit
        self._tasks: dict[str, None] = {}
        self._grants: dict[tuple[str, Hashable], int] = {}
        self._used_by_task: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Messages granted right now."""
        with self._lock:
            return sum(self._used_by_task.values())

    def share(self) -> int:
        """The most one batch task may use at once."""
        with self._lock:
            return self._share()

    def _share(self) -> int:
        return self.limit // max(1, len(self._tasks))

    def add_task(self, task: str) -> None:
        """Count ``task`` among the batch tasks sharing the budget."""
        with self._lock:
            self._tasks[task] = None

    def granted(self, task: str, key: Hashable) -> int:
        """Return how much ``key`` of ``task`` widens the window now (0 if none)."""
        with self._lock:
            return self._grants.get((task, key), 0)

    def granted_to(self, task: str) -> int:
        """Return how much the keys of ``task`` widen the window now, in all."""
        with self._lock:
            return self._used_by_task.get(task, 0)

    def keys(self, task: str) -> int:
        """Return how many keys of ``task`` widen the window now."""
        with self._lock:
            return sum(1 for name, _ in self._grants if name == task)

    def grant(self, task: str, key: Hashable, want: int, *, max_keys: int) -> int:
        """Widen for ``key`` of ``task`` by up to ``want``; return by how much.

        Returns 0 (nothing to widen) when the key widens already, when
        ``task`` has ``max_keys`` keys widening, or when its share or the
        budget is spent; otherwise as much of ``want`` as both allow.
        """
        with self._lock:
            if (task, key) in self._grants or want <= 0:
                return 0
            if sum(1 for name, _ in self._grants if name == task) >= max_keys:
                return 0
            used_by_task = self._used_by_task.get(task, 0)
            left = min(
                self._share() - used_by_task,
                self.limit - sum(self._used_by_task.values()),
            )
            amount = min(want, left)
            if amount <= 0:
                return 0
            self._grants[(task, key)] = amount
            self._used_by_task[task] = used_by_task + amount
            return amount

    def release(self, task: str, key: Hashable) -> int:
        """Give back what ``key`` of ``task`` was granted; return how much."""
        with self._lock:
            amount = self._grants.pop((task, key), 0)
            if amount:
                self._used_by_task[task] -= amount
            return amount

    def release_task(self, task: str) -> int:
        """Give back every grant of ``task``; return how much in all."""
        with self._lock:
            mine = [grant for grant in self._grants if grant[0] == task]
            amount = sum(self._grants.pop(grant) for grant in mine)
            self._used_by_task[task] = self._used_by_task.get(task, 0) - amount
            return amount

    def static_widening(self, wants: list[int], *, room: int) -> int:
        """Return how much to widen a window fixed when its consumer starts.

        For brokers that apply a prefetch count only to consumers started
        after it (RabbitMQ's per-consumer QoS), the window is sized once:
        each batch task gets what one key of it asks (``wants``, one entry
        per task) up to its equal share of the limit, and the total stays
        within ``room`` (what the window may still grow by).
        """
        share = self.limit // max(1, len(wants))
        total = sum(min(max(want, 0), share) for want in wants)
        return max(0, min(total, self.limit, room))
