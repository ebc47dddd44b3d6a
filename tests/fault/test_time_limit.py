"""A batch past its hard time limit fails, and the worker goes on."""

from __future__ import annotations

import pytest

from tests.harness.wait import wait_for
from tests.harness.worker import Workers

pytestmark = pytest.mark.fault


def test_hard_time_limit_fails_the_batch_and_the_next_batch_runs(
    workers: Workers,
) -> None:
    # given a prefork worker and a task with time_limit=2 s that batches 2
    # calls
    worker = workers.start("redis", "prefork")
    sleepy = worker.tasks.sleepy

    # when a batch of 2 calls sleeps for 5 s
    slow = [sleepy.delay(5), sleepy.delay(5)]
    slow_ids = [r.id for r in slow]

    # then both calls fail with TimeLimitExceeded after running once
    wait_for(
        lambda: worker.states(slow_ids) == ["FAILURE"] * 2,
        timeout=30,
        what="the slow calls to fail",
    )
    assert {type(r.result).__name__ for r in slow} == {"TimeLimitExceeded"}
    assert worker.run_counts(slow_ids) == dict.fromkeys(slow_ids, 1)
    assert "Hard time limit (2s) exceeded for a batch of 2 tests.sleepy" in worker.log()

    # and a following batch of 2 quick calls runs to SUCCESS in the same worker
    fast = [sleepy.delay(0), sleepy.delay(0)]
    fast_ids = [r.id for r in fast]
    wait_for(
        lambda: worker.states(fast_ids) == ["SUCCESS"] * 2,
        timeout=30,
        what="the next batch to succeed",
    )
    assert [r.result for r in fast] == [0, 0]
    assert worker.run_counts(fast_ids) == dict.fromkeys(fast_ids, 1)
    assert worker.process is not None and worker.process.poll() is None
