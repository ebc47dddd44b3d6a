"""Inputs that used to crash the worker, strand a call or mislabel it.

Each test reproduces one defect found by attacking a real worker, and holds
the outcome the guarantees page promises: the bad call gets a clear error,
the worker goes on, and no other call is lost, run twice or mislabelled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import celery
import pytest
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from tests.conftest import (
    ROOT,
    Worker,
    start_subprocess_worker,
    stop_subprocess_worker,
    thread_worker,
    wait_for,
)
from tests.fault.conftest import Spawn, exit_code, queue_depth, run_counts, states

pytestmark = pytest.mark.fault

CELERY_VERSION = tuple(int(part) for part in celery.__version__.split(".")[:2])


@pytest.fixture(scope="module", params=["memory", "redis", "rabbitmq"])
def shared(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Worker]:
    """One worker per broker for the tests that need no worker of their own."""
    journal = str(tmp_path_factory.mktemp("hardening") / "journal")
    if request.param == "memory":
        with thread_worker("threads", journal) as worker:
            yield worker
        return
    worker = start_subprocess_worker(request.param, "prefork", journal)
    try:
        yield worker
    finally:
        stop_subprocess_worker(worker)


def alive(worker: Worker) -> bool:
    return worker.process is None or worker.process.poll() is None


def results(worker: Worker, ids: list[str]) -> list[Any]:
    return [AsyncResult(task_id, app=worker.app).result for task_id in ids]


def wait_for_states(
    worker: Worker, ids: list[str], expected: list[str], timeout: float = 30
) -> None:
    wait_for(
        lambda: states(worker, ids) == expected,
        timeout=timeout,
        what=f"states {expected} (now {states(worker, ids)})",
    )


def publish_raw(worker: Worker, task: str, body: bytes) -> str:
    """Publish a protocol 2 message of ``task`` whose body is ``body``."""
    task_id = uuid()
    message = worker.app.amqp.as_task_v2(task_id, task, args=(1,), kwargs={})
    with worker.app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=worker.queue,
            headers=dict(message.headers),
            content_type="application/json",
            content_encoding="utf-8",
            retry=True,
        )
    return task_id


# -- 1. an unhashable batch key --------------------------------------------


def test_an_unhashable_batch_key_fails_only_its_call(shared: Worker) -> None:
    # given a task batched by its tenant keyword, and a call whose tenant
    # is a list among good calls
    keyed = shared.app.tasks["tests.keyed"]
    bad = keyed.delay(tenant=["acme"])
    good = [keyed.delay(tenant=t) for t in ("a", "a", "a", "b")]
    good_ids = [r.id for r in good]
    # when the worker has consumed them
    wait_for_states(shared, good_ids, ["SUCCESS"] * 4)
    wait_for_states(shared, [bad.id], ["FAILURE"])
    # then the bad call failed with an error naming the cause, never ran,
    # the good ones ran once each, and the worker is still running
    assert "unhashable" in str(bad.result)
    assert run_counts(shared, [bad.id]) == {bad.id: 0}
    assert run_counts(shared, good_ids) == dict.fromkeys(good_ids, 1)
    assert alive(shared)


# -- 2. an options part that is not a mapping --------------------------------


@pytest.mark.parametrize("task", ["tests.sized", "tests.collect"])
def test_a_body_whose_options_part_is_not_a_mapping_is_rejected_on_arrival(
    shared: Worker, task: str
) -> None:
    # given a full batch's worth of good calls (flushed by size for
    # tests.sized, by interval for tests.collect) and a message whose body
    # is [args, kwargs, "x"]
    batch_task = shared.app.tasks[task]
    good = [batch_task.delay(n) for n in range(2)]
    bad = publish_raw(shared, task, b'[[1], {}, "x"]')
    good += [batch_task.delay(n) for n in range(2, 5)]
    good_ids = [r.id for r in good]
    # when the worker has consumed them all
    wait_for_states(shared, good_ids, ["SUCCESS"] * 5)
    wait_for_states(shared, [bad], ["FAILURE"])
    # then the good calls ran once each, the bad one never, with an error
    # saying what is wrong, and the worker is still running
    assert run_counts(shared, good_ids) == dict.fromkeys(good_ids, 1)
    assert run_counts(shared, [bad]) == {bad: 0}
    assert "options part" in str(AsyncResult(bad, app=shared.app).result)
    assert alive(shared)


# -- 3. two ETA calls with the same task id ----------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_two_held_calls_with_one_id_both_run_and_are_acked(
    spawn: Spawn, broker: str
) -> None:
    # given two countdown calls sent with the same task id (de-duplication
    # by id, or a redelivered ETA message), and a plain call after them
    worker = spawn(broker, "prefork")
    collect = worker.app.tasks["tests.collect"]
    same = uuid()
    collect.apply_async((1,), task_id=same, countdown=1)
    collect.apply_async((2,), task_id=same, countdown=1)
    other = collect.delay(3)
    # when both are due and flushed
    wait_for(
        lambda: run_counts(worker, [same, other.id]) == {same: 2, other.id: 1},
        timeout=30,
        what="both held calls and the plain one to run",
    )
    # then after a warm shutdown no message is left behind: both held
    # messages were acked, none went back to the broker
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0
    assert run_counts(worker, [same]) == {same: 2}


# -- 4. settings ---------------------------------------------------------------


def test_a_worker_with_an_invalid_annotated_setting_refuses_to_start(
    journal_path: str,
) -> None:
    # given an app whose task_annotations give a batch task flush_every=0
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CB_TEST_BROKER": "memory://",
        "CB_TEST_BACKEND": "cache+memory://",
        "CB_TEST_JOURNAL": journal_path,
        "CB_TEST_QUEUE": f"q-{uuid()}",
        "CB_TEST_CONF": json.dumps(
            {"task_annotations": {"tests.collect": {"flush_every": 0}}}
        ),
    }
    # when a worker is started for it
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # then it exits at once with an error naming the task, option and value
    assert done.returncode != 0
    assert re.search(
        r"tests\.collect: flush_every=0 is invalid; flush_every must be an int "
        r"of at least 1",
        done.stdout + done.stderr,
    ), done.stdout + done.stderr


# -- 5. per-request values that cannot be stored --------------------------------


def test_a_result_the_serializer_refuses_fails_only_its_call(shared: Worker) -> None:
    # given a per_request_results batch whose body returns a set (which JSON
    # cannot encode) for one call and strings for the others
    task = shared.app.tasks["tests.unencodable"]
    calls = [task.delay(value) for value in ("a", "bad", "b")]
    ids = [r.id for r in calls]
    # when the batch has run
    wait_for_states(shared, ids, ["SUCCESS", "FAILURE", "SUCCESS"])
    # then that one call is FAILURE with the encoding error, as a plain task
    # gets, and the others have their own results
    assert results(shared, [ids[0], ids[2]]) == ["a", "b"]
    assert type(calls[1].result).__name__ == "EncodeError"
    assert alive(shared)


def test_a_link_that_cannot_be_sent_fails_only_its_call(shared: Worker) -> None:
    # given a call whose link callback cannot be sent (its countdown is not
    # a number), batched with good calls
    collect = shared.app.tasks["tests.collect"]
    total = shared.app.tasks["tests.total"]
    bad = collect.apply_async((1,), link=total.s().set(countdown="soon"))
    good = [collect.delay(n) for n in (2, 3)]
    ids = [bad.id, *(r.id for r in good)]
    # when the batch has run
    wait_for_states(shared, ids, ["FAILURE", "SUCCESS", "SUCCESS"])
    # then only that call failed, and the others kept their results
    assert results(shared, ids[1:]) == [2, 3]
    assert alive(shared)


# -- 6. revoke by stamped headers ------------------------------------------------


@pytest.mark.skipif(
    CELERY_VERSION < (5, 3), reason="revoke_by_stamped_headers is new in Celery 5.3"
)
def test_calls_revoked_by_stamped_header_while_buffered_never_run(
    shared: Worker,
) -> None:
    # given stamped and unstamped calls waiting in a buffer that flushes by
    # interval (3 s)
    hold = shared.app.tasks["tests.fault_hold"]
    stamp = f"doomed-{uuid()}"
    stamped = [hold.s(n).stamp(batch=stamp).apply_async() for n in range(3)]
    plain = [hold.delay(n) for n in range(3, 6)]
    stamped_ids = [r.id for r in stamped]
    plain_ids = [r.id for r in plain]
    wait_for(
        lambda: set(stamped_ids + plain_ids) <= set(shared.journal.ids("received")),
        timeout=30,
        what="all six calls to be received",
    )
    # when the stamp is revoked while they wait
    shared.app.control.revoke_by_stamped_headers({"batch": stamp})
    # then the stamped calls are stored as REVOKED and never run, and the
    # others run once
    wait_for_states(shared, plain_ids, ["SUCCESS"] * 3)
    wait_for_states(shared, stamped_ids, ["REVOKED"] * 3)
    assert run_counts(shared, stamped_ids) == dict.fromkeys(stamped_ids, 0)
    assert run_counts(shared, plain_ids) == dict.fromkeys(plain_ids, 1)


# -- 7. retry(throw=False) ----------------------------------------------------------


def test_retry_without_throwing_sends_the_calls_again(shared: Worker) -> None:
    # given a body that calls self.retry(countdown=0.2, throw=False) for
    # calls on their first run, then settles them on the retry
    task = shared.app.tasks["tests.retry_nothrow"]
    calls = [task.delay(n) for n in range(3)]
    ids = [r.id for r in calls]
    # when the calls have been retried
    wait_for_states(shared, ids, ["SUCCESS"] * 3)
    # then each ran twice, the second time as its first retry
    assert run_counts(shared, ids) == dict.fromkeys(ids, 2)
    assert results(shared, ids) == [1, 1, 1]


# -- 8. Reject and Ignore end a batch call as they end a plain task -----------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_reject_and_ignore_end_batch_calls_as_they_end_plain_tasks(
    spawn: Spawn, broker: str
) -> None:
    # given a worker running late-acked batch tasks and their plain twins,
    # which raise Reject(requeue=False), Reject(requeue=True) on the first
    # delivery, or Ignore
    worker = spawn(broker, "prefork")
    modes = ("reject", "requeue", "ignore")
    sent: dict[tuple[str, str], list[str]] = {}
    for mode in modes:
        for kind in ("batch", "plain"):
            task = worker.app.tasks[f"tests.{kind}_{mode}"]
            sent[(kind, mode)] = [task.delay(n).id for n in range(3)]

    def ran() -> Counter[str]:
        return Counter(worker.journal.ids("run") + worker.journal.ids("plainrun"))

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
    assert exit_code(worker) == 0, worker.log()
    failures = Counter(worker.journal.ids("failure"))
    runs = ran()

    # then each batch call ended exactly as its plain twin: state, number
    # of task_failure signals and of runs
    for mode in modes:
        batch, plain = sent[("batch", mode)], sent[("plain", mode)]
        outcome = {
            kind: [
                (state, failures[task_id], runs[task_id])
                for state, task_id in zip(states(worker, ids), ids)
            ]
            for kind, ids in (("batch", batch), ("plain", plain))
        }
        assert outcome["batch"] == outcome["plain"], (mode, outcome)
        # and never settled twice
        assert all(count <= 1 for _, count, _ in outcome["batch"]), (mode, outcome)
    ignored = sent[("batch", "ignore")]
    assert states(worker, ignored) == ["PENDING"] * 3
    requeued = sent[("batch", "requeue")]
    assert states(worker, requeued) == ["SUCCESS"] * 3
    assert run_counts(worker, requeued) == dict.fromkeys(requeued, 2)
    # and no message is left on the broker
    assert queue_depth(worker) == 0


# -- 9. the prefetch window stays bounded -----------------------------------------


def test_a_huge_flush_every_does_not_unbound_the_prefetch_window(
    spawn: Spawn,
) -> None:
    # given a RabbitMQ worker (prefetch 2 x 4) and a batch task with
    # flush_every=50,000, which used to widen the window by 100,000: past
    # AMQP's 65,535, which kombu sends as 0, that is unlimited
    worker = spawn("rabbitmq", "prefork")
    huge = worker.app.tasks["tests.huge"]
    ids = [huge.delay(n).id for n in range(5)]
    wait_for(
        lambda: set(ids) <= set(worker.journal.ids("received")),
        timeout=30,
        what="the calls to be received",
    )

    # when the worker is asked for its prefetch window while they wait (the
    # broker may serve other workers too: ask this one by its node name)
    found = re.search(r"(\S+@\S+) ready\.", worker.log())
    assert found is not None, worker.log()
    node = found.group(1)

    def window() -> int | None:
        inspect = worker.app.control.inspect(destination=[node], timeout=2)
        replies = inspect.stats() or {}
        counts = [stats.get("prefetch_count") for stats in replies.values()]
        return counts[0] if counts else None

    prefetch = wait_for(window, timeout=20, what="the worker's stats")
    # then it is wider than Celery's own 8 but within the prefetch budget
    assert 8 < prefetch <= 8 + 10_000
    assert all(state == "PENDING" for state in states(worker, ids))


# -- 10. a body that settled everything and returns None --------------------------


def test_a_body_that_settled_every_call_and_returns_none_succeeds(
    shared: Worker,
) -> None:
    # given a per_request_results body that marks every call done itself
    task = shared.app.tasks["tests.settles_all"]
    ids = [task.delay(n).id for n in range(3)]
    # when the batch has run
    wait_for_states(shared, ids, ["SUCCESS"] * 3)
    assert results(shared, ids) == [0, 1, 2]
    # then the batch is reported to task_postrun as a success, and no error
    # is logged for it
    wait_for(
        lambda: [
            fields
            for fields in shared.journal.events("postrun")
            if fields[1] == "tests.settles_all"
        ],
        what="the batch's task_postrun",
    )
    batch_states = {
        fields[2]
        for fields in shared.journal.events("postrun")
        if fields[1] == "tests.settles_all"
    }
    assert batch_states == {"SUCCESS"}
    assert "tests.settles_all returned" not in shared.log()
