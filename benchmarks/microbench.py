"""In-process cost per message of our strategy against Celery's default one.

Both strategies are driven exactly as the worker's consumer drives them: a
real :class:`kombu.message.Message` (protocol 2, JSON, built by Celery's own
``app.amqp.as_task_v2``) and ``body=None``, so each call decodes the payload,
builds Celery's ``Request`` and hands it on. Nothing reaches a broker or a
pool: the pool's ``apply_async`` does nothing, so what is timed is the
worker's per-message work in the consumer thread.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from typing import Any, Callable

from celery import Celery
from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy
from kombu.common import QoS
from kombu.message import Message
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from celery_batches.collector import collectors_of

__all__ = ["run_microbench"]

QUEUE = "bench-micro"


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _Pool:
    """A pool that accepts jobs and never runs them."""

    num_processes = 1
    apply_async = staticmethod(_noop)


class _Entry:
    def cancel(self) -> None:
        return None


class _Timer:
    def call_repeatedly(self, *args: Any, **kwargs: Any) -> _Entry:
        return _Entry()

    def call_at(self, *args: Any, **kwargs: Any) -> _Entry:
        return _Entry()

    def cancel(self, entry: Any) -> None:
        return None


class _Namespace:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def _consumer(on_task_request: Callable[[Any], None]) -> Any:
    # Plain objects rather than ``Mock()``: a Mock records every call and
    # costs microseconds per attribute, which would swamp what we measure.
    return _Namespace(
        hostname="bench@localhost",
        connection_errors=(),
        event_dispatcher=_Namespace(enabled=False, send=_noop, groups=set()),
        pool=_Pool(),
        timer=_Timer(),
        # Kombu's own QoS, whose callback would set the channel's prefetch.
        qos=QoS(_noop, 4),
        initial_prefetch_count=4,
        controller=_Namespace(state=_Namespace(revoked=worker_state.revoked)),
        blueprint=_Namespace(steps={"celery_batches.BatchesStep": None}),
        disable_rate_limits=True,
        task_buckets=defaultdict(lambda: None),
        on_task_request=on_task_request,
        apply_eta_task=_noop,
        _limit_task=_noop,
        _limit_post_eta=_noop,
    )


def _app() -> Celery:
    from celery_batches import Batches

    app = Celery("bench-micro", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = QUEUE

    @app.task(name="bench.plain", shared=False)
    def plain(value: int) -> int:
        return value

    @app.task(base=Batches, name="bench.batch", flush_every=100, shared=False)
    def batch(requests: list[Any]) -> None:
        return None

    @app.task(base=Batches, name="bench.buffer", flush_every=10**9, shared=False)
    def buffer_only(requests: list[Any]) -> None:
        return None

    return app


def _messages(app: Celery, name: str, count: int) -> list[Message]:
    messages = []
    for index in range(count):
        task = app.amqp.as_task_v2(uuid(), name, args=(index,))
        content_type, encoding, body = dumps(task.body, serializer="json")
        messages.append(
            Message(
                body=body,
                delivery_tag=index,
                content_type=content_type,
                content_encoding=encoding,
                delivery_info={"exchange": "", "routing_key": QUEUE},
                properties=dict(task.properties),
                headers=task.headers,
            )
        )
    return messages


def _reset(app: Celery) -> None:
    worker_state.requests.clear()
    worker_state.reserved_requests.clear()
    for collector in getattr(app, "_bench_collectors", ()):
        collector.buffer.clear()


def _time(
    app: Celery, handler: Callable[..., Any], name: str, count: int, rounds: int
) -> float:
    """µs per message: the best of ``rounds`` rounds of ``count`` messages.

    The best, not the median: other processes on a shared 2-core machine
    only ever add time.
    """
    samples = []
    for _ in range(rounds):
        messages = _messages(app, name, count)
        _reset(app)
        gc.collect()
        start = time.perf_counter()
        for message in messages:
            handler(message, None, _noop, _noop, None)
        samples.append((time.perf_counter() - start) / count * 1e6)
    _reset(app)
    return min(samples)


def run_microbench(*, count: int = 5000, rounds: int = 5) -> dict[str, Any]:
    """Time both strategies; return µs/message for each and their ratios."""
    app = _app()
    pool = _Pool()
    plain = app.tasks["bench.plain"]

    def to_pool(request: Any) -> None:
        # What the worker's ``on_task_request`` does for a plain task.
        request.execute_using_pool(pool)

    celery_strategy = default_strategy(plain, app, _consumer(_noop))
    celery_to_pool = default_strategy(plain, app, _consumer(to_pool))

    ours_consumer = _consumer(_noop)
    batch = app.tasks["bench.batch"]
    buffer_only = app.tasks["bench.buffer"]
    ours_buffer = buffer_only.Strategy(buffer_only, app, ours_consumer)
    ours_to_pool = batch.Strategy(batch, app, ours_consumer)
    app._bench_collectors = list(collectors_of(ours_consumer).values())

    # Warm up every path once (imports, caches) before timing.
    for handler, name in [
        (celery_strategy, "bench.plain"),
        (celery_to_pool, "bench.plain"),
        (ours_buffer, "bench.buffer"),
        (ours_to_pool, "bench.batch"),
    ]:
        _time(app, handler, name, 200, 1)

    results = {
        "count": count,
        "rounds": rounds,
        "celery_strategy_us": _time(app, celery_strategy, "bench.plain", count, rounds),
        "ours_strategy_us": _time(app, ours_buffer, "bench.buffer", count, rounds),
        "celery_to_pool_us": _time(app, celery_to_pool, "bench.plain", count, rounds),
        "ours_to_pool_us": _time(app, ours_to_pool, "bench.batch", count, rounds),
    }
    results["strategy_ratio"] = (
        results["ours_strategy_us"] / results["celery_strategy_us"]
    )
    results["to_pool_ratio"] = results["ours_to_pool_us"] / results["celery_to_pool_us"]
    return results


if __name__ == "__main__":
    for key, value in run_microbench().items():
        print(f"{key:>20}: {value:.3f}" if isinstance(value, float) else value)
