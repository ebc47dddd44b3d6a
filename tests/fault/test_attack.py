"""Inputs found by attacking real workers, each of which broke a promise.

Each test is one defect the attack found: a message, a body or a setting
that crashed the worker, stranded a call, ran it twice, lost it or
mislabelled it, where ``docs/guarantees.rst`` promises otherwise. Each
failed before its fix.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from tests.conftest import Worker, wait_for
from tests.fault.conftest import Spawn, exit_code, queue_depth, run_counts, states

pytestmark = pytest.mark.fault

#: The options part of a protocol 2 body, as Celery writes it.
EMBED = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'


def alive(worker: Worker) -> bool:
    """Whether the worker runs and has not met an error that ends it.

    A worker that meets an unrecoverable error may take half a minute to
    exit (it waits for its pool), consuming nothing meanwhile.
    """
    running = worker.process is None or worker.process.poll() is None
    return running and "Unrecoverable error" not in worker.log()


def node_name(worker: Worker) -> str:
    """The node name the worker reported when it became ready."""
    found = re.search(r"(\S+@\S+) ready\.", worker.log())
    assert found is not None, worker.log()
    return found.group(1)


def task_headers(
    worker: Worker, task: str, task_id: Any, **changes: Any
) -> dict[str, Any]:
    """Protocol 2 headers of a call of ``task``, as Celery writes them, changed."""
    message = worker.app.amqp.as_task_v2(uuid(), task, args=(1,), kwargs={})
    headers = dict(message.headers)
    headers["id"] = task_id
    headers.update(changes)
    return headers


def publish_raw(worker: Worker, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Publish ``(body, headers)`` messages in order, on one connection."""
    with worker.app.connection_for_write() as conn:
        producer = conn.Producer()
        for body, headers in messages:
            producer.publish(
                body,
                exchange="",
                routing_key=worker.queue,
                headers=headers,
                content_type="application/json",
                content_encoding="utf-8",
                retry=True,
            )


def body_of(*args: Any, extra_kwargs: bytes = b"{}") -> bytes:
    """A protocol 2 body ``[args, kwargs, options]`` with raw JSON kwargs."""
    encoded = ", ".join(str(int(a)) for a in args)
    return b"[[" + encoded.encode() + b"], " + extra_kwargs + b", " + EMBED + b"]"


def readable_states(worker: Worker, ids: list[str]) -> list[str]:
    """The state of each of ``ids``, or the error reading it raised."""
    seen = []
    for task_id in ids:
        try:
            seen.append(AsyncResult(task_id, app=worker.app).state)
        except Exception as exc:
            seen.append(f"unreadable: {exc!r}")
    return seen


def wait_for_states(
    worker: Worker, ids: list[str], expected: list[str], timeout: float = 30
) -> None:
    """Wait until ``ids`` have the ``expected`` states; fail naming the states seen."""
    try:
        wait_for(
            lambda: states(worker, ids) == expected,
            timeout=timeout,
            what=f"states {expected}",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; states now {states(worker, ids)}") from None


# -- 1. a task id that is not a string -----------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_task_id_that_cannot_be_hashed_is_rejected_as_poison(
    spawn: Spawn, broker: str
) -> None:
    # given a worker, and its queue holding good calls with a message whose
    # "id" header is a list between them
    worker = spawn(broker, "prefork")
    good = [uuid() for _ in range(4)]
    publish_raw(
        worker,
        [
            (body_of(1), task_headers(worker, "tests.collect", good[0])),
            (body_of(1), task_headers(worker, "tests.collect", ["not", "an", "id"])),
            *((body_of(1), task_headers(worker, "tests.collect", i)) for i in good[1:]),
        ],
    )
    # when the worker has consumed them
    wait_for(
        lambda: states(worker, good) == ["SUCCESS"] * 4 or not alive(worker),
        timeout=30,
        what="the good calls to succeed (or the worker to die)",
    )
    # then the worker is still running, the good calls ran once each, and
    # after a warm shutdown the poison message is not on the broker again
    # (rejected without requeue), so it cannot end the next worker too
    assert alive(worker), worker.log()[-3000:]
    assert states(worker, good) == ["SUCCESS"] * 4
    assert run_counts(worker, good) == dict.fromkeys(good, 1)
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0


# -- 2. stamped_headers of the wrong shape -------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_stamped_headers_of_the_wrong_shape_are_poison_once_a_stamp_is_revoked(
    spawn: Spawn, broker: str
) -> None:
    # given a worker on which a stamp, unrelated to any call, is revoked (so
    # every buffered call's stamps are looked at when it is flushed)
    worker = spawn(broker, "prefork")
    replies = worker.app.control.revoke_by_stamped_headers(
        {"attack": uuid()}, destination=[node_name(worker)], reply=True, timeout=10
    )
    assert replies, "the worker did not take the revoke"
    # when a batch of tests.collect (flush_every=5) is four good calls and a
    # call whose stamped_headers header is the number 5
    good = [uuid() for _ in range(4)]
    bad = uuid()
    publish_raw(
        worker,
        [
            *((body_of(1), task_headers(worker, "tests.collect", i)) for i in good[:2]),
            (body_of(1), task_headers(worker, "tests.collect", bad, stamped_headers=5)),
            *((body_of(1), task_headers(worker, "tests.collect", i)) for i in good[2:]),
        ],
    )
    wait_for(
        lambda: states(worker, good) == ["SUCCESS"] * 4 or not alive(worker),
        timeout=30,
        what="the good calls to succeed (or the worker to die)",
    )
    # then the worker is still running, the good calls ran once each, the
    # bad call was settled (not left unacked), and nothing is left on the
    # broker after a warm shutdown
    assert alive(worker), worker.log()[-3000:]
    assert run_counts(worker, good) == dict.fromkeys(good, 1)
    wait_for(lambda: states(worker, [bad]) != ["PENDING"], what="the bad call")
    assert run_counts(worker, [bad])[bad] <= 1
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0


# -- 3. deeply nested JSON arguments on the prefork pool ---------------------------


def test_deeply_nested_arguments_fail_at_most_their_own_call(spawn: Spawn) -> None:
    # given a prefork worker, and a batch of tests.settles_all (flush_every=3)
    # of two good calls and one whose keyword argument is a JSON list nested
    # 600 deep: JSON decodes it, a plain Celery task runs it (the pool gets
    # its raw body), but it is deeper than pickle can go
    worker = spawn("redis", "prefork")
    deep = b'{"deep": ' + b"[" * 600 + b"]" * 600 + b"}"
    good = [uuid(), uuid()]
    nested = uuid()
    publish_raw(
        worker,
        [
            (body_of(1), task_headers(worker, "tests.settles_all", good[0])),
            (
                body_of(0, extra_kwargs=deep),
                task_headers(worker, "tests.settles_all", nested, kwargsrepr="{}"),
            ),
            (body_of(2), task_headers(worker, "tests.settles_all", good[1])),
        ],
    )
    # when the batch has been flushed
    wait_for(
        lambda: "PENDING" not in states(worker, [*good, nested]),
        timeout=30,
        what="every call to be settled",
    )
    # then the good calls ran once each with their own results: as the
    # guarantees promise for a call whose arguments do not pickle, "the
    # rest of the batch runs"
    assert states(worker, good) == ["SUCCESS", "SUCCESS"], [
        AsyncResult(i, app=worker.app).result for i in good
    ]
    assert [AsyncResult(i, app=worker.app).result for i in good] == [1, 2]
    assert run_counts(worker, good) == dict.fromkeys(good, 1)
    assert alive(worker)


# -- 4. a body that changes the list it was given ------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_body_that_pops_its_requests_still_acks_every_message(
    spawn: Spawn, broker: str
) -> None:
    # given a late-acked task whose body consumes its list, settling each
    # call with request = requests.pop(); request.mark_as_done(...)
    worker = spawn(broker, "prefork")
    drain = worker.app.tasks["tests.attack_drain"]
    ids = [drain.delay(n).id for n in range(3)]
    # when the batch has run and every call is stored as SUCCESS
    wait_for_states(worker, ids, ["SUCCESS"] * 3)
    assert run_counts(worker, ids) == dict.fromkeys(ids, 1)
    # then after a warm shutdown no message is left on the broker: each was
    # acked once its batch ended, as the guarantees promise for acks_late,
    # and no later worker runs the calls a second time
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0


def test_a_body_that_pops_its_requests_leaves_no_call_active(spawn: Spawn) -> None:
    # given an early-acked task whose body consumes its list, settling each
    # call with request = requests.pop(); request.mark_as_done(...)
    worker = spawn("redis", "prefork")
    drain = worker.app.tasks["tests.attack_drain_early"]
    ids = [drain.delay(n).id for n in range(3)]
    # when the batch has run and every call is stored as SUCCESS
    wait_for_states(worker, ids, ["SUCCESS"] * 3)
    node = node_name(worker)

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
    spawn: Spawn,
) -> None:
    # given a late-acked per_request_results task whose body sorts its list
    # in place (largest first) and answers in that order, the call of 0
    # asking to be delivered again once (Reject(requeue=True) as its value)
    worker = spawn("redis", "prefork")
    task = worker.app.tasks["tests.attack_sorted"]
    ids = [task.delay(n).id for n in range(3)]
    # when the batch of three has run, and the requeued call again
    wait_for_states(worker, ids, ["SUCCESS"] * 3, timeout=20)
    # then the call of 0 ran twice (it was requeued) and the others once
    assert run_counts(worker, ids) == {ids[0]: 2, ids[1]: 1, ids[2]: 1}
    assert [AsyncResult(i, app=worker.app).result for i in ids] == [0, 1, 2]


# -- 5. a retries header that is not a number ----------------------------------


def test_a_retries_header_that_is_not_a_number_fails_only_its_call(
    spawn: Spawn,
) -> None:
    # given a batch of three calls of a task whose body retries the whole
    # batch on a first run (raise self.retry(countdown=0.2)), the middle one
    # carrying retries="abc"
    worker = spawn("redis", "prefork")
    first, bad, last = uuid(), uuid(), uuid()
    name = "tests.attack_retry_all"
    publish_raw(
        worker,
        [
            (body_of(1), task_headers(worker, name, first)),
            (body_of(2), task_headers(worker, name, bad, retries="abc")),
            (body_of(3), task_headers(worker, name, last)),
        ],
    )
    # when the batch has run and the retries have come back
    wait_for_states(worker, [first, bad, last], ["SUCCESS", "FAILURE", "SUCCESS"])
    # then only the bad call failed; the good ones were retried and
    # succeeded on their retry, and task_failure never fired for them
    assert run_counts(worker, [first, last]) == {first: 2, last: 2}
    assert not {first, last} & set(worker.journal.ids("failure"))


# -- 6. a batch key that cannot be compared ------------------------------------


def test_a_batch_key_that_cannot_be_compared_fails_only_its_calls(
    spawn: Spawn,
) -> None:
    # given a keyed task whose batch_key returns, for calls marked touchy, a
    # key that hashes like every other such key and whose == raises (as a
    # key wrapping an array does)
    worker = spawn("redis", "prefork")
    task = worker.app.tasks["tests.attack_touchy"]
    good = [task.delay(tenant="a") for _ in range(3)]
    touchy = [task.delay(tenant=t, touchy=True) for t in ("x", "y")]
    good += [task.delay(tenant="b") for _ in range(3)]
    good_ids = [r.id for r in good]
    touchy_ids = [r.id for r in touchy]
    # when the worker has consumed them
    wait_for(
        lambda: states(worker, good_ids) == ["SUCCESS"] * 6 or not alive(worker),
        timeout=30,
        what="the good calls to succeed (or the worker to die)",
    )
    # then the worker is still running, the good calls ran once each, and
    # the touchy calls were settled one way or the other
    assert alive(worker), worker.log()[-3000:]
    assert run_counts(worker, good_ids) == dict.fromkeys(good_ids, 1)
    wait_for(
        lambda: "PENDING" not in states(worker, touchy_ids), what="the touchy calls"
    )
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0


# -- 7. retry() with a reason or an ETA given as strings -----------------------


@pytest.mark.parametrize("how", ["exc", "eta"])
def test_a_retry_with_string_arguments_retries_each_call_once(
    spawn: Spawn, how: str
) -> None:
    # given a batch of two calls whose body retries each on its first run
    # as Celery's Task.retry allows: with exc="busy, try later", or with an
    # ETA given as an ISO 8601 string
    worker = spawn("redis", "prefork")
    task = worker.app.tasks["tests.attack_retry_odd"]
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
    assert run_counts(worker, ids) == dict.fromkeys(ids, 2)
    assert [AsyncResult(i, app=worker.app).result for i in ids] == [1, 1]
    assert not set(ids) & set(worker.journal.ids("failure"))


# -- 8. a poison ETA sends task_received ----------------------------------------


def test_an_eta_too_far_to_convert_is_rejected_without_a_signal(
    spawn: Spawn,
) -> None:
    # given a worker, and a message whose ETA is past year 9999 in UTC
    worker = spawn("redis", "prefork")
    bad = uuid()
    eta = "9999-12-31T23:59:59-14:00"
    good = uuid()
    publish_raw(
        worker,
        [
            (body_of(1), task_headers(worker, "tests.collect", bad, eta=eta)),
            (body_of(1), task_headers(worker, "tests.collect", good)),
        ],
    )
    # when the worker has consumed it and a good call after it
    wait_for_states(worker, [bad, good], ["FAILURE", "SUCCESS"])
    # then the poison message was stored as FAILURE with the OverflowError
    # and, as the guarantees say of a poison message, "no signal is sent"
    assert isinstance(AsyncResult(bad, app=worker.app).result, OverflowError)
    assert good in worker.journal.ids("received")
    assert bad not in worker.journal.ids("received")


# -- 9. a compressed body that does not decompress --------------------------------


@pytest.mark.parametrize(
    "compression", ["application/x-gzip", "application/x-celery-batches-unknown"]
)
def test_a_body_that_does_not_decompress_is_stored_as_failure(
    spawn: Spawn, compression: str
) -> None:
    # given a worker, and a message whose compression header names gzip
    # over a body that is not gzip (or a compression no one knows)
    worker = spawn("redis", "prefork")
    bad, good = uuid(), uuid()
    publish_raw(
        worker,
        [
            (
                b"not compressed",
                task_headers(worker, "tests.collect", bad, compression=compression),
            ),
            (body_of(1), task_headers(worker, "tests.collect", good)),
        ],
    )
    # when the worker has consumed it and a good call after it
    wait_for_states(worker, [good], ["SUCCESS"])
    # then, as for every poison message that carries its task id, FAILURE is
    # stored for it, and it is not on the broker any more
    wait_for_states(worker, [bad], ["FAILURE"], timeout=5)
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0


# -- 10. calls held for their ETA stall the worker ------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_calls_held_for_their_eta_do_not_stop_the_worker_receiving(
    spawn: Spawn, broker: str
) -> None:
    # given a worker of two processes (Celery's window: 8 messages) that may
    # not widen it for batches (batches_prefetch_limit=0, "never widen"),
    # and 8 batch calls sent to run in an hour
    worker = spawn(broker, "prefork", conf={"batches_prefetch_limit": 0})
    collect = worker.app.tasks["tests.collect"]
    held = [collect.apply_async((n,), countdown=3600).id for n in range(8)]
    wait_for(
        lambda: set(held) <= set(worker.journal.ids("received")),
        what="the held calls to be received",
    )
    try:
        # when a batch call and a plain task are sent for now
        now = collect.delay(5)
        plain = worker.app.tasks["tests.total"].delay([1, 2])
        # then both run within seconds, as they would next to plain ETA
        # tasks (Celery widens its window by one for each): the held calls
        # wait in memory, not in the way of every other message
        wait_for_states(worker, [now.id, plain.id], ["SUCCESS"] * 2, timeout=20)
        assert [now.result, plain.result] == [5, 3]
    finally:
        # A warm shutdown gives the held calls back to the queue, which the
        # fixture deletes: none is left in the shared server's unacked index.
        exit_code(worker)
