"""Code written for celery-batches 0.11 runs unchanged."""

from __future__ import annotations

from tests.harness.worker import Worker


def test_the_documented_retry_pattern_works(worker: Worker) -> None:
    # given a body that re-sends each call once with the same id and a
    # countdown, then stores its result via app.backend.mark_as_done
    task = worker.tasks.documented
    results = [task.delay(i) for i in range(4)]
    # then each call ends with its result, after exactly two runs
    assert [r.get(timeout=20) for r in results] == [i * 3 for i in range(4)]
    assert [worker.runs(r.id) for r in results] == [2] * 4
