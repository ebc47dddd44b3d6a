"""Watch a real Celery worker run the calls of a batch task in batches.

``make demo`` (``python demo.py --help`` for the options) starts ``celery
worker``, sends it 1000 calls of :func:`record`, prints each batch the worker
flushes under a progress bar, and ends with a summary. It exits 0 only if
every call ran, and always stops its worker.

* A file of the checkout, not a ``celery_batches.demo`` module: that would
  ship to every user, with its broker and progress bar as dependencies.
* The broker is kombu's SQLAlchemy transport on a SQLite file in ``.demo/``:
  no server, no patch. kombu takes each message in a ``BEGIN IMMEDIATE``
  transaction, so processes share the file safely; its filesystem transport,
  the other one without a server, lets a worker read a half-written message.
* The worker reports to a second SQLite file: its ``batch_flushed`` handler
  writes each batch's size and reason, the body the calls it ran.
* The worker is the ``celery worker`` command a user runs (the test suite's
  helpers start the test app); the bar is tqdm's, silent off a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu.exceptions import OperationalError
from kombu.transport import sqlalchemy
from kombu.utils.uuid import uuid
from tqdm import tqdm

from celery_batches import Batches, SimpleRequest
from celery_batches.signals import batch_flushed

ROOT = Path(__file__).resolve().parent
#: What main() hands its worker, whose ``celery -A demo`` imports this module.
SETTINGS: dict[str, Any] = json.loads(os.environ.get("CELERY_BATCHES_DEMO", "{}"))


class SQLiteTransport(sqlalchemy.Transport):
    # The worker's pause after a poll that takes nothing, as when its prefetch
    # window is full while a batch fills: kombu's 1 s would mean a batch a
    # second. (This transport hands its options to SQLAlchemy, which refuses
    # a polling_interval; hence a class attribute.)
    polling_interval = 0.01


app = Celery("demo", set_as_current=False)


def configure() -> None:
    """Point the app at ``SETTINGS``, in the demo as in its worker."""
    app.conf.update(
        broker_url=SETTINGS.get("broker"),
        broker_transport=SQLiteTransport if SETTINGS.get("sqlite") else None,
        # A broker that cannot be reached stops the worker, not retried for ever.
        broker_connection_retry_on_startup=False,
        task_default_queue=SETTINGS.get("queue", "demo"),
        task_ignore_result=True,
        # Remote control needs a fanout exchange, which the SQLAlchemy
        # transport lacks; the demo sends no control command.
        worker_enable_remote_control=False,
    )


configure()


def journal(sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Write ``rows`` to the journal the demo reads, in one transaction."""
    db = sqlite3.connect(SETTINGS["journal"], timeout=30)
    with contextlib.closing(db), db:  # commits, then closes
        db.executemany(sql, rows)


@app.task(
    base=Batches,
    name="demo.record",
    flush_every=SETTINGS.get("flush_every", 100),
    flush_interval=SETTINGS.get("flush_interval", 0.5),
)
def record(requests: list[SimpleRequest]) -> None:
    """Note the calls as run: one INSERT for the batch, not one per call."""
    now = time.time()
    journal("INSERT INTO ran VALUES (?, ?)", [(r.args[0], now) for r in requests])


@batch_flushed.connect
def _on_flushed(sender: Any, size: int, reason: str, **kwargs: Any) -> None:
    journal("INSERT INTO flushes VALUES (?, ?)", [(size, reason)])


@signals.worker_ready.connect
def _on_ready(**kwargs: Any) -> None:
    journal("INSERT INTO ready VALUES (?)", [(time.time(),)])


def start_worker(workdir: Path, concurrency: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "celery", "-A", "demo", "worker", "-P", "prefork",
        "-c", str(concurrency), "-Q", SETTINGS["queue"], "-l", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = {**os.environ, "CELERY_BATCHES_DEMO": json.dumps(SETTINGS)}
    with open(workdir / "worker.log", "wb") as log:
        # A session of its own keeps the terminal's Ctrl-C from the worker,
        # which the demo stops itself, and holds its pool for stop_worker().
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm-stop the worker; kill it and its pool after 20 s or a Ctrl-C."""
    worker.terminate()
    try:
        worker.wait(20)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


class Demo:
    """One run of the demo: its directory, its journal and what it saw."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.sent, self.ran = args, 0, 0
        self.sizes: list[int] = []
        self.started_at = self.last_run_at = 0.0
        (ROOT / ".demo").mkdir(exist_ok=True)
        # A directory per run, as demos (and the tests running them) may overlap.
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=ROOT / ".demo"))
        SETTINGS.update(
            broker=args.broker or f"sqlite:///{self.dir / 'broker.sqlite'}",
            sqlite=not args.broker,
            queue=f"demo-{uuid()[:12]}",
            journal=str(self.dir / "journal.sqlite"),
            flush_every=args.flush_every,
            flush_interval=args.flush_interval,
        )
        configure()
        if not args.broker:  # SQLite keeps it in the file: twice the calls a second
            with contextlib.closing(sqlite3.connect(self.dir / "broker.sqlite")) as b:
                b.execute("PRAGMA journal_mode=WAL")
        self.db = sqlite3.connect(SETTINGS["journal"], isolation_level=None)
        self.db.executescript(
            # Write-ahead logging lets the demo read while the worker writes.
            "PRAGMA journal_mode=WAL; CREATE TABLE ready (at REAL);"
            "CREATE TABLE flushes (size INTEGER, reason TEXT);"
            "CREATE TABLE ran (call INTEGER, at REAL);"
        )
        print(
            f"celery-batches demo: {args.calls} calls, flush_every={args.flush_every}, "
            f"flush_interval={args.flush_interval:g}s, broker {SETTINGS['broker']}"
        )
        self.bar = tqdm(total=args.calls, unit="call", file=sys.stdout, disable=None)

    def run(self, worker: subprocess.Popen[bytes], started: float) -> str | None:
        """Send the calls once the worker is ready; return what went wrong, if any."""
        while (ready := self.db.execute("SELECT at FROM ready").fetchone()) is None:
            if worker.poll() is not None or time.time() > started + 60:
                return "the worker did not start"
            time.sleep(0.05)
        self.bar.write(
            f"worker ready in {ready[0] - started:.1f}s (pid {worker.pid}, prefork, "
            f"{self.args.concurrency} processes); sending..."
        )
        deadline = time.monotonic() + self.args.timeout
        with app.producer_or_acquire() as producer:
            self.started_at = time.time()
            while True:
                # Send for 50 ms at a time, then show what the worker did.
                until = time.monotonic() + 0.05
                while self.sent < self.args.calls and time.monotonic() < until:
                    record.apply_async((self.sent,), producer=producer)
                    self.sent += 1
                self.update()
                if self.ran == self.args.calls:
                    return None
                if worker.poll() is not None:
                    return f"the worker exited with code {worker.returncode}"
                if time.monotonic() > deadline:
                    return f"timed out after {self.args.timeout:g}s"
                if self.sent == self.args.calls:
                    time.sleep(0.05)

    def update(self) -> None:
        """Show the batches flushed since the last update, and the calls run."""
        for size, reason in self.db.execute(
            "SELECT * FROM flushes WHERE rowid > ? ORDER BY rowid", (len(self.sizes),)
        ).fetchall():
            self.sizes.append(size)
            self.bar.write(
                f"  batch {len(self.sizes):>4}: {size:>5} calls  by {reason}"
            )
        self.ran, last = self.db.execute(
            "SELECT count(DISTINCT call), max(at) FROM ran"
        ).fetchone()
        self.last_run_at = last or 0.0
        self.bar.update(self.ran - self.bar.n)
        self.bar.set_postfix(sent=self.sent, batches=len(self.sizes))

    def summary(self) -> str:
        batches, took = len(self.sizes), self.last_run_at - self.started_at
        return (
            f"Summary: {self.ran}/{self.args.calls} calls ran in {batches} batches, "
            f"mean batch size {sum(self.sizes) / max(batches, 1):.1f}, "
            f"{self.ran / took if took > 0 else 0:.0f} calls/s "
            f"({max(took, 0):.2f}s from first call sent to last call run)"
        )

    def finish(self, problem: str | None) -> int:
        """Report and clean up once the worker stopped; return the exit code."""
        if self.args.broker:
            with contextlib.suppress(OperationalError), app.connection_for_write() as c:
                c.default_channel.queue_delete(SETTINGS["queue"])
        if problem is not None:
            self.update()  # with the calls the worker ran as it stopped
            if self.started_at:
                print(self.summary())
            print(f"FAILED: {problem}; {self.ran} of {self.args.calls} calls ran")
        self.db.close()
        if problem in (None, "interrupted"):
            shutil.rmtree(self.dir, ignore_errors=True)
            return 0 if problem is None else 130
        print(f"worker log: {self.dir / 'worker.log'}")
        return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--calls", type=int, default=1000, help="calls to send (default: 1000)")
    add("--broker", help="broker URL (default: a SQLite file, needs no server)")
    add("--flush-every", type=int, default=100, help="batch size (default: 100)")
    add("--flush-interval", type=float, default=0.5, help="seconds (default: 0.5)")
    add("--concurrency", type=int, default=2, help="pool processes (default: 2)")
    add("--timeout", type=float, default=120, help="seconds (default: 120)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return its exit code: 0 if every call ran."""
    args = parse_args(argv)
    demo = Demo(args)
    # `kill` stops the demo as Ctrl-C does, its worker included.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.time()
    worker = start_worker(demo.dir, args.concurrency)
    problem: str | None = "interrupted"
    try:
        problem = demo.run(worker, started)
    except KeyboardInterrupt:
        pass
    finally:
        demo.bar.close()
        if problem is None:  # now: the worker takes a few seconds to stop
            print(demo.summary())
        print("stopping the worker...", flush=True)
        stop_worker(worker)
    return demo.finish(problem)


if __name__ == "__main__":
    sys.exit(main())
