"""A soak under faults: calls sent non-stop while the worker and broker are hurt.

Usage::

    python benchmarks/soak.py --broker redis --duration 120
    python benchmarks/soak.py --broker all          # redis, then rabbitmq

Per broker it starts a private server (never the shared ones), a prefork
worker with an early-acked and a late-acked batch task, and a publisher,
then runs one segment per fault kind: publish while injecting that fault at
random intervals (seeded; the seed is printed), stop publishing, and wait
until every call of the segment is settled and the broker has nothing left
to deliver. Each call's executions are counted from a journal the task
bodies write, and judged by ``docs/guarantees.rst`` (see ``soak_ledger``).
Exits non-zero if any call broke the rules. See ``benchmarks/README.rst``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
# The soak's modules are imported as ``benchmarks.*`` (and the private
# servers as ``tests.harness.servers``): the worker imports its app by the same
# name, and mypy checks them by it.
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from kombu.utils.uuid import uuid  # noqa: E402

from benchmarks.soak_app import EARLY, LATE  # noqa: E402
from benchmarks.soak_brokers import BROKER_NAMES, Broker, start_broker  # noqa: E402
from benchmarks.soak_ledger import Cell, JournalReader, format_table, tally  # noqa: E402
from benchmarks.soak_publisher import Publisher  # noqa: E402
from benchmarks.soak_worker import Supervisor, alive  # noqa: E402

__all__ = ["FAULTS", "main"]

#: Fault kinds in the order they run, with the bounds (seconds) of the
#: random wait before each injection, counted from the previous one or from
#: the moment a restarted worker is ready, so that batches run when it hits.
FAULTS: dict[str, tuple[float, float]] = {
    "sigkill": (1.0, 4.0),
    "sigterm": (1.0, 4.0),
    "connection-kill": (1.0, 3.0),
    "broker-restart": (2.0, 5.0),
}
#: The acks mode of each task.
MODES = {EARLY: "early", LATE: "late"}
#: Seconds a segment may take, after publishing stopped, to settle. On
#: Redis a call lost with a connection comes back after the 10 s
#: visibility timeout plus up to 1 s until the next scan.
DRAIN_TIMEOUT = 60.0
#: Printed under the table.
LEGEND = """\
cut short: started, never done. never ran: never started; (not received): of
those, the calls no worker received, which on Redis the transport lost (not
failed, see soak_ledger). unsure: publishes that raised, not in "sent"."""
#: Seconds the "settled" state must hold, with no journal line written,
#: before a segment counts as drained.
SETTLE = 1.0


@dataclass
class Segment:
    """What happened in one fault kind's segment."""

    fault: str
    sent: dict[str, list[str]]
    unsure: dict[str, list[str]]
    #: When each call's publish returned, in ``time.time()``.
    sent_at: dict[str, float]
    #: When each fault was injected, in ``time.time()``.
    fault_times: list[float] = field(default_factory=list)
    faults: int = 0
    publish_seconds: float = 0.0
    #: Seconds until every call settled, or ``None`` if the bound was hit.
    drain_seconds: float | None = None
    #: Warm shutdowns that did not end in time (then killed).
    hung: int = 0
    #: The longest time the publisher could not send, in seconds.
    stall: float = 0.0
    #: The worker's consumer state and thread stacks if the drain timed out.
    stacks: str = ""
    #: The supervisor's exits recorded during this segment, as a range.
    exits: range = range(0)


@dataclass
class Soak:
    """One broker's soak: its servers, worker, journal and what was sent."""

    broker: Broker
    supervisor: Supervisor
    journal: JournalReader
    queue: str
    backend: str
    rng: random.Random
    rate: float
    segments: list[Segment] = field(default_factory=list)

    def inject(self, fault: str, segment: Segment) -> None:
        segment.fault_times.append(time.time())
        if fault == "sigkill":
            self.supervisor.sigkill()
        elif fault == "sigterm":
            segment.hung += not self.supervisor.sigterm()
        elif fault == "connection-kill":
            self.broker.kill_connections()
        elif fault == "broker-restart":
            self.broker.restart()
        else:
            raise ValueError(f"unknown fault {fault!r}")
        segment.faults += 1

    def run_segment(self, fault: str, seconds: float) -> Segment:
        """Publish for ``seconds`` while injecting ``fault``, then drain."""
        publisher = Publisher(
            url=self.broker.url,
            transport_options=self.broker.publisher_options,
            queue=self.queue,
            tasks=list(MODES),
            rate=self.rate,
        )
        segment = Segment(fault, publisher.sent, publisher.unsure, publisher.sent_at)
        low, high = FAULTS[fault]
        first_exit = len(self.supervisor.exits)
        started = time.monotonic()
        end = started + seconds
        next_fault = started + self.rng.uniform(low, high)
        publisher.start()
        try:
            while (now := time.monotonic()) < end:
                if self.supervisor.ensure_running():
                    # Give the new worker time to take on work first.
                    next_fault = time.monotonic() + self.rng.uniform(low, high)
                elif now >= next_fault:
                    self.inject(fault, segment)
                    next_fault = time.monotonic() + self.rng.uniform(low, high)
                if publisher.error is not None:
                    raise RuntimeError("publisher failed") from publisher.error
                time.sleep(0.05)
        finally:
            publisher.stop()
        segment.stall = publisher.longest_stall
        segment.publish_seconds = time.monotonic() - started
        segment.drain_seconds = self.drain(segment)
        if segment.drain_seconds is None:
            segment.stacks = self.supervisor.dump_stacks()
        segment.exits = range(first_exit, len(self.supervisor.exits))
        self.segments.append(segment)
        return segment

    def _running(self, waiting: set[str]) -> bool:
        """Drop the calls of ``waiting`` that can no longer finish by themselves.

        Returns ``True`` while one of them was begun by a process that is
        still alive (its batch is running). A call is dropped once it was
        done, or once every process that began it is dead; a call nobody
        began is dropped as well: if it is still to run, the broker has it.
        """
        journal = self.journal
        for task_id in list(waiting):
            if journal.dones[task_id] or not any(
                alive(pid) for pid in journal.starters[task_id]
            ):
                waiting.discard(task_id)
        return bool(waiting)

    def drain(self, segment: Segment) -> float | None:
        """Wait until nothing of the segment can run any more.

        That is: the broker has no message of the queue left, ready or
        unacked (so nothing can be delivered again), no batch is running,
        and the journal stayed still for :data:`SETTLE` seconds. A worker
        keeps running meanwhile (restarted if the last fault ended it).
        Returns the seconds it took, or ``None`` if :data:`DRAIN_TIMEOUT`
        passed first.
        """
        started = time.monotonic()
        waiting = {i for ids in segment.sent.values() for i in ids}
        stable_since: float | None = None
        while time.monotonic() - started < DRAIN_TIMEOUT:
            self.supervisor.ensure_running()
            progressed = self.journal.poll() > 0
            if (
                not progressed
                and not self._running(waiting)
                and self.broker.pending(self.queue) == (0, 0)
            ):
                now = time.monotonic()
                if stable_since is None:
                    stable_since = now
                elif now - stable_since >= SETTLE:
                    return now - started
            else:
                stable_since = None
            time.sleep(0.2)
        return None

    def cells(self) -> list[Cell]:
        return [
            tally(
                segment.fault,
                mode,
                segment.sent[name],
                segment.unsure[name],
                self.journal,
                lossy_transport=self.broker.loses_in_flight,
            )
            for segment in self.segments
            for name, mode in MODES.items()
        ]

    def forget_results(self) -> None:
        """Delete the results the soak stored in the shared backend."""
        ids = [
            task_id
            for segment in self.segments
            for ids in (*segment.sent.values(), *segment.unsure.values())
            for task_id in ids
        ]
        client = redis.Redis.from_url(self.backend, socket_timeout=10)
        try:
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                client.delete(*(f"celery-task-meta-{i}" for i in chunk))
        finally:
            client.close()


def _say(text: str) -> None:
    print(text, flush=True)


def _when(segment: Segment, task_id: str) -> str:
    """When ``task_id`` was sent, relative to the nearest fault."""
    sent = segment.sent_at.get(task_id)
    if sent is None or not segment.fault_times:
        return "sent at an unknown time"
    nearest = min(segment.fault_times, key=lambda t: abs(t - sent))
    number = segment.fault_times.index(nearest) + 1
    side = "before" if sent <= nearest else "after"
    return f"sent {abs(nearest - sent):.3f} s {side} fault #{number}"


def _report_failures(soak: Soak, cells: list[Cell], directory: Path) -> None:
    segments = {segment.fault: segment for segment in soak.segments}
    for cell in cells:
        for why, ids in cell.problems.items():
            _say(f"\nFAIL {cell.fault} / {cell.mode} acks: {len(ids)} calls {why}:")
            for task_id in ids[:10]:
                when = _when(segments[cell.fault], task_id)
                _say(f"  {soak.journal.history(task_id)}; {when}")
            if len(ids) > 10:
                _say(f"  ... and {len(ids) - 10} more")
    for segment in soak.segments:
        if segment.stacks:
            _say(f"\nWorker state when the {segment.fault} segment did not drain:")
            _say(segment.stacks)
    problems = soak.supervisor.log_problems()
    if problems:
        _say("\nERROR/CRITICAL lines of the worker logs (last ones):")
        _say("\n".join(problems))
    _say(f"\nWorker log tail:\n{soak.supervisor.log_tail()}")
    _say(f"\nJournal, worker logs: {directory}")


def _judge(soak: Soak, directory: Path) -> bool:
    """Print the table and what failed; return ``True`` if every rule held."""
    soak.journal.poll()
    cells = soak.cells()
    _say("")
    _say(format_table(cells))
    _say(LEGEND)
    exits: dict[str, int] = {}
    for end in soak.supervisor.exits:
        exits[end.cause] = exits.get(end.cause, 0) + 1
    hung = sum(segment.hung for segment in soak.segments)
    causes = ", ".join(f"{n} {cause}" for cause, n in sorted(exits.items()))
    _say(f"worker exits: {causes}; warm shutdowns that hung: {hung}")
    undrained = [s.fault for s in soak.segments if s.drain_seconds is None]
    # docs/guarantees.rst: the worker keeps running through a lost broker
    # connection and a Redis restart; the supervisor would hide its exits.
    during = {i: segment.fault for segment in soak.segments for i in segment.exits}
    crashed = [
        (during.get(i, "after the segments"), end)
        for i, end in enumerate(soak.supervisor.exits)
        if end.cause == "unexpected"
    ]
    passed = all(cell.ok for cell in cells) and not (hung or undrained or crashed)
    if not passed:
        if crashed:
            _say(f"\nFAIL the worker exited by itself {len(crashed)} times:")
            for fault, end in crashed:
                _say(f"  {fault}: pid {end.pid}, code {end.code}: {end.last_words()}")
        if undrained:
            bound = f"{DRAIN_TIMEOUT:.0f} s"
            _say(f"\nFAIL segments not drained within {bound}: {undrained}")
        if hung:
            _say(f"\nFAIL {hung} warm shutdowns did not end within their bound")
        _report_failures(soak, cells, directory)
    return passed


def run_broker(
    name: str,
    *,
    faults: list[str],
    seconds: float,
    rate: float,
    seed: int,
    backend: str,
    keep: bool,
    remote_control: bool,
) -> bool:
    """Run the soak on broker ``name``; return ``True`` if it passed."""
    began = time.monotonic()
    per_segment = seconds / len(faults)
    control = "on" if remote_control else "off"
    _say(
        f"\n== soak on {name}: {seconds:.0f} s under faults ({len(faults)} segments "
        f"of {per_segment:.0f} s), {rate:.0f} calls/s, remote control {control}, "
        f"seed {seed} =="
    )
    directory = Path(tempfile.mkdtemp(prefix=f"cbsoak-{name}-"))
    queue = f"soak-{uuid()}"
    passed = False
    try:
        with ExitStack() as stack:
            broker = start_broker(name)
            stack.callback(broker.stop)
            took = time.monotonic() - began
            _say(f"[{name}] private broker at {broker.url}, started in {took:.1f} s")
            journal_path = directory / "journal"
            supervisor = Supervisor(
                broker_url=broker.url,
                backend_url=backend,
                queue=queue,
                transport_options=broker.worker_options,
                journal=journal_path,
                directory=directory,
                remote_control=remote_control,
            )
            stack.callback(supervisor.kill_all)
            soak = Soak(
                broker,
                supervisor,
                JournalReader(journal_path),
                queue,
                backend,
                random.Random(seed),
                rate,
            )
            stack.callback(soak.forget_results)
            supervisor.ensure_running()
            for fault in faults:
                segment = soak.run_segment(fault, per_segment)
                sent = sum(map(len, segment.sent.values()))
                unsure = sum(map(len, segment.unsure.values()))
                drained = (
                    f"drained in {segment.drain_seconds:.1f} s"
                    if segment.drain_seconds is not None
                    else f"NOT drained within {DRAIN_TIMEOUT:.0f} s"
                )
                _say(
                    f"[{name}] {fault}: {segment.faults} faults in "
                    f"{segment.publish_seconds:.0f} s, {sent} calls sent "
                    f"({unsure} unsure, longest stall {segment.stall:.1f} s), {drained}"
                )
            supervisor.stop()
            passed = _judge(soak, directory)
    except Exception:
        # A broker that does not start, a worker that never gets ready: this
        # broker fails with what is known, and the next one still runs.
        _say(f"\n{name}: ERROR\n{traceback.format_exc()}")
        _say(f"Journal, worker logs: {directory}")
        passed = False
    elapsed = time.monotonic() - began
    _say(f"{name}: {'PASS' if passed else 'FAIL'} in {elapsed:.0f} s (seed {seed})")
    if passed and not keep:
        shutil.rmtree(directory, ignore_errors=True)
    return passed


def _backend_url() -> str:
    """The result backend: the shared Redis server's database 1, as the tests use."""
    url = os.environ.get("CELERY_BATCHES_REDIS_URL", "redis://127.0.0.1:6379/0")
    return url.rsplit("/", 1)[0] + "/1"


def _terminated(signum: int, frame: FrameType | None) -> None:
    # CI's `timeout` sends SIGTERM: unwind, so that the worker and the
    # private broker are stopped on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=[*BROKER_NAMES, "all"], default="all")
    parser.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="seconds of publishing under faults per broker, split evenly "
        "over the fault kinds (default: 120); draining comes on top",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"fault kinds to run, comma-separated (default: {','.join(FAULTS)})",
    )
    parser.add_argument(
        "--rate", type=float, default=200.0, help="calls sent per second (default: 200)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the fault timing"
    )
    parser.add_argument(
        "--without-remote-control",
        action="store_true",
        help="run the worker with worker_enable_remote_control=False",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the journal and logs of a passing run"
    )
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown or not faults:
        parser.error(f"unknown fault kinds: {sorted(unknown)}")
    seed = (
        args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    )
    backend = _backend_url()
    try:
        redis.Redis.from_url(backend, socket_timeout=3, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        _say(f"the result backend {backend} does not answer: {exc!r}")
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    names = list(BROKER_NAMES) if args.broker == "all" else [args.broker]
    began = time.monotonic()
    results = {
        name: run_broker(
            name,
            faults=faults,
            seconds=args.duration,
            rate=args.rate,
            seed=seed,
            backend=backend,
            keep=args.keep,
            remote_control=not args.without_remote_control,
        )
        for name in names
    }
    verdicts = ", ".join(f"{n} {'PASS' if ok else 'FAIL'}" for n, ok in results.items())
    _say(f"\nsoak: {verdicts}; seed {seed}; {time.monotonic() - began:.0f} s in all")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
