"""Brokers, workers and helpers shared by the test suite.

Broker tests run against real servers: the in-memory transport (worker in a
thread), and Redis and RabbitMQ servers (worker in a subprocess). On a
machine without a server those tests skip; under CI (``CI=true``) they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery, _state
from celery.contrib.testing.worker import start_worker
from kombu.connection import Connection
from kombu.transport import memory
from kombu.utils.uuid import uuid

from tests.app import Journal, create_app

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

REDIS_URL = os.environ.get("CELERY_BATCHES_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get(
    "CELERY_BATCHES_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
REDIS_BACKEND = REDIS_URL.rsplit("/", 1)[0] + "/1"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _reachable(url: str) -> str | None:
    """Return why ``url`` cannot be reached, or ``None`` if it can."""
    try:
        if url.startswith("redis"):
            import redis

            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        else:
            with Connection(url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"{url}: {exc!r}"
    return None


_checked: dict[str, str | None] = {}


def require_server(url: str) -> None:
    """Skip (or under CI, fail) the test if the server at ``url`` is down."""
    if url not in _checked:
        _checked[url] = _reachable(url)
    problem = _checked[url]
    if problem is not None:
        if IN_CI:
            pytest.fail(f"broker test cannot run under CI: {problem}")
        pytest.skip(f"server not reachable: {problem}")


#: The runnable examples the documentation includes.
EXAMPLES = ROOT / "docs" / "examples"


class PromptMemoryTransport(memory.Transport):
    """The in-memory transport, with waits for messages of at most 0.1 s.

    Celery's loop for transports without an event loop waits up to 2 s for
    a message and looks for a shutdown request only in between, twice over:
    4 s added to every test that stops a worker. The loop takes a shorter
    wait that times out as nothing received.
    """

    # kombu's base and virtual transports declare this method differently;
    # no signature satisfies both.
    def drain_events(  # type: ignore[override]
        self, connection: Any, timeout: float | None = None
    ) -> Any:
        if timeout is not None and timeout > 0.1:
            timeout = 0.1
        return super().drain_events(connection, timeout=timeout)


def _worker_thread(app: Celery, pool: str) -> Any:
    """Celery's test worker for ``app``, in a thread of this process."""
    return start_worker(
        app,
        pool=pool,
        concurrency=2 if pool == "threads" else 1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    )


#: The keyword arguments of each ``batch_flushed``, plus the task's name.
Flushes = list[dict[str, Any]]


@contextmanager
def example_worker(
    app: Celery,
    *,
    pool: str = "solo",
    backend: str = "cache+memory://",
    **settings: Any,
) -> Iterator[Flushes]:
    """Run a worker for an example's ``app`` on the in-memory transport.

    ``settings`` override options of every batch task of the app (a short
    ``flush_interval`` keeps the tests fast). Yields each ``batch_flushed``
    the worker sends, as it comes.
    """
    from celery_batches import Batches
    from celery_batches.signals import batch_flushed

    app.conf.update(
        broker_url="memory://",
        broker_transport=PromptMemoryTransport,
        # kombu's default is to poll an empty queue once a second.
        broker_transport_options={"polling_interval": 0.01},
        result_backend=backend,
        task_default_queue=f"examples-{uuid()}",
        worker_hijack_root_logger=False,
    )
    for task in app.tasks.values():
        if isinstance(task, Batches):
            for name, value in settings.items():
                setattr(task, name, value)
    flushes: Flushes = []

    def on_flushed(sender: Any, **kwargs: Any) -> None:
        if sender.app is app:
            flushes.append({"task": sender.name, **kwargs})

    batch_flushed.connect(on_flushed, weak=False)
    try:
        with _worker_thread(app, pool):
            yield flushes
    finally:
        batch_flushed.disconnect(on_flushed)


@contextmanager
def loading() -> Iterator[Callable[[str], Any]]:
    """Import modules of docs/examples afresh, so each test has its own state."""
    finalizers = set(_state._on_app_finalizers)

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    try:
        yield load
    finally:
        # The examples' tasks are shared tasks (Celery's default): forget
        # them, or every app finalized later in the session would get them.
        _state._on_app_finalizers.intersection_update(finalizers)


BROKERS = {
    "memory": ("memory://", "cache+memory://"),
    "redis": (REDIS_URL, REDIS_BACKEND),
    "rabbitmq": (AMQP_URL, REDIS_BACKEND),
}


@dataclass
class Worker:
    """A running worker and the app the test sends its calls with."""

    broker: str
    pool: str
    app: Celery
    journal: Journal
    queue: str
    log_path: str | None = None
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def runs(self, task_id: str) -> int:
        """How many times the body saw ``task_id``."""
        return self.journal.ids("run").count(task_id)

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _servers_for(broker: str) -> tuple[str, str]:
    url, backend = BROKERS[broker]
    if broker != "memory":
        require_server(url)
        require_server(REDIS_URL)
    return url, backend


@contextmanager
def thread_worker(pool: str, journal_path: str, **conf: Any) -> Iterator[Worker]:
    """A worker in a thread of this process, on the in-memory transport."""
    queue = f"q-{uuid()}"
    app = create_app(
        broker="memory://",
        backend="cache+memory://",
        journal=journal_path,
        queue=queue,
        **conf,
    )
    with _worker_thread(app, pool):
        yield Worker("memory", pool, app, Journal(journal_path), queue)


#: Worker steps a test worker leaves out unless asked for Celery's defaults.
QUIET_STEPS = ("--without-gossip", "--without-mingle", "--without-heartbeat")


def start_subprocess_worker(
    broker: str,
    pool: str,
    journal_path: str,
    *,
    concurrency: int = 2,
    queue: str | None = None,
    conf: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
    loglevel: str = "INFO",
    urls: tuple[str, str] | None = None,
    celery_defaults: bool = False,
) -> Worker:
    """Start ``celery worker`` in a subprocess and wait until it is ready.

    ``urls`` (broker, result backend) replaces the servers of ``broker``,
    e.g. with a broker that a fault test starts and restarts itself. The
    worker runs without gossip, mingle and heartbeats (which only slow a
    test down) unless ``celery_defaults`` asks for Celery's default steps.
    """
    url, backend = urls if urls is not None else _servers_for(broker)
    queue = queue or f"q-{uuid()}"
    conf = conf or {}
    log_path = journal_path + f".{uuid()[:8]}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CB_TEST_BROKER": url,
        "CB_TEST_BACKEND": backend,
        "CB_TEST_JOURNAL": journal_path,
        "CB_TEST_QUEUE": queue,
        "CB_TEST_CONF": json.dumps(conf),
        **(extra_env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.worker_app",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency if pool != "solo" else 1),
        "-n",
        f"w{uuid()[:8]}@%h",
        "-Q",
        queue,
        *(() if celery_defaults else QUIET_STEPS),
        "-l",
        loglevel,
        "--logfile",
        log_path,
    ]
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    app = create_app(
        broker=url, backend=backend, journal=journal_path, queue=queue, **conf
    )
    worker = Worker(
        broker, pool, app, Journal(journal_path), queue, log_path, process, env
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"worker exited early:\n{worker.log()}")
        return " ready." in worker.log()

    try:
        wait_for(ready, timeout=60, what=f"{broker}/{pool} worker to be ready")
    except AssertionError:
        # A worker that never got ready must not outlive the test.
        process.kill()
        process.wait(10)
        raise
    return worker


def stop_subprocess_worker(
    worker: Worker, sig: int = signal.SIGTERM, timeout: float = 60
) -> int:
    """Stop the worker with ``sig``; return its exit code."""
    process = worker.process
    assert process is not None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError(
                f"worker did not stop on {sig!r}:\n{worker.log()}"
            ) from None
    _delete_queue(worker)
    return process.returncode


def _delete_queue(worker: Worker) -> None:
    try:
        with worker.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(worker.queue)
    except Exception:
        pass
    _close_result_backend(worker.app)
    worker.app.close()


def _close_result_backend(app: Celery) -> None:
    """Close the sockets of ``app``'s Redis result backend, if it made one.

    ``app.close()`` leaves them to the garbage collector, where older
    Celery and redis-py warn about unclosed sockets at a random later test.
    """
    # None if never made; Celery 5.2 keeps it in a thread-local only.
    backend = getattr(app, "_backend", None) or getattr(app._local, "backend", None)
    client = getattr(backend, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()


WORKERS = [
    ("memory", "solo"),
    ("memory", "threads"),
    ("redis", "prefork"),
    ("redis", "solo"),
    ("redis", "gevent"),
    ("rabbitmq", "prefork"),
    ("rabbitmq", "solo"),
    ("rabbitmq", "eventlet"),
]


@pytest.fixture(scope="session")
def journal_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="celery-batches-tests-") as path:
        yield path


@pytest.fixture(scope="session", params=WORKERS, ids=[f"{b}-{p}" for b, p in WORKERS])
def worker(request: pytest.FixtureRequest, journal_dir: str) -> Iterator[Worker]:
    """A worker shared by the tests of one broker and pool."""
    broker, pool = request.param
    journal = os.path.join(journal_dir, f"{broker}-{pool}.journal")
    if broker == "memory":
        with thread_worker(pool, journal) as w:
            yield w
        return
    w = start_subprocess_worker(broker, pool, journal)
    try:
        yield w
    finally:
        stop_subprocess_worker(w)


@pytest.fixture(params=[1, 2], ids=["proto1", "proto2"])
def protocol(request: pytest.FixtureRequest, worker: Worker) -> Iterator[int]:
    """Send the test's calls with task protocol 1, then 2."""
    amqp = worker.app.amqp
    previous = worker.app.conf.task_protocol
    # Celery picks the message format once per app (a cached property of
    # app.amqp); forget it so the new protocol takes effect.
    worker.app.conf.task_protocol = request.param
    amqp.__dict__.pop("create_task_message", None)
    yield request.param
    worker.app.conf.task_protocol = previous
    amqp.__dict__.pop("create_task_message", None)
