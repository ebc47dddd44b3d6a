"""The examples in docs/examples, each run by a real worker on their own app."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.harness.examples import Load, loading
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, start_worker


@pytest.fixture
def load_example() -> Iterator[Load]:
    """Import an example afresh, so each test has its own app and state."""
    with loading() as load:
        yield load


def flushed(worker: Worker, calls: int) -> bool:
    return sum(flush.size for flush in worker.flushes()) == calls


def rows(database: Path, query: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(database)) as db:
        return db.execute(query).fetchall()


def test_click_counter_adds_each_batch_to_the_store_in_one_update(
    load_example: Load,
) -> None:
    # given the click counter, flushing every 100 clicks (or each second, so
    # the last 50 need not wait the example's 10 s)
    example = load_example("click_counter")
    urls = [f"https://example.com/{i % 3}" for i in range(250)]
    with start_worker(app=example.app, batch_options={"flush_interval": 1}) as worker:
        # when 250 clicks on three URLs are sent
        for url in urls:
            example.count_click.delay(url=url)
        wait_for(lambda: flushed(worker, 250), what="250 clicks flushed")
    # then the store holds every click, added in one update per batch
    assert example.store.counts == Counter(urls)
    assert example.store.updates == len(worker.flushes()) < 250
    assert max(flush.size for flush in worker.flushes()) == 100


def test_last_seen_writes_each_batch_with_one_executemany(
    load_example: Load,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given the last-seen example on a fresh database, counting executemany
    example = load_example("last_seen")
    example.DATABASE = str(tmp_path / "last_seen.sqlite3")
    executemanys: list[int] = []

    class CountingConnection(sqlite3.Connection):
        def executemany(self, sql: str, params: Iterable[Any], /) -> sqlite3.Cursor:
            params = list(params)
            executemanys.append(len(params))
            return super().executemany(sql, params)

    monkeypatch.setattr(
        sqlite3,
        "connect",
        functools.partial(sqlite3.connect, factory=CountingConnection),
    )
    # when users are seen, some more than once and out of order
    sightings = [
        (1, 100.0), (2, 100.0), (1, 105.0), (3, 101.0),
        (1, 103.0), (2, 99.0), (3, 110.0), (2, 120.0),
        (4, 50.0),
    ]  # fmt: skip
    with start_worker(
        app=example.app, batch_options={"flush_every": 4, "flush_interval": 0.2}
    ) as worker:
        for user_id, seen_at in sightings:
            example.seen.delay(user_id, seen_at)
        wait_for(lambda: flushed(worker, len(sightings)), what="sightings flushed")
    # then each user's latest time is stored, one executemany per batch
    stored = rows(Path(example.DATABASE), "SELECT user_id, seen_at FROM last_seen")
    assert dict(stored) == {1: 105.0, 2: 120.0, 3: 110.0, 4: 50.0}
    assert len(executemanys) == len(worker.flushes()) < len(sightings)


def test_bulk_insert_returns_each_call_its_row_id(
    load_example: Load, tmp_path: Path
) -> None:
    # given the bulk insert example on a fresh database
    example = load_example("bulk_insert")
    example.DATABASE = str(tmp_path / "events.sqlite3")
    events = [(f"kind{i % 3}", {"n": i}) for i in range(12)]
    with start_worker(
        app=example.app, batch_options={"flush_every": 5, "flush_interval": 0.2}
    ) as worker:
        # when twelve events are logged
        results = [example.log_event.delay(kind, data) for kind, data in events]
        row_ids = [result.get(timeout=20) for result in results]
    # then each call returns the id of the row holding its own event
    stored = rows(Path(example.DATABASE), "SELECT id, kind, data FROM events")
    assert {row_id: (kind, json.loads(data)) for row_id, kind, data in stored} == (
        dict(zip(row_ids, events))
    )
    assert len(set(row_ids)) == 12
    assert 1 < len(worker.flushes()) < 12


def test_bulk_insert_fails_the_whole_batch_when_one_row_fails(
    load_example: Load, tmp_path: Path
) -> None:
    # given the bulk insert example, flushing only on size
    example = load_example("bulk_insert")
    example.DATABASE = str(tmp_path / "events.sqlite3")
    with start_worker(
        app=example.app, batch_options={"flush_every": 4, "flush_interval": 60}
    ) as worker:
        # when a batch of four holds one event the table refuses (kind NULL)
        results: list[AsyncResult] = [
            example.log_event.delay(kind, {"n": i})
            for i, kind in enumerate(["a", "b", None, "d"])
        ]
        for result in results:
            wait_for(result.ready, what=f"{result.id} ready")
    # then the transaction is rolled back and every call fails with the error
    assert [flush.size for flush in worker.flushes()] == [4]
    for result in results:
        assert result.state == "FAILURE"
        assert isinstance(result.result, sqlite3.IntegrityError)
    assert rows(Path(example.DATABASE), "SELECT * FROM events") == []


def test_batched_lookup_calls_the_service_once_per_batch(
    load_example: Load,
) -> None:
    # given the lookup example, with a service that counts its calls
    example = load_example("batched_lookup")
    user_ids = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    with start_worker(
        app=example.app, batch_options={"flush_every": 4, "flush_interval": 0.2}
    ) as worker:
        # when users are looked up, and one that does not exist
        found = [example.get_user.delay(user_id) for user_id in user_ids]
        missing = example.get_user.delay(99)
        users = [result.get(timeout=20) for result in found]
        wait_for(missing.ready, what="lookup of user 99")
    # then each call gets its own user, with one service call per batch
    assert users == [example.service.users[user_id] for user_id in user_ids]
    assert missing.state == "FAILURE"
    assert isinstance(missing.result, LookupError)
    assert example.service.calls == len(worker.flushes())
    assert 1 < len(worker.flushes()) < len(user_ids) + 1
