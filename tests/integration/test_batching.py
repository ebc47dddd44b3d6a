"""A real worker batches real messages: results, sizes, signals and acks."""

from __future__ import annotations

from collections import Counter

from tests.harness.journal import Failure, Run
from tests.harness.wait import wait_for
from tests.harness.worker import Worker


def test_full_batches_flush_by_size_and_store_each_result(worker: Worker) -> None:
    # given a batch task with flush_every=5 and an interval too long to matter
    task = worker.tasks.sized
    # when ten calls are sent
    results = [task.delay(i) for i in range(10)]
    # then every call gets its own result, computed in two batches of five
    assert [r.get(timeout=20) for r in results] == list(range(10))
    ids = {r.id for r in results}
    runs = [run for run in worker.journal.records(Run) if run.id in ids]
    assert Counter(run.id for run in runs) == Counter({i: 1 for i in ids})
    assert [run.size for run in runs] == [5] * 10
    flushes = worker.flushes(task)
    assert flushes and {(f.size, f.reason) for f in flushes} == {(5, "size")}


def test_interval_flushes_a_partial_batch(worker: Worker, protocol: int) -> None:
    task = worker.tasks.collect
    results = [task.delay(1, kw=i) for i in range(3)]
    assert [r.get(timeout=20) for r in results] == [1 + i for i in range(3)]
    ids = {r.id for r in results}
    sizes = {run.size for run in worker.journal.records(Run) if run.id in ids}
    assert sizes == {3}


def test_failing_batch_fails_every_request(worker: Worker) -> None:
    task = worker.tasks.boom
    results = [task.delay(i) for i in range(3)]
    for r in results:
        wait_for(r.failed, what=f"{r.id} FAILURE")
        assert isinstance(r.result, ValueError)
        assert r.traceback and "boom" in r.traceback
    wait_for(
        lambda: {r.id for r in results} <= set(worker.journal.ids(Failure)),
        what="task_failure for each request",
    )


def test_body_settles_each_request(worker: Worker) -> None:
    task = worker.tasks.settle
    results = [task.delay(i) for i in range(4)]
    for i, r in enumerate(results):
        wait_for(r.ready, what=f"{r.id} ready")
        if i % 2:
            assert r.state == "FAILURE" and isinstance(r.result, KeyError)
        else:
            assert r.get(timeout=5) == i * 10
