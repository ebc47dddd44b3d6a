"""Inputs found by attacking real workers, each of which broke a promise.

Each test is one defect the attack found: a message, a body or a setting
that crashed the worker, stranded a call, ran it twice, lost it or
mislabelled it, where ``docs/guarantees.rst`` promises otherwise. Each
failed before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest
from kombu.utils.uuid import uuid

from tests.harness.client import RawMessage
from tests.harness.journal import Failure, Received
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers

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
