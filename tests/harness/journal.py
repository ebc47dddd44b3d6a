"""What happened in a worker, as typed records in an append-only file.

The test app's tasks and signal receivers write one record per event, from
the worker's main process and its pool children alike; the test reads them
back by kind::

    runs = worker.journal.records(Run)
    sizes = [run.size for run in runs if run.task == worker.tasks.sized.name]

Each record is one JSON object on one line, written with ``O_APPEND`` in a
single ``write``, so records of several processes never interleave. A line
is parsed once, by field name, into the dataclass of its kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "AckFrame",
    "Batch",
    "CallRecord",
    "Failure",
    "Flush",
    "Journal",
    "Keys",
    "Plain",
    "PlainRun",
    "Postrun",
    "Prerun",
    "Received",
    "Record",
    "Retried",
    "Revoked",
    "Run",
    "Timed",
]


@dataclass(frozen=True)
class Record:
    """One event of a worker. Subclasses name their ``kind`` and add fields."""

    #: The name of the kind on disk; unique among the subclasses.
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class CallRecord(Record):
    """An event of one call (task id)."""

    id: str


@dataclass(frozen=True)
class Run(CallRecord):
    """A batch body ran a call: one record per call of the batch."""

    kind = "run"
    #: The name of the batch task.
    task: str
    #: How many calls the batch held.
    size: int
    #: The process that ran the body.
    pid: int


@dataclass(frozen=True)
class Batch(CallRecord):
    """A batch ran (for tasks that journal one record per batch, not per call).

    ``id`` is the id of the batch's first call.
    """

    kind = "batch"
    task: str
    size: int
    pid: int


@dataclass(frozen=True)
class Flush(Record):
    """``batch_flushed`` was sent."""

    kind = "flush"
    task: str
    size: int
    #: ``size``, ``interval``, ``shutdown``, ...
    reason: str
    #: The batch key as text, ``None`` for the default key.
    key: str | None


@dataclass(frozen=True)
class Keys(CallRecord):
    """The batch keys (tenants) of one batch of ``tests.keyed``.

    ``id`` is the id of the batch's first call.
    """

    kind = "keys"
    keys: list[str]


@dataclass(frozen=True)
class Timed(CallRecord):
    """When a call of ``tests.timed`` ran (``time.time()``)."""

    kind = "timed"
    at: float


@dataclass(frozen=True)
class PlainRun(CallRecord):
    """A plain (not batch) task ran a call."""

    kind = "plainrun"
    pid: int


@dataclass(frozen=True)
class Plain(Record):
    """``tests.fault_plain_late`` ran with ``value``."""

    kind = "plain"
    value: int
    pid: int


@dataclass(frozen=True)
class Received(CallRecord):
    """``task_received`` was sent for a call."""

    kind = "received"


@dataclass(frozen=True)
class Prerun(CallRecord):
    """``task_prerun`` was sent (for a batch: once, under the batch's id)."""

    kind = "prerun"
    task: str


@dataclass(frozen=True)
class Postrun(CallRecord):
    """``task_postrun`` was sent, with the state it reported."""

    kind = "postrun"
    task: str
    state: str


@dataclass(frozen=True)
class Failure(CallRecord):
    """``task_failure`` was sent for a call."""

    kind = "failure"
    #: The exception's class name.
    exception: str


@dataclass(frozen=True)
class Revoked(CallRecord):
    """``task_revoked`` was sent for a call."""

    kind = "revoked"


@dataclass(frozen=True)
class Retried(CallRecord):
    """``task_retry`` was sent for a call."""

    kind = "retry"


@dataclass(frozen=True)
class AckFrame(Record):
    """An AMQP ``basic.ack`` frame a worker process sent (``CB_TEST_TRACE_ACKS``)."""

    kind = "ackframe"
    pid: int
    tag: int
    multiple: bool


def _kinds(cls: type[Record]) -> list[type[Record]]:
    found = [cls] if cls.kind else []
    for sub in cls.__subclasses__():
        found += _kinds(sub)
    return found


_KINDS = {cls.kind: cls for cls in _kinds(Record)}
assert len(_KINDS) == len(_kinds(Record)), "two record kinds share a name"

R = TypeVar("R", bound=Record)
C = TypeVar("C", bound=CallRecord)


class Journal:
    """The records of one journal file, read as they are appended.

    Any number of processes may write; the reader keeps what it parsed and
    reads only what was appended since, so polling a long journal is cheap.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._parsed: list[Record] = []
        self._offset = 0
        self._lock = threading.Lock()

    def write(self, record: Record) -> None:
        """Append ``record``, in one ``write`` call."""
        fields = {"kind": record.kind, **dataclasses.asdict(record)}
        line = (json.dumps(fields) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def all(self) -> list[Record]:
        """Every record written so far, in order."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    appended = f.read()
            except FileNotFoundError:
                appended = b""
            # A line still being written has no newline yet: leave it for
            # the next read.
            complete = appended[: appended.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                self._parsed.append(_parse(line))
            return list(self._parsed)

    def records(self, kind: type[R]) -> list[R]:
        """Every record of ``kind`` written so far, in order."""
        return [record for record in self.all() if isinstance(record, kind)]

    def ids(self, kind: type[C]) -> list[str]:
        """The ``id`` of every record of ``kind``, in order (repeats included)."""
        return [record.id for record in self.records(kind)]


def _parse(line: bytes) -> Record:
    fields: dict[str, Any] = json.loads(line)
    return _KINDS[fields.pop("kind")](**fields)
