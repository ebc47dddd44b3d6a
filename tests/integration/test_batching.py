"""A real worker batches real messages: results, sizes, signals and acks."""

from __future__ import annotations

from collections import Counter

from tests.conftest import Worker, wait_for


def test_full_batches_flush_by_size_and_store_each_result(
    worker: Worker, protocol: int
) -> None:
    # given a batch task with flush_every=5 and an interval too long to matter
    task = worker.app.tasks["tests.sized"]
    # when ten calls are sent
    results = [task.delay(i) for i in range(10)]
    # then every call gets its own result, computed in two batches of five
    assert [r.get(timeout=20) for r in results] == list(range(10))
    ids = {r.id for r in results}
    runs = Counter(i for i in worker.journal.ids("run") if i in ids)
    assert runs == Counter({i: 1 for i in ids})
    sizes = [int(f[1]) for f in worker.journal.events("run") if f[0] in ids]
    assert sizes == [5] * 10
    flushes = [f for f in worker.journal.events("flush") if f[0] == "tests.sized"]
    assert flushes and {(f[1], f[2]) for f in flushes} == {("5", "size")}


def test_interval_flushes_a_partial_batch(worker: Worker, protocol: int) -> None:
    task = worker.app.tasks["tests.collect"]
    results = [task.delay(1, kw=i) for i in range(3)]
    assert [r.get(timeout=20) for r in results] == [1 + i for i in range(3)]
    sizes = {
        int(f[1])
        for f in worker.journal.events("run")
        if f[0] in {r.id for r in results}
    }
    assert sizes == {3}


def test_failing_batch_fails_every_request(worker: Worker, protocol: int) -> None:
    task = worker.app.tasks["tests.boom"]
    results = [task.delay(i) for i in range(3)]
    for r in results:
        wait_for(r.failed, what=f"{r.id} FAILURE")
        assert isinstance(r.result, ValueError)
        assert r.traceback and "boom" in r.traceback
    wait_for(
        lambda: {r.id for r in results} <= set(worker.journal.ids("failure")),
        what="task_failure for each request",
    )


def test_body_settles_each_request(worker: Worker, protocol: int) -> None:
    task = worker.app.tasks["tests.settle"]
    results = [task.delay(i) for i in range(4)]
    for i, r in enumerate(results):
        wait_for(r.ready, what=f"{r.id} ready")
        if i % 2:
            assert r.state == "FAILURE" and isinstance(r.result, KeyError)
        else:
            assert r.get(timeout=5) == i * 10
