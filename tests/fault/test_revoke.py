"""Calls revoked, or expired, while they wait in the buffer."""

from __future__ import annotations

import time

import pytest

from tests.harness.journal import Revoked
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers

pytestmark = pytest.mark.fault


def _sized_flushes(worker: Worker) -> list[tuple[int, str]]:
    return [(f.size, f.reason) for f in worker.flushes(worker.tasks.sized)]


def test_call_revoked_while_buffered_never_runs(workers: Workers) -> None:
    # given 4 calls waiting in the buffer of a task that flushes at 5 calls
    # (its interval, 60 s, never comes), one of them revoked once received
    worker = workers.start("redis", "prefork")
    sized = worker.tasks.sized
    waiting = [sized.delay(i) for i in range(4)]
    worker.wait_received([r.id for r in waiting])
    victim, others = waiting[1], [waiting[0], *waiting[2:]]
    worker.app.control.revoke(victim.id)
    wait_for(
        lambda: f"Tasks flagged as revoked: {victim.id}" in worker.log(),
        what="the worker to take the revoke",
    )

    # when a fifth call fills the buffer and it is flushed
    others.append(sized.delay(4))
    ids = [r.id for r in others]
    wait_for(lambda: worker.states(ids) == ["SUCCESS"] * 4, what="4 results")

    # then the revoked call is REVOKED, task_revoked fired for it and it never
    # ran; the others ran once each, in one batch of 4
    assert victim.state == "REVOKED"
    assert worker.journal.ids(Revoked) == [victim.id]
    assert worker.run_counts([victim.id, *ids]) == {
        victim.id: 0,
        **dict.fromkeys(ids, 1),
    }
    assert [r.result for r in others] == [0, 2, 3, 4]
    assert _sized_flushes(worker) == [(4, "size")]


def test_call_expired_at_flush_time_never_runs(workers: Workers) -> None:
    # given 4 calls waiting in the buffer of a task that flushes at 5 calls,
    # one of them sent with expires=2 s
    worker = workers.start("redis", "prefork")
    sized = worker.tasks.sized
    expires_at = time.time() + 2
    expiring = sized.apply_async((0,), expires=2)
    others = [sized.delay(i) for i in range(1, 4)]
    waiting = [expiring.id, *(r.id for r in others)]
    worker.wait_received(waiting)
    assert time.time() < expires_at, "too slow: the call expired before buffering"

    # when its expiry has passed and a fifth call fills the buffer
    wait_for(lambda: time.time() > expires_at + 0.2, what="the expiry to pass")
    others.append(sized.delay(4))
    ids = [r.id for r in others]
    wait_for(lambda: worker.states(ids) == ["SUCCESS"] * 4, what="4 results")

    # then the expired call is REVOKED, task_revoked fired for it and it never
    # ran; the others ran once each
    assert expiring.state == "REVOKED"
    assert worker.journal.ids(Revoked) == [expiring.id]
    assert worker.run_counts(waiting + ids[-1:]) == {
        expiring.id: 0,
        **dict.fromkeys(ids, 1),
    }
    assert _sized_flushes(worker) == [(4, "size")]
