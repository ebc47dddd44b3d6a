"""Counting each call's executions from the soak journal, and judging them.

The rules are those of ``docs/guarantees.rst``: late acks promise at least
once, so a call never done fails and a call done twice is allowed; early
acks promise at most once for a running batch, so a call never started
fails, a call started but never done is allowed only where the pool died
with its batch running (``sigkill``), and a call done twice fails, except
under a fault that can lose the batch's ack on its way out (the ack leaves
a moment after the batch starts: ``sigkill``, ``connection-kill``,
``broker-restart``), as for a plain Celery task with early acks.

One exception, outside celery-batches: Kombu's Redis transport takes a
message off the queue with ``BRPOP`` and records it in its unacked index
only afterwards, from the worker. A message popped for a connection that
dies in between (the worker was killed, the connection cut, the server shut
down) is lost before any worker saw it. So on Redis a call that never
reached a worker (no ``received`` line) is counted apart, as lost by the
transport, and not failed; a call the worker received and never ran fails.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cell", "JournalReader", "format_table", "tally"]

#: Faults that may end a running batch without it finishing: a SIGKILL of
#: the worker and its pool. Every other fault lets a running batch finish.
CUTS_SHORT = frozenset({"sigkill"})

#: Faults that may lose an early ack between the batch's start and the
#: broker: the broker then delivers the calls again, and they run twice.
LOSES_ACKS = frozenset({"sigkill", "connection-kill", "broker-restart"})


class JournalReader:
    """Reads the worker journal incrementally: who started and finished what.

    Lines are ``received <id> <pid>``, ``start <id> <pid>``,
    ``done <id> <pid>`` and ``flushed <pid> <reason> <id>,<id>,...``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        #: Deliveries to a worker, executions begun and completed, by call id.
        self.received: Counter[str] = Counter()
        self.starts: Counter[str] = Counter()
        self.dones: Counter[str] = Counter()
        #: Pids of the processes that began each call.
        self.starters: dict[str, list[int]] = defaultdict(list)
        #: Pids of the worker main processes that flushed each call.
        self.flushers: dict[str, list[int]] = defaultdict(list)
        #: Lines read so far.
        self.lines = 0

    def poll(self) -> int:
        """Read what was appended since the last call; return how many lines."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            fields = raw.decode().split()
            if not fields:
                continue
            kind = fields[0]
            if kind == "received":
                self.received[fields[1]] += 1
            elif kind == "start":
                self.starts[fields[1]] += 1
                self.starters[fields[1]].append(int(fields[2]))
            elif kind == "done":
                self.dones[fields[1]] += 1
            elif kind == "flushed":
                for task_id in fields[3].split(","):
                    self.flushers[task_id].append(int(fields[1]))
        self.lines += len(complete)
        return len(complete)

    def history(self, task_id: str) -> str:
        """What the journal says about ``task_id``, for a failure report."""
        return (
            f"{task_id}: received {self.received[task_id]}x, "
            f"flushed by {self.flushers[task_id]}, "
            f"started {self.starts[task_id]}x by {self.starters[task_id]}, "
            f"done {self.dones[task_id]}x"
        )


@dataclass
class Cell:
    """One row of the table: the calls of one fault kind and acks mode."""

    fault: str
    mode: str
    sent: int = 0
    once: int = 0
    twice: int = 0
    cut_short: int = 0
    never: int = 0
    #: Of :attr:`never`, the calls no worker received.
    unreceived: int = 0
    #: Publishes that raised: the broker may or may not have the call.
    unsure: int = 0
    #: Why calls failed the rules, with their ids.
    problems: dict[str, list[str]] = field(default_factory=dict)

    def fail(self, why: str, task_id: str) -> None:
        self.problems.setdefault(why, []).append(task_id)

    @property
    def ok(self) -> bool:
        return not self.problems


def tally(
    fault: str,
    mode: str,
    sent: list[str],
    unsure: list[str],
    journal: JournalReader,
    *,
    lossy_transport: bool,
) -> Cell:
    """Count the executions of ``sent`` and judge them by the rules of ``mode``.

    ``unsure`` calls (their publish raised) are only held to "never done
    twice" with early acks: whether they ran at all depends on whether the
    broker got them. With a ``lossy_transport`` (Redis) a call no worker
    received is not failed.
    """
    cell = Cell(fault, mode, sent=len(sent), unsure=len(unsure))
    early = mode == "early"
    for task_id in sent:
        done = journal.dones[task_id]
        if done >= 2:
            cell.twice += 1
            if early and fault not in LOSES_ACKS:
                cell.fail("done twice or more (early acks: at most once)", task_id)
        elif done == 1:
            cell.once += 1
        elif journal.starts[task_id]:
            cell.cut_short += 1
            if not early:
                cell.fail("never done (late acks: at least once)", task_id)
            elif fault not in CUTS_SHORT:
                cell.fail(f"started but never done under {fault}", task_id)
        else:
            cell.never += 1
            if journal.received[task_id]:
                cell.fail("received, never ran", task_id)
            else:
                cell.unreceived += 1
                if not lossy_transport:
                    cell.fail("never received by a worker", task_id)
    if early and fault not in LOSES_ACKS:
        for task_id in unsure:
            if journal.dones[task_id] >= 2:
                cell.fail("unsure send done twice (early acks)", task_id)
    return cell


COLUMNS = (
    ("fault", 16),
    ("acks", 6),
    ("sent", 7),
    ("done once", 10),
    ("twice+", 7),
    ("cut short", 10),
    ("never ran", 10),
    ("(not received)", 15),
    ("unsure", 7),
    ("verdict", 8),
)


def format_table(cells: list[Cell]) -> str:
    """The table the soak prints: one row per fault kind and acks mode."""

    def row(values: list[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        (fault, (_, fault_width)), (mode, (_, mode_width)), *rest = zip(values, COLUMNS)
        text = fault.ljust(fault_width) + mode.ljust(mode_width)
        return text + "".join(value.rjust(width) for value, (_, width) in rest)

    lines = [row([name for name, _ in COLUMNS])]
    lines.append("-" * len(lines[0]))
    for c in cells:
        values = [c.fault, c.mode, c.sent, c.once, c.twice, c.cut_short, c.never]
        values += [c.unreceived, c.unsure, "ok" if c.ok else "FAIL"]
        lines.append(row([str(v) for v in values]))
    return "\n".join(lines)
