"""What batching costs in waiting: latency from publish to stored result.

A worker (ours, solo, ``flush_every=100``, ``flush_interval=1``,
``per_request_results=True`` into the Redis result backend) is offered
calls at a fixed rate: every 10 ms this process publishes the calls due
since the last tick with ``delay_many``, noting when. The Redis backend
announces every stored result on a pub/sub channel of its own
(``celery-task-meta-<id>``); a thread here listens to them all and notes
when each of ours arrives. Latency is the difference (one clock, one
machine). The load is offered for ``WARM_UP + DURATION + TAIL`` seconds
and the calls of the middle ``DURATION`` are measured: not the worker's
first batches, nor the last, partial one, which would wait for the
``flush_interval`` only because the load stopped.

Batching must cost the wait for a batch to fill, and no more: at ``rate``
calls a second a batch of ``flush_every`` fills in ``flush_every / rate``
seconds, unless ``flush_interval`` comes first. :func:`bound` is that wait
plus 50 ms, the target for p99.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import brokers
from harness import stop_process

__all__ = ["FLUSH_EVERY", "FLUSH_INTERVAL", "RATES", "bound", "run_latency"]

#: Offered loads, calls per second.
RATES = (100, 1000, 5000)
FLUSH_EVERY = 100
FLUSH_INTERVAL = 1.0
#: Seconds of offered load measured, and left out before and after.
DURATION = 5.0
WARM_UP = 1.0
TAIL = FLUSH_INTERVAL + 0.5
TICK = 0.01


def bound(rate: float) -> float:
    """The target for p99 at ``rate``: the wait batching must cost, plus 50 ms."""
    return min(FLUSH_INTERVAL, FLUSH_EVERY / rate) + 0.05


class _Results(threading.Thread):
    """Notes when each stored result is announced by the Redis backend."""

    def __init__(self, backend_url: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(backend_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("celery-task-meta-*")
        #: Task id to the time its result was announced.
        self.arrived: dict[str, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        prefix = len("celery-task-meta-")
        while not self._stop_event.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is None:
                continue
            now = time.time()
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            self.arrived.setdefault(channel[prefix:], now)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.pubsub.close()
        self.client.close()


def _worker(cmd: list[str], env: dict[str, str], log: Path) -> Any:
    import subprocess

    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=Path(__file__).resolve().parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _offer(work: Any, rate: float, duration: float) -> dict[str, float]:
    """Publish ``rate`` calls a second for ``duration`` s; return id -> sent."""
    sent: dict[str, float] = {}
    started = time.time()
    published = 0
    n = 0
    while True:
        now = time.time()
        elapsed = now - started
        if elapsed >= duration:
            return sent
        due = int(rate * elapsed) + 1 - published
        if due > 0:
            results = work.delay_many([(n + i,) for i in range(due)])
            for result in results:
                sent[result.id] = now
            published += due
            n += due
        time.sleep(max(0.0, TICK - (time.time() - now)))


def measure(
    *,
    url: str,
    rate: float,
    worker_cmd: list[str],
    env: dict[str, str],
    log: Path,
    queue: str,
) -> dict[str, Any]:
    """One run at ``rate``; return the percentiles and what was lost."""
    from celery import Celery

    from celery_batches import Batches

    backend = brokers.redis_backend_url()
    app = Celery("bench-latency", broker=url, set_as_current=False)
    app.conf.task_default_queue = queue

    # The calls ask for their results (ignore_result=False, as by default),
    # which the worker stores; this app has no backend to wait on them.
    @app.task(base=Batches, name="bench.work", shared=False, ignore_result=False)
    def work(requests: list[Any]) -> None:
        pass

    results = _Results(backend)
    results.start()
    process = _worker(worker_cmd, env, log)
    sent: dict[str, float] = {}
    try:
        # Ready once a first call's result comes back.
        probe = work.delay(-1).id
        deadline = time.monotonic() + 60
        while probe not in results.arrived:
            if process.poll() is not None or time.monotonic() > deadline:
                return {"rate": rate, "error": "the worker did not answer"}
            time.sleep(0.05)
        sent = _offer(work, rate, WARM_UP + DURATION + TAIL)
        # Every result is due within a flush_interval; give it a few.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not set(sent) <= set(results.arrived):
            time.sleep(0.05)
    finally:
        stop_process(process, timeout=30)
        results.stop()
        app.close()
        brokers.delete_queue(url, queue)
        brokers.delete_results(backend, [*sent, *results.arrived])
    first = min(sent.values())
    measured = {
        task_id: at
        for task_id, at in sent.items()
        if WARM_UP <= at - first < WARM_UP + DURATION
    }
    latencies = sorted(
        results.arrived[task_id] - at
        for task_id, at in measured.items()
        if task_id in results.arrived
    )
    lost = sum(1 for task_id in measured if task_id not in results.arrived)
    if not latencies:
        return {"rate": rate, "error": "no result came back"}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "rate": rate,
        "calls": len(sent),
        "measured": len(latencies),
        "lost": lost,
        "p50": cuts[49],
        "p95": cuts[94],
        "p99": cuts[98],
        "max": latencies[-1],
        "bound": bound(rate),
        "error": None if not lost else f"{lost} results never came",
    }


def run_latency(
    setups: list[tuple[str, str, dict[str, str]]],
    *,
    url: str,
    worker_cmd: Callable[[str, Path], list[str]],
    env_for: Callable[[dict[str, str]], dict[str, str]],
    work_dir: Path,
    rates: tuple[int, ...] = RATES,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Measure each setup ``(key, label, env)`` at each rate, on ``url``."""
    from kombu.utils.uuid import uuid

    out: dict[str, Any] = {}
    for key, label, extra_env in setups:
        rows = []
        for rate in rates:
            queue = f"cb-bench-latency-{uuid()[:8]}"
            log = work_dir / f"{queue}.log"
            env = env_for(
                {
                    **extra_env,
                    "BENCH_BROKER": url,
                    "BENCH_QUEUE": queue,
                    "BENCH_BACKEND": brokers.redis_backend_url(),
                    "BENCH_RESULTS": "1",
                    "BENCH_FLUSH_EVERY": str(FLUSH_EVERY),
                    "BENCH_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
                }
            )
            try:
                row = measure(
                    url=url,
                    rate=rate,
                    worker_cmd=worker_cmd(queue, log),
                    env=env,
                    log=log,
                    queue=queue,
                )
            except Exception as exc:
                row = {"rate": rate, "error": f"run failed: {exc!r}"}
            rows.append(row)
            if row.get("error") and "p99" not in row:
                say(f"latency {label} at {rate}/s: FAILED, {row['error']}")
            else:
                say(
                    f"latency {label} at {rate}/s: p50 {row['p50'] * 1000:.0f} ms, "
                    f"p95 {row['p95'] * 1000:.0f} ms, p99 {row['p99'] * 1000:.0f} ms "
                    f"(bound {row['bound'] * 1000:.0f} ms; {row['measured']} calls)"
                )
        out[key] = {"label": label, "rows": rows}
    return out
