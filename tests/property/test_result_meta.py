"""Any batch of calls: the result each stores is the one Celery would store.

The writer builds the first call's meta with Celery's ``_get_result_meta``
and copies the shared part for the others. Hypothesis draws batches of
calls with and without a group, a parent, a root, a chord-free context
already built (with children or without), any result value, with
``result_extended`` on and off; each stored document, decoded, must equal
the one Celery builds for that call, ``date_done`` aside (one per batch).
Nothing is sent to a server: the writer encodes when a call is added.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.eager import eager_request
from celery_batches.results import ResultWriter
from tests.property.conftest import property_settings
from tests.property.values import json_values

ids = st.one_of(st.none(), st.just(""), st.uuids().map(str))

calls = st.fixed_dictionaries(
    {
        "group": ids,
        "parent_id": ids,
        "root_id": ids,
        "result": json_values,
        # Whether the body read request.context (so it is built), and the
        # children it appended to it.
        "context": st.one_of(st.none(), st.lists(st.uuids().map(str), max_size=2)),
    }
)


@pytest.fixture(params=[False, True], ids=["plain", "extended"])
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    # Never contacted: the writer only encodes until the batch is flushed.
    app = Celery("meta", backend="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.result_extended = request.param

    @app.task(base=Batches, name="meta.work", shared=False)
    def work(requests: list[SimpleRequest]) -> None:
        pass

    yield app
    app.close()


def _request(task: Any, call: dict[str, Any]) -> SimpleRequest:
    request = eager_request(task, uuid(), (1,), {"k": 2}, {})
    for key in ("group", "parent_id", "root_id"):
        if call[key] is not None:
            request.request_dict[key] = call[key]
    if call["context"] is not None:
        children = request.context.children
        for child in call["context"]:
            children.append(task.app.AsyncResult(child))
    return request


@property_settings(max_examples=60)
@given(batch=st.lists(calls, min_size=1, max_size=6))
def test_each_stored_meta_is_the_one_celery_builds(
    app: Celery, batch: list[dict[str, Any]]
) -> None:
    task = app.tasks["meta.work"]
    backend: Any = app.backend
    writer = ResultWriter.for_backend(backend)
    assert writer is not None
    requests = [_request(task, call) for call in batch]
    for request, call in zip(requests, batch):
        writer.add(request, call["result"])
    for (request, result, document), call in zip(writer.pending, batch):
        expected = backend._get_result_meta(
            result=backend.encode_result(call["result"], states.SUCCESS),
            state=states.SUCCESS,
            traceback=None,
            request=request.context,
        )
        expected["task_id"] = request.id
        stored = backend.decode(document)
        assert stored.pop("date_done") is not None
        expected.pop("date_done")
        assert stored == backend.decode(backend.encode(expected))
        assert list(stored) == [k for k in expected if k in stored]
        assert result is call["result"]
