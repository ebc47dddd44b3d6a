"""Per-request results go to a Redis backend in bulk, and correctly."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chain, states
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest, results
from celery_batches.eager import eager_request
from celery_batches.trace import run_batch
from tests.harness.brokers import REDIS_BACKEND, require_server
from tests.harness.client import close_app
from tests.harness.params import shared_workers
from tests.harness.worker import Worker


@pytest.fixture
def app() -> Iterator[Celery]:
    require_server(REDIS_BACKEND)
    app = Celery("results", backend=REDIS_BACKEND, set_as_current=False)
    app.conf.result_expires = 300
    yield app
    close_app(app)


def _commands(app: Celery) -> dict[str, int]:
    stats: dict[str, Any] = app.backend.client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


def _stored(app: Celery, task_id: str) -> Any:
    """The result stored for ``task_id``, read without ``AsyncResult.get()``.

    The batches here run in this process, so the results are stored when
    ``run_batch`` returns. An ``AsyncResult`` that waited would subscribe on
    the backend's pub/sub connection, which Celery 5.2 opens again when the
    result is collected, after the app is closed: an unclosed socket for a
    later test to warn about.
    """
    meta = app.backend.get_task_meta(task_id)
    assert meta["status"] == states.SUCCESS, meta
    return meta["result"]


def _delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(f"cmdstat_{name}", 0) - before.get(f"cmdstat_{name}", 0)


@pytest.mark.parametrize("slice_size", [1000, 7])
def test_a_batch_stores_every_result_in_one_round_trip(
    app: Celery, slice_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "SCRIPT_SLICE", slice_size)

    @app.task(base=Batches, per_request_results=True, shared=False)
    def double(requests: list[SimpleRequest]) -> list[int]:
        return [r.args[0] * 2 for r in requests]

    # given a batch of 50 calls, one of which already has a SUCCESS result
    # (a redelivered message whose first run completed) and one a STARTED
    # state (task_track_started), and the server knows our script
    ids = [uuid() for _ in range(50)]
    app.backend.mark_as_done(ids[0], "first run")
    app.backend.store_result(ids[1], None, states.STARTED)
    app.backend.client.script_load(results.STORE_SCRIPT)
    requests = [eager_request(double, i, (n,), {}, {}) for n, i in enumerate(ids)]
    before = _commands(app)
    # when the batch runs
    run_batch(double, requests)
    after = _commands(app)
    # then every result is stored, the earlier SUCCESS is kept, the
    # STARTED state is written over, each with its expiry ...
    assert _stored(app, ids[0]) == "first run"
    assert [_stored(app, i) for i in ids[1:]] == [n * 2 for n in range(1, 50)]
    assert app.backend.client.ttl(app.backend.get_key_for_task(ids[1])) > 0
    assert app.backend.client.ttl(app.backend.get_key_for_task(ids[2])) > 0
    # ... by one script call per slice, and one more for the STARTED one,
    # with nothing sent per request (the script's own SETs and PUBLISHes
    # are counted by the server too: one of each per stored result)
    slices = -(-50 // slice_size)
    assert _delta(before, after, "evalsha") == slices + 1
    assert _delta(before, after, "set") == 49
    assert _delta(before, after, "publish") == 49
    for command in ("mget", "setex", "eval"):
        assert _delta(before, after, command) == 0


def test_a_server_that_refuses_scripts_gets_a_pipeline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a Redis user not permitted to run scripts
    require_server(REDIS_BACKEND)
    admin = redis.Redis.from_url(REDIS_BACKEND)
    user, password = f"cb-noscript-{uuid()[:8]}", uuid()
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-@scripting"],
    )
    url = REDIS_BACKEND.replace("redis://", f"redis://{user}:{password}@", 1)
    app = Celery("noscript", backend=url, set_as_current=False)
    app.conf.result_expires = 300
    try:

        @app.task(base=Batches, per_request_results=True, shared=False)
        def double(requests: list[SimpleRequest]) -> list[int]:
            return [r.args[0] * 2 for r in requests]

        first, second = [uuid() for _ in range(5)], [uuid() for _ in range(3)]
        app.backend.mark_as_done(first[0], "first run")
        # when two batches run
        with caplog.at_level(logging.WARNING, logger="celery_batches.results"):
            for batch in (first, second):
                run_batch(
                    double,
                    [
                        eager_request(double, i, (n,), {}, {})
                        for n, i in enumerate(batch)
                    ],
                )
        # then every result is stored, the SUCCESS kept, and the refusal
        # was said once, not per batch
        assert _stored(app, first[0]) == "first run"
        assert [_stored(app, i) for i in first[1:]] == [2, 4, 6, 8]
        assert [_stored(app, i) for i in second] == [0, 2, 4]
        refusals = [r for r in caplog.records if "refused our script" in r.message]
        assert len(refusals) == 1
    finally:
        close_app(app)
        admin.acl_deluser(user)
        admin.close()


def test_chord_members_and_failures_take_the_per_result_path(app: Celery) -> None:
    @app.task(base=Batches, per_request_results=True, shared=False)
    def mixed(requests: list[SimpleRequest]) -> list[Any]:
        return [ValueError("no") if r.args[0] else r.args[0] for r in requests]

    ids = [uuid(), uuid()]
    requests = [eager_request(mixed, i, (n,), {}, {}) for n, i in enumerate(ids)]
    run_batch(mixed, requests)
    assert _stored(app, ids[0]) == 0
    failed = app.backend.get_task_meta(ids[1])
    assert failed["status"] == states.FAILURE
    assert isinstance(failed["result"], ValueError)


@shared_workers("memory-solo", "redis-prefork")
def test_link_callbacks_and_chain_steps_come_from_their_call_as_a_plain_tasks(
    worker: Worker, protocol: int
) -> None:
    collect = worker.tasks.collect
    plain = worker.tasks.attack_plain_double
    lineage = worker.tasks.attack_lineage
    # given a batched call and its plain twin, each with a link callback
    # and each the first step of a chain, sent in either task protocol (a
    # protocol 1 message carries no root id)
    calls = [
        collect.apply_async((1, 1), link=lineage.s()),
        plain.apply_async((1,), link=lineage.s()),
    ]
    chains = [
        chain(collect.s(1, 1), lineage.s()).apply_async(),
        chain(plain.s(1), lineage.s()).apply_async(),
    ]
    # when they have run, then each call's result holds its callback as a
    # child, and callback and next step name the call as parent and root
    # (or neither, in a protocol 1 message), the batch's as the plain's
    seen = []
    for call in calls:
        assert call.get(timeout=20) == 2
        children = worker.app.AsyncResult(call.id).children
        assert children is not None and len(children) == 1, children
        seen.append(_lineage(children[0].get(timeout=20), call.id))
    for step in chains:
        first = step.parent
        assert first is not None and first.get(timeout=20) == 2
        assert [c.id for c in worker.app.AsyncResult(first.id).children or []] == [
            step.id
        ]
        seen.append(_lineage(step.get(timeout=20), first.id))
    batched_callback, plain_callback, batched_step, plain_step = seen
    assert batched_callback == plain_callback
    assert batched_step == plain_step


def _lineage(reported: list[Any], call_id: str) -> list[Any]:
    """What a callback reported, with its call's id written as "call"."""
    return ["call" if value == call_id else value for value in reported]
