"""Cold shutdown, soft time limits and revoke(terminate=True) of a batch."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.harness.wait import wait_for
from tests.harness.worker import Workers

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_cold_shutdown_runs_nothing_and_a_new_worker_runs_each_call_once(
    workers: Workers, broker: str
) -> None:
    # given a worker with calls waiting in its buffer
    conf = {"broker_transport_options": {"visibility_timeout": 3}}
    first = workers.start(broker, "prefork", conf=conf)
    hold = first.tasks.fault_hold
    results = [hold.delay(i) for i in range(6)]
    ids = [r.id for r in results]
    first.wait_received(ids)
    # when it gets a cold shutdown (SIGQUIT)
    first.exit(signal.SIGQUIT)
    # then nothing ran, and a new worker runs every call exactly once
    assert first.run_counts(ids) == dict.fromkeys(ids, 0)
    second = workers.start(broker, "prefork", queue=first.queue, conf=conf)
    wait_for(
        lambda: second.states(ids) == ["SUCCESS"] * 6,
        timeout=40,
        what="the calls to run in the new worker",
    )
    assert second.run_counts(ids) == dict.fromkeys(ids, 1)


def test_soft_time_limit_fails_each_request_of_the_batch(workers: Workers) -> None:
    # given a task with soft_time_limit=1 s whose batch sleeps 4 s
    worker = workers.start("redis", "prefork")
    soft = worker.tasks.fault_soft
    slow = [soft.delay(4), soft.delay(4)]
    ids = [r.id for r in slow]
    # then the body is interrupted, and each request fails with the exception
    wait_for(lambda: worker.states(ids) == ["FAILURE"] * 2, timeout=30, what="FAILURE")
    assert {type(r.result).__name__ for r in slow} == {"SoftTimeLimitExceeded"}
    assert worker.run_counts(ids) == dict.fromkeys(ids, 1)
    # and the worker goes on with the next batch
    quick = [soft.delay(0), soft.delay(0)]
    assert [r.get(timeout=20) for r in quick] == [0, 0]


def test_revoke_with_terminate_ends_the_whole_running_batch(
    workers: Workers, gate: Path
) -> None:
    # given a batch of two calls running in a pool child
    worker = workers.start("redis", "prefork")
    long = worker.tasks.fault_long
    gate.touch()
    running = [long.delay(1), long.delay(2)]
    ids = [r.id for r in running]
    wait_for(lambda: all(worker.runs(i) for i in ids), what="batch running")
    # when one of them is revoked with terminate=True
    worker.app.control.revoke(ids[0], terminate=True, signal="SIGKILL")
    # then the child running the batch is ended: both calls are REVOKED, and
    # the worker goes on with the next batch
    wait_for(lambda: worker.states(ids) == ["REVOKED"] * 2, timeout=30, what="REVOKED")
    gate.unlink()
    after = [long.delay(3), long.delay(4)]
    assert [r.get(timeout=30) for r in after] == [3, 4]
