"""The test app's tasks: batch tasks that journal what they run, and a few plain ones.

Every task is registered on the app as ``tests.<name>`` and reached in a test
as an attribute of :class:`Tasks` (``worker.tasks.collect.delay(1)``), so a
misspelt task is a mypy error, not a ``KeyError`` in a worker. To add one,
define it in :func:`register_tasks` with ``@batch(...)`` or ``@plain(...)``
and add a field of the same name to :class:`Tasks`; registering checks that
the two agree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore, Reject

from celery_batches import Batches, SimpleRequest
from tests.harness.journal import Batch, Journal, Keys, Plain, PlainRun, Run, Timed

__all__ = ["Tasks", "TouchyKey", "register_tasks"]


@dataclass(frozen=True)
class Tasks:
    """The test app's tasks, each registered as ``tests.<field name>``."""

    # The integration suite's.
    collect: Batches
    sized: Batches
    plain: Batches
    boom: Batches
    settle: Batches
    late: Batches
    sleepy: Batches
    keyed: Batches
    retrying: Batches
    big: Batches
    big2: Batches
    documented: Batches
    total: Task
    # The hardening suite's (tests/fault/test_hardening.py).
    unencodable: Batches
    settles_all: Batches
    retry_nothrow: Batches
    timed: Batches
    huge: Batches
    batch_reject: Batches
    batch_requeue: Batches
    batch_ignore: Batches
    plain_reject: Task
    plain_requeue: Task
    plain_ignore: Task
    # The fault suite's (tests/fault).
    fault_hold: Batches
    fault_shutdown: Batches
    fault_late_requeue: Batches
    fault_late_lost: Batches
    fault_restart: Batches
    fault_deep: Batches
    fault_soft: Batches
    fault_long: Batches
    fault_plain_late: Task
    # The attack suite's (tests/fault/test_attack.py).
    attack_drain: Batches
    attack_drain_early: Batches
    attack_sorted: Batches
    attack_retry_all: Batches
    attack_touchy: Batches
    attack_retry_odd: Batches
    attack_lineage: Task
    attack_plain_double: Task

    def twins(self, mode: str) -> tuple[Batches, Task]:
        """The batch task and the plain task that end their calls by ``mode``."""
        twins = {
            "reject": (self.batch_reject, self.plain_reject),
            "requeue": (self.batch_requeue, self.plain_requeue),
            "ignore": (self.batch_ignore, self.plain_ignore),
        }
        return twins[mode]


class TouchyKey:
    """A batch key that hashes alike for every value but cannot be compared.

    What a key wrapping an array looks like to a dict: ``==`` raises (an
    array's truth value is ambiguous).
    """

    def __init__(self, value: object) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        raise TypeError(f"cannot compare {self.value!r} with {other!r}")


Decorator = Callable[[Callable[..., Any]], Any]


def register_tasks(app: Celery, journal: Journal, gate: str) -> Tasks:
    """Register the test tasks on ``app``; return them.

    Arguments:
        app: The app to register on (each worker, and each sending test,
            has its own).
        journal: Where the tasks record what they run.
        gate: A file whose existence holds the gated tasks' running batches.
    """
    made: dict[str, Any] = {}

    def batch(name: str | None = None, **options: Any) -> Decorator:
        def register(fun: Callable[..., Any]) -> Any:
            key = name or fun.__name__
            made[key] = app.task(
                base=Batches, name=f"tests.{key}", shared=False, **options
            )(fun)
            return made[key]

        return register

    def plain(name: str | None = None, **options: Any) -> Decorator:
        def register(fun: Callable[..., Any]) -> Any:
            key = name or fun.__name__
            made[key] = app.task(name=f"tests.{key}", shared=False, **options)(fun)
            return made[key]

        return register

    def record(requests: list[SimpleRequest]) -> None:
        for r in requests:
            journal.write(
                Run(id=r.id, task=r.name, size=len(requests), pid=os.getpid())
            )

    def wait_at_gate() -> None:
        # Keeps a batch running while a fault test kills its process. The
        # wait is bounded so that a child orphaned by a kill -9 of its
        # parent never outlives the test run.
        deadline = time.monotonic() + 60
        while os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- the integration suite's tasks ------------------------------------

    @batch(flush_every=5, flush_interval=0.5, per_request_results=True)
    def collect(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [sum(r.args) + sum(r.kwargs.values()) for r in requests]

    @batch(flush_every=5, flush_interval=60, per_request_results=True)
    def sized(requests: list[SimpleRequest]) -> list[Any]:
        # The interval is long enough that only a full buffer flushes it.
        record(requests)
        return [r.args[0] for r in requests]

    @batch(name="plain", flush_every=5, flush_interval=0.5)
    def plain_batch(requests: list[SimpleRequest]) -> int:
        record(requests)
        return len(requests)

    @batch(flush_every=3, flush_interval=0.5)
    def boom(requests: list[SimpleRequest]) -> None:
        record(requests)
        raise ValueError("boom")

    @batch(flush_every=4, flush_interval=0.5)
    def settle(requests: list[SimpleRequest]) -> None:
        record(requests)
        for r in requests:
            if r.args[0] % 2:
                r.mark_as_failure(KeyError(r.args[0]))
            else:
                r.mark_as_done(r.args[0] * 10)

    @batch(flush_every=5, flush_interval=0.5, acks_late=True, per_request_results=True)
    def late(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [r.args[0] for r in requests]

    @batch(flush_every=2, flush_interval=0.3, time_limit=2, per_request_results=True)
    def sleepy(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        time.sleep(max(r.args[0] for r in requests))
        return [r.args[0] for r in requests]

    @batch(
        flush_every=3, flush_interval=0.5, batch_key="tenant", per_request_results=True
    )
    def keyed(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        tenants = sorted({r.kwargs["tenant"] for r in requests})
        journal.write(Keys(id=requests[0].id, keys=tenants))
        return [r.kwargs["tenant"] for r in requests]

    @batch(flush_every=4, flush_interval=0.3, max_retries=2)
    def retrying(requests: list[SimpleRequest]) -> None:
        record(requests)
        for r in requests:
            retries = r.request_dict.get("retries") or 0
            if retries < r.args[0]:
                r.retry(countdown=0.2)
            else:
                r.mark_as_done(retries)

    def journal_batch(requests: list[SimpleRequest]) -> None:
        journal.write(
            Batch(
                id=requests[0].id,
                task=requests[0].name,
                size=len(requests),
                pid=os.getpid(),
            )
        )

    @batch(flush_every=100, flush_interval=2, ignore_result=True)
    def big(requests: list[SimpleRequest]) -> None:
        journal_batch(requests)

    @batch(flush_every=100, flush_interval=2, ignore_result=True)
    def big2(requests: list[SimpleRequest]) -> None:
        # A second batch task on the same worker, to show neither starves.
        journal_batch(requests)

    @batch(flush_every=3, flush_interval=0.3)
    def documented(requests: list[SimpleRequest]) -> None:
        # The retry pattern celery-batches 0.11 documents: re-send the call
        # with the same task id and a countdown, store results through the
        # app's backend with the SimpleRequest as the request.
        record(requests)
        for request in requests:
            if not request.kwargs.get("retried"):
                documented.apply_async(
                    args=request.args,
                    kwargs={**request.kwargs, "retried": True},
                    countdown=0.2,
                    task_id=request.id,
                )
            else:
                app.backend.mark_as_done(
                    request.id, request.args[0] * 3, request=request
                )

    @plain()
    def total(values: list[int]) -> int:
        # A plain task, for chord callbacks over batch members.
        return sum(values)

    # -- the hardening suite's tasks (tests/fault/test_hardening.py) -------

    @batch(flush_every=3, flush_interval=0.5, per_request_results=True)
    def unencodable(requests: list[SimpleRequest]) -> list[Any]:
        # A set is a value the JSON result serializer cannot encode.
        record(requests)
        return [{r.args[0]} if r.args[0] == "bad" else r.args[0] for r in requests]

    @batch(flush_every=3, flush_interval=0.5, per_request_results=True)
    def settles_all(requests: list[SimpleRequest]) -> None:
        # Settles every call itself and returns nothing to distribute.
        record(requests)
        for r in requests:
            r.mark_as_done(r.args[0])

    @batch(bind=True, flush_every=3, flush_interval=0.3, max_retries=3)
    def retry_nothrow(self: Batches, requests: list[SimpleRequest]) -> None:
        record(requests)
        first = [r for r in requests if not r.request_dict.get("retries")]
        if first:
            # Celery's Task.retry(throw=False) sends the retry and returns.
            self.retry(countdown=0.2, throw=False)
        for r in requests:
            if not r.settled:
                r.mark_as_done(r.request_dict.get("retries"))

    @batch(flush_every=3, flush_interval=0.3, per_request_results=True)
    def timed(requests: list[SimpleRequest]) -> list[Any]:
        # When each call ran, to check that none ran before its ETA.
        record(requests)
        now = time.time()
        for r in requests:
            journal.write(Timed(id=r.id, at=now))
        return [r.args[0] for r in requests]

    @batch(flush_every=50_000, flush_interval=5, ignore_result=True)
    def huge(requests: list[SimpleRequest]) -> None:
        # Would widen the prefetch window past what AMQP can carry.
        record(requests)

    def predicate(mode: str, redelivered: bool) -> Any:
        """What the reject/ignore twins raise (or return, once redelivered)."""
        if mode == "reject":
            raise Reject("rejected on purpose", requeue=False)
        if mode == "requeue" and not redelivered:
            raise Reject("again, please", requeue=True)
        if mode == "ignore":
            raise Ignore()
        return "second time"

    def twins(mode: str) -> None:
        """A batch task and a plain task that end their calls the same way."""

        @batch(
            name=f"batch_{mode}",
            flush_every=3,
            flush_interval=0.5,
            acks_late=True,
            per_request_results=True,
        )
        def batch_twin(requests: list[SimpleRequest]) -> list[Any]:
            record(requests)
            redelivered = all(r.delivery_info.get("redelivered") for r in requests)
            value = predicate(mode, redelivered)
            return [value] * len(requests)

        @plain(name=f"plain_{mode}", bind=True, acks_late=True)
        def plain_twin(self: Any, value: int) -> Any:
            journal.write(PlainRun(id=self.request.id, pid=os.getpid()))
            redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
            return predicate(mode, redelivered)

    for mode in ("reject", "requeue", "ignore"):
        twins(mode)

    # -- the fault suite's tasks (tests/fault) -----------------------------

    @batch(flush_every=100, flush_interval=3, per_request_results=True)
    def fault_hold(requests: list[SimpleRequest]) -> list[Any]:
        # Calls sit in the buffer for seconds: long enough for a test to
        # stop the worker or the broker while they wait.
        record(requests)
        return [r.args[0] for r in requests]

    @batch(flush_every=100, flush_interval=30, per_request_results=True)
    def fault_shutdown(requests: list[SimpleRequest]) -> list[Any]:
        # Only a shutdown flushes these in a test: the green pools take a
        # few seconds to act on a SIGTERM, longer than fault_hold's 3 s.
        record(requests)
        return [r.args[0] for r in requests]

    @batch(
        flush_every=4,
        flush_interval=0.5,
        acks_late=True,
        reject_on_worker_lost=True,
        per_request_results=True,
    )
    def fault_late_requeue(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        wait_at_gate()
        return [r.args[0] for r in requests]

    @batch(flush_every=4, flush_interval=0.5, acks_late=True, per_request_results=True)
    def fault_late_lost(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        wait_at_gate()
        return [r.args[0] for r in requests]

    @batch(flush_every=8, flush_interval=2, per_request_results=True)
    def fault_restart(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [r.args[0] for r in requests]

    @batch(flush_every=100, flush_interval=2, ignore_result=True)
    def fault_deep(requests: list[SimpleRequest]) -> None:
        # tests.big's twin that journals every call, so a deep queue can
        # be checked for calls run twice or never.
        record(requests)

    @batch(
        flush_every=2,
        flush_interval=0.3,
        soft_time_limit=1,
        time_limit=20,
        per_request_results=True,
    )
    def fault_soft(requests: list[SimpleRequest]) -> list[Any]:
        # Sleeps past its soft limit: SoftTimeLimitExceeded is raised in here.
        record(requests)
        time.sleep(max(r.args[0] for r in requests))
        return [r.args[0] for r in requests]

    @batch(flush_every=2, flush_interval=0.3, per_request_results=True)
    def fault_long(requests: list[SimpleRequest]) -> list[Any]:
        # Runs until its gate file is removed (bounded), to be terminated.
        record(requests)
        wait_at_gate()
        return [r.args[0] for r in requests]

    @plain(acks_late=True)
    def fault_plain_late(value: int) -> int:
        # A plain task whose message stays unacked while it runs: batches
        # acked meanwhile must not ack it with theirs.
        journal.write(Plain(value=value, pid=os.getpid()))
        wait_at_gate()
        return value

    # -- the attack suite's tasks (tests/fault/test_attack.py) ------------

    @batch(flush_every=3, flush_interval=0.5, acks_late=True)
    def attack_drain(requests: list[SimpleRequest]) -> None:
        # Consumes the list it was given, settling each call as it goes.
        record(requests)
        while requests:
            request = requests.pop()
            request.mark_as_done(request.args[0])

    @batch(flush_every=3, flush_interval=0.5)
    def attack_drain_early(requests: list[SimpleRequest]) -> None:
        # tests.attack_drain with early acks.
        record(requests)
        while requests:
            request = requests.pop()
            request.mark_as_done(request.args[0])

    @batch(flush_every=3, flush_interval=2, acks_late=True, per_request_results=True)
    def attack_sorted(requests: list[SimpleRequest]) -> list[Any]:
        # Sorts the list in place (largest first) and answers in that order;
        # the call of 0 asks to be delivered again, once.
        record(requests)
        requests.sort(key=lambda r: r.args[0], reverse=True)
        return [
            Reject("again, please", requeue=True)
            if r.args[0] == 0 and not r.delivery_info.get("redelivered")
            else r.args[0]
            for r in requests
        ]

    @batch(bind=True, flush_every=3, flush_interval=2, max_retries=3)
    def attack_retry_all(self: Batches, requests: list[SimpleRequest]) -> None:
        # Retries the whole batch on a call's first run (the documented
        # ``raise self.retry()``), settles each call on its retry.
        record(requests)
        if any(r.request_dict.get("retries") in (None, 0) for r in requests):
            raise self.retry(countdown=0.2)
        for r in requests:
            r.mark_as_done(r.args[0])

    def touchy_key(request: SimpleRequest) -> object:
        tenant = request.kwargs.get("tenant")
        return TouchyKey(tenant) if request.kwargs.get("touchy") else tenant

    @batch(
        flush_every=3,
        flush_interval=0.5,
        batch_key=touchy_key,
        per_request_results=True,
    )
    def attack_touchy(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [r.kwargs["tenant"] for r in requests]

    @batch(flush_every=2, flush_interval=0.5, max_retries=3)
    def attack_retry_odd(requests: list[SimpleRequest]) -> None:
        # On a call's first run, retries it the way Celery's Task.retry
        # accepts: a reason given as a string, or an ISO 8601 ETA string.
        record(requests)
        for r in requests:
            if r.request_dict.get("retries"):
                r.mark_as_done(r.request_dict["retries"])
            elif r.kwargs.get("how") == "exc":
                r.retry(countdown=0.2, exc="busy, try later")  # type: ignore[arg-type]
            else:
                soon = datetime.now(timezone.utc) + timedelta(seconds=0.2)
                r.retry(eta=soon.isoformat())  # type: ignore[arg-type]

    @plain(bind=True)
    def attack_lineage(self: Any, value: Any) -> list[Any]:
        # A callback that reports where Celery says it comes from.
        return [value, self.request.parent_id, self.request.root_id]

    @plain()
    def attack_plain_double(value: int) -> int:
        # The plain twin of collect(value, value): what Celery does for it.
        return value * 2

    declared = {field.name for field in fields(Tasks)}
    assert declared == set(made), (
        f"tasks without a Tasks field: {sorted(set(made) - declared)}; "
        f"Tasks fields without a task: {sorted(declared - set(made))}"
    )
    return Tasks(**made)
