"""The soak's worker: a ``celery worker`` subprocess, killed and restarted on demand.

:class:`Supervisor` keeps one worker running, as systemd would: once the
worker has exited, for whatever reason, the next call to
:meth:`Supervisor.ensure_running` starts a new one and waits until it is
ready. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = ["Exit", "Supervisor", "WorkerFailed", "alive"]

ROOT = Path(__file__).resolve().parent.parent

#: Seconds a worker may take to report ready. Celery starts in 2-4 s here.
READY_TIMEOUT = 60.0
#: Seconds a warm shutdown may take: running batches finish, then the
#: buffered ones run in the main process; both take well under a second.
WARM_SHUTDOWN_TIMEOUT = 30.0
#: Workers in a row that may exit before they are ready.
MAX_FAILED_STARTS = 5


class WorkerFailed(RuntimeError):
    """The worker could not be started, or did not stop as asked."""


def alive(pid: int) -> bool:
    """Return ``True`` if ``pid`` runs and is not a zombie waiting to be reaped."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@dataclass
class Exit:
    """How one worker ended."""

    pid: int
    code: int | None
    #: What ended it: ``sigkill``, ``sigterm``, ``stop`` or ``unexpected``.
    cause: str
    #: Its log file.
    log: Path
    #: A warm shutdown that did not end in time (then it was killed).
    hung: bool = False

    def last_words(self) -> str:
        """The last CRITICAL line of its log: why it exited, if it said."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        critical = [line for line in lines if "CRITICAL/" in line]
        return critical[-1] if critical else ""


@dataclass
class _Incarnation:
    process: subprocess.Popen[bytes]
    log: Path
    #: Written by the worker once it consumes (``worker_ready``).
    ready_file: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Supervisor:
    """Starts, kills and restarts the soak's worker; remembers every exit."""

    def __init__(
        self,
        *,
        broker_url: str,
        backend_url: str,
        queue: str,
        transport_options: dict[str, Any],
        journal: Path,
        directory: Path,
        remote_control: bool = True,
    ) -> None:
        self.queue = queue
        self.directory = directory
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "SOAK_BROKER": broker_url,
            "SOAK_BACKEND": backend_url,
            "SOAK_QUEUE": queue,
            "SOAK_JOURNAL": str(journal),
            "SOAK_TRANSPORT_OPTIONS": json.dumps(transport_options),
            "SOAK_PARENT": str(os.getpid()),
            "SOAK_REMOTE_CONTROL": "1" if remote_control else "0",
        }
        self.current: _Incarnation | None = None
        self.incarnations: list[_Incarnation] = []
        self.exits: list[Exit] = []
        #: The cause to record for the exit of the current worker.
        self._cause = "unexpected"

    def _command(self, log: Path) -> list[str]:
        number = len(self.incarnations)
        return [
            sys.executable, "-m", "celery", "-A", "benchmarks.soak_app", "worker",
            "-P", "prefork", "-c", "2", "-n", f"soak{number}-{os.getpid()}@%h",
            "-Q", self.queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "WARNING", "--logfile", str(log),
        ]  # fmt: skip

    def _spawn(self) -> _Incarnation:
        number = len(self.incarnations)
        log = self.directory / f"worker-{number:03d}.log"
        ready_file = self.directory / f"worker-{number:03d}.ready"
        # What is not logged, such as the thread stacks Celery prints on
        # SIGUSR1 (see dump_stacks), goes to stderr.
        with open(self.directory / f"worker-{number:03d}.out", "ab") as out:
            process = subprocess.Popen(
                self._command(log),
                cwd=ROOT,
                env={**self.env, "SOAK_READY_FILE": str(ready_file)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: a kill reaches its pool children
                # and nothing else.
                start_new_session=True,
            )
        incarnation = _Incarnation(process, log, ready_file)
        self.incarnations.append(incarnation)
        self.current = incarnation
        self._cause = "unexpected"
        return incarnation

    def _await_ready(self, incarnation: _Incarnation) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if incarnation.process.poll() is not None:
                return False
            if incarnation.ready_file.exists():
                return True
            time.sleep(0.1)
        self._kill(incarnation)
        raise WorkerFailed(
            f"worker not ready within {READY_TIMEOUT:.0f}s:\n"
            f"{incarnation.log_text()[-3000:]}"
        )

    def ensure_running(self) -> bool:
        """Start a worker if none runs; return ``True`` if one was started.

        Raises:
            WorkerFailed: workers kept exiting before they were ready.
        """
        current = self.current
        if current is not None and current.process.poll() is None:
            return False
        if current is not None:
            self._record_exit(current)
        for _ in range(MAX_FAILED_STARTS):
            incarnation = self._spawn()
            if self._await_ready(incarnation):
                return True
            self._record_exit(incarnation)
        raise WorkerFailed(
            f"{MAX_FAILED_STARTS} workers in a row exited before they were ready:\n"
            f"{self.log_tail()}"
        )

    def _record_exit(self, incarnation: _Incarnation, hung: bool = False) -> None:
        if self.current is incarnation:
            self.current = None
        process = incarnation.process
        self.exits.append(
            Exit(process.pid, process.returncode, self._cause, incarnation.log, hung)
        )
        self._cause = "unexpected"

    @staticmethod
    def _kill(incarnation: _Incarnation) -> None:
        process = incarnation.process
        if process.poll() is not None:
            return
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        # The main process first, so that it cannot notice a lost pool child
        # and settle that child's messages before it dies itself; then the
        # rest of its process group.
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        psutil.wait_procs(children, timeout=10)

    def sigkill(self) -> None:
        """``kill -9`` the worker's main process and its pool children."""
        current = self.current
        if current is None or current.process.poll() is not None:
            return
        self._cause = "sigkill"
        self._kill(current)
        self._record_exit(current)

    def sigterm(self) -> bool:
        """Warm-shut the worker down; return ``False`` if it had to be killed."""
        current = self.current
        if current is None or current.process.poll() is not None:
            return True
        self._cause = "sigterm"
        current.process.send_signal(signal.SIGTERM)
        try:
            current.process.wait(WARM_SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill(current)
            self._record_exit(current, hung=True)
            return False
        self._record_exit(current)
        return True

    def stop(self) -> None:
        """Warm-shut the worker down at the end of the soak."""
        current = self.current
        if current is None:
            return
        if current.process.poll() is not None:
            self._record_exit(current)
            return
        self._cause = "stop"
        current.process.send_signal(signal.SIGTERM)
        try:
            current.process.wait(WARM_SHUTDOWN_TIMEOUT)
            self._record_exit(current)
        except subprocess.TimeoutExpired:
            self._kill(current)
            self._record_exit(current, hung=True)

    def kill_all(self) -> None:
        """Kill whatever is left of every worker started (cleanup)."""
        for incarnation in self.incarnations:
            self._kill(incarnation)

    def dump_stacks(self) -> str:
        """The consumer state and thread stacks of the running worker.

        ``soak_app`` prints the state on SIGUSR2 and Celery the stacks on
        SIGUSR1, both to stderr; waited for (bounded) and returned, to show
        why a worker stopped consuming.
        """
        current = self.current
        if current is None or current.process.poll() is not None:
            return ""
        out = current.log.with_suffix(".out")
        before = out.stat().st_size if out.exists() else 0
        current.process.send_signal(signal.SIGUSR2)
        current.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        size = before
        while time.monotonic() < deadline:
            time.sleep(0.5)
            new_size = out.stat().st_size if out.exists() else 0
            if new_size > before and new_size == size:
                break  # written, and no longer growing
            size = new_size
        with open(out, "rb") as f:
            f.seek(before)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the latest worker's log."""
        if not self.incarnations:
            return ""
        incarnation = self.incarnations[-1]
        text = incarnation.log_text().splitlines()[-lines:]
        return f"--- {incarnation.log} ---\n" + "\n".join(text)

    def log_problems(self, limit: int = 20) -> list[str]:
        """ERROR and CRITICAL lines of every worker's log, the last ``limit``."""
        found: list[str] = []
        for incarnation in self.incarnations:
            for line in incarnation.log_text().splitlines():
                if "ERROR/" in line or "CRITICAL/" in line:
                    found.append(f"{incarnation.log.name}: {line}")
        return found[-limit:]
