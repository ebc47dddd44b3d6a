"""Messages as hypothesis draws them, and a ledger of what became of each.

A :class:`Call` describes one message in the terms a falsifying example is
read in (protocol, id, each slot of the body, headers); :func:`build` turns
it into the message Celery's own test helpers make, then changes the slots.
:class:`Run` delivers calls to the real strategy on the unit tier's
:class:`~tests.unit.conftest.FakeWorker`, plays revokes and timer ticks in
between, and keeps the account the invariants are checked against.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import Mock

from celery import Celery, states
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from hypothesis import event
from kombu.utils.uuid import uuid

from celery_batches.collector import collectors_of
from tests.unit.conftest import FakeWorker, make_message

__all__ = [
    "FRESH",
    "KEEP",
    "MISSING",
    "Call",
    "Fate",
    "Run",
    "backend_writes",
    "build",
]

#: The most kombu can tell a broker: larger prefetch counts go out as 0,
#: which means no limit at all.
PREFETCH_COUNT_MAX = 0xFFFF


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: A slot left out of the message altogether.
MISSING: Any = _Marker("MISSING")
#: A slot left as Celery's helper made it.
KEEP: Any = _Marker("KEEP")
#: A task id of its own, unlike any other.
FRESH: Any = _Marker("FRESH")


@dataclass(frozen=True)
class Call:
    """One message of a batch task, slot by slot.

    ``body`` replaces the whole body (protocol 2: the ``[args, kwargs,
    embed]`` triple; protocol 1 and hybrid: the fields dict) when given;
    ``fields`` are set (``MISSING``: removed) in the headers (protocol 2,
    hybrid) or in the body (protocol 1).
    """

    protocol: str
    task_id: Any = FRESH
    args: Any = KEEP
    kwargs: Any = KEEP
    embed: Any = KEEP
    body: Any = KEEP
    eta: Any = KEEP
    expires: Any = KEEP
    fields: dict[str, Any] = field(default_factory=dict)


# One branch per field a generated call may change: split, it would read worse.
def build(app: Celery, task: Any, call: Call) -> Mock:
    """The message ``call`` describes, as the consumer would receive it."""
    message = make_message(app, task.s(), call.protocol)
    task_id = uuid() if call.task_id is FRESH else call.task_id
    if call.protocol == "proto2":
        args, kwargs, embed = message.payload
        payload: Any = (
            list(args) if call.args is KEEP else call.args,
            kwargs if call.kwargs is KEEP else call.kwargs,
            embed if call.embed is KEEP else call.embed,
        )
        if call.body is not KEEP:
            payload = call.body
        message.payload = payload
        message.body = json.dumps(payload)
        fields = message.headers
        fields["id"] = fields["root_id"] = task_id
    else:
        fields = message.payload
        fields["id"] = task_id
        if call.protocol == "hybrid":
            message.headers["id"] = task_id
        if call.args is not KEEP:
            fields["args"] = call.args
        if call.kwargs is not KEEP:
            fields["kwargs"] = call.kwargs
        if call.body is not KEEP:
            message.payload = fields = {"task": task.name, "id": task_id, **call.body}
    if call.eta is not KEEP:
        fields["eta"] = call.eta
    if call.expires is not KEEP:
        fields["expires"] = call.expires
    for name, value in call.fields.items():
        target = message.headers if call.protocol == "hybrid" else fields
        if name in ("eta", "expires") and call.protocol == "hybrid":
            # A hybrid message carries them in its protocol 1 body.
            target = message.payload
        if value is MISSING:
            target.pop(name, None)
        else:
            target[name] = value
    if task_id is MISSING:
        message.headers.pop("id", None)
        if isinstance(message.payload, dict):
            message.payload.pop("id", None)
    return message


@contextmanager
def backend_writes(app: Celery) -> Iterator[list[tuple[Any, str]]]:
    """Record ``(task_id, state)`` of every result the app's backend stores."""
    backend = app.backend
    writes: list[tuple[Any, str]] = []
    store = backend.store_result

    def recording_store(
        task_id: Any, result: Any, state: str, *a: Any, **kw: Any
    ) -> Any:
        # Counted once stored: a result that cannot be encoded is not stored.
        stored = store(task_id, result, state, *a, **kw)
        writes.append((task_id, state))
        return stored

    backend.store_result = recording_store
    try:
        yield writes
    finally:
        del backend.store_result


@dataclass
class Fate:
    """What became of one message, from what the worker did with it."""

    #: The strategy raised InvalidTaskError: the consumer rejects it.
    invalid: bool
    #: Times the message was handed to the pool (by identity, not id).
    dispatched: int
    #: ``message.ack`` calls (a revoked or expired call is acked).
    acks: int
    #: ``requeue`` of each ``message.reject`` call.
    rejects: list[bool]

    def name(self) -> str:
        """Which single fate this is, or a description of the mix."""
        seen = (self.invalid, self.dispatched, self.acks, self.rejects)
        single = {
            (True, 0, 0, ()): "invalid",
            (False, 1, 0, ()): "dispatched",
            (False, 0, 0, (False,)): "rejected",
            (False, 0, 1, ()): "revoked",
        }
        return single.get((seen[0], seen[1], seen[2], tuple(seen[3])), repr(self))


class Run:
    """Delivers calls to one batch task's real strategy and keeps the account."""

    def __init__(self, app: Celery, worker: FakeWorker, task: Any, floor: int) -> None:
        self.app = app
        self.worker = worker
        self.task = task
        self.floor = floor
        self.handler = worker.strategy(task)
        self.collector = collectors_of(worker.consumer)[task.name]
        self.delivered: list[tuple[Call, Mock, bool]] = []
        self.windows: list[int] = []

    # -- what the worker is told ------------------------------------------

    def deliver(self, call: Call) -> Mock:
        """Hand the message of ``call`` to the strategy, as the consumer does."""
        message = build(self.app, self.task, call)
        try:
            self.worker.deliver(self.handler, message)
        except InvalidTaskError:
            # Consumer.on_task_received: on_invalid_task rejects it.
            invalid = True
        else:
            invalid = False
        self.delivered.append((call, message, invalid))
        self.check_window()
        return message

    def revoke(self, index: int) -> None:
        """``celery control revoke`` of the id of the ``index``-th delivered call."""
        if self.delivered:
            _, message, _ = self.delivered[index % len(self.delivered)]
            task_id = task_id_of(message)
            if isinstance(task_id, str):
                worker_state.revoked.add(task_id)

    def revoke_stamped(self, header: str, value: Any) -> None:
        """``celery control revoke_by_stamped_headers header=value``."""
        from celery.worker import control

        control.revoke_by_stamped_headers(Mock(name="state"), {header: value})

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the worker's timer."""
        self.worker.advance(seconds)
        self.check_window()

    def fire_interval(self) -> None:
        """Let the flush interval come due, if one is armed."""
        if self.worker.interval_entries():
            self.worker.fire_interval()
        self.check_window()

    def finish(self) -> None:
        """Let every ETA come due, then flush what waits, as a warm shutdown does."""
        due = [s.eta for s in self.worker.timer.queue if not s.entry.canceled]
        if due:
            self.worker.run_until(max(due) + 1)
        self.check_window()
        self.collector.flush_all("shutdown")
        self.check_window()

    # -- the account --------------------------------------------------------

    def check_window(self) -> None:
        """The prefetch window stays within the collector's documented bound."""
        self.worker.sync_prefetch()
        qos = self.worker.qos
        self.windows.append(qos.value)
        if self.floor == 0:
            # No limit stays no limit.
            assert qos.value == 0, self.windows
            return
        held = len(self.worker.eta_entries())
        bound = (
            self.floor
            + self.collector.max_boosted_keys * self.collector.widening
            + held
        )
        assert self.floor <= qos.value <= bound, (qos.value, bound, self.windows)
        assert qos.value <= PREFETCH_COUNT_MAX, self.windows
        assert 0 not in self.worker.prefetch_sent, self.worker.prefetch_sent

    def dispatched(self) -> Counter[int]:
        """How often each message (by identity) was handed to the pool."""
        counts: Counter[int] = Counter()
        for pool_call in self.worker.pool.calls:
            job = pool_call["callback"].__self__
            for request in job.requests:
                counts[id(request.message)] += 1
        return counts

    def fates(self) -> list[Fate]:
        """The fate of each delivered message, in delivery order."""
        dispatched = self.dispatched()
        return [
            Fate(
                invalid=invalid,
                dispatched=dispatched[id(message)],
                acks=message.ack.call_count,
                rejects=[
                    c.args[-1] if c.args else c.kwargs.get("requeue")
                    for c in message.reject.call_args_list
                ],
            )
            for _, message, invalid in self.delivered
        ]

    def expected_writes(self) -> tuple[Counter[Any], Counter[Any]]:
        """The fewest and most results the worker may have stored, by (id, state).

        A message asking not to store results (``ignore_result``) may go
        without its FAILURE or REVOKED; where Celery reads that flag from
        depends on the protocol, so either count is accepted for it.
        """
        least: Counter[Any] = Counter()
        most: Counter[Any] = Counter()
        for (_, message, _), fate in zip(self.delivered, self.fates()):
            kind = fate.name()
            task_id = task_id_of(message)
            state = {
                "invalid": states.FAILURE,
                "rejected": states.FAILURE,
                "revoked": states.REVOKED,
            }.get(kind)
            if state is None or not isinstance(task_id, str) or not task_id:
                # Nothing can be stored under an id that is no string.
                continue
            most[(task_id, state)] += 1
            # An invalid message is stored whatever it says about results:
            # there is no request whose ignore_result could be asked.
            if kind == "invalid" or not asks_to_ignore_results(message):
                least[(task_id, state)] += 1
        return least, most

    def check_every_message_accounted(self, writes: list[tuple[Any, str]]) -> None:
        """Each message met exactly one fate, and its result says which."""
        fates = [fate.name() for fate in self.fates()]
        for fate in fates:
            event(f"fate: {fate}")
        mixed = [
            f
            for f in fates
            if f not in ("invalid", "dispatched", "rejected", "revoked")
        ]
        assert mixed == [], fates
        least, most = self.expected_writes()
        stored = Counter(writes)
        keys = set(least) | set(most) | set(stored)
        assert all(least[k] <= stored[k] <= most[k] for k in keys), (fates, writes)
        # Nothing is left behind: no buffered call, no timer entry, the
        # window back at its floor.
        assert not self.collector.buffer
        assert self.worker.eta_entries() == []
        assert self.worker.interval_entries() == []
        assert self.worker.qos.value == self.floor, self.windows
        if self.floor:
            assert self.worker.prefetch_sent[-1] == self.floor, (
                self.worker.prefetch_sent
            )


def task_id_of(message: Mock) -> Any:
    """The id the message carries (header first, then a protocol 1 body)."""
    task_id = (message.headers or {}).get("id")
    if task_id is None and isinstance(message.payload, dict):
        task_id = message.payload.get("id")
    return task_id


def asks_to_ignore_results(message: Mock) -> bool:
    """Whether ``message`` sets ``ignore_result`` in its headers or body."""
    return any(
        isinstance(fields, dict) and bool(fields.get("ignore_result"))
        for fields in (message.headers, message.payload)
    )
