"""How fast calls are published: a ``delay()`` loop against ``delay_many``.

Both publish the same calls of the benchmark's batch task (``bench.work``,
one integer argument) to a fresh queue of the broker, from this process,
with Celery's default settings (no result backend). Messages per second
is calls over the wall time of the publishing alone; the queue is deleted
afterwards. Repeats are interleaved so drift spreads over both.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import brokers

__all__ = ["WAYS", "measure", "run_publishing"]

#: The ways of publishing, by key: what the table calls them.
WAYS = {
    "delay": "delay() loop",
    "delay_many": "delay_many, chunks of 1,000",
}


def _app(url: str, queue: str) -> tuple[Any, Any]:
    from celery import Celery

    from celery_batches import Batches

    app = Celery("bench-publisher", broker=url, set_as_current=False)
    app.conf.task_default_queue = queue

    @app.task(base=Batches, name="bench.work", shared=False, flush_every=100)
    def work(requests: list[Any]) -> None:
        pass

    return app, work


def measure(url: str, way: str, calls: int) -> float:
    """Publish ``calls`` calls ``way``; return calls per second."""
    from kombu.utils.uuid import uuid

    queue = f"cb-bench-publish-{uuid()[:8]}"
    app, work = _app(url, queue)
    try:
        # Connect and declare first: a program publishing in a loop has.
        work.delay(-1)
        publish: Callable[[], Any]
        if way == "delay":

            def publish() -> None:
                for n in range(calls):
                    work.delay(n)

        else:

            def publish() -> None:
                work.delay_many([(n,) for n in range(calls)])

        started = time.perf_counter()
        publish()
        seconds = time.perf_counter() - started
        return calls / seconds
    finally:
        app.close()
        brokers.delete_queue(url, queue)


def run_publishing(
    names: list[str], *, repeat: int, calls: dict[str, int], say: Callable[[str], None]
) -> dict[str, Any]:
    """Measure every way on every broker in ``names``; return the medians.

    ``calls`` is how many calls each way publishes per run (a ``delay()``
    loop is slow: fewer calls keep it to seconds).
    """
    rates: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    for round_ in range(repeat):
        for name in names:
            url = brokers.BROKERS[name]
            for way in WAYS:
                what = f"[{round_ + 1}/{repeat}] {name:<15} {WAYS[way]}"
                try:
                    rate = measure(url, way, calls[way])
                except Exception as exc:
                    errors[(name, way)] = repr(exc)
                    say(f"{what}: FAILED {exc!r}")
                    continue
                rates.setdefault((name, way), []).append(rate)
                say(f"{what}: {rate:,.0f} calls/s")
    out: dict[str, Any] = {}
    for name in names:
        rows = {}
        for way in WAYS:
            runs = rates.get((name, way), [])
            rows[way] = {
                "label": WAYS[way],
                "calls": calls[way],
                "runs": runs,
                "rate": statistics.median(runs) if runs else None,
                "error": errors.get((name, way)),
            }
        out[name] = rows
    return out
