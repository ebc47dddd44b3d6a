"""Brokers the fault tests own, and workers they may kill.

The shared servers on 127.0.0.1:6379 and :5672 serve other test runs too, so
a test that restarts its broker (or needs a short Redis visibility timeout,
which acts on every unacked message of a database) gets a Redis server and a
RabbitMQ node of its own, on free ports, started on first use and stopped at
the end of the session (the servers themselves are in
``tests/harness/servers.py``, which the soak shares). Without the binaries
those tests skip, and under CI (``CI=true``) they fail.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery.result import AsyncResult

from tests.conftest import (
    IN_CI,
    REDIS_BACKEND,
    REDIS_URL,
    Worker,
    require_server,
    start_subprocess_worker,
    stop_subprocess_worker,
)
from tests.harness.servers import (
    MissingBinary,
    RabbitNode,
    RedisServer,
    find_binary,
    free_port,
    port_open,
)

__all__ = [
    "RabbitNode",
    "RedisServer",
    "Spawn",
    "exit_code",
    "free_port",
    "kill_worker",
    "port_open",
    "queue_depth",
    "redis_urls",
    "require_binary",
    "run_counts",
    "states",
    "worker_pids",
]


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip the test without it (fail under CI)."""
    try:
        return find_binary(name)
    except MissingBinary as exc:
        if IN_CI:
            pytest.fail(f"fault test cannot run under CI: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[RedisServer]:
    require_binary("redis-server")
    with tempfile.TemporaryDirectory(prefix="cbfault-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def own_redis(_redis_server: RedisServer) -> RedisServer:
    """A Redis server of this session's own, which tests may restart.

    Started again for the next test if a failed test left it stopped.
    """
    process = _redis_server.process
    if process is None or process.poll() is not None:
        _redis_server.start()
    return _redis_server


@pytest.fixture(scope="session")
def _rabbit_node() -> Iterator[RabbitNode]:
    require_binary("rabbitmq-server")
    require_binary("rabbitmqctl")
    node = RabbitNode()
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def own_rabbit(_rabbit_node: RabbitNode) -> RabbitNode:
    """A RabbitMQ node of this session's own, which tests may restart.

    Its application is started again if a failed test left it stopped.
    """
    if not port_open(_rabbit_node.port):
        _rabbit_node.start_app()
    return _rabbit_node


# -- workers ---------------------------------------------------------------


def exit_code(worker: Worker, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` to the worker and return its exit code once it exited.

    Unlike :func:`stop_subprocess_worker` this keeps the worker's queue, so
    that what went back to the broker is there for the next worker.
    """
    process = worker.process
    assert process is not None
    process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_worker(worker)
        raise AssertionError(
            f"worker did not exit within {timeout}s of {sig!r}:\n{worker.log()}"
        ) from None


def worker_pids(worker: Worker) -> set[int]:
    """Return the pids of the worker's main process and its pool children."""
    assert worker.process is not None
    main = psutil.Process(worker.process.pid)
    return {main.pid, *(child.pid for child in main.children(recursive=True))}


def kill_worker(worker: Worker) -> None:
    """``kill -9`` the worker: its main process first, then its children.

    Killing the main process first keeps it from noticing a lost child and
    settling that child's messages before it dies itself.
    """
    process = worker.process
    assert process is not None
    if process.poll() is not None:
        return
    children = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.wait(10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=10)


def queue_depth(worker: Worker) -> int:
    """Return how many messages wait in the worker's queue on the broker."""
    with worker.app.connection_for_write() as conn:
        channel = conn.default_channel
        if conn.transport.driver_type == "redis":
            # A Redis list exists only while it holds messages, so a passive
            # declare of an empty queue fails with NOT_FOUND.
            return int(channel._size(worker.queue))
        declared = channel.queue_declare(worker.queue, passive=True)
        return int(declared.message_count)


def run_counts(worker: Worker, ids: Iterable[str]) -> dict[str, int]:
    """Return how many times the batch bodies ran each of ``ids``."""
    runs = Counter(worker.journal.ids("run"))
    return {task_id: runs[task_id] for task_id in ids}


def states(worker: Worker, ids: Iterable[str]) -> list[str]:
    """Return the backend state of each of ``ids``."""
    return [AsyncResult(task_id, app=worker.app).state for task_id in ids]


Spawn = Callable[..., Worker]


@pytest.fixture
def journal_path(tmp_path: Path) -> str:
    return str(tmp_path / "journal")


@pytest.fixture
def gate(journal_path: str) -> Iterator[Path]:
    """The file that holds the gated tasks' running batches while it exists."""
    path = Path(journal_path + ".gate")
    try:
        yield path
    finally:
        # Lets a child orphaned by a failed test run out of the gate.
        path.unlink(missing_ok=True)


@pytest.fixture
def spawn(journal_path: str) -> Iterator[Spawn]:
    """Start workers that all write to this test's journal.

    Workers still running at the end of the test are killed (a test that
    failed may have left one stuck) and their queues deleted.
    """
    require_server(REDIS_URL)  # every worker stores its results there
    started: list[Worker] = []

    def start(
        broker: str,
        pool: str,
        *,
        urls: tuple[str, str] | None = None,
        **options: Any,
    ) -> Worker:
        worker = start_subprocess_worker(
            broker, pool, journal_path, urls=urls, **options
        )
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        kill_worker(worker)
        stop_subprocess_worker(worker)


def redis_urls(server: RedisServer, db: int) -> tuple[str, str]:
    """Broker and backend URLs for a worker on our own Redis server."""
    return server.url(db), REDIS_BACKEND
