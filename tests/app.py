"""The Celery app and batch tasks that the integration tests run.

Built by :func:`create_app` in the test process (in-memory transport,
worker in a thread) and by ``tests.worker_app`` in worker subprocesses
(Redis, RabbitMQ), from the same code so both sides agree on every task.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery, signals
from celery.exceptions import Ignore, Reject

from celery_batches import Batches, SimpleRequest
from celery_batches.signals import batch_flushed

__all__ = ["Journal", "TouchyKey", "create_app"]


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


class Journal:
    """An append-only file of what happened in a worker, one event a line.

    Lines are written with ``O_APPEND`` in one ``write`` each, so lines from
    the worker's main process and its pool children never interleave.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, *fields: object) -> None:
        line = (" ".join(str(f) for f in fields) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def lines(self) -> list[list[str]]:
        try:
            with open(self.path) as f:
                return [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def events(self, kind: str) -> list[list[str]]:
        return [fields[1:] for fields in self.lines() if fields[0] == kind]

    def ids(self, kind: str) -> list[str]:
        return [fields[0] for fields in self.events(kind)]


def create_app(
    *,
    broker: str,
    backend: str,
    journal: str,
    queue: str,
    **conf: Any,
) -> Celery:
    """Return the test app: batch tasks that record what they run in ``journal``."""
    app = Celery("batches_tests", broker=broker, backend=backend, set_as_current=False)
    settings: dict[str, Any] = {
        "task_default_queue": queue,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "result_expires": 600,
        "worker_send_task_events": False,
    }
    settings.update(conf)
    app.conf.update(settings)
    log = Journal(journal)

    def record(requests: list[SimpleRequest]) -> None:
        for r in requests:
            log.write("run", r.id, len(requests), os.getpid())

    @app.task(
        base=Batches,
        name="tests.collect",
        flush_every=5,
        flush_interval=0.5,
        per_request_results=True,
        shared=False,
    )
    def collect(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [sum(r.args) + sum(r.kwargs.values()) for r in requests]

    @app.task(
        base=Batches,
        name="tests.sized",
        flush_every=5,
        flush_interval=60,
        per_request_results=True,
        shared=False,
    )
    def sized(requests: list[SimpleRequest]) -> list[Any]:
        # The interval is long enough that only a full buffer flushes it.
        record(requests)
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.plain",
        flush_every=5,
        flush_interval=0.5,
        shared=False,
    )
    def plain(requests: list[SimpleRequest]) -> int:
        record(requests)
        return len(requests)

    @app.task(
        base=Batches, name="tests.boom", flush_every=3, flush_interval=0.5, shared=False
    )
    def boom(requests: list[SimpleRequest]) -> None:
        record(requests)
        raise ValueError("boom")

    @app.task(
        base=Batches,
        name="tests.settle",
        flush_every=4,
        flush_interval=0.5,
        shared=False,
    )
    def settle(requests: list[SimpleRequest]) -> None:
        record(requests)
        for r in requests:
            if r.args[0] % 2:
                r.mark_as_failure(KeyError(r.args[0]))
            else:
                r.mark_as_done(r.args[0] * 10)

    @app.task(
        base=Batches,
        name="tests.late",
        flush_every=5,
        flush_interval=0.5,
        acks_late=True,
        per_request_results=True,
        shared=False,
    )
    def late(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.sleepy",
        flush_every=2,
        flush_interval=0.3,
        time_limit=2,
        per_request_results=True,
        shared=False,
    )
    def sleepy(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        time.sleep(max(r.args[0] for r in requests))
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.keyed",
        flush_every=3,
        flush_interval=0.5,
        batch_key="tenant",
        per_request_results=True,
        shared=False,
    )
    def keyed(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        tenants = {r.kwargs["tenant"] for r in requests}
        log.write("keys", requests[0].id, ",".join(sorted(tenants)))
        return [r.kwargs["tenant"] for r in requests]

    @app.task(
        base=Batches,
        name="tests.retrying",
        flush_every=4,
        flush_interval=0.3,
        max_retries=2,
        shared=False,
    )
    def retrying(requests: list[SimpleRequest]) -> None:
        record(requests)
        for r in requests:
            retries = r.request_dict.get("retries") or 0
            if retries < r.args[0]:
                r.retry(countdown=0.2)
            else:
                r.mark_as_done(retries)

    @app.task(
        base=Batches,
        name="tests.big",
        flush_every=100,
        flush_interval=2,
        ignore_result=True,
        shared=False,
    )
    def big(requests: list[SimpleRequest]) -> None:
        log.write("batch", requests[0].id, len(requests), os.getpid())

    @app.task(
        base=Batches,
        name="tests.big2",
        flush_every=100,
        flush_interval=2,
        ignore_result=True,
        shared=False,
    )
    def big2(requests: list[SimpleRequest]) -> None:
        # A second batch task on the same worker, to show neither starves.
        log.write("batch2", requests[0].id, len(requests), os.getpid())

    @app.task(
        base=Batches,
        name="tests.documented",
        flush_every=3,
        flush_interval=0.3,
        shared=False,
    )
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

    @app.task(name="tests.total", shared=False)
    def total(values: list[int]) -> int:
        # A plain task, for chord callbacks over batch members.
        return sum(values)

    # -- the hardening suite's tasks (tests/fault/test_hardening.py) -------

    @app.task(
        base=Batches,
        name="tests.unencodable",
        flush_every=3,
        flush_interval=0.5,
        per_request_results=True,
        shared=False,
    )
    def unencodable(requests: list[SimpleRequest]) -> list[Any]:
        # A set is a value the JSON result serializer cannot encode.
        record(requests)
        return [{r.args[0]} if r.args[0] == "bad" else r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.settles_all",
        flush_every=3,
        flush_interval=0.5,
        per_request_results=True,
        shared=False,
    )
    def settles_all(requests: list[SimpleRequest]) -> None:
        # Settles every call itself and returns nothing to distribute.
        record(requests)
        for r in requests:
            r.mark_as_done(r.args[0])

    @app.task(
        base=Batches,
        name="tests.retry_nothrow",
        bind=True,
        flush_every=3,
        flush_interval=0.3,
        max_retries=3,
        shared=False,
    )
    def retry_nothrow(self: Batches, requests: list[SimpleRequest]) -> None:
        record(requests)
        first = [r for r in requests if not r.request_dict.get("retries")]
        if first:
            # Celery's Task.retry(throw=False) sends the retry and returns.
            self.retry(countdown=0.2, throw=False)
        for r in requests:
            if not r.settled:
                r.mark_as_done(r.request_dict.get("retries"))

    @app.task(
        base=Batches,
        name="tests.timed",
        flush_every=3,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def timed(requests: list[SimpleRequest]) -> list[Any]:
        # When each call ran, to check that none ran before its ETA.
        record(requests)
        now = time.time()
        for r in requests:
            log.write("timed", r.id, now)
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fifty",
        flush_every=50,
        flush_interval=5,
        ignore_result=True,
        shared=False,
    )
    def fifty(requests: list[SimpleRequest]) -> None:
        # A backlog task: batches that fill only if the broker delivers
        # 50 calls while they wait unacked.
        record(requests)

    @app.task(
        base=Batches,
        name="tests.huge",
        flush_every=50_000,
        flush_interval=5,
        ignore_result=True,
        shared=False,
    )
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

        @app.task(
            base=Batches,
            name=f"tests.batch_{mode}",
            flush_every=3,
            flush_interval=0.5,
            acks_late=True,
            per_request_results=True,
            shared=False,
        )
        def batch_twin(requests: list[SimpleRequest]) -> list[Any]:
            record(requests)
            redelivered = all(r.delivery_info.get("redelivered") for r in requests)
            value = predicate(mode, redelivered)
            return [value] * len(requests)

        @app.task(name=f"tests.plain_{mode}", bind=True, acks_late=True, shared=False)
        def plain_twin(self: Any, value: int) -> Any:
            log.write("plainrun", self.request.id, os.getpid())
            redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
            return predicate(mode, redelivered)

    for mode in ("reject", "requeue", "ignore"):
        twins(mode)

    # -- the fault suite's tasks (tests/fault), all named tests.fault_* ----

    gate = journal + ".gate"

    def wait_at_gate() -> None:
        # Keeps a batch running while a fault test kills its process. The
        # wait is bounded so that a child orphaned by a kill -9 of its
        # parent never outlives the test run.
        deadline = time.monotonic() + 60
        while os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)

    @app.task(
        base=Batches,
        name="tests.fault_hold",
        flush_every=100,
        flush_interval=3,
        per_request_results=True,
        shared=False,
    )
    def fault_hold(requests: list[SimpleRequest]) -> list[Any]:
        # Calls sit in the buffer for seconds: long enough for a test to
        # stop the worker or the broker while they wait.
        record(requests)
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fault_shutdown",
        flush_every=100,
        flush_interval=30,
        per_request_results=True,
        shared=False,
    )
    def fault_shutdown(requests: list[SimpleRequest]) -> list[Any]:
        # Only a shutdown flushes these in a test: the green pools take a
        # few seconds to act on a SIGTERM, longer than fault_hold's 3 s.
        record(requests)
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fault_late_requeue",
        flush_every=4,
        flush_interval=0.5,
        acks_late=True,
        reject_on_worker_lost=True,
        per_request_results=True,
        shared=False,
    )
    def fault_late_requeue(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        wait_at_gate()
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fault_late_lost",
        flush_every=4,
        flush_interval=0.5,
        acks_late=True,
        per_request_results=True,
        shared=False,
    )
    def fault_late_lost(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        wait_at_gate()
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fault_restart",
        flush_every=8,
        flush_interval=2,
        per_request_results=True,
        shared=False,
    )
    def fault_restart(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fault_deep",
        flush_every=100,
        flush_interval=2,
        ignore_result=True,
        shared=False,
    )
    def fault_deep(requests: list[SimpleRequest]) -> None:
        # tests.big's twin that journals every call, so a deep queue can
        # be checked for calls run twice or never.
        record(requests)

    @app.task(
        base=Batches,
        name="tests.fault_soft",
        flush_every=2,
        flush_interval=0.3,
        soft_time_limit=1,
        time_limit=20,
        per_request_results=True,
        shared=False,
    )
    def fault_soft(requests: list[SimpleRequest]) -> list[Any]:
        # Sleeps past its soft limit: SoftTimeLimitExceeded is raised in here.
        record(requests)
        time.sleep(max(r.args[0] for r in requests))
        return [r.args[0] for r in requests]

    @app.task(
        base=Batches,
        name="tests.fault_long",
        flush_every=2,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def fault_long(requests: list[SimpleRequest]) -> list[Any]:
        # Runs until its gate file is removed (bounded), to be terminated.
        record(requests)
        wait_at_gate()
        return [r.args[0] for r in requests]

    @app.task(name="tests.fault_plain_late", acks_late=True, shared=False)
    def fault_plain_late(value: int) -> int:
        # A plain task whose message stays unacked while it runs: batches
        # acked meanwhile must not ack it with theirs.
        log.write("plain", value, os.getpid())
        wait_at_gate()
        return value

    # -- the attack suite's tasks (tests/fault/test_attack.py) ------------

    @app.task(
        base=Batches,
        name="tests.attack_drain",
        flush_every=3,
        flush_interval=0.5,
        acks_late=True,
        shared=False,
    )
    def attack_drain(requests: list[SimpleRequest]) -> None:
        # Consumes the list it was given, settling each call as it goes.
        record(requests)
        while requests:
            request = requests.pop()
            request.mark_as_done(request.args[0])

    @app.task(
        base=Batches,
        name="tests.attack_drain_early",
        flush_every=3,
        flush_interval=0.5,
        shared=False,
    )
    def attack_drain_early(requests: list[SimpleRequest]) -> None:
        # tests.attack_drain with early acks.
        record(requests)
        while requests:
            request = requests.pop()
            request.mark_as_done(request.args[0])

    @app.task(
        base=Batches,
        name="tests.attack_sorted",
        flush_every=3,
        flush_interval=2,
        acks_late=True,
        per_request_results=True,
        shared=False,
    )
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

    @app.task(
        base=Batches,
        name="tests.attack_retry_all",
        bind=True,
        flush_every=3,
        flush_interval=2,
        max_retries=3,
        shared=False,
    )
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

    @app.task(
        base=Batches,
        name="tests.attack_touchy",
        flush_every=3,
        flush_interval=0.5,
        batch_key=touchy_key,
        per_request_results=True,
        shared=False,
    )
    def attack_touchy(requests: list[SimpleRequest]) -> list[Any]:
        record(requests)
        return [r.kwargs["tenant"] for r in requests]

    @app.task(
        base=Batches,
        name="tests.attack_retry_odd",
        flush_every=2,
        flush_interval=0.5,
        max_retries=3,
        shared=False,
    )
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

    # -- what the worker tells, recorded so the test process can see it ---

    @batch_flushed.connect(weak=False)
    def on_flushed(sender: Any, size: int, key: Any, reason: str, **kw: Any) -> None:
        if sender.app is app:
            log.write("flush", sender.name, size, reason, key)

    @signals.task_failure.connect(weak=False)
    def on_failure(
        sender: Any = None, task_id: str = "", exception: Any = None, **kw: Any
    ) -> None:
        if sender is not None and sender.app is app:
            log.write("failure", task_id, type(exception).__name__)

    @signals.task_revoked.connect(weak=False)
    def on_revoked(sender: Any = None, request: Any = None, **kw: Any) -> None:
        if sender is not None and sender.app is app:
            log.write("revoked", request.id)

    @signals.task_received.connect(weak=False)
    def on_received(sender: Any = None, request: Any = None, **kw: Any) -> None:
        if request is not None and request.task.app is app:
            log.write("received", request.id)

    @signals.task_prerun.connect(weak=False)
    def on_prerun(sender: Any = None, task_id: str = "", **kw: Any) -> None:
        if sender is not None and sender.app is app:
            log.write("prerun", task_id, sender.name)

    @signals.task_postrun.connect(weak=False)
    def on_postrun(
        sender: Any = None, task_id: str = "", state: str = "", **kw: Any
    ) -> None:
        if sender is not None and sender.app is app:
            log.write("postrun", task_id, sender.name, state)

    @signals.task_retry.connect(weak=False)
    def on_retry(sender: Any = None, request: Any = None, **kw: Any) -> None:
        if sender is not None and sender.app is app:
            log.write("retry", request.id)

    return app
