"""Retries, batch keys, ETA, acks_late, and canvas (link, chain, chord)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import chain, chord
from celery.exceptions import MaxRetriesExceededError
from kombu.utils.uuid import uuid

from tests.harness.journal import Keys, Retried
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, start_worker


def test_request_retry_runs_the_call_again_with_the_same_id(
    worker: Worker, protocol: int
) -> None:
    task = worker.tasks.retrying
    # given a call whose first run asks for one retry
    result = task.delay(1)
    # then it succeeds on its second run, under the same id
    assert result.get(timeout=20) == 1
    assert worker.runs(result.id) == 2
    wait_for(lambda: result.id in worker.journal.ids(Retried), what="task_retry")


def test_retry_past_max_retries_fails_the_request(worker: Worker) -> None:
    task = worker.tasks.retrying
    # given a call that retries more often than max_retries=2 allows
    result = task.delay(5)
    # then it fails once the limit is reached, after 1 + 2 runs
    wait_for(lambda: result.state == "FAILURE", what="FAILURE", timeout=30)
    assert isinstance(result.result, MaxRetriesExceededError)
    assert worker.runs(result.id) == 3


def test_batch_key_never_mixes_keys(worker: Worker, protocol: int) -> None:
    task = worker.tasks.keyed
    # given calls for two tenants, interleaved
    results = [task.delay(i, tenant="ab"[i % 2]) for i in range(6)]
    # then each call's batch held only its own tenant
    assert [r.get(timeout=20) for r in results] == ["ab"[i % 2] for i in range(6)]
    ids = {r.id for r in results}
    keys = [k.keys for k in worker.journal.records(Keys) if k.id in ids]
    assert keys and all(k in (["a"], ["b"]) for k in keys)


def test_countdown_holds_the_call_until_it_is_due(
    worker: Worker, protocol: int
) -> None:
    task = worker.tasks.collect
    sent = time.monotonic()
    result = task.apply_async((2, 3), countdown=1.5)
    assert result.get(timeout=20) == 5
    assert time.monotonic() - sent >= 1.4
    assert worker.runs(result.id) == 1


def test_acks_late_batches_store_results(worker: Worker) -> None:
    task = worker.tasks.late
    results = [task.delay(i) for i in range(7)]
    assert [r.get(timeout=20) for r in results] == list(range(7))


def test_link_and_chain_follow_each_request(worker: Worker, protocol: int) -> None:
    collect = worker.tasks.collect
    # given a call with a link callback, and a chain of two batched calls
    callback_id = uuid()
    linked = collect.apply_async((1, 1), link=collect.s(5).set(task_id=callback_id))
    chained = chain(collect.s(1, 2), collect.s(10)).apply_async()
    # then the callback got the call's own result, and the chain moved on
    assert linked.get(timeout=20) == 2
    assert worker.app.AsyncResult(callback_id).get(timeout=20) == 7
    assert chained.get(timeout=20) == 13


def test_chord_counts_each_batched_member(worker: Worker, protocol: int) -> None:
    collect, total = worker.tasks.collect, worker.tasks.total
    result = chord([collect.s(i) for i in range(7)])(total.s())
    assert result.get(timeout=30) == sum(range(7))


def test_plain_batches_leave_results_to_the_body(worker: Worker) -> None:
    # Without per_request_results, the original behaviour: the return value
    # reaches task_success only; the calls' own results stay PENDING.
    task = worker.tasks.plain
    results = [task.delay(i) for i in range(5)]
    wait_for(lambda: all(worker.runs(r.id) == 1 for r in results), what="runs")
    assert {r.state for r in results} == {"PENDING"}


@pytest.mark.parametrize("enable_utc", [True, False], ids=["utc", "local-time"])
def test_eta_is_honoured_with_and_without_utc(enable_utc: bool) -> None:
    # given a worker whose app runs in a non-UTC timezone, with UTC on or off
    conf = {"enable_utc": enable_utc, "timezone": "America/New_York"}
    with start_worker("memory", "solo", conf=conf) as w:
        task = w.tasks.collect
        eta = datetime.now(timezone.utc) + timedelta(seconds=1.5)
        # when a call is sent with an aware ETA, and another with a countdown
        at = task.apply_async((1, 1), eta=eta)
        later = task.apply_async((2, 2), countdown=1.5)
        # then both run once, after they are due, not hours early or late
        assert at.get(timeout=20) == 2
        assert datetime.now(timezone.utc) >= eta
        assert later.get(timeout=20) == 4
        assert w.runs(at.id) == 1 and w.runs(later.id) == 1
