"""Prometheus-style metrics of batch flushes, in plain Python.

Import this module from the module your worker loads (``celery -A``), so
that the receiver is connected in the worker's main process, where
``batch_flushed`` is sent. :func:`serve` then answers ``GET /metrics`` in
the Prometheus text format, for a scraper to read.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import signals

from celery_batches.signals import batch_flushed

#: The port :func:`start_metrics_server` serves ``/metrics`` on.
METRICS_PORT = 9808

#: Upper bounds of the batch size histogram's buckets.
SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000)


class BatchMetrics:
    """A counter of flushes by task and reason, and a histogram of batch sizes."""

    def __init__(self, buckets: tuple[int, ...] = SIZE_BUCKETS) -> None:
        self.buckets = buckets
        # The flush timer may run in a thread of its own: count under a lock.
        self.lock = threading.Lock()
        self.flushes: Counter[tuple[str, str]] = Counter()
        self.bucket_counts: Counter[tuple[str, int]] = Counter()
        self.size_sum: Counter[str] = Counter()
        self.size_count: Counter[str] = Counter()

    def on_batch_flushed(
        self, sender: Any, size: int, key: Hashable, reason: str, **kwargs: Any
    ) -> None:
        """Receiver of ``batch_flushed``: count one batch of ``size`` requests."""
        task = sender.name
        with self.lock:
            self.flushes[task, reason] += 1
            self.size_sum[task] += size
            self.size_count[task] += 1
            for bound in self.buckets:
                if size <= bound:
                    self.bucket_counts[task, bound] += 1

    def render(self) -> str:
        """Return every metric in the Prometheus text exposition format."""
        with self.lock:
            lines = [
                "# HELP celery_batches_flushes_total Batches handed to the pool.",
                "# TYPE celery_batches_flushes_total counter",
            ]
            for (task, reason), count in sorted(self.flushes.items()):
                labels = f'task="{task}",reason="{reason}"'
                lines.append(f"celery_batches_flushes_total{{{labels}}} {count}")
            lines += [
                "# HELP celery_batches_batch_size Requests per batch.",
                "# TYPE celery_batches_batch_size histogram",
            ]
            for task in sorted(self.size_count):
                for bound in self.buckets:
                    count = self.bucket_counts[task, bound]
                    lines.append(
                        f'celery_batches_batch_size_bucket{{task="{task}",'
                        f'le="{bound}"}} {count}'
                    )
                total = self.size_count[task]
                lines += [
                    f'celery_batches_batch_size_bucket{{task="{task}",le="+Inf"}} '
                    f"{total}",
                    f'celery_batches_batch_size_sum{{task="{task}"}} '
                    f"{self.size_sum[task]}",
                    f'celery_batches_batch_size_count{{task="{task}"}} {total}',
                ]
        return "\n".join(lines) + "\n"


metrics = BatchMetrics()
# [connect]
# weak=False: the signal keeps the receiver alive for the life of the worker.
batch_flushed.connect(metrics.on_batch_flushed, weak=False)
# [/connect]


def serve(port: int = 9808, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Answer ``GET /metrics`` on ``host:port`` from a daemon thread.

    Returns the server; ``server.shutdown()`` stops it.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would flood the worker's log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


#: The server :func:`start_metrics_server` started, if any.
metrics_server: ThreadingHTTPServer | None = None


@signals.worker_ready.connect(weak=False)
def start_metrics_server(sender: Any = None, **kwargs: Any) -> None:
    """Serve ``/metrics`` from the worker's main process once it is ready."""
    global metrics_server
    metrics_server = serve(METRICS_PORT)
