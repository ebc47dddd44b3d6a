"""Running one consumer process to completion: timing, batch sizes, memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

__all__ = ["Journal", "Measurement", "run_consumer", "stop_process"]

HERE = Path(__file__).resolve().parent


@dataclass
class Measurement:
    """What one run of one consumer measured."""

    #: Messages the consumer was expected to process.
    expected: int
    #: Messages it recorded as processed.
    processed: int = 0
    #: Executions recorded (batches, or messages for a plain task).
    executions: int = 0
    #: Seconds from the end of the first execution to the end of the last.
    seconds: float = 0.0
    #: Messages the first execution processed (not counted in :attr:`rate`).
    first_count: int = 0
    #: Highest sum of RSS over the process tree seen while it ran, in bytes.
    peak_rss: int = 0
    #: Sum of each process's own peak RSS (``VmHWM``) at the end, in bytes.
    peak_rss_hwm: int = 0
    #: Why the run failed, or ``None``.
    error: str | None = None
    #: Last lines of the consumer's log, kept when it failed.
    log_tail: str = field(default="", repr=False)

    @property
    def rate(self) -> float:
        """Messages per second after the first execution ended.

        The first execution (one message, or a first batch) is left out, as
        its messages arrived before the clock started: a batch task would
        otherwise get its first 100 messages free.
        """
        if self.seconds <= 0:
            return 0.0
        return (self.processed - self.first_count) / self.seconds

    @property
    def mean_batch(self) -> float:
        """Messages per execution: the mean batch size."""
        return self.processed / self.executions if self.executions else 0.0


class Journal:
    """Reads the ``start end count`` lines consumers append, incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.count = 0
        self.executions = 0
        #: ``(start, end, count)`` of the execution that started first.
        self.first: tuple[float, float, int] = (float("inf"), 0.0, 0)
        self.last = 0.0

    def poll(self) -> int:
        """Read what was appended since the last call; return the total count."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line:
                continue
            fields = line.split()
            start, end, count = float(fields[0]), float(fields[1]), int(fields[2])
            self.count += count
            self.executions += 1
            if start < self.first[0]:
                self.first = (start, end, count)
            self.last = max(self.last, end)
        return self.count


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _hwm(processes: list[psutil.Process]) -> int:
    """Sum of each process's peak RSS, from ``/proc/PID/status`` (Linux)."""
    total = 0
    for proc in processes:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class _Sampler(threading.Thread):
    """Samples the RSS of a process tree until stopped.

    The tree is re-listed four times a second only: listing children scans
    all of ``/proc``, which on a 2-core machine would take CPU from the
    worker; RSS itself is read every ``interval``.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.processes: list[psutil.Process] = [self.root]
        self._stop_event = threading.Event()

    def run(self) -> None:
        relisted = 0.0
        while not self._stop_event.is_set():
            now = time.monotonic()
            if now - relisted >= 0.25:
                self.processes = _tree(self.root)
                relisted = now
            self.peak = max(self.peak, _rss(self.processes))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        # A last sample with a fresh list: a short run may end before the
        # pool children were first listed.
        self.peak = max(self.peak, _rss(_tree(self.root)))


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(
    process: subprocess.Popen[bytes],
    timeout: float,
    wake: Callable[[], object] | None = None,
) -> None:
    """Stop a worker started in its own session, within bounded time."""
    if process.poll() is not None:
        return
    # SIGTERM is Celery's warm shutdown: the main process stops its pool
    # children itself, and on Redis puts unacked messages back, which leaves
    # nothing behind once the queue is deleted. An idle solo worker only
    # notices the signal when its event loop wakes, after up to 10 s; a
    # message for an unregistered task wakes it at once (and is discarded).
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(0.5)
        return
    except subprocess.TimeoutExpired:
        pass
    if wake is not None:
        with contextlib.suppress(Exception):
            wake()
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    # The whole group is killed only if the warm shutdown hangs.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        process.kill()
    process.wait(10)


def run_consumer(
    cmd: list[str],
    *,
    env: dict[str, str],
    journal: Path,
    log: Path,
    expected: int,
    timeout: float,
    max_seconds: float = 0.0,
    exits_by_itself: bool = False,
    wake: Callable[[], object] | None = None,
) -> Measurement:
    """Start ``cmd``, wait until it recorded ``expected`` messages, stop it.

    A run is also ended ``max_seconds`` after its first execution (if not
    zero): the rate is that of the messages processed by then. Every wait is
    bounded: a consumer that has not finished within ``timeout`` seconds is
    stopped and the measurement carries an error. ``wake`` is called if the
    consumer does not stop at once when asked. A consumer that
    ``exits_by_itself`` writes its journal when it exits, and applies
    ``max_seconds`` itself.
    """
    result = Measurement(expected=expected)
    reader = Journal(journal)
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            cmd,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own process group, so a hung worker and its pool children
            # can be killed together without touching anything else.
            start_new_session=True,
        )
    sampler = _Sampler(process.pid)
    sampler.start()
    deadline = time.monotonic() + timeout
    capped_at = 0.0
    try:
        while True:
            count = reader.poll()
            if count >= expected:
                break
            now = time.time()
            if (
                max_seconds
                and count
                and not exits_by_itself
                and now - reader.first[1] >= max_seconds
            ):
                # The window ends now, not at the last execution: a worker
                # that stalled before the cap must not look fast.
                capped_at = now
                break
            if process.poll() is not None:
                if not exits_by_itself or process.returncode not in (0, 1):
                    result.error = f"exited with code {process.returncode}"
                break
            if time.monotonic() > deadline:
                result.error = f"timed out after {timeout:.0f}s"
                break
            time.sleep(0.05)
        result.peak_rss_hwm = _hwm(_tree(sampler.root))
        # Read the journal before the stop: a warm shutdown flushes what is
        # still buffered, which is not part of the measurement.
        reader.poll()
    finally:
        sampler.stop()
        stop_process(process, timeout=30, wake=wake)
    result.processed = reader.count
    result.executions = reader.executions
    result.peak_rss = sampler.peak
    if reader.count:
        result.seconds = max(reader.last, capped_at) - reader.first[1]
        result.first_count = reader.first[2]
    if result.error is None and result.processed <= result.first_count:
        result.error = "nothing processed after the first execution"
    if result.error is not None:
        result.log_tail = _tail(log)
    return result
