"""The Celery app that every benchmark worker runs, configured by environment.

A worker started with ``celery -A workload worker`` registers one task,
``bench.work``, as a batch task or as a plain task depending on
``BENCH_KIND``, so the queue contents are byte-identical whichever setup
drains them. Each execution appends one line ``start end count`` to the
journal file ``BENCH_JOURNAL``, which is how the benchmark measures time from
the first execution to the last and the size of each batch.

``celery_batches`` is whichever package comes first on ``PYTHONPATH``: this
repository's, or the original 0.11 installed into a directory of its own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

__all__ = ["TASK_NAME", "app", "work"]

#: The name every setup registers the benchmarked task under.
TASK_NAME = "bench.work"

_env = os.environ.get
KIND = _env("BENCH_KIND", "batches")  # "batches" or "plain"
JOURNAL = _env("BENCH_JOURNAL", os.devnull)

app = Celery("bench", broker=_env("BENCH_BROKER"), set_as_current=True)
app.conf.update(
    task_default_queue=_env("BENCH_QUEUE", "bench"),
    # No pidbox: workers of other runs on the shared servers never see ours,
    # and no per-node control queue is left behind on Redis.
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
if _env("BENCH_QUEUE_TYPE"):
    # Celery 5.5+: the default queue is declared as this type (quorum), and
    # the worker detects it and uses per-consumer QoS.
    app.conf.task_default_queue_type = _env("BENCH_QUEUE_TYPE")
if _env("BENCH_BACKEND"):
    app.conf.result_backend = _env("BENCH_BACKEND")
    app.conf.result_expires = 600
if _env("BENCH_REDIS_DELIVERY") == "0":
    # Ours, but consuming through Kombu's own Redis transport.
    app.conf.batches_redis_delivery = False
if _env("BENCH_PREFETCH"):
    # Only the original package's runs set this; the others keep Celery's
    # default multiplier of 4.
    app.conf.worker_prefetch_multiplier = int(_env("BENCH_PREFETCH", "4"))


def _watch_parent(parent: int) -> None:
    """Shut this worker down if the benchmark that started it went away."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
        os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watch", daemon=True).start()


if _env("BENCH_PARENT_PID"):
    # Pool children are forked later and do not inherit this thread.
    _watch_parent(int(_env("BENCH_PARENT_PID", "0")))

_fd: int | None = None
_pid: int | None = None


def record(start: float, end: float, count: int) -> None:
    """Append one execution to the journal, in a single ``write``."""
    global _fd, _pid
    # One descriptor per process, opened lazily: prefork children must not
    # share the parent's, and re-opening per call would cost a syscall pair.
    pid = os.getpid()
    if _fd is None or _pid != pid:
        _fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _pid = pid
    os.write(_fd, b"%.6f %.6f %d\n" % (start, end, count))


def work(value: Any) -> int:
    """The work done for one message, the same in every setup."""
    return int(value) * 2 + 1


if KIND == "plain":

    @app.task(name=TASK_NAME, ignore_result=not _env("BENCH_BACKEND"))
    def plain(value: Any) -> int:
        start = time.time()
        result = work(value)
        record(start, time.time(), 1)
        return result

else:
    import celery_batches
    from celery_batches import Batches

    if _env("BENCH_IMPL_FILE"):
        # Lets the benchmark check which celery_batches this worker imported.
        with open(_env("BENCH_IMPL_FILE", os.devnull), "w") as f:
            f.write(os.path.dirname(os.path.abspath(celery_batches.__file__)))

    options: dict[str, Any] = {
        "base": Batches,
        "name": TASK_NAME,
        "flush_every": int(_env("BENCH_FLUSH_EVERY", "100")),
        "flush_interval": float(_env("BENCH_FLUSH_INTERVAL", "1")),
    }
    if _env("BENCH_RESULTS") == "1":
        options["per_request_results"] = True

    @app.task(**options)
    def batch(requests: list[Any]) -> list[int]:
        start = time.time()
        results = [work(request.args[0]) for request in requests]
        record(start, time.time(), len(requests))
        return results
