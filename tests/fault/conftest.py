"""Brokers the fault tests own, and workers they may kill.

The shared servers on 127.0.0.1:6379 and :5672 serve other test runs too, so
a test that restarts its broker (or needs a short Redis visibility timeout,
which acts on every unacked message of a database) gets a Redis server and a
RabbitMQ node of its own, on free ports, started on first use and stopped at
the end of the session. Without the binaries those tests skip, and under CI
(``CI=true``) they fail.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery.result import AsyncResult

from tests.conftest import (
    IN_CI,
    REDIS_BACKEND,
    REDIS_URL,
    Worker,
    require_server,
    start_subprocess_worker,
    stop_subprocess_worker,
    wait_for,
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

#: Seconds a server may take to start. Debian's RabbitMQ needs 4 to 10.
SERVER_START_TIMEOUT = 90.0


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip the test without it (fail under CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"fault test cannot run under CI: {message}")
        pytest.skip(message)
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Return ``True`` if something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` of our own, on a free port, that tests may restart.

    Snapshots are off except on a restart, which saves the data set first
    (``SHUTDOWN SAVE``) and loads it again, as a broker restart keeps its
    queues.
    """

    def __init__(self, directory: Path) -> None:
        self.binary = require_binary("redis-server")
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = itertools.count(1)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_db(self) -> int:
        """Return a database number no other test of the session used.

        Kombu keeps the unacked messages of every queue of a database in one
        hash, so a test that restores them must not share its database.
        """
        db = next(self._databases)
        assert db < 16, "out of Redis databases: raise --databases"
        return db

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "redis.log").read_text(errors="replace")
            raise AssertionError(f"redis-server exited:\n{log[-2000:]}")
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--dbfilename",
                "dump.rdb",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._answers, timeout=SERVER_START_TIMEOUT, what="own redis-server")

    def stop(self, *, save: bool = False) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # The server closes the connection as it exits.
        with contextlib.suppress(redis.RedisError):
            self.client().shutdown(save=save, nosave=not save)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError("own redis-server did not shut down") from None

    def restart(self) -> None:
        """Shut the server down with its data saved, and start it again."""
        self.stop(save=True)
        self.start()


class RabbitNode:
    """A RabbitMQ node of our own, with its own ports, data and logs.

    It runs beside the shared node (same Erlang port mapper and cookie) and
    listens on loopback only. :meth:`stop_app` and :meth:`start_app` restart
    the broker while the Erlang VM stays up, which takes about a second.
    """

    def __init__(self) -> None:
        self.server = require_binary("rabbitmq-server")
        self.ctl = require_binary("rabbitmqctl")
        # Debian's wrappers run the node as the rabbitmq user, which must be
        # able to write here; pytest's own tmp dirs are private to root.
        self.base = Path(tempfile.mkdtemp(prefix="cbfault-rabbit-"))
        self.base.chmod(0o777)
        self.name = f"cbfault{os.getpid()}@localhost"
        self.port = free_port()
        (self.base / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.base / "plugins-expand"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                "-kernel inet_dist_use_interface {127,0,0,1}"
            ),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl_run(
        self, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        # `timeout` ends rabbitmqctl itself; subprocess's own limit would only
        # end the su wrapper in front of it.
        return subprocess.run(
            ["timeout", str(int(timeout)), self.ctl, "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            check=False,
        )

    def _log_tail(self) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)

    def _await_app(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            # await_startup fails at once while the node has not yet
            # registered with epmd; it blocks while the node boots.
            remaining = deadline - time.monotonic()
            done = self.ctl_run("await_startup", timeout=max(remaining, 5))
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"own RabbitMQ node did not start: {done.stderr}\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.5)
        # The AMQP listener opens moments after the application reports in.
        wait_for(lambda: port_open(self.port), timeout=30, what="own AMQP port")

    def start(self) -> None:
        subprocess.run([self.server, "-detached"], env=self.env, timeout=60, check=True)
        self._await_app()

    def stop_app(self) -> None:
        done = self.ctl_run("stop_app")
        assert done.returncode == 0, done.stderr

    def start_app(self) -> None:
        done = self.ctl_run("start_app")
        assert done.returncode == 0, done.stderr
        self._await_app()

    def stop(self) -> None:
        done = self.ctl_run("stop")
        if done.returncode != 0:
            pid_file = self.base / "node.pid"
            if pid_file.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[RedisServer]:
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
