"""The one way a test starts a worker: in a thread or a subprocess, on any broker.

:func:`start_worker` starts the test app's worker (or one for an app the test
brings, such as a documentation example), waits until it is ready and
returns a :class:`Worker` that stops it again::

    with start_worker("redis", "prefork") as worker:
        result = worker.tasks.collect.delay(1)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from celery import Celery
from celery.contrib.testing import worker as celery_testing
from kombu.transport import memory
from kombu.utils.uuid import uuid

from celery_batches import Batches
from celery_batches.signals import batch_flushed
from tests.harness.app import create_app, journal_flushes
from tests.harness.brokers import BROKERS, ROOT, require_server, servers_for
from tests.harness.client import Client, close_app
from tests.harness.journal import Journal
from tests.harness.wait import wait_for

__all__ = [
    "PromptMemoryTransport",
    "Worker",
    "WorkerExited",
    "Workers",
    "start_worker",
]

#: Worker steps a test worker leaves out unless asked for Celery's defaults.
QUIET_STEPS = ("--without-gossip", "--without-mingle", "--without-heartbeat")


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


#: Settings of every in-thread worker's app: the prompt transport, polled
#: every 10 ms (kombu's default is once a second).
IN_THREAD = {
    "broker_transport": PromptMemoryTransport,
    "broker_transport_options": {"polling_interval": 0.01},
    "worker_hijack_root_logger": False,
}


class WorkerExited(AssertionError):
    """The worker process exited before it was ready."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"worker exited early with {returncode}:\n{output}")
        self.returncode = returncode
        #: The worker's log file and console output.
        self.output = output


_scratch: list[str] = []


def _scratch_journal() -> str:
    """A fresh journal path in a directory removed when the tests end."""
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix="celery-batches-tests-"))
        atexit.register(shutil.rmtree, _scratch[0], ignore_errors=True)
    return os.path.join(_scratch[0], f"{uuid()[:8]}.journal")


@dataclass(eq=False)
class Worker(Client):
    """A running worker, and the app the test sends its calls with."""

    pool: str = "solo"
    #: The worker's process (``None`` for a worker in a thread).
    process: subprocess.Popen[bytes] | None = None
    #: The worker's log file (``None`` for a worker in a thread).
    log_path: str | None = None
    #: The environment of the worker's process.
    env: dict[str, str] = field(default_factory=dict)
    #: Ends the in-thread worker, or what else was set up for it.
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def log(self) -> str:
        """The worker's log so far ("" for a worker in a thread)."""
        if self.log_path is None:
            return ""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        """Whether the worker runs and has not met an error that ends it.

        A worker that meets an unrecoverable error may take half a minute to
        exit (it waits for its pool), consuming nothing meanwhile.
        """
        running = self.process is None or self.process.poll() is None
        return running and "Unrecoverable error" not in self.log()

    def node_name(self) -> str:
        """The node name the worker reported when it became ready."""
        found = re.search(r"(\S+@\S+) ready\.", self.log())
        assert found is not None, self.log()
        return found.group(1)

    def pids(self) -> set[int]:
        """The pids of the worker's main process and its pool children."""
        assert self.process is not None
        main = psutil.Process(self.process.pid)
        return {main.pid, *(child.pid for child in main.children(recursive=True))}

    # -- ending it ---------------------------------------------------------

    def exit(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and return the exit code once the worker exited.

        Unlike :meth:`stop` this keeps the worker's queue, so that what went
        back to the broker is there for the next worker.
        """
        process = self.process
        assert process is not None
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker did not exit within {timeout}s of {sig!r}:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """``kill -9`` the worker: its main process first, then its children.

        Killing the main process first keeps it from noticing a lost child
        and settling that child's messages before it dies itself.
        """
        process = self.process
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

    def stop(self, timeout: float = 60) -> int | None:
        """Stop the worker warmly (if it runs), delete its queue, close its app.

        Returns:
            The process's exit code (``None`` for a worker in a thread).
        """
        self._stack.close()
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.exit(signal.SIGTERM, timeout)
        self.delete_queue()
        return self.process.returncode

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_worker(
    broker: str = "memory",
    pool: str = "solo",
    *,
    journal: str | None = None,
    in_thread: bool | None = None,
    concurrency: int | None = None,
    conf: dict[str, Any] | None = None,
    queue: str | None = None,
    celery_defaults: bool = False,
    extra_env: dict[str, str] | None = None,
    loglevel: str = "INFO",
    urls: tuple[str, str] | None = None,
    app: Celery | None = None,
    batch_options: dict[str, Any] | None = None,
) -> Worker:
    """Start a worker and wait until it is ready (skip if its broker is down).

    Arguments:
        broker: ``memory`` (the in-memory transport), ``redis`` or
            ``rabbitmq`` (the shared servers), or a label for the servers
            given by ``urls``.
        pool: The worker pool: ``solo``, ``threads``, ``prefork``,
            ``gevent`` or ``eventlet``.
        journal: The journal file the test app's tasks write; workers that
            share one count each call's runs together. A fresh file if
            ``None``.
        in_thread: Run the worker in a thread of this process (the default
            on ``memory``, the only broker it can share with the test) or
            as ``celery worker`` in a subprocess (the default elsewhere).
        concurrency: Pool processes or threads: by default 2, or 1 for the
            solo pool and for a worker in a thread that is not on threads.
        conf: Settings over the test app's own, on both sides.
        queue: The queue to consume; a fresh one if ``None``.
        celery_defaults: Keep gossip, mingle and heartbeats, which a test
            worker leaves out (they only slow a test down).
        extra_env: More environment for the worker's process.
        loglevel: The log level of a worker's process (a worker in a
            thread logs warnings only).
        urls: (broker URL, result backend URL) replacing the servers of
            ``broker``, e.g. a private server a fault test restarts.
        app: Run a worker for this app (in a thread, on ``memory``) instead
            of the test app; it journals its flushes only.
        batch_options: Options set on every batch task of ``app``, e.g. a
            short ``flush_interval`` to keep a test fast.
    """
    journal = journal or _scratch_journal()
    if in_thread is None:
        in_thread = broker == "memory"
    if urls is None:
        urls = servers_for(broker)
    elif urls[1].startswith("redis"):
        require_server(urls[1])
    if in_thread:
        return _start_in_thread(
            broker,
            pool,
            journal,
            concurrency=concurrency or (2 if pool == "threads" else 1),
            conf=conf or {},
            queue=queue or f"q-{uuid()}",
            urls=urls,
            app=app,
            batch_options=batch_options or {},
        )
    assert app is None, "a worker for the test's own app runs in a thread"
    return _start_process(
        broker,
        pool,
        journal,
        concurrency=1 if pool == "solo" else concurrency or 2,
        conf=conf or {},
        queue=queue or f"q-{uuid()}",
        celery_defaults=celery_defaults,
        extra_env=extra_env or {},
        loglevel=loglevel,
        urls=urls,
    )


def _start_in_thread(
    broker: str,
    pool: str,
    journal: str,
    *,
    concurrency: int,
    conf: dict[str, Any],
    queue: str,
    urls: tuple[str, str],
    app: Celery | None,
    batch_options: dict[str, Any],
) -> Worker:
    assert urls[0] == BROKERS["memory"][0], "a worker in a thread needs memory://"
    stack = ExitStack()
    settings = {**IN_THREAD, **conf}
    if app is None:
        app, tasks = create_app(
            broker=urls[0], backend=urls[1], journal=journal, queue=queue, **settings
        )
    else:
        tasks = None
        app.conf.update(
            broker_url=urls[0],
            result_backend=urls[1],
            task_default_queue=queue,
            **settings,
        )
        for task in app.tasks.values():
            if isinstance(task, Batches):
                for name, value in batch_options.items():
                    setattr(task, name, value)
        receiver = journal_flushes(app, Journal(journal))
        stack.callback(batch_flushed.disconnect, receiver)
    stack.enter_context(
        celery_testing.start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        )
    )
    return Worker(broker, app, queue, Journal(journal), tasks, pool, _stack=stack)


def _start_process(
    broker: str,
    pool: str,
    journal: str,
    *,
    concurrency: int,
    conf: dict[str, Any],
    queue: str,
    celery_defaults: bool,
    extra_env: dict[str, str],
    loglevel: str,
    urls: tuple[str, str],
) -> Worker:
    log_path = f"{journal}.{uuid()[:8]}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CB_TEST_BROKER": urls[0],
        "CB_TEST_BACKEND": urls[1],
        "CB_TEST_JOURNAL": journal,
        "CB_TEST_QUEUE": queue,
        "CB_TEST_CONF": json.dumps(conf),
        **extra_env,
    }
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.harness.worker_app",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
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
    # What the worker prints before its log file is open (an error at
    # start-up) goes to a file of its own; the child keeps its own copy of
    # the file descriptor.
    console_path = log_path + ".console"
    with open(console_path, "wb") as console:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT
        )
    app, tasks = create_app(
        broker=urls[0], backend=urls[1], journal=journal, queue=queue, **conf
    )
    worker = Worker(
        broker,
        app,
        queue,
        Journal(journal),
        tasks,
        pool,
        process=process,
        log_path=log_path,
        env=env,
    )

    def ready() -> bool:
        if process.poll() is not None:
            output = worker.log() + Path(console_path).read_text(errors="replace")
            raise WorkerExited(process.returncode, output)
        return " ready." in worker.log()

    try:
        wait_for(ready, timeout=60, what=f"{broker}/{pool} worker to be ready")
    except AssertionError:
        # A worker that never got ready must not outlive the test.
        worker.kill()
        worker.stop()
        raise
    return worker


class Workers:
    """Starts the workers of one test, all writing to one journal, and ends them.

    Workers still running when the test ends are stopped warmly, or with
    ``kill=True`` killed (for fault tests, where a test that failed may
    have left one stuck); their queues are deleted either way.
    """

    def __init__(self, journal: str, *, kill: bool = False) -> None:
        self.journal = journal
        self.kill = kill
        self.started: list[Worker] = []
        self.clients: list[Client] = []

    def start(self, broker: str, pool: str, **options: Any) -> Worker:
        """:func:`start_worker` with this test's journal."""
        worker = start_worker(broker, pool, journal=self.journal, **options)
        self.started.append(worker)
        return worker

    def client(self, broker: str, **options: Any) -> Client:
        """:meth:`Client.create` with this test's journal; closed at the end."""
        client = Client.create(broker, self.journal, **options)
        self.clients.append(client)
        return client

    def close(self) -> None:
        """End every worker and client this test started, the last first."""
        for worker in reversed(self.started):
            if self.kill and worker.process is not None:
                worker.kill()
            worker.stop()
        for client in self.clients:
            close_app(client.app)
