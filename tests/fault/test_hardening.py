"""Inputs that used to crash the worker, strand a call or mislabel it.

Each test reproduces one defect found by attacking a real worker, and holds
the outcome the guarantees page promises: the bad call gets a clear error,
the worker goes on, and no other call is lost, run twice or mislabelled.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from kombu.utils.uuid import uuid

from tests.harness.client import RawMessage
from tests.harness.journal import Failure, PlainRun, Postrun, Run
from tests.harness.params import CELERY_VERSION, shared_workers
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, WorkerExited, Workers, start_worker

pytestmark = pytest.mark.fault

#: The shared workers (tests/conftest.py) the tests that need no worker of
#: their own run on: one per broker.
on_shared_workers = shared_workers(
    "memory-threads", "redis-prefork", "rabbitmq-prefork"
)


# -- 1. an unhashable batch key --------------------------------------------


@on_shared_workers
def test_an_unhashable_batch_key_fails_only_its_call(worker: Worker) -> None:
    # given a task batched by its tenant keyword, and a call whose tenant
    # is a list among good calls
    keyed = worker.tasks.keyed
    bad = keyed.delay(tenant=["acme"])
    good = [keyed.delay(tenant=t) for t in ("a", "a", "a", "b")]
    good_ids = [r.id for r in good]
    # when the worker has consumed them
    worker.wait_for_states(good_ids, ["SUCCESS"] * 4)
    worker.wait_for_states([bad.id], ["FAILURE"])
    # then the bad call failed with an error naming the cause, never ran,
    # the good ones ran once each, and the worker is still running
    assert "unhashable" in str(bad.result)
    assert worker.run_counts([bad.id]) == {bad.id: 0}
    assert worker.run_counts(good_ids) == dict.fromkeys(good_ids, 1)
    assert worker.alive()


# -- 2. an options part that is not a mapping --------------------------------


@on_shared_workers
@pytest.mark.parametrize("task", ["sized", "collect"])
def test_a_body_whose_options_part_is_not_a_mapping_is_rejected_on_arrival(
    worker: Worker, task: str
) -> None:
    # given a full batch's worth of good calls (flushed by size for
    # tests.sized, by interval for tests.collect) and a message whose body
    # is [args, kwargs, "x"]
    batch_task = {"sized": worker.tasks.sized, "collect": worker.tasks.collect}[task]
    good = [batch_task.delay(n) for n in range(2)]
    bad = uuid()
    worker.publish(RawMessage(b'[[1], {}, "x"]', worker.headers(batch_task, bad)))
    good += [batch_task.delay(n) for n in range(2, 5)]
    good_ids = [r.id for r in good]
    # when the worker has consumed them all
    worker.wait_for_states(good_ids, ["SUCCESS"] * 5)
    worker.wait_for_states([bad], ["FAILURE"])
    # then the good calls ran once each, the bad one never, with an error
    # saying what is wrong, and the worker is still running
    assert worker.run_counts(good_ids) == dict.fromkeys(good_ids, 1)
    assert worker.run_counts([bad]) == {bad: 0}
    assert "options part" in str(worker.results([bad])[0])
    assert worker.alive()


# -- 3. two ETA calls with the same task id ----------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_two_held_calls_with_one_id_both_run_and_are_acked(
    workers: Workers, broker: str
) -> None:
    # given two countdown calls sent with the same task id (de-duplication
    # by id, or a redelivered ETA message), and a plain call after them
    worker = workers.start(broker, "prefork")
    collect = worker.tasks.collect
    same = uuid()
    collect.apply_async((1,), task_id=same, countdown=1)
    collect.apply_async((2,), task_id=same, countdown=1)
    other = collect.delay(3)
    # when both are due and flushed
    wait_for(
        lambda: worker.run_counts([same, other.id]) == {same: 2, other.id: 1},
        timeout=30,
        what="both held calls and the plain one to run",
    )
    # then after a warm shutdown no message is left behind: both held
    # messages were acked, none went back to the broker
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0
    assert worker.run_counts([same]) == {same: 2}


# -- 4. settings ---------------------------------------------------------------


def test_a_worker_with_an_invalid_annotated_setting_refuses_to_start() -> None:
    # given an app whose task_annotations give a batch task flush_every=0
    conf = {"task_annotations": {"tests.collect": {"flush_every": 0}}}
    # when a worker is started for it
    with pytest.raises(WorkerExited) as exited:
        start_worker("memory", "prefork", in_thread=False, conf=conf).stop()
    # then it exits at once with an error naming the task, option and value
    assert exited.value.returncode != 0
    assert re.search(
        r"tests\.collect: flush_every=0 is invalid; flush_every must be an int "
        r"of at least 1",
        exited.value.output,
    ), exited.value.output


# -- 5. per-request values that cannot be stored --------------------------------


@on_shared_workers
def test_a_result_the_serializer_refuses_fails_only_its_call(worker: Worker) -> None:
    # given a per_request_results batch whose body returns a set (which JSON
    # cannot encode) for one call and strings for the others
    task = worker.tasks.unencodable
    calls = [task.delay(value) for value in ("a", "bad", "b")]
    ids = [r.id for r in calls]
    # when the batch has run
    worker.wait_for_states(ids, ["SUCCESS", "FAILURE", "SUCCESS"])
    # then that one call is FAILURE with the encoding error, as a plain task
    # gets, and the others have their own results
    assert worker.results([ids[0], ids[2]]) == ["a", "b"]
    assert type(calls[1].result).__name__ == "EncodeError"
    assert worker.alive()


@on_shared_workers
def test_a_link_that_cannot_be_sent_fails_only_its_call(worker: Worker) -> None:
    # given a call whose link callback cannot be sent (its countdown is not
    # a number), batched with good calls
    collect, total = worker.tasks.collect, worker.tasks.total
    bad = collect.apply_async((1,), link=total.s().set(countdown="soon"))
    good = [collect.delay(n) for n in (2, 3)]
    ids = [bad.id, *(r.id for r in good)]
    # when the batch has run
    worker.wait_for_states(ids, ["FAILURE", "SUCCESS", "SUCCESS"])
    # then only that call failed, and the others kept their results
    assert worker.results(ids[1:]) == [2, 3]
    assert worker.alive()


# -- 6. revoke by stamped headers ------------------------------------------------


@on_shared_workers
@pytest.mark.skipif(
    CELERY_VERSION < (5, 3), reason="revoke_by_stamped_headers is new in Celery 5.3"
)
def test_calls_revoked_by_stamped_header_while_buffered_never_run(
    worker: Worker,
) -> None:
    # given stamped and unstamped calls waiting in a buffer that flushes by
    # interval (3 s)
    hold = worker.tasks.fault_hold
    stamp = f"doomed-{uuid()}"
    stamped = [hold.s(n).stamp(batch=stamp).apply_async() for n in range(3)]
    plain = [hold.delay(n) for n in range(3, 6)]
    stamped_ids = [r.id for r in stamped]
    plain_ids = [r.id for r in plain]
    worker.wait_received(stamped_ids + plain_ids, timeout=30)
    # when the stamp is revoked while they wait
    worker.app.control.revoke_by_stamped_headers({"batch": stamp})
    # then the stamped calls are stored as REVOKED and never run, and the
    # others run once
    worker.wait_for_states(plain_ids, ["SUCCESS"] * 3)
    worker.wait_for_states(stamped_ids, ["REVOKED"] * 3)
    assert worker.run_counts(stamped_ids) == dict.fromkeys(stamped_ids, 0)
    assert worker.run_counts(plain_ids) == dict.fromkeys(plain_ids, 1)


# -- 7. retry(throw=False) ----------------------------------------------------------


@on_shared_workers
def test_retry_without_throwing_sends_the_calls_again(worker: Worker) -> None:
    # given a body that calls self.retry(countdown=0.2, throw=False) for
    # calls on their first run, then settles them on the retry
    task = worker.tasks.retry_nothrow
    calls = [task.delay(n) for n in range(3)]
    ids = [r.id for r in calls]
    # when the calls have been retried
    worker.wait_for_states(ids, ["SUCCESS"] * 3)
    # then each ran twice, the second time as its first retry
    assert worker.run_counts(ids) == dict.fromkeys(ids, 2)
    assert worker.results(ids) == [1, 1, 1]


# -- 8. Reject and Ignore end a batch call as they end a plain task -----------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_reject_and_ignore_end_batch_calls_as_they_end_plain_tasks(
    workers: Workers, broker: str
) -> None:
    # given a worker running late-acked batch tasks and their plain twins,
    # which raise Reject(requeue=False), Reject(requeue=True) on the first
    # delivery, or Ignore
    worker = workers.start(broker, "prefork")
    modes = ("reject", "requeue", "ignore")
    sent: dict[tuple[str, str], list[str]] = {}
    for mode in modes:
        for kind, task in zip(("batch", "plain"), worker.tasks.twins(mode)):
            sent[(kind, mode)] = [task.delay(n).id for n in range(3)]

    def ran() -> Counter[str]:
        return Counter(worker.journal.ids(Run) + worker.journal.ids(PlainRun))

    # when every call has run (the requeued ones twice) and the worker has
    # shut down warmly, so every message is settled
    expected_runs = {mode: 2 if mode == "requeue" else 1 for mode in modes}
    wait_for(
        lambda: all(
            ran()[task_id] >= expected_runs[mode]
            for (_, mode), ids in sent.items()
            for task_id in ids
        ),
        timeout=60,
        what="every call to run",
    )
    assert worker.exit() == 0, worker.log()
    failures = Counter(worker.journal.ids(Failure))
    runs = ran()

    # then each batch call ended exactly as its plain twin: state, number
    # of task_failure signals and of runs
    for mode in modes:
        batch, plain = sent[("batch", mode)], sent[("plain", mode)]
        outcome = {
            kind: [
                (state, failures[task_id], runs[task_id])
                for state, task_id in zip(worker.states(ids), ids)
            ]
            for kind, ids in (("batch", batch), ("plain", plain))
        }
        assert outcome["batch"] == outcome["plain"], (mode, outcome)
        # and never settled twice
        assert all(count <= 1 for _, count, _ in outcome["batch"]), (mode, outcome)
    ignored = sent[("batch", "ignore")]
    assert worker.states(ignored) == ["PENDING"] * 3
    requeued = sent[("batch", "requeue")]
    assert worker.states(requeued) == ["SUCCESS"] * 3
    assert worker.run_counts(requeued) == dict.fromkeys(requeued, 2)
    # and no message is left on the broker
    assert worker.queue_depth() == 0


# -- 9. the prefetch window stays bounded -----------------------------------------


def test_a_huge_flush_every_does_not_unbound_the_prefetch_window(
    workers: Workers,
) -> None:
    # given a RabbitMQ worker (prefetch 2 x 4) and a batch task with
    # flush_every=50,000, which used to widen the window by 100,000: past
    # AMQP's 65,535, which kombu sends as 0, that is unlimited
    worker = workers.start("rabbitmq", "prefork")
    huge = worker.tasks.huge
    ids = [huge.delay(n).id for n in range(5)]
    worker.wait_received(ids, timeout=30)

    # when the worker is asked for its prefetch window while they wait (the
    # broker may serve other workers too: ask this one by its node name)
    node = worker.node_name()

    def window() -> int:
        # 0 (waited past, as a window of 0 is no answer either): no reply yet.
        inspect = worker.app.control.inspect(destination=[node], timeout=2)
        replies = inspect.stats() or {}
        counts = [stats.get("prefetch_count") for stats in replies.values()]
        return int(counts[0] or 0) if counts else 0

    prefetch = wait_for(window, timeout=20, what="the worker's stats")
    # then it is wider than Celery's own 8 but within the prefetch budget
    assert 8 < prefetch <= 8 + 10_000
    assert all(state == "PENDING" for state in worker.states(ids))


# -- 10. a body that settled everything and returns None --------------------------


@on_shared_workers
def test_a_body_that_settled_every_call_and_returns_none_succeeds(
    worker: Worker,
) -> None:
    # given a per_request_results body that marks every call done itself
    task = worker.tasks.settles_all
    ids = [task.delay(n).id for n in range(3)]
    # when the batch has run
    worker.wait_for_states(ids, ["SUCCESS"] * 3)
    assert worker.results(ids) == [0, 1, 2]

    # then the batch is reported to task_postrun as a success, and no error
    # is logged for it
    def postruns() -> list[Postrun]:
        records = worker.journal.records(Postrun)
        return [postrun for postrun in records if postrun.task == task.name]

    wait_for(postruns, what="the batch's task_postrun")
    assert {postrun.state for postrun in postruns()} == {"SUCCESS"}
    assert "tests.settles_all returned" not in worker.log()
