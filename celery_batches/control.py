"""``celery inspect batches``: what each batch task of a worker is holding."""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Any

from celery.worker.control import inspect_command

from .collector import worker_batches

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer

__all__ = ["batches", "describe"]


def _plain(key: Any) -> Any:
    """A batch key as a reply can carry it (JSON): itself, or its repr."""
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    try:
        return repr(key)
    # A batch_key function may return any hashable, whose __repr__ is the
    # user's: one that raises must not take the whole reply with it.
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(key).__qualname__} key>"


def describe(consumer: Consumer) -> dict[str, Any]:
    """What the batch tasks of ``consumer`` hold, for ``inspect batches``.

    Returns:
        ``{"tasks": {name: {...}}, "prefetch": {...}}``: per batch task, its
        ``flush_every`` and ``flush_interval``, the calls waiting per key
        (with the oldest one's wait and the seconds until that key flushes
        by interval), the calls held for their ETA and the prefetch window
        it has widened; then the worker's prefetch budget (limit, in use,
        share per task) and its current window.
    """
    batches = worker_batches(consumer)
    now = monotonic()
    tasks: dict[str, Any] = {}
    for name, collector in list(batches.collectors.items()):
        with collector.lock:
            waiting = collector.policy.waiting()
            held = len(collector.held)
            # Every key's grant, not only the waiting keys': a key that just
            # filled a batch keeps its widening a moment with nothing waiting.
            granted = collector.budget.granted_to(name)
        interval = collector.policy.flush_interval
        tasks[name] = {
            "flush_every": collector.policy.buffer.flush_every,
            "flush_interval": interval,
            "waiting": sum(count for _, count, _ in waiting),
            "keys": [
                {
                    "key": _plain(key),
                    "waiting": count,
                    "oldest_wait": round(now - since, 3),
                    "next_flush_in": round(max(0.0, since + interval - now), 3),
                }
                for key, count, since in waiting
            ],
            "held_for_eta": held,
            "prefetch_granted": granted,
        }
    qos = getattr(consumer, "qos", None)
    return {
        "tasks": tasks,
        "prefetch": {
            "limit": batches.budget.limit,
            "in_use": batches.budget.used,
            "share_per_task": batches.budget.share(),
            "sized_at_start": not batches.dynamic,
            "window": qos.value if qos is not None else None,
        },
    }


@inspect_command()  # type: ignore[untyped-decorator]
def batches(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Calls waiting per batch task and key, the next flush, the prefetch budget."""
    return describe(state.consumer)
