"""Private Redis and RabbitMQ servers, on free loopback ports, that may be restarted.

The fault tests (``tests/fault/conftest.py``) and the soak
(``benchmarks/soak.py``) both restart their broker on purpose, which they
must never do to the shared servers on 127.0.0.1:6379 and :5672. Nothing
here depends on pytest: a missing binary raises :exc:`MissingBinary`, and
the fault tests turn that into a skip (a failure under CI) before they get
here.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "SERVER_START_TIMEOUT",
    "MissingBinary",
    "RabbitNode",
    "RedisSentinel",
    "RedisServer",
    "ServerError",
    "find_binary",
    "free_port",
    "port_open",
]

#: Seconds a server may take to start. Debian's RabbitMQ needs 4 to 10.
SERVER_START_TIMEOUT = 90.0


class ServerError(RuntimeError):
    """A private server did not start, stop or answer as asked."""


class MissingBinary(ServerError):
    """The server's binary is not installed."""


def find_binary(name: str) -> str:
    """Return the path of ``name``.

    Raises:
        MissingBinary: it is not on ``PATH``.
    """
    path = shutil.which(name)
    if path is None:
        raise MissingBinary(f"{name} is not installed")
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


def _wait_for(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class RedisServer:
    """A ``redis-server`` of our own, on a free port, that may be restarted.

    Snapshots are off except on a restart, which saves the data set first
    (``SHUTDOWN SAVE``) and loads it again, as a broker restart keeps its
    queues.
    """

    def __init__(self, directory: Path) -> None:
        self.binary = find_binary("redis-server")
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = itertools.count(1)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_db(self) -> int:
        """Return a database number no other user of this server took.

        Kombu keeps the unacked messages of every queue of a database in one
        hash, so a test that restores them must not share its database.
        """
        db = next(self._databases)
        assert db < 16, "out of Redis databases: raise --databases"
        return db

    def client(self, db: int = 0) -> redis.Redis:
        # No retries: redis-py 6 and later retry a command whose connection
        # failed, with backoff, by default. A SHUTDOWN (the server closes
        # the connection) then took 4 s, and a PING while the server starts
        # as long.
        return redis.Redis(
            port=self.port,
            db=db,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerError(f"redis-server exited:\n{self.log_tail()}")
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
        _wait_for(self._answers, timeout=SERVER_START_TIMEOUT, what="own redis-server")

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
            raise ServerError("own redis-server did not shut down") from None

    def restart(self) -> None:
        """Shut the server down with its data saved, and start it again."""
        self.stop(save=True)
        self.start()


class RedisSentinel:
    """A ``redis-sentinel`` of our own, watching one :class:`RedisServer`.

    It names that server's master ``master_name``; a ``sentinel://`` broker
    URL on :attr:`port` finds the master through it.
    """

    def __init__(
        self, directory: Path, server: RedisServer, master_name: str = "cbmaster"
    ) -> None:
        self.binary = find_binary("redis-sentinel")
        self.directory = directory
        self.server = server
        self.master_name = master_name
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"sentinel://127.0.0.1:{self.port}/{db}"

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "sentinel.log").read_text(errors="replace")
            raise ServerError(f"redis-sentinel exited:\n{log[-2000:]}")
        client = redis.Redis(
            port=self.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        try:
            master: Any = client.sentinel_get_master_addr_by_name(self.master_name)
        except redis.ConnectionError:
            return False
        finally:
            client.close()
        return master is not None and int(master[1]) == self.server.port

    def start(self) -> None:
        # A sentinel rewrites its configuration file: it gets one of its own.
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"logfile {self.directory / 'sentinel.log'}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.server.port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 60000\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_for(
            self._answers, timeout=SERVER_START_TIMEOUT, what="own redis-sentinel"
        )

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class RabbitNode:
    """A RabbitMQ node of our own, with its own ports, data and logs.

    It runs beside the shared node (same Erlang port mapper and cookie) and
    listens on loopback only. :meth:`stop_app` and :meth:`start_app` restart
    the broker while the Erlang VM stays up, which takes about a second.
    ``prefix`` starts the node name, which also holds this process's pid.
    """

    def __init__(self, prefix: str = "cbfault") -> None:
        self.server = find_binary("rabbitmq-server")
        self.ctl = find_binary("rabbitmqctl")
        # Debian's wrappers run the node as the rabbitmq user, which must be
        # able to write here; pytest's own tmp dirs are private to root.
        self.base = Path(tempfile.mkdtemp(prefix=f"{prefix}-rabbit-"))
        self.base.chmod(0o777)
        self.name = f"{prefix}{os.getpid()}@localhost"
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

    def log_tail(self, chars: int = 2000) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in logs)

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
                raise ServerError(
                    f"own RabbitMQ node did not start: {done.stderr}\n{self.log_tail()}"
                )
            time.sleep(0.5)
        # The AMQP listener opens moments after the application reports in.
        _wait_for(lambda: port_open(self.port), timeout=30, what="own AMQP port")

    def start(self) -> None:
        subprocess.run([self.server, "-detached"], env=self.env, timeout=60, check=True)
        self._await_app()

    def stop_app(self) -> None:
        done = self.ctl_run("stop_app")
        if done.returncode != 0:
            raise ServerError(f"stop_app: {done.stderr}")

    def start_app(self) -> None:
        done = self.ctl_run("start_app")
        if done.returncode != 0:
            raise ServerError(f"start_app: {done.stderr}")
        self._await_app()

    def stop(self) -> None:
        done = self.ctl_run("stop")
        if done.returncode != 0:
            pid_file = self.base / "node.pid"
            if pid_file.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
