"""Every request is visible to Celery's tools: events, inspect, rpc results."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from kombu.utils.uuid import uuid

from tests.harness.wait import wait_for
from tests.harness.worker import Worker, start_worker

DEDICATED = [("memory", "solo"), ("redis", "prefork"), ("rabbitmq", "prefork")]


@pytest.fixture(
    scope="module", params=DEDICATED, ids=[f"{b}-{p}" for b, p in DEDICATED]
)
def events_worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    broker, pool = request.param
    conf = {"worker_send_task_events": True}
    with start_worker(broker, pool, conf=conf) as worker:
        yield worker


@pytest.fixture(
    scope="module", params=DEDICATED, ids=[f"{b}-{p}" for b, p in DEDICATED]
)
def rpc_worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    broker, pool = request.param
    with start_worker(broker, pool, conf={"result_backend": "rpc://"}) as worker:
        yield worker


class EventLog:
    """Captures task events with a real event receiver, in a thread."""

    def __init__(self, worker: Worker) -> None:
        self.app = worker.app
        self.events: dict[str, list[str]] = defaultdict(list)
        self.lock = threading.Lock()
        self.marker = f"test-ready-{uuid()}"
        self.conn = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(
            self.conn, handlers={"*": self.on_event}
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            key = event.get("uuid") or event.get("marker") or ""
            self.events[key].append(event["type"])

    def _run(self) -> None:
        self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventLog:
        self.thread.start()
        # The receiver's queue exists once it hears our own event.
        with self.app.events.default_dispatcher() as dispatcher:

            def heard() -> bool:
                dispatcher.send("test-ready", marker=self.marker)
                return bool(self.types(self.marker))

            wait_for(heard, timeout=20, interval=0.2, what="event receiver ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.conn.release()

    def has(self, task_id: str, event_type: str) -> bool:
        return event_type in self.types(task_id)

    def types(self, task_id: str) -> list[str]:
        with self.lock:
            return list(self.events.get(task_id, ()))


def test_each_request_emits_its_own_events(events_worker: Worker) -> None:
    tasks = events_worker.tasks
    with EventLog(events_worker) as log:
        # given calls that succeed, fail and retry, in batches
        ok = [tasks.collect.delay(i) for i in range(3)]
        bad = [tasks.boom.delay(i) for i in range(3)]
        retried = tasks.retrying.delay(1)
        # then each request has its own received/started/outcome events
        for r in ok:
            wait_for(partial(log.has, r.id, "task-succeeded"), what=f"ok {r.id}")
            assert log.types(r.id)[:2] == ["task-received", "task-started"]
        for r in bad:
            wait_for(partial(log.has, r.id, "task-failed"), what=f"failed {r.id}")
            assert log.types(r.id)[:2] == ["task-received", "task-started"]
        wait_for(lambda: "task-retried" in log.types(retried.id), what="task-retried")
        wait_for(
            lambda: "task-succeeded" in log.types(retried.id), what="retry succeeded"
        )


def test_inspect_lists_buffered_and_running_requests(events_worker: Worker) -> None:
    app = events_worker.app
    inspect = app.control.inspect(timeout=3)
    # given three calls waiting in a buffer that flushes at five
    sized = events_worker.tasks.sized
    waiting = [sized.delay(i) for i in range(3)]

    def reserved_ids() -> set[str]:
        replies = inspect.reserved() or {}
        return {req["id"] for reqs in replies.values() for req in reqs}

    # then `inspect reserved` lists them
    wait_for(lambda: {r.id for r in waiting} <= reserved_ids(), what="reserved")
    rest = [sized.delay(i) for i in range(3, 5)]
    assert [r.get(timeout=20) for r in waiting + rest] == list(range(5))

    # given a batch that runs for a while
    sleepy = events_worker.tasks.sleepy
    running = [sleepy.delay(1.5), sleepy.delay(1.5)]
    wait_for(
        lambda: all(events_worker.runs(r.id) for r in running), what="batch started"
    )

    def active_ids() -> set[str]:
        replies = inspect.active() or {}
        return {req["id"] for reqs in replies.values() for req in reqs}

    # then `inspect active` lists each of its requests
    if events_worker.pool != "solo":  # a solo worker cannot answer while busy
        assert {r.id for r in running} <= active_ids()
    assert [r.get(timeout=20) for r in running] == [1.5, 1.5]


def test_rpc_results_reach_the_caller(rpc_worker: Worker) -> None:
    assert rpc_worker.app.conf.result_backend == "rpc://"
    ok = [rpc_worker.tasks.collect.delay(i, 1) for i in range(3)]
    settled = [rpc_worker.tasks.settle.delay(i) for i in range(4)]
    assert [r.get(timeout=20) for r in ok] == [i + 1 for i in range(3)]
    assert settled[0].get(timeout=20) == 0
    assert settled[2].get(timeout=20) == 20
    with pytest.raises(KeyError):
        settled[1].get(timeout=20)
