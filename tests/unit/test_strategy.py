"""The worker-side strategy, driven with Celery's own test messages.

Each test starts the real strategy of a batch task on a consumer double (see
``conftest.py``), hands it messages as the consumer would, and looks at what
a user would see: the batches the pool receives, the states stored in the
result backend, the prefetch window told to the broker, the timer entries.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Celery, signals, states
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.collector import LINGER, collectors_of
from celery_batches.control import describe
from celery_batches.signals import batch_flushed
from tests.unit.conftest import (
    PROTOCOLS,
    FakeWorker,
    make_message,
    recording,
    utc_in,
)


def batch_task(app: Celery, **options: Any) -> Any:
    """Register a batch task on ``app`` (flush_every=3, a long interval)."""
    options = {"flush_every": 3, "flush_interval": 60, **options}

    @app.task(base=Batches, name=f"unit.batch.{uuid()}", shared=False, **options)
    def batch(requests: list[SimpleRequest]) -> None:
        pass

    return batch


def state_of(app: Celery, task_id: str) -> str:
    return app.AsyncResult(task_id).state  # type: ignore[no-any-return]


# -- decoding -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_message_protocol_decodes_into_requests_with_their_arguments(
    app: Celery, worker: FakeWorker, protocol: str
) -> None:
    # given a batch task that flushes two calls at a time
    task = batch_task(app, flush_every=2)
    handler = worker.strategy(task)
    sigs = [task.s(1, "two", [3]), task.s(x=1, y={"z": None})]
    # when both calls arrive as messages of this protocol
    for sig in sigs:
        worker.deliver(handler, make_message(app, sig, protocol))
    # then the pool gets one batch holding both calls, as they were made
    (batch,) = worker.pool.batches
    assert [r.id for r in batch] == [sig.id for sig in sigs]
    assert [r.name for r in batch] == [task.name, task.name]
    assert [list(r.args) for r in batch] == [[1, "two", [3]], []]
    assert [r.kwargs for r in batch] == [{}, {"x": 1, "y": {"z": None}}]
    assert all(r.hostname == worker.hostname for r in batch)


def test_task_received_fires_once_per_message(app: Celery, worker: FakeWorker) -> None:
    # given a batch task of two and a receiver of task_received
    task = batch_task(app, flush_every=2)
    handler = worker.strategy(task)
    messages = [make_message(app, task.s(n)) for n in range(3)]
    # when three messages arrive (one batch flushes, one call waits)
    with recording(signals.task_received) as received:
        for message in messages:
            worker.deliver(handler, message)
    # then the signal fired once for each message, in arrival order, with
    # the consumer as sender, whether the call was flushed or still waits
    mine = [sent for sent in received if sent["request"].name == task.name]
    assert [sent["request"].id for sent in mine] == [m.headers["id"] for m in messages]
    assert all(sent["sender"] is worker.consumer for sent in mine)


# -- flushing -----------------------------------------------------------------


def test_a_batch_flushes_when_flush_every_calls_wait_and_holds_exactly_those(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task of three
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    messages = [make_message(app, task.s(n)) for n in range(7)]
    ids = [m.headers["id"] for m in messages]
    with recording(batch_flushed) as flushed:
        # when seven calls arrive
        for message in messages:
            worker.deliver(handler, message)
        # then two batches of three went to the pool, in arrival order
        assert worker.pool.ids() == [ids[0:3], ids[3:6]]
        # when the interval comes due
        worker.fire_interval()
    # then the seventh call went alone
    assert worker.pool.ids() == [ids[0:3], ids[3:6], ids[6:]]
    mine = [f for f in flushed if f["sender"].name == task.name]
    assert [(f["size"], f["reason"], f["request_ids"]) for f in mine] == [
        (3, "size", ids[0:3]),
        (3, "size", ids[3:6]),
        (1, "interval", ids[6:]),
    ]


def test_the_interval_timer_is_armed_by_the_first_call_and_disarmed_by_its_flush(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task of ten with a 5 s interval, and nothing received
    task = batch_task(app, flush_every=10, flush_interval=5)
    handler = worker.strategy(task)
    assert worker.interval_entries() == []
    # when the first call arrives
    before = time.monotonic()
    worker.deliver(handler, make_message(app, task.s(0)))
    # then one interval entry is armed, due flush_interval from now
    (due,) = [s.eta for s in worker.timer.queue if not s.entry.canceled]
    assert before + 5 <= due <= time.monotonic() + 5
    # when more calls arrive, no second entry is armed
    worker.deliver(handler, make_message(app, task.s(1)))
    worker.deliver(handler, make_message(app, task.s(2)))
    assert len(worker.interval_entries()) == 1
    # when the interval comes due
    worker.fire_interval()
    # then the three waiting calls flush as one batch and the timer is disarmed
    assert [len(b) for b in worker.pool.batches] == [3]
    assert worker.interval_entries() == []
    # when another call arrives, a fresh interval is armed for it
    worker.deliver(handler, make_message(app, task.s(3)))
    assert len(worker.interval_entries()) == 1


def test_an_interval_that_finds_nothing_waiting_flushes_nothing_and_disarms(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch of two that filled and flushed by size
    task = batch_task(app, flush_every=2)
    handler = worker.strategy(task)
    worker.deliver(handler, make_message(app, task.s(0)))
    worker.deliver(handler, make_message(app, task.s(1)))
    assert len(worker.pool.batches) == 1
    # when the interval time passes
    worker.advance(61)
    # then no empty batch is sent and no interval stays armed
    assert len(worker.pool.batches) == 1
    assert worker.interval_entries() == []


# -- prefetch -------------------------------------------------------------------


def test_the_prefetch_window_widens_while_calls_wait_and_narrows_after_the_flush(
    app: Celery,
) -> None:
    # given a worker whose prefetch window is 4 and a batch task of three
    worker = FakeWorker(app, prefetch=4)
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    windows = []
    # when three calls arrive one by one, and no more
    for n in range(3):
        worker.deliver(handler, make_message(app, task.s(n)))
        worker.sync_prefetch()
        windows.append(worker.qos.value)
    # then the window is 4 + 2 x 3 while calls wait (so the broker can
    # deliver a full batch, and the next one while the pool takes this one),
    # stays so for a moment after the flush, in case more calls follow ...
    assert windows == [10, 10, 10]
    assert len(worker.pool.batches) == 1
    # ... and is back to 4 once that moment has passed with no call
    worker.advance(LINGER)
    worker.sync_prefetch()
    assert worker.qos.value == 4
    assert worker.prefetch_sent == [4, 10, 4]
    assert worker.interval_entries() == []


def test_a_busy_key_keeps_its_window_from_one_batch_to_the_next(app: Celery) -> None:
    # given a worker whose prefetch window is 4 and a batch task of three
    worker = FakeWorker(app, prefetch=4)
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    # when nine calls arrive one by one, the prefetch count sent after each
    # (as Celery's event loop does)
    for n in range(9):
        worker.deliver(handler, make_message(app, task.s(n)))
        worker.sync_prefetch()
    # then three batches ran, and the window was widened once: not narrowed
    # and widened again around each flush (two basic.qos round trips a
    # batch on RabbitMQ)
    assert len(worker.pool.batches) == 3
    assert worker.prefetch_sent == [4, 10]
    worker.advance(LINGER)
    worker.sync_prefetch()
    assert worker.prefetch_sent == [4, 10, 4]


def test_a_lingering_key_gives_way_to_a_waiting_one(app: Celery) -> None:
    # given a batch task keyed by its argument, on a worker whose pool has
    # one process (so at most two keys widen the window at once)
    worker = FakeWorker(app, prefetch=4)
    task = batch_task(app, flush_every=2, batch_key=lambda request: request.args[0])
    handler = worker.strategy(task)
    # when keys "a" and "b" each fill a batch, and then "c" has a call
    for key in ("a", "a", "b", "b", "c"):
        worker.deliver(handler, make_message(app, task.s(key)))
        worker.sync_prefetch()
    # then "c" waits with a widened window: the idle keys gave theirs back
    collector = collectors_of(worker.consumer)[task.name]
    assert collector.budget.granted(task.name, "c") == 4
    assert set(collector.lingering) <= {"a", "b"}
    assert worker.qos.value <= 4 + 2 * 4


def test_inspect_batches_counts_the_widening_a_lingering_key_keeps(
    app: Celery,
) -> None:
    # given a worker whose prefetch window is 4 and a batch task of three
    worker = FakeWorker(app, prefetch=4)
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    # when three calls fill a batch and no call follows yet, so the key
    # keeps its widening for a moment
    for n in range(3):
        worker.deliver(handler, make_message(app, task.s(n)))
    worker.sync_prefetch()
    assert worker.qos.value == 10
    # then `celery inspect batches` puts that widening on the task, as the
    # budget counts it: not "nothing granted" beside 6 in use
    state = describe(worker.consumer)
    assert state["prefetch"]["in_use"] == 6
    assert state["tasks"][task.name]["prefetch_granted"] == 6
    # and once that moment has passed, on neither
    worker.advance(LINGER)
    state = describe(worker.consumer)
    assert state["prefetch"]["in_use"] == 0
    assert state["tasks"][task.name]["prefetch_granted"] == 0


def test_an_interval_flush_narrows_the_prefetch_window_too(app: Celery) -> None:
    worker = FakeWorker(app, prefetch=4)
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    worker.deliver(handler, make_message(app, task.s(0)))
    assert worker.qos.value == 10
    worker.fire_interval()
    assert worker.qos.value == 4


def test_the_window_widens_once_per_waiting_key_up_to_a_bound(app: Celery) -> None:
    # given a one-process worker with a window of 4 and a keyed batch task
    worker = FakeWorker(app, prefetch=4)
    task = batch_task(app, flush_every=3, batch_key="tenant")
    handler = worker.strategy(task)
    # when calls of two tenants wait
    worker.deliver(handler, make_message(app, task.s(tenant="a")))
    worker.deliver(handler, make_message(app, task.s(tenant="b")))
    # then each waiting key widens the window by twice flush_every
    assert worker.qos.value == 4 + 6 + 6
    # when many more tenants wait
    for tenant in "cdefgh":
        worker.deliver(handler, make_message(app, task.s(tenant=tenant)))
    # then the window stops growing: messages held in memory stay bounded
    assert worker.qos.value == 4 + 6 + 6
    # and when everything is flushed the window is back where it started
    worker.fire_interval()
    assert worker.qos.value == 4


def test_a_prefetch_window_of_zero_stays_unlimited(app: Celery) -> None:
    # given a worker with prefetch multiplier 0 (no limit: QoS value 0)
    worker = FakeWorker(app, prefetch=0)
    task = batch_task(app, flush_every=2)
    handler = worker.strategy(task)
    seen = []
    # when calls wait, flush, and one is held for its ETA
    for sig in (task.s(0), task.s(1), task.s(2).set(countdown=60), task.s(3)):
        worker.deliver(handler, make_message(app, sig))
        worker.sync_prefetch()
        seen.append(worker.qos.value)
    worker.fire_interval()
    seen.append(worker.qos.value)
    # then the window never becomes a limit
    assert seen == [0, 0, 0, 0, 0]
    assert worker.prefetch_sent == [0]


# -- revoked and expired ------------------------------------------------------


def test_a_call_revoked_while_waiting_is_left_out_and_stored_as_revoked(
    app: Celery, worker: FakeWorker
) -> None:
    # given two calls waiting in a batch of three
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    first, second, third = (make_message(app, task.s(n)) for n in range(3))
    worker.deliver(handler, first)
    worker.deliver(handler, second)
    # when the first is revoked (what the worker's revoke command records)
    worker_state.revoked.add(first.headers["id"])
    # and the third call fills the batch
    worker.deliver(handler, third)
    # then the batch runs without the revoked call
    assert worker.pool.ids() == [[second.headers["id"], third.headers["id"]]]
    # and the revoked call is stored as REVOKED and its message acked
    assert state_of(app, first.headers["id"]) == states.REVOKED
    assert first.ack.called


def test_a_call_revoked_before_it_arrives_never_waits(
    app: Celery, worker: FakeWorker
) -> None:
    task = batch_task(app, flush_every=2)
    handler = worker.strategy(task)
    revoked, a, b = (make_message(app, task.s(n)) for n in range(3))
    worker_state.revoked.add(revoked.headers["id"])
    with recording(signals.task_received) as received:
        for message in (revoked, a, b):
            worker.deliver(handler, message)
    assert worker.pool.ids() == [[a.headers["id"], b.headers["id"]]]
    assert state_of(app, revoked.headers["id"]) == states.REVOKED
    assert revoked.headers["id"] not in [s["request"].id for s in received]


def test_a_call_that_expires_while_waiting_is_left_out_and_stored_as_revoked(
    app: Celery, worker: FakeWorker
) -> None:
    # given a call that expires in a second and one that never expires
    task = batch_task(app, flush_every=3)
    handler = worker.strategy(task)
    expires = utc_in(1.0)
    expiring = make_message(app, task.s(0).set(expires=expires))
    lasting = make_message(app, task.s(1))
    with recording(signals.task_received) as received:
        worker.deliver(handler, expiring)
        worker.deliver(handler, lasting)
    # (the expiring call was accepted: it had not expired on arrival)
    assert expiring.headers["id"] in [s["request"].id for s in received]
    # when its expiry passes before the interval flushes them
    deadline = time.monotonic() + 5
    while datetime.now(timezone.utc) <= expires and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.fire_interval()
    # then only the lasting call runs, and the expired one is REVOKED
    assert worker.pool.ids() == [[lasting.headers["id"]]]
    assert state_of(app, expiring.headers["id"]) == states.REVOKED
    assert expiring.ack.called


def test_a_call_expired_on_arrival_never_waits(app: Celery, worker: FakeWorker) -> None:
    task = batch_task(app, flush_every=2)
    handler = worker.strategy(task)
    expired = make_message(app, task.s(0).set(expires=utc_in(-60)))
    worker.deliver(handler, expired)
    assert worker.interval_entries() == []
    assert state_of(app, expired.headers["id"]) == states.REVOKED


# -- ETA ------------------------------------------------------------------------


def test_a_call_with_a_future_eta_is_held_until_its_timer_entry_fires(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task of two whose interval is longer than the ETA
    task = batch_task(app, flush_every=2, flush_interval=600)
    handler = worker.strategy(task)
    late = make_message(app, task.s("late").set(countdown=60))
    now = make_message(app, task.s("now"))
    # when a call with an ETA a minute away arrives
    worker.deliver(handler, late)
    # then it is held by a timer entry (the request is what `inspect
    # scheduled` reports), not buffered: no interval is armed for it
    (held,) = worker.eta_entries()
    assert held.args[0].id == late.headers["id"]
    assert worker.interval_entries() == []
    # and the prefetch window grows by one, as for Celery's own ETA tasks
    assert worker.qos.value == 5
    # when a call without ETA arrives, it does not make a batch with it
    worker.deliver(handler, now)
    assert worker.pool.batches == []
    # when the ETA comes
    worker.advance(61)
    # then the held call joins the buffer and completes the batch
    assert worker.pool.ids() == [[now.headers["id"], late.headers["id"]]]
    assert worker.eta_entries() == []
    assert worker.qos.value == 4


def with_eta(app: Celery, task: Any, protocol: str, eta: str) -> Any:
    message = make_message(app, task.s(1), protocol)
    fields = message.payload if protocol == "proto1" else message.headers
    if protocol == "hybrid":
        message.payload["eta"] = eta  # a hybrid body carries the ETA
    fields["eta"] = eta
    return message


def task_id_of(message: Any) -> str:
    return message.headers.get("id") or message.payload["id"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "protocol",
    ["proto1", "proto2", "hybrid"],
)
def test_an_unparseable_eta_is_an_invalid_message_stored_as_failure(
    app: Celery, worker: FakeWorker, protocol: str
) -> None:
    # given a call whose ETA is no date
    task = batch_task(app)
    handler = worker.strategy(task)
    message = with_eta(app, task, protocol, "not a date")
    # when it arrives, the strategy raises InvalidTaskError, which the
    # consumer turns into a reject
    with pytest.raises(InvalidTaskError, match="not a date"):
        worker.deliver(handler, message)
    # then FAILURE is stored and nothing waits for it
    assert state_of(app, task_id_of(message)) == states.FAILURE
    assert worker.timer.queue == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_eta_out_of_range_is_rejected_and_stored_as_failure(
    app: Celery, worker: FakeWorker, protocol: str
) -> None:
    # given a call whose ETA cannot be turned into a timestamp
    task = batch_task(app)
    handler = worker.strategy(task)
    message = with_eta(app, task, protocol, "9999-12-31T23:59:59-12:00")
    # when it arrives
    worker.deliver(handler, message)
    # then its message is rejected without requeue, FAILURE is stored with
    # the reason, and nothing waits for it
    assert message.reject.call_count == 1
    assert message.reject.call_args.args[-1] is False
    result = app.AsyncResult(task_id_of(message))
    assert result.state == states.FAILURE
    assert isinstance(result.result, OverflowError)
    assert worker.timer.queue == []
    assert worker.qos.value == 4


# -- malformed messages -------------------------------------------------------


def _body(protocol: str, *body: Any, **fields: Any) -> Any:
    """A message of ``protocol`` whose body is ``body``, or has ``fields`` changed."""

    def build(app: Celery, task: Any) -> Any:
        message = make_message(app, task.s(), protocol)
        if body:
            (message.payload,) = body
        else:
            message.payload.update(fields)
        return message

    return build


MALFORMED = {
    "proto2 empty body": _body("proto2", {}),
    "proto2 body a list of one": _body("proto2", [1]),
    "proto2 args a string": _body("proto2", ["abc", {}, {}]),
    "proto2 args a number": _body("proto2", [1, {}, {}]),
    "proto2 kwargs a list": _body("proto2", [[], [1], {}]),
    "proto1 args a string": _body("proto1", args="abc"),
    "proto1 kwargs a list": _body("proto1", kwargs=[1]),
    "hybrid args a string": _body("hybrid", args="abc"),
    "hybrid kwargs a list": _body("hybrid", kwargs=[1]),
}


@pytest.mark.parametrize("build", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_message_is_invalid_and_stored_as_failure(
    app: Celery, worker: FakeWorker, build: Any
) -> None:
    # given a message of a batch task whose body makes no call
    task = batch_task(app)
    handler = worker.strategy(task)
    message = build(app, task)
    task_id = task_id_of(message)
    # when it arrives, the strategy raises InvalidTaskError, which the
    # consumer turns into a reject (any other error would stop the worker)
    with recording(signals.task_received) as received, pytest.raises(InvalidTaskError):
        worker.deliver(handler, message)
    # then FAILURE is stored for its id and nothing waits or runs
    assert state_of(app, task_id) == states.FAILURE
    assert worker.timer.queue == []
    assert worker.pool.batches == []
    assert [s for s in received if s["request"].id == task_id] == []
    # and the next calls batch as usual
    for n in range(3):
        worker.deliver(handler, make_message(app, task.s(n)))
    assert len(worker.pool.batches) == 1


def test_a_malformed_message_without_an_id_is_invalid(
    app: Celery, worker: FakeWorker
) -> None:
    task = batch_task(app)
    handler = worker.strategy(task)
    message = make_message(app, task.s())
    message.headers = {"task": task.name}
    with pytest.raises(InvalidTaskError):
        worker.deliver(handler, message)
    assert worker.pool.batches == []


# -- batch keys -----------------------------------------------------------------


def test_batch_key_by_keyword_name_batches_each_value_apart(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task of two keyed by its `tenant` keyword
    task = batch_task(app, flush_every=2, batch_key="tenant")
    handler = worker.strategy(task)
    # when calls of three tenants arrive interleaved
    for n, tenant in enumerate("ababc"):
        worker.deliver(handler, make_message(app, task.s(n, tenant=tenant)))
    # then each tenant's calls fill their own batch
    tenants = [[r.kwargs["tenant"] for r in b] for b in worker.pool.batches]
    assert tenants == [["a", "a"], ["b", "b"]]
    # when the interval flushes the rest, with two tenants waiting
    worker.deliver(handler, make_message(app, task.s(5, tenant="d")))
    worker.fire_interval()
    # then every batch still holds a single tenant
    tenants = [[r.kwargs["tenant"] for r in b] for b in worker.pool.batches]
    assert sorted(tenants) == [["a", "a"], ["b", "b"], ["c"], ["d"]]


class Parity:
    """A batch key that is a callable object: the parity of the first argument."""

    def __init__(self) -> None:
        self.seen: list[SimpleRequest] = []

    def __call__(self, request: SimpleRequest) -> int:
        self.seen.append(request)
        return int(request.args[0]) % 2


def test_batch_key_callable_sees_the_request_and_batches_each_key_apart(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task of three keyed by the parity of its first argument
    parity = Parity()
    task = batch_task(app, flush_every=3, batch_key=parity)
    handler = worker.strategy(task)
    # when six calls arrive, three of each parity, interleaved, and a seventh
    for n in range(7):
        worker.deliver(handler, make_message(app, task.s(n)))
    # then the key saw each call as the body will see it
    assert [list(r.args) for r in parity.seen] == [[n] for n in range(7)]
    assert all(isinstance(r, SimpleRequest) for r in parity.seen)
    # and each batch holds one parity only
    assert [[r.args[0] for r in b] for b in worker.pool.batches] == [
        [0, 2, 4],
        [1, 3, 5],
    ]
    # when two keys wait as the interval comes due
    worker.deliver(handler, make_message(app, task.s(7)))
    worker.fire_interval()
    # then they still go in separate batches
    rest = sorted([r.args[0] for r in b] for b in worker.pool.batches[2:])
    assert rest == [[6], [7]]


def test_batch_key_may_be_a_plain_function(app: Celery, worker: FakeWorker) -> None:
    # given a batch task keyed by a plain function, the documented form
    def parity(request: SimpleRequest) -> int:
        return int(request.args[0]) % 2

    task = batch_task(app, flush_every=2, batch_key=parity)
    handler = worker.strategy(task)
    # when calls of both parities arrive
    for n in range(4):
        worker.deliver(handler, make_message(app, task.s(n)))
    # then each parity makes its own batch
    assert [[r.args[0] for r in b] for b in worker.pool.batches] == [[0, 2], [1, 3]]


class TenantOf:
    """A batch key (callable object) that needs a `tenant` keyword."""

    def __call__(self, request: SimpleRequest) -> str:
        return str(request.kwargs["tenant"])


def test_a_batch_key_that_raises_rejects_only_that_message(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task keyed by a keyword some calls lack
    task = batch_task(app, flush_every=2, batch_key=TenantOf())
    handler = worker.strategy(task)
    bad = make_message(app, task.s(0))
    # when a call without it arrives, it is refused like any invalid message
    # (InvalidTaskError, which the consumer rejects) or rejected outright
    try:
        worker.deliver(handler, bad)
    except InvalidTaskError:
        pass
    else:
        assert bad.reject.called
    # then it is stored as failed, and the next calls batch as usual
    assert state_of(app, bad.headers["id"]) == states.FAILURE
    worker.deliver(handler, make_message(app, task.s(1, tenant="a")))
    worker.deliver(handler, make_message(app, task.s(2, tenant="a")))
    assert len(worker.pool.batches) == 1


def test_a_worker_without_the_batches_step_is_warned(
    app: Celery, worker: FakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    # given a worker whose consumer lacks celery_batches.BatchesStep
    worker.consumer.blueprint.steps = {}
    task = batch_task(app)
    # when the task's strategy starts
    with caplog.at_level("WARNING", logger="celery_batches"):
        worker.strategy(task)
    # then a warning names the task whose buffer would not be flushed
    messages = [record.getMessage() for record in caplog.records]
    assert any(task.name in m and "BatchesStep" in m for m in messages)


def test_the_window_never_narrows_below_the_consumers_own(app: Celery) -> None:
    # given a worker whose window was widened for waiting calls, then reset
    # by Celery itself (5.7 does this while restoring prefetch after a
    # reconnect), which drops our widening
    worker = FakeWorker(app)
    worker.consumer.initial_prefetch_count = 4
    task = batch_task(app)
    handler = worker.strategy(task)
    worker.deliver(handler, make_message(app, task.s(1)))
    assert worker.qos.value == 4 + 2 * 3
    worker.qos.value = 4
    # when the waiting calls flush
    worker.fire_interval()
    # then the window is the consumer's own again, not one message
    assert worker.qos.value == 4
