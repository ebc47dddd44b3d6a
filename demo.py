"""Watch a real Celery worker run a few thousand calls in batches.

``make demo`` (or ``python demo.py``) starts ``celery worker`` in a
subprocess, sends it 3000 calls of a batch task, prints each batch as the
worker flushes it under a progress bar, and ends with a summary: calls,
batches, mean batch size and calls per second. It exits 0 only if every
call ran, and always stops the worker it started, Ctrl-C included.

It needs no server, which is why it is built the way it is:

* The broker is kombu's filesystem transport: each message is a file in a
  directory under ``.demo/``, so the demo and the worker share a queue with
  nothing installed or running. That transport has no event loop, so the
  worker polls the directory every ``polling_interval`` seconds (tuned
  below, see :data:`FS_POLLING_INTERVAL`) and runs the flush timer in a
  thread of its own, as for any such transport. :class:`DemoFilesystemTransport`
  also fixes a race in kombu's writer and lets the worker stop promptly.
* There is no result backend. The demo needs to know which calls ran, not
  their return values, and the worker can tell it that through a file:
  its main process appends a line to ``events.log`` on each
  ``batch_flushed`` signal, and the batch body appends one line per batch
  with the calls it ran. The demo tails that file. (Celery's ``file://``
  backend would also need no server, but waiting on 3000 result files
  would cost more than the work being shown.)

``--broker redis://127.0.0.1:6379/0`` runs the same demo on a real broker,
on a queue of its own that is deleted afterwards.

The worker side of the demo lives in this file too: the subprocess runs
``celery -A demo worker``, and :func:`make_app` builds the same app there
from the settings the demo passes in the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from celery import Celery, signals
from kombu.transport import filesystem
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.signals import batch_flushed

__all__ = ["DemoFilesystemTransport", "Settings", "app", "main", "make_app"]

ROOT = Path(__file__).resolve().parent

#: The environment variable that hands the demo's settings to the worker.
SETTINGS_ENV = "CELERY_BATCHES_DEMO"

#: Seconds the filesystem transport sleeps when it finds no message, or may
#: take none because the prefetch window is full, which happens once per
#: batch here. kombu's default of 1 s stretches the 3000 calls over 30 s;
#: 10 ms runs them in about 2 s, for one directory listing per poll.
FS_POLLING_INTERVAL = 0.01

#: Longest wait of the worker for a message on the filesystem transport,
#: in seconds: how long it may take to notice it was asked to stop.
MAX_DRAIN_WAIT = 0.1

TASK_NAME = "demo.record"


@dataclass
class Settings:
    """What the demo and its worker must agree on."""

    broker: str
    queue: str
    #: File the worker appends its ``ready``, ``flush`` and ``ran`` lines to.
    events: str
    flush_every: int
    flush_interval: float
    transport_options: dict[str, Any] = field(default_factory=dict)
    #: The demo's pid; the worker stops itself when its parent is no longer it.
    demo_pid: int = 0


def append_line(path: str, line: str) -> None:
    """Append ``line`` to ``path`` in one ``write``.

    With ``O_APPEND`` and a single write per line, lines from the worker's
    main process and its pool processes never interleave.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class StagedChannel(filesystem.Channel):
    """A filesystem channel that renames each message into place, whole.

    kombu's own ``_put`` creates the message file in the queue folder and
    then writes it. A worker that lists the folder in between reads an
    empty message, and its consumer dies on the JSON error. Writing the
    file in a staging folder and renaming it in is atomic.
    """

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        # kombu's name: the time sent (which the consumer sorts on), a
        # unique part, then the queue (which the consumer matches on).
        name = f"{round(time.monotonic() * 1000)}_{uuid()}.{queue}.msg"
        staged = os.path.join(self.transport_options["staging_folder"], name)
        with open(staged, "wb") as f:
            f.write(dumps(message).encode())
        os.replace(staged, os.path.join(self.data_folder_out, name))


class DemoFilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport, made safe and prompt for the demo.

    Messages are written by :class:`StagedChannel`, and a wait for messages
    lasts at most :data:`MAX_DRAIN_WAIT`.
    """

    Channel = StagedChannel

    def drain_events(self, connection: Any, **kwargs: Any) -> Any:
        # Celery's loop for transports without an event loop waits up to
        # 2 s here and looks for a shutdown request only in between, twice
        # over, so a warm shutdown would take 4 s. The loop treats a
        # shorter wait that times out as nothing received.
        timeout = kwargs.get("timeout")
        if timeout is not None and timeout > MAX_DRAIN_WAIT:
            kwargs["timeout"] = MAX_DRAIN_WAIT
        return super().drain_events(connection, **kwargs)


def make_app(settings: Settings) -> Celery:
    """Return the demo's app and its batch task ``demo.record``."""
    app = Celery("demo", broker=settings.broker, set_as_current=False)
    if settings.broker.startswith("filesystem:"):
        app.conf.broker_transport = DemoFilesystemTransport
    app.conf.update(
        broker_transport_options=settings.transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        # Remote control adds a broadcast queue that the filesystem
        # transport would list the directory for on every poll; the demo
        # never sends a control command.
        worker_enable_remote_control=False,
    )
    events = settings.events

    @app.task(
        base=Batches,
        name=TASK_NAME,
        flush_every=settings.flush_every,
        flush_interval=settings.flush_interval,
    )
    def record(requests: list[SimpleRequest]) -> None:
        # The one write per batch stands for what a real batch body does:
        # one bulk statement for all its calls instead of one per call.
        calls = " ".join(str(request.args[0]) for request in requests)
        append_line(events, f"ran {time.time():.6f} {calls}")

    def on_flushed(sender: Any, size: int, reason: str, **kwargs: Any) -> None:
        append_line(events, f"flush {time.time():.6f} {size} {reason}")

    def on_ready(**kwargs: Any) -> None:
        stop_when_orphaned(settings.demo_pid)
        append_line(events, f"ready {time.time():.6f} {os.getpid()}")

    # weak=False: the handlers are closures that nothing else keeps alive.
    batch_flushed.connect(on_flushed, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    return app


def stop_when_orphaned(demo_pid: int) -> None:
    """Warm-stop this worker once the demo that started it is gone.

    The demo stops its worker itself, even on Ctrl-C; this covers the one
    case it cannot, being killed with SIGKILL.
    """

    def watch() -> None:
        while os.getppid() == demo_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    if demo_pid:
        threading.Thread(target=watch, name="demo-watchdog", daemon=True).start()


#: The app ``celery -A demo worker`` loads. Only the worker subprocess has
#: the settings in its environment; the demo itself builds its app in main().
app = (
    make_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))
    if SETTINGS_ENV in os.environ
    else None
)


# -- the demo process --------------------------------------------------------


class Worker:
    """A ``celery worker`` subprocess in a session of its own.

    Its own session keeps the terminal's Ctrl-C away from it, so the demo
    alone decides how it stops: SIGTERM (warm shutdown), then SIGKILL.
    """

    def __init__(self, settings: Settings, workdir: Path, concurrency: int) -> None:
        self.log_path = workdir / "worker.log"
        env = {
            **os.environ,
            SETTINGS_ENV: json.dumps(asdict(settings)),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
            ),
        }
        cmd = [
            sys.executable, "-m", "celery", "-A", "demo", "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", settings.queue,
            "-n", f"demo-{uuid()[:8]}@%h", "-l", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Warm-stop the worker; kill it and its pool if it takes too long."""
        process = self.process
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:
            pass  # a second Ctrl-C while waiting: stop waiting, kill now
        # The session id is the worker's pid, so this reaches its pool too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


class EventLog:
    """Reads the lines the worker appends to the events file, as they come."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[list[str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        # A line still being written stays for the next read.
        complete, _, self._partial = data.rpartition(b"\n")
        return [line.split() for line in complete.decode().splitlines() if line]


class Tally:
    """What the worker reported so far."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        #: How many times each call ran, by call number.
        self.runs = [0] * calls
        #: How many distinct calls ran.
        self.ran = 0
        #: How many extra runs there were (a call running twice counts one).
        self.repeated = 0
        self.batch_sizes: list[int] = []
        self.last_run_at = 0.0
        self.ready_at = 0.0

    def record_run(self, number: int) -> None:
        if not 0 <= number < self.calls:
            return
        if self.runs[number]:
            self.repeated += 1
        else:
            self.ran += 1
        self.runs[number] += 1


class Sender(threading.Thread):
    """Sends the calls from a thread, so the display goes on meanwhile.

    It stays at most ``max_backlog`` calls ahead of those that ran, as a
    real producer would be: the filesystem transport lists its whole
    folder for every message it reads, so a deep queue would slow it down.
    """

    def __init__(
        self, app: Celery, tally: Tally, *, calls: int, max_backlog: int
    ) -> None:
        super().__init__(name="demo-sender", daemon=True)
        self.app = app
        self.tally = tally
        self.calls = calls
        self.max_backlog = max_backlog
        self.sent = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.error: BaseException | None = None
        self.cancelled = threading.Event()

    def run(self) -> None:
        task = self.app.tasks[TASK_NAME]
        tally, max_backlog, cancelled = self.tally, self.max_backlog, self.cancelled
        try:
            with self.app.producer_or_acquire() as producer:
                self.started_at = time.time()
                for number in range(self.calls):
                    while number - tally.ran >= max_backlog:
                        if cancelled.wait(0.005):
                            return
                    if cancelled.is_set():
                        return
                    task.apply_async((number,), producer=producer)
                    self.sent += 1
            self.finished_at = time.time()
        except Exception as exc:  # reported by the main thread
            self.error = exc


class Display:
    """Flush lines that scroll above a progress bar redrawn in place.

    When the output is not a terminal there is no bar and no control
    characters: only the lines, which tell the same story.
    """

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self._bar_shown = False

    def line(self, text: str) -> None:
        if self.tty and self._bar_shown:
            text = "\r\x1b[K" + text  # write over the bar, redrawn after
            self._bar_shown = False
        self.out.write(text + "\n")
        self.out.flush()

    def bar(self, *, sent: int, ran: int, batches: int, elapsed: float) -> None:
        if not self.tty:
            return
        columns = shutil.get_terminal_size((80, 24)).columns
        width = max(10, min(40, columns - 50))
        done = width * ran // self.total
        queued = width * sent // self.total - done
        bar = "#" * done + "-" * queued + " " * (width - done - queued)
        status = (
            f"[{bar}] {ran:>{len(str(self.total))}}/{self.total} ran"
            f"  {batches} batches  {elapsed:5.1f}s"
        )
        self.out.write("\r\x1b[K" + status[: columns - 1])
        self.out.flush()
        self._bar_shown = True

    def end_bar(self) -> None:
        if self.tty and self._bar_shown:
            self.out.write("\n")
            self.out.flush()
            self._bar_shown = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Watch a celery worker run calls of a batch task in batches.",
    )
    parser.add_argument(
        "--calls", type=int, default=3000, help="calls to send (default: 3000)"
    )
    parser.add_argument(
        "--broker",
        default="filesystem://",
        help="broker URL (default: filesystem:// under .demo/, needs no server)",
    )
    parser.add_argument(
        "--flush-every", type=int, default=100, help="batch size (default: 100)"
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=0.5,
        help="seconds after which waiting calls are flushed anyway (default: 0.5)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="worker pool processes (default: 2)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="give up if the calls have not all run after this many seconds "
        "(default: 120)",
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.flush_every < 1 or args.concurrency < 1:
        parser.error("--calls, --flush-every and --concurrency must be at least 1")
    if args.flush_interval <= 0 or args.timeout <= 0:
        parser.error("--flush-interval and --timeout must be positive")
    return args


def _interrupt_on_sigterm(signum: int, frame: Any) -> NoReturn:
    # `kill <demo>` stops the demo as Ctrl-C does, worker included.
    raise KeyboardInterrupt


def _check_broker(app: Celery) -> None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=5)


def _wait_ready(worker: Worker, events: EventLog, tally: Tally, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # Only "ready" can be there yet: no call is sent before it.
        for fields in events.new_lines():
            if fields[0] == "ready":
                tally.ready_at = float(fields[1])
                return
        if worker.exited() is not None:
            raise RuntimeError(
                f"worker exited with code {worker.exited()} before it was ready"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker not ready after {timeout:.0f}s")
        time.sleep(0.05)


def _watch(
    *,
    worker: Worker,
    sender: Sender,
    events: EventLog,
    tally: Tally,
    display: Display,
    flush_every: int,
    flush_interval: float,
    timeout: float,
) -> str | None:
    """Show flushes and progress until every call ran; return what went wrong."""
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    announced_sent = False
    # The setting behind each reason batch_flushed gives.
    triggers = {
        "size": f"(flush_every={flush_every})",
        "interval": f"(flush_interval={flush_interval:g}s)",
    }
    while True:
        for fields in events.new_lines():
            kind = fields[0]
            if kind == "flush":
                size, reason = int(fields[2]), fields[3]
                tally.batch_sizes.append(size)
                display.line(
                    f"  batch {len(tally.batch_sizes):>4}: {size:>5} calls"
                    f"  by {reason:<9}{triggers.get(reason, '')}"
                )
            elif kind == "ran":
                tally.last_run_at = float(fields[1])
                for number in fields[2:]:
                    tally.record_run(int(number))
        if not announced_sent and sender.finished_at:
            announced_sent = True
            took = sender.finished_at - sender.started_at
            display.line(f"  (all {sender.sent} calls sent in {took:.1f}s)")
        ran = tally.ran
        display.bar(
            sent=sender.sent,
            ran=ran,
            batches=len(tally.batch_sizes),
            elapsed=time.monotonic() - start,
        )
        if ran == tally.calls:
            return None
        if sender.error is not None:
            return f"sending failed: {sender.error!r}"
        if worker.exited() is not None:
            return f"the worker exited with code {worker.exited()}"
        if time.monotonic() > deadline:
            return f"timed out after {timeout:g}s"
        time.sleep(0.05)


def _summary(tally: Tally, sender: Sender) -> str:
    batches = len(tally.batch_sizes)
    mean = sum(tally.batch_sizes) / batches if batches else 0.0
    elapsed = tally.last_run_at - sender.started_at if tally.last_run_at else 0.0
    rate = tally.ran / elapsed if elapsed > 0 else 0.0
    return (
        f"Summary: {tally.ran}/{tally.calls} calls ran in {batches} batches, "
        f"mean batch size {mean:.1f}, {rate:.0f} calls/s "
        f"({elapsed:.2f}s from first call sent to last call run)"
    )


def _filesystem_options(workdir: Path) -> dict[str, Any]:
    messages = workdir / "broker" / "messages"
    staging = workdir / "broker" / "staging"
    processed = workdir / "broker" / "processed"
    control = workdir / "broker" / "control"
    for folder in (messages, staging, processed, control):
        folder.mkdir(parents=True)
    return {
        # One folder both ways: the demo writes the files the worker reads.
        "data_folder_in": str(messages),
        "data_folder_out": str(messages),
        # Where StagedChannel writes a message before renaming it in.
        "staging_folder": str(staging),
        # Consumed messages are renamed into this folder on the same disk,
        # which is cheaper than the default move to the system temp dir.
        "store_processed": True,
        "processed_folder": str(processed),
        # Exchange bindings; the default is ./control in the current dir.
        "control_folder": str(control),
        "polling_interval": FS_POLLING_INTERVAL,
    }


def _delete_queue(app: Celery, queue: str) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            conn.default_channel.queue_delete(queue)
    except Exception as exc:
        print(f"note: could not delete queue {queue}: {exc!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit code (0: every call ran)."""
    args = parse_args(argv)
    out = sys.stdout
    demo_root = ROOT / ".demo"
    demo_root.mkdir(exist_ok=True)
    # A directory per run: demos (and tests running them) may run at once.
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=demo_root))
    on_filesystem = args.broker.startswith("filesystem:")
    settings = Settings(
        broker=args.broker,
        queue=f"demo-{uuid()[:12]}",
        events=str(workdir / "events.log"),
        flush_every=args.flush_every,
        flush_interval=args.flush_interval,
        transport_options=_filesystem_options(workdir) if on_filesystem else {},
        demo_pid=os.getpid(),
    )
    demo_app = make_app(settings)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    display = Display(args.calls, out)
    tally = Tally(args.calls)
    sender = Sender(
        demo_app, tally, calls=args.calls, max_backlog=10 * args.flush_every
    )
    worker: Worker | None = None
    problem: str | None = None
    where = f"{workdir.relative_to(ROOT)}/" if on_filesystem else args.broker
    display.line(
        f"celery-batches demo: {args.calls} calls, flush_every={args.flush_every}, "
        f"flush_interval={args.flush_interval:g}s, broker {where}"
    )
    try:
        if not on_filesystem:
            _check_broker(demo_app)
        started = time.time()
        worker = Worker(settings, workdir, args.concurrency)
        events = EventLog(settings.events)
        _wait_ready(worker, events, tally, timeout=60)
        display.line(
            f"worker ready in {tally.ready_at - started:.1f}s (pid "
            f"{worker.process.pid}, prefork, {args.concurrency} processes); "
            "sending..."
        )
        sender.start()
        problem = _watch(
            worker=worker,
            sender=sender,
            events=events,
            tally=tally,
            display=display,
            flush_every=args.flush_every,
            flush_interval=args.flush_interval,
            timeout=args.timeout,
        )
    except KeyboardInterrupt:
        problem = "interrupted"
    except Exception as exc:
        # Whatever went wrong (broker unreachable, worker not starting), the
        # worker is stopped below and the demo reports it and exits 1.
        problem = str(exc) or repr(exc)
    finally:
        display.end_bar()
        sender.cancelled.set()
        if worker is not None:
            worker.stop()
        if worker is not None and not on_filesystem:
            _delete_queue(demo_app, settings.queue)
    if sender.started_at:
        print(_summary(tally, sender), file=out)
    if tally.repeated:
        print(f"note: {tally.repeated} calls ran more than once", file=out)
    # Keep the worker's log and the queue folder when they may tell why.
    if problem is None or problem == "interrupted" or worker is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if problem is None:
        return 0
    if problem == "interrupted":
        print(f"Interrupted: {tally.ran} of {args.calls} calls ran", file=out)
        return 130
    print(f"FAILED: {problem}; {tally.ran} of {args.calls} calls ran", file=out)
    if worker is not None:
        print(f"worker log: {worker.log_path}", file=out)
        print(worker.log_tail(), file=out)
    return 1


if __name__ == "__main__":
    sys.exit(main())
