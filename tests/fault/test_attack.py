"""Inputs found by attacking real workers, each of which broke a promise.

Each test is one defect the attack found: a message, a body or a setting
that crashed the worker, stranded a call, ran it twice, lost it or
mislabelled it, where ``docs/guarantees.rst`` promises otherwise. Each
failed before its fix.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from celery import Celery
from celery.utils.saferepr import saferepr
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from tests.harness.brokers import BROKERS, REDIS_BACKEND
from tests.harness.client import RawMessage
from tests.harness.journal import Failure, Postrun, Received
from tests.harness.servers import RedisServer
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers, start_worker
from tests.integration.test_monitoring import EventLog

pytestmark = pytest.mark.fault

#: The options part of a protocol 2 body, as Celery writes it.
EMBED = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'


def body_of(*args: Any, extra_kwargs: bytes = b"{}") -> bytes:
    """A protocol 2 body ``[args, kwargs, options]`` with raw JSON kwargs."""
    encoded = ", ".join(str(int(a)) for a in args)
    return b"[[" + encoded.encode() + b"], " + extra_kwargs + b", " + EMBED + b"]"


def call(
    worker: Worker, task: Any, task_id: Any, body: bytes = b"", **headers: Any
) -> RawMessage:
    """A raw call of ``task`` (body ``body_of(1)`` unless given), headers changed."""
    return RawMessage(body or body_of(1), worker.headers(task, task_id, **headers))


def readable_states(worker: Worker, ids: list[str]) -> list[str]:
    """The state of each of ``ids``, or the error reading it raised."""
    seen = []
    for task_id in ids:
        try:
            seen.append(worker.states([task_id])[0])
        # The point is to report what reading raised, whatever it was.
        except Exception as exc:
            seen.append(f"unreadable: {exc!r}")
    return seen


# -- 1. a task id that is not a string -----------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_task_id_that_cannot_be_hashed_is_rejected_as_poison(
    workers: Workers, broker: str
) -> None:
    # given a worker, and its queue holding good calls with a message whose
    # "id" header is a list between them
    worker = workers.start(broker, "prefork")
    collect = worker.tasks.collect
    good = [uuid() for _ in range(4)]
    worker.publish(
        call(worker, collect, good[0]),
        call(worker, collect, ["not", "an", "id"]),
        *(call(worker, collect, i) for i in good[1:]),
    )
    # when the worker has consumed them
    wait_for(
        lambda: worker.states(good) == ["SUCCESS"] * 4 or not worker.alive(),
        timeout=30,
        what="the good calls to succeed (or the worker to die)",
    )
    # then the worker is still running, the good calls ran once each, and
    # after a warm shutdown the poison message is not on the broker again
    # (rejected without requeue), so it cannot end the next worker too
    assert worker.alive(), worker.log()[-3000:]
    assert worker.states(good) == ["SUCCESS"] * 4
    assert worker.run_counts(good) == dict.fromkeys(good, 1)
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0


# -- 2. stamped_headers of the wrong shape -------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_stamped_headers_of_the_wrong_shape_are_poison_once_a_stamp_is_revoked(
    workers: Workers, broker: str
) -> None:
    # given a worker on which a stamp, unrelated to any call, is revoked (so
    # every buffered call's stamps are looked at when it is flushed)
    worker = workers.start(broker, "prefork")
    replies = worker.app.control.revoke_by_stamped_headers(
        {"attack": uuid()}, destination=[worker.node_name()], reply=True, timeout=10
    )
    assert replies, "the worker did not take the revoke"
    # when a batch of tests.collect (flush_every=5) is four good calls and a
    # call whose stamped_headers header is the number 5
    good = [uuid() for _ in range(4)]
    bad = uuid()
    collect = worker.tasks.collect
    worker.publish(
        *(call(worker, collect, i) for i in good[:2]),
        call(worker, collect, bad, stamped_headers=5),
        *(call(worker, collect, i) for i in good[2:]),
    )
    wait_for(
        lambda: worker.states(good) == ["SUCCESS"] * 4 or not worker.alive(),
        timeout=30,
        what="the good calls to succeed (or the worker to die)",
    )
    # then the worker is still running, the good calls ran once each, the
    # bad call was settled (not left unacked), and nothing is left on the
    # broker after a warm shutdown
    assert worker.alive(), worker.log()[-3000:]
    assert worker.run_counts(good) == dict.fromkeys(good, 1)
    wait_for(lambda: worker.states([bad]) != ["PENDING"], what="the bad call")
    assert worker.run_counts([bad])[bad] <= 1
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0


# -- 3. deeply nested JSON arguments on the prefork pool ---------------------------


def test_deeply_nested_arguments_fail_at_most_their_own_call(workers: Workers) -> None:
    # given a prefork worker, and a batch of tests.settles_all (flush_every=3)
    # of two good calls and one whose keyword argument is a JSON list nested
    # 600 deep: JSON decodes it, a plain Celery task runs it (the pool gets
    # its raw body), but it is deeper than pickle can go
    worker = workers.start("redis", "prefork")
    deep = b'{"deep": ' + b"[" * 600 + b"]" * 600 + b"}"
    good = [uuid(), uuid()]
    nested = uuid()
    settles_all = worker.tasks.settles_all
    worker.publish(
        call(worker, settles_all, good[0]),
        call(
            worker,
            settles_all,
            nested,
            body_of(0, extra_kwargs=deep),
            kwargsrepr="{}",
        ),
        call(worker, settles_all, good[1], body_of(2)),
    )
    # when the batch has been flushed
    wait_for(
        lambda: "PENDING" not in worker.states([*good, nested]),
        timeout=30,
        what="every call to be settled",
    )
    # then the good calls ran once each with their own results: as the
    # guarantees promise for a call whose arguments do not pickle, "the
    # rest of the batch runs"
    assert worker.states(good) == ["SUCCESS", "SUCCESS"], worker.results(good)
    assert worker.results(good) == [1, 2]
    assert worker.run_counts(good) == dict.fromkeys(good, 1)
    assert worker.alive()


# -- 4. a body that changes the list it was given ------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_body_that_pops_its_requests_still_acks_every_message(
    workers: Workers, broker: str
) -> None:
    # given a late-acked task whose body consumes its list, settling each
    # call with request = requests.pop(); request.mark_as_done(...)
    worker = workers.start(broker, "prefork")
    drain = worker.tasks.attack_drain
    ids = [drain.delay(n).id for n in range(3)]
    # when the batch has run and every call is stored as SUCCESS
    worker.wait_for_states(ids, ["SUCCESS"] * 3)
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    # then after a warm shutdown no message is left on the broker: each was
    # acked once its batch ended, as the guarantees promise for acks_late,
    # and no later worker runs the calls a second time
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0


def test_a_body_that_pops_its_requests_leaves_no_call_active(workers: Workers) -> None:
    # given an early-acked task whose body consumes its list, settling each
    # call with request = requests.pop(); request.mark_as_done(...)
    worker = workers.start("redis", "prefork")
    drain = worker.tasks.attack_drain_early
    ids = [drain.delay(n).id for n in range(3)]
    # when the batch has run and every call is stored as SUCCESS
    worker.wait_for_states(ids, ["SUCCESS"] * 3)
    node = worker.node_name()

    def active() -> list[str] | None:
        inspect = worker.app.control.inspect(destination=[node], timeout=2)
        replies = inspect.active()
        if not replies:
            return None
        return [request["id"] for request in replies[node]]

    # then the worker no longer counts them as running: its state forgets
    # each call once its batch has ended
    wait_for(lambda: active() == [], timeout=10, what="no active calls")


def test_a_body_that_sorts_its_requests_settles_each_message_by_its_own_outcome(
    workers: Workers,
) -> None:
    # given a late-acked per_request_results task whose body sorts its list
    # in place (largest first) and answers in that order, the call of 0
    # asking to be delivered again once (Reject(requeue=True) as its value)
    worker = workers.start("redis", "prefork")
    task = worker.tasks.attack_sorted
    ids = [task.delay(n).id for n in range(3)]
    # when the batch of three has run, and the requeued call again
    worker.wait_for_states(ids, ["SUCCESS"] * 3, timeout=20)
    # then the call of 0 ran twice (it was requeued) and the others once
    assert worker.run_counts(ids) == {ids[0]: 2, ids[1]: 1, ids[2]: 1}
    assert worker.results(ids) == [0, 1, 2]


# -- 5. a retries header that is not a number ----------------------------------


def test_a_retries_header_that_is_not_a_number_fails_only_its_call(
    workers: Workers,
) -> None:
    # given a batch of three calls of a task whose body retries the whole
    # batch on a first run (raise self.retry(countdown=0.2)), the middle one
    # carrying retries="abc"
    worker = workers.start("redis", "prefork")
    first, bad, last = uuid(), uuid(), uuid()
    task = worker.tasks.attack_retry_all
    worker.publish(
        call(worker, task, first),
        call(worker, task, bad, body_of(2), retries="abc"),
        call(worker, task, last, body_of(3)),
    )
    # when the batch has run and the retries have come back
    worker.wait_for_states([first, bad, last], ["SUCCESS", "FAILURE", "SUCCESS"])
    # then only the bad call failed; the good ones were retried and
    # succeeded on their retry, and task_failure never fired for them
    assert worker.run_counts([first, last]) == {first: 2, last: 2}
    assert not {first, last} & set(worker.journal.ids(Failure))


# -- 6. a batch key that cannot be compared ------------------------------------


def test_a_batch_key_that_cannot_be_compared_fails_only_its_calls(
    workers: Workers,
) -> None:
    # given a keyed task whose batch_key returns, for calls marked touchy, a
    # key that hashes like every other such key and whose == raises (as a
    # key wrapping an array does)
    worker = workers.start("redis", "prefork")
    task = worker.tasks.attack_touchy
    good = [task.delay(tenant="a") for _ in range(3)]
    touchy = [task.delay(tenant=t, touchy=True) for t in ("x", "y")]
    good += [task.delay(tenant="b") for _ in range(3)]
    good_ids = [r.id for r in good]
    touchy_ids = [r.id for r in touchy]
    # when the worker has consumed them
    wait_for(
        lambda: worker.states(good_ids) == ["SUCCESS"] * 6 or not worker.alive(),
        timeout=30,
        what="the good calls to succeed (or the worker to die)",
    )
    # then the worker is still running, the good calls ran once each, and
    # the touchy calls were settled one way or the other
    assert worker.alive(), worker.log()[-3000:]
    assert worker.run_counts(good_ids) == dict.fromkeys(good_ids, 1)
    wait_for(
        lambda: "PENDING" not in worker.states(touchy_ids), what="the touchy calls"
    )
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0


# -- 7. retry() with a reason or an ETA given as strings -----------------------


@pytest.mark.parametrize("how", ["exc", "eta"])
def test_a_retry_with_string_arguments_retries_each_call_once(
    workers: Workers, how: str
) -> None:
    # given a batch of two calls whose body retries each on its first run
    # as Celery's Task.retry allows: with exc="busy, try later", or with an
    # ETA given as an ISO 8601 string
    worker = workers.start("redis", "prefork")
    task = worker.tasks.attack_retry_odd
    ids = [task.delay(n, how=how).id for n in range(2)]
    # when the retries have run
    try:
        wait_for(
            lambda: readable_states(worker, ids) == ["SUCCESS"] * 2,
            timeout=20,
            what="both calls to succeed on their retry",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; now {readable_states(worker, ids)}") from None
    # then each call ran twice, its result is its retry count, and it was
    # never reported as failed
    assert worker.run_counts(ids) == dict.fromkeys(ids, 2)
    assert worker.results(ids) == [1, 1]
    assert not set(ids) & set(worker.journal.ids(Failure))


# -- 8. a poison ETA sends task_received ----------------------------------------


def test_an_eta_too_far_to_convert_is_rejected_without_a_signal(
    workers: Workers,
) -> None:
    # given a worker, and a message whose ETA is past year 9999 in UTC
    worker = workers.start("redis", "prefork")
    bad = uuid()
    eta = "9999-12-31T23:59:59-14:00"
    good = uuid()
    worker.publish(
        call(worker, worker.tasks.collect, bad, eta=eta),
        call(worker, worker.tasks.collect, good),
    )
    # when the worker has consumed it and a good call after it
    worker.wait_for_states([bad, good], ["FAILURE", "SUCCESS"])
    # then the poison message was stored as FAILURE with the OverflowError
    # and, as the guarantees say of a poison message, "no signal is sent"
    assert isinstance(worker.results([bad])[0], OverflowError)
    assert good in worker.journal.ids(Received)
    assert bad not in worker.journal.ids(Received)


# -- 9. a compressed body that does not decompress --------------------------------


@pytest.mark.parametrize(
    "compression", ["application/x-gzip", "application/x-celery-batches-unknown"]
)
def test_a_body_that_does_not_decompress_is_stored_as_failure(
    workers: Workers, compression: str
) -> None:
    # given a worker, and a message whose compression header names gzip
    # over a body that is not gzip (or a compression no one knows)
    worker = workers.start("redis", "prefork")
    bad, good = uuid(), uuid()
    collect = worker.tasks.collect
    worker.publish(
        call(worker, collect, bad, b"not compressed", compression=compression),
        call(worker, collect, good),
    )
    # when the worker has consumed it and a good call after it
    worker.wait_for_states([good], ["SUCCESS"])
    # then, as for every poison message that carries its task id, FAILURE is
    # stored for it, and it is not on the broker any more
    worker.wait_for_states([bad], ["FAILURE"], timeout=5)
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0


# -- 10. calls held for their ETA stall the worker ------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_calls_held_for_their_eta_do_not_stop_the_worker_receiving(
    workers: Workers, broker: str
) -> None:
    # given a worker of two processes (Celery's window: 8 messages) that may
    # not widen it for batches (batches_prefetch_limit=0, "never widen"),
    # and 8 batch calls sent to run in an hour
    worker = workers.start(broker, "prefork", conf={"batches_prefetch_limit": 0})
    collect = worker.tasks.collect
    held = [collect.apply_async((n,), countdown=3600).id for n in range(8)]
    wait_for(
        lambda: set(held) <= set(worker.journal.ids(Received)),
        what="the held calls to be received",
    )
    try:
        # when a batch call and a plain task are sent for now
        now = collect.delay(5)
        plain = worker.tasks.total.delay([1, 2])
        # then both run within seconds, as they would next to plain ETA
        # tasks (Celery widens its window by one for each): the held calls
        # wait in memory, not in the way of every other message
        worker.wait_for_states([now.id, plain.id], ["SUCCESS"] * 2, timeout=20)
        assert [now.result, plain.result] == [5, 3]
    finally:
        # A warm shutdown gives the held calls back to the queue, which the
        # fixture deletes: none is left in the shared server's unacked index.
        worker.exit()


# -- 11. a batch key whose repr raises -------------------------------------------


class Unprintable:
    """A batch key that hashes and compares, but whose repr raises."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def __hash__(self) -> int:
        return hash(self.tenant)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unprintable) and other.tenant == self.tenant

    def __repr__(self) -> str:
        raise RuntimeError("not printable")


def unprintable_odd_tenant(request: SimpleRequest) -> object:
    """Batch key: the call's tenant, an :class:`Unprintable` for tenant "odd"."""
    tenant = request.kwargs["tenant"]
    return Unprintable(tenant) if tenant == "odd" else tenant


def test_inspect_batches_answers_while_a_key_cannot_be_printed() -> None:
    # given a worker holding calls of a task keyed by an object whose repr
    # raises (batch_key may return any hashable), and calls of a plain key
    app = Celery("attack.unprintable", set_as_current=False)

    @app.task(
        base=Batches,
        name="attack.unprintable",
        flush_every=50,
        flush_interval=60,
        batch_key=unprintable_odd_tenant,
        shared=False,
    )
    def unprintable(requests: list[SimpleRequest]) -> None:
        pass

    try:
        with start_worker(
            app=app, pool="solo", batch_options={"flush_interval": 60}
        ) as worker:
            unprintable.delay(tenant="odd")
            unprintable.delay(tenant="even")

            def report() -> dict[str, Any] | None:
                replies = app.control.broadcast("batches", reply=True, timeout=1)
                for reply in replies or []:
                    (state,) = reply.values()
                    waiting = state.get("tasks", {}).get("attack.unprintable", {})
                    if waiting.get("waiting") == 2:
                        return state  # type: ignore[no-any-return]
                return None

            # when asked what it holds (celery inspect batches)
            state = wait_for(report, timeout=10, what="an answer counting both calls")
            assert worker.flushes() == []
    finally:
        app.close()
    assert state is not None
    # then it answers, showing each key; the one that cannot be printed as
    # a placeholder naming its type, as the reply has to carry something
    keys = [entry["key"] for entry in state["tasks"]["attack.unprintable"]["keys"]]
    assert "even" in keys
    (odd,) = [key for key in keys if key != "even"]
    assert isinstance(odd, str) and "Unprintable" in odd


# -- 12. arguments hidden with argsrepr ---------------------------------------


class Keeping(logging.Handler):
    """A log handler that keeps every record it is given."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_calls_log_lines_keep_arguments_hidden_with_argsrepr() -> None:
    # given a worker running a per_request_results task, and a handler on
    # celery_batches.calls as an error tracker's logging integration has
    app = Celery("attack.hidden", set_as_current=False)

    @app.task(
        base=Batches,
        name="attack.hidden",
        flush_every=2,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def hidden(requests: list[SimpleRequest]) -> list[Any]:
        return [ValueError("no") if r.kwargs.get("fail") else 1 for r in requests]

    handler = Keeping(logging.INFO)
    records = handler.records
    calls_logger = logging.getLogger("celery_batches.calls")
    level = calls_logger.level
    calls_logger.addHandler(handler)
    calls_logger.setLevel(logging.INFO)
    try:
        with start_worker(app=app, pool="solo"):
            # when two calls are sent with their secrets hidden as Celery
            # documents it, with argsrepr and kwargsrepr; one of them fails
            results = [
                hidden.apply_async(
                    ("hunter2",),
                    {"token": "hunter2", "fail": fail},
                    argsrepr="('<hidden>',)",
                    kwargsrepr="{'token': '<hidden>'}",
                )
                for fail in (False, True)
            ]
            wait_for(
                lambda: [r.state for r in results] == ["SUCCESS", "FAILURE"],
                what="one call to succeed and one to fail",
            )
            wait_for(lambda: len(records) >= 2, what="both calls' log lines")
    finally:
        calls_logger.removeHandler(handler)
        calls_logger.setLevel(level)
        app.close()
    # then, as in a plain task's lines, each call's line carries the
    # argsrepr and kwargsrepr it was sent with, never the secret
    data = [record.__dict__["data"] for record in records]
    assert [(d["args"], d["kwargs"]) for d in data] == [
        ("('<hidden>',)", "{'token': '<hidden>'}")
    ] * 2
    assert not [d for d in data if "hunter2" in repr(d)]


# -- 13. a retry whose reason cannot be printed --------------------------------


class Grumpy(Exception):
    """An exception whose ``__str__`` raises (it formats an attribute it lacks)."""

    def __str__(self) -> str:
        raise AttributeError("Grumpy has no attribute 'detail'")


def test_a_retry_whose_reason_cannot_be_printed_retries_every_call() -> None:
    # given a worker running a task whose body retries the whole batch on
    # its first run, for a reason whose str() raises
    app = Celery("attack.grumpy", set_as_current=False)
    runs: list[str] = []

    @app.task(
        base=Batches,
        name="attack.grumpy",
        bind=True,
        flush_every=3,
        flush_interval=0.3,
        max_retries=3,
        shared=False,
    )
    def grumpy(self: Batches, requests: list[SimpleRequest]) -> None:
        runs.extend(r.id for r in requests)
        if any(not r.request_dict.get("retries") for r in requests):
            raise self.retry(exc=Grumpy(), countdown=0.1)
        for r in requests:
            r.mark_as_done(r.args[0])

    try:
        with start_worker(app=app, pool="solo"):
            # when a batch of three calls has run, and their retries
            results = [grumpy.delay(n) for n in range(3)]
            wait_for(
                lambda: all(r.state in ("SUCCESS", "FAILURE") for r in results),
                what="every call to be settled",
            )
            states = [r.state for r in results]
            values = [r.result for r in results]
    finally:
        app.close()
    # then every call was retried, ran twice and succeeded: how the reason
    # prints (it is only logged) does not decide what happens to a call
    assert states == ["SUCCESS"] * 3, values
    assert values == [0, 1, 2]
    assert sorted(runs) == sorted([r.id for r in results] * 2)


# -- 14. a large result in every call's outcome --------------------------------


class SucceededLog(EventLog):
    """The ``result`` of each ``task-succeeded`` event, by task id."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.results: dict[str, Any] = {}

    def __enter__(self) -> SucceededLog:
        super().__enter__()
        return self

    def on_event(self, event: dict[str, Any]) -> None:
        super().on_event(event)
        if event["type"] == "task-succeeded":
            with self.lock:
                self.results[event["uuid"]] = event["result"]


def test_a_large_result_reaches_the_worker_shortened_as_celery_shortens_it(
    workers: Workers,
) -> None:
    # given a worker sending task events, and a per_request_results task
    # whose calls each return their argument
    worker = workers.start("memory", "solo", conf={"worker_send_task_events": True})
    late = worker.tasks.late
    with SucceededLog(worker) as log:
        # when a batch of calls each returns 200,000 characters
        ids = [late.delay("x" * 200_000).id for _ in range(5)]
        worker.wait_for_states(ids, ["SUCCESS"] * 5)
        wait_for(lambda: set(ids) <= set(log.results), what="task-succeeded events")
    # then the results are stored whole, but what goes back from the pool
    # to the worker, and on to every monitor in task-succeeded, is the
    # result's repr cut to resultrepr_maxsize (1024), as a plain task's is
    assert [len(value) for value in worker.results(ids)] == [200_000] * 5
    assert {log.results[i] for i in ids} == {saferepr("x" * 200_000, 1024)}


# -- 15. the flush line of a key that is huge or cannot be printed -------------


def test_the_flush_line_of_any_key_is_printable_and_bounded() -> None:
    # given a worker logging its flushes, running a task keyed by what its
    # calls were sent with: a 100,000-character tenant, or an object whose
    # repr raises
    app = Celery("attack.flushline", set_as_current=False)

    @app.task(
        base=Batches,
        name="attack.flushline",
        flush_every=2,
        flush_interval=0.3,
        batch_key=unprintable_odd_tenant,
        shared=False,
    )
    def flushline(requests: list[SimpleRequest]) -> None:
        pass

    handler = Keeping(logging.INFO)
    collector_logger = logging.getLogger("celery_batches.collector")
    level = collector_logger.level
    collector_logger.addHandler(handler)
    collector_logger.setLevel(logging.INFO)
    try:
        with start_worker(app=app, pool="solo"):
            # when a batch of each key has been flushed
            for tenant in ("odd", "y" * 100_000):
                flushline.delay(tenant=tenant)
                flushline.delay(tenant=tenant)
            wait_for(lambda: len(flush_lines(handler)) == 2, what="two flush lines")
    finally:
        collector_logger.removeHandler(handler)
        collector_logger.setLevel(level)
        app.close()
    # then every batch's INFO line can be formatted and stays short,
    # whatever key the calls' senders chose
    lines = [record.getMessage() for record in flush_lines(handler)]
    assert max(len(line) for line in lines) < 2048


def flush_lines(handler: Keeping) -> list[logging.LogRecord]:
    """The records of the flush line (one per batch) ``handler`` kept."""
    return [r for r in handler.records if str(r.msg).startswith("Flushed a batch")]


# -- 16. a flush hook that raises after handing its batch over -----------------


class Audited(Batches):
    """Counts each batch after handing it over, with a counter that fails."""

    abstract = True

    def flush(self, requests: list[Any]) -> Any:
        handed = super().flush(requests)
        self.count_batch(len(requests))
        return handed

    def count_batch(self, size: int) -> None:
        raise ConnectionError("the metrics server is down")


def test_a_flush_hook_that_raises_after_super_does_not_fail_calls_that_ran() -> None:
    # given a worker running a task whose flush hook hands each batch over
    # (super().flush) and then raises, and an errback on each call
    app = Celery("attack.audited", set_as_current=False)
    runs: list[str] = []
    errbacks: list[str] = []

    @app.task(
        base=Audited,
        name="attack.audited",
        flush_every=2,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def audited(requests: list[SimpleRequest]) -> list[Any]:
        runs.extend(r.id for r in requests)
        return [r.args[0] for r in requests]

    @app.task(name="attack.errback", shared=False)
    def errback(task_id: str) -> None:
        errbacks.append(task_id)

    try:
        with start_worker(app=app, pool="solo"):
            # when a batch of two calls is flushed
            results = [
                audited.apply_async((n,), link_error=errback.s()) for n in range(2)
            ]
            wait_for(lambda: len(runs) == 2, what="the batch to run")
            sentinel = errback.delay("sentinel")
            wait_for(lambda: "sentinel" in errbacks, what="the errback task to run")
            states = [r.state for r in results]
            values = [r.result for r in results]
            assert sentinel.state == "SUCCESS"
    finally:
        app.close()
    # then the calls, which ran once each and succeeded, are not also
    # failed by the hook's error: no errback fires for them and SUCCESS
    # stands (the hook fails only the calls it did not hand over)
    assert sorted(runs) == sorted(r.id for r in results)
    assert states == ["SUCCESS", "SUCCESS"], values
    assert errbacks == ["sentinel"]


# -- 17. on_success before the result is stored --------------------------------


class Announcing(Batches):
    """Reads each call's stored state from its own on_success and after_return."""

    abstract = True
    seen: ClassVar[list[tuple[str, str]]] = []

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self.seen.append(("on_success", self.AsyncResult(task_id).state))

    def after_return(self, status: str, retval: Any, task_id: str, *rest: Any) -> None:
        self.seen.append(("after_return", self.AsyncResult(task_id).state))


def test_on_success_runs_once_the_calls_result_is_stored() -> None:
    # given a worker with a Redis result backend (results stored in bulk)
    # running a task whose on_success and after_return read the call's
    # stored state, as a handler announcing "result ready" would
    app = Celery("attack.announcing", set_as_current=False)
    Announcing.seen = []

    @app.task(
        base=Announcing,
        name="attack.announcing",
        flush_every=2,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def announcing(requests: list[SimpleRequest]) -> list[Any]:
        return [r.args[0] for r in requests]

    try:
        with start_worker(
            "memory", "solo", app=app, urls=(BROKERS["memory"][0], REDIS_BACKEND)
        ):
            # when a batch of two calls succeeds
            results = [announcing.delay(n) for n in range(2)]
            wait_for(lambda: len(Announcing.seen) == 4, what="four handler calls")
            assert [r.get(timeout=10) for r in results] == [0, 1]
    finally:
        app.close()
    # then, as the handlers section promises ("on_success ... once its
    # result is stored"), each handler finds its call's result stored
    assert (
        Announcing.seen
        == [
            ("on_success", "SUCCESS"),
            ("after_return", "SUCCESS"),
        ]
        * 2
    )


# -- 18. the 0.11 way of storing results, with extended results ----------------


def test_the_0_11_way_of_storing_results_works_with_extended_results() -> None:
    # given a worker with result_extended on, running a task that stores
    # each call's result the 0.11 way, passing the request to the backend
    # as docs/examples/migration.py does ("so that rpc://, chords and
    # extended results work")
    app = Celery("attack.extended", set_as_current=False)

    @app.task(base=Batches, name="attack.extended", flush_every=2, shared=False)
    def square(requests: list[SimpleRequest]) -> None:
        for request in requests:
            app.backend.mark_as_done(request.id, request.args[0] ** 2, request=request)

    try:
        with start_worker(
            "memory",
            "solo",
            app=app,
            conf={"result_extended": True},
            urls=(BROKERS["memory"][0], REDIS_BACKEND),
            batch_options={"flush_interval": 0.3},
        ):
            # when a batch of two calls has run
            results = [square.delay(n) for n in (3, 4)]
            wait_for(
                lambda: all(r.state != "PENDING" for r in results),
                what="both calls to be stored",
            )
            stored = [(r.state, r.result, r.name) for r in results]
    finally:
        app.close()
    # then each result is stored, with the task's name as extended results
    # record it
    assert stored == [
        ("SUCCESS", 9, "attack.extended"),
        ("SUCCESS", 16, "attack.extended"),
    ]


# -- 19. a body that consumes its list and answers by id -----------------------


def test_a_body_that_pops_its_requests_and_answers_by_id_settles_each_call() -> None:
    # given a per_request_results task whose body consumes the list it is
    # given (request = requests.pop()) and answers with a mapping of
    # request.id to value, the shape per-request.rst offers "for when
    # building the answers in order is awkward"
    app = Celery("attack.byid", set_as_current=False)

    @app.task(
        base=Batches,
        name="attack.byid",
        flush_every=3,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def by_id(requests: list[SimpleRequest]) -> dict[str, Any]:
        answers = {}
        while requests:
            request = requests.pop()
            answers[request.id] = request.args[0] * 2
        return answers

    try:
        with start_worker(app=app, pool="solo"):
            # when a batch of three calls has run
            results = [by_id.delay(n) for n in range(3)]
            wait_for(
                lambda: all(r.state != "PENDING" for r in results),
                what="every call to be settled",
            )
            settled = [(r.state, r.result) for r in results]
    finally:
        app.close()
    # then each call has the value the mapping gave its id: the ids are the
    # batch's, whatever the body did to its list
    assert settled == [("SUCCESS", 0), ("SUCCESS", 2), ("SUCCESS", 4)]


# -- 20. a body that does not decompress, under a task header that is a list ----


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_body_that_does_not_decompress_under_an_odd_task_header_is_dropped(
    workers: Workers, broker: str
) -> None:
    # given a worker, and a message whose body does not decompress and
    # whose task header is a list (Kombu hands such a message to the task
    # consumer's decode-error handler before any strategy sees it)
    worker = workers.start(broker, "solo")
    collect = worker.tasks.collect
    bad, good = uuid(), uuid()
    headers = worker.headers(collect, bad, compression="application/x-gzip")
    headers["task"] = [collect.name]
    worker.publish(RawMessage(b"not compressed", headers), call(worker, collect, good))
    # when the worker has consumed it and a good call after it
    wait_for(
        lambda: worker.states([good]) == ["SUCCESS"] or not worker.alive(),
        timeout=30,
        what="the good call to succeed (or the worker to die)",
    )
    # then the worker is still running, as it is after any other poison
    # message, the good call ran, and the bad message is not on the broker
    assert worker.alive(), worker.log()[-3000:]
    assert worker.states([good]) == ["SUCCESS"]
    assert worker.exit() == 0, worker.log()[-3000:]
    assert worker.queue_depth() == 0


# -- 21. a flush hook that leaves calls out of the batch -----------------------


class Filtering(Batches):
    """Hands over each batch without its calls of 1 (a dedupe, say)."""

    abstract = True

    def flush(self, requests: list[Any]) -> Any:
        return super().flush([r for r in requests if r.args[0] != 1])


def test_a_call_a_flush_hook_leaves_out_is_settled_not_stranded() -> None:
    # given a worker running a task whose flush hook hands each batch over
    # without some of its calls, as the hook's docs allow ("see or change
    # each batch before it runs")
    app = Celery("attack.filtering", set_as_current=False)

    @app.task(
        base=Filtering,
        name="attack.filtering",
        flush_every=2,
        flush_interval=0.3,
        per_request_results=True,
        shared=False,
    )
    def filtering(requests: list[SimpleRequest]) -> list[Any]:
        return [r.args[0] for r in requests]

    def reserved() -> list[str]:
        replies = app.control.inspect(timeout=1).reserved() or {}
        return [call["id"] for calls in replies.values() for call in calls]

    try:
        with start_worker(app=app, pool="solo"):
            # when a batch of a call the hook keeps and one it leaves out runs
            kept, left = (filtering.delay(n) for n in (0, 1))
            wait_for(lambda: kept.state == "SUCCESS", what="the kept call to run")
            # then the call left out does not wait unacked in the worker for
            # ever: it is settled (FAILURE, naming the hook) and no longer
            # reserved, as a call a raising hook does not hand over is
            wait_for(lambda: left.state != "PENDING", timeout=5, what="the left call")
            assert left.state == "FAILURE"
            assert "flush" in str(left.result)
            assert left.id not in reserved()
    finally:
        app.close()


# -- a result backend that ran out of memory for a while ------------------------


def test_a_backend_out_of_memory_for_a_while_keeps_the_script_afterwards(
    workers: Workers, own_redis: RedisServer
) -> None:
    # given a worker whose results go to a Redis server of our own, which
    # runs out of memory (maxmemory reached, noeviction) while a batch is
    # stored: the script is refused, and so is everything else
    worker = workers.start(
        "rabbitmq", "solo", urls=(BROKERS["rabbitmq"][0], own_redis.url(2))
    )
    task = worker.tasks.collect
    admin = own_redis.client()
    before: dict[Any, Any] = dict(admin.config_get("maxmemory*"))
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        starved = [task.delay(n) for n in range(3)]
        wait_for(
            lambda: (
                all(worker.runs(r.id) == 1 for r in starved)
                and _postruns(worker, task.name) >= 1
            ),
            what="the batch stored while out of memory",
        )
    finally:
        for name in ("maxmemory", "maxmemory-policy"):
            admin.config_set(name, before[name])
    assert worker.states([r.id for r in starved]) == ["PENDING"] * 3
    # when memory is freed and the next batch is stored
    admin.config_resetstat()
    fed = [task.delay(n) for n in range(3)]
    # then its results are stored by the script again, not by the MGET and
    # pipeline of a server that refuses scripts for good
    assert [r.get(timeout=20) for r in fed] == [0, 1, 2]
    stats = admin.info("commandstats")
    assert stats.get("cmdstat_evalsha", {}).get("calls", 0) >= 1, stats
    assert "cmdstat_mget" not in stats, stats


def _postruns(worker: Worker, name: str) -> int:
    return sum(r.task == name for r in worker.journal.records(Postrun))
