"""SimpleRequest: what the batch body learns about each call, and how it travels."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from celery import Celery, signals, states
from celery.worker.request import Request

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import run_batch
from tests.unit.conftest import PROTOCOLS, FakeWorker, make_message, recording

FIELDS = [
    "id",
    "name",
    "args",
    "kwargs",
    "delivery_info",
    "hostname",
    "ignore_result",
    "reply_to",
    "correlation_id",
    "request_dict",
    "chord",
]


def fields_of(request: SimpleRequest) -> dict[str, Any]:
    return {name: getattr(request, name) for name in FIELDS}


@pytest.fixture
def tasks(app: Celery) -> dict[str, Any]:
    """A batch task, and a callback and an errback to link to its calls."""

    @app.task(base=Batches, name="unit.req.batch", flush_every=10, shared=False)
    def batch(requests: list[SimpleRequest]) -> None:
        for request in requests:
            request.mark_as_done(request.args[0])

    @app.task(name="unit.req.callback", shared=False)
    def callback(value: Any) -> Any:
        return value

    @app.task(name="unit.req.errback", shared=False)
    def errback(*args: Any) -> None:
        pass

    return {"batch": batch, "callback": callback, "errback": errback}


def received_request(
    app: Celery, task: Any, message: Any, worker: FakeWorker
) -> Request:
    """Let the strategy decode ``message``; return the worker Request it built."""
    handler = worker.strategy(task)
    with recording(signals.task_received) as received:
        worker.deliver(handler, message)
    (request,) = [
        sent["request"] for sent in received if sent["request"].name == task.name
    ]
    return request  # type: ignore[no-any-return]


def a_call(app: Celery, tasks: dict[str, Any], protocol: str) -> Any:
    """A message of a linked call that is a member of a chord, sent for an rpc reply."""
    sig = tasks["batch"].s(1, [2])
    sig.link(tasks["callback"].s())
    sig.link_error(tasks["errback"].s())
    message = make_message(app, sig, protocol, reply_to="reply-queue", priority=3)
    chord = dict(tasks["callback"].s())
    if protocol == "proto2":
        _, _, embed = message.payload
        embed["chord"] = chord
    else:
        message.payload["chord"] = chord
    return message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_from_request_carries_everything_a_result_needs(
    app: Celery, tasks: dict[str, Any], worker: FakeWorker, protocol: str
) -> None:
    # given the worker Request of a linked chord member sent for an rpc reply
    message = a_call(app, tasks, protocol)
    request = received_request(app, tasks["batch"], message, worker)
    task_id = request.id
    # when the batch body's view of it is taken
    simple = SimpleRequest.from_request(request)
    # then it carries the call itself
    assert simple.id == task_id
    assert simple.name == "unit.req.batch"
    assert list(simple.args) == [1, [2]]
    assert simple.kwargs == {}
    assert simple.hostname == worker.hostname
    assert simple.ignore_result is False
    # and where its message came from and where an rpc reply goes
    assert simple.delivery_info == {
        "exchange": "",
        "routing_key": app.conf.task_default_queue,
        "priority": 3,
        "redelivered": False,
    }
    assert simple.reply_to == "reply-queue"
    assert simple.correlation_id == task_id
    # and the chord it is a member of
    assert simple.chord == dict(tasks["callback"].s())
    # and the full request, with the callbacks and errbacks a result needs
    assert simple.request_dict["id"] == task_id
    assert simple.request_dict["task"] == "unit.req.batch"
    assert [cb["task"] for cb in simple.request_dict["callbacks"]] == [
        "unit.req.callback"
    ]
    assert [eb["task"] for eb in simple.request_dict["errbacks"]] == [
        "unit.req.errback"
    ]
    assert simple.request_dict["chord"] == dict(tasks["callback"].s())
    # and its execution context sees the same links
    assert [cb["task"] for cb in simple.context.callbacks] == ["unit.req.callback"]


def test_from_request_of_a_plain_worker_request(
    app: Celery, tasks: dict[str, Any]
) -> None:
    # given a Request built by Celery from a protocol 2 message directly
    sig = tasks["batch"].s(5, key="value").set(ignore_result=True, shadow="shown-as")
    message = make_message(app, sig, reply_to="replies")
    request = Request(message, app=app, task=tasks["batch"], hostname="h@x")
    # when it is turned into a SimpleRequest
    simple = SimpleRequest.from_request(request)
    # then the shadow name, the message's ignore_result and the arguments are kept
    assert simple.id == sig.id
    assert simple.name == "shown-as"
    assert list(simple.args) == [5]
    assert simple.kwargs == {"key": "value"}
    assert simple.ignore_result is True
    assert simple.hostname == "h@x"
    assert simple.reply_to == "replies"
    assert simple.chord is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_simple_request_pickles_into_an_equal_one(
    app: Celery, tasks: dict[str, Any], worker: FakeWorker, protocol: str
) -> None:
    # given the SimpleRequest of a linked chord member
    message = a_call(app, tasks, protocol)
    simple = SimpleRequest.from_request(
        received_request(app, tasks["batch"], message, worker)
    )
    for proto in (pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        # when it is sent to a pool process (pickled and unpickled)
        copy = pickle.loads(pickle.dumps(simple, protocol=proto))
        # then every field arrives equal
        assert type(copy) is SimpleRequest
        assert fields_of(copy) == fields_of(simple)


def test_a_pickled_request_does_not_carry_its_outcome_or_task(
    app: Celery, tasks: dict[str, Any]
) -> None:
    # given a request that a batch run settled in this process
    simple = SimpleRequest(
        "settled-id",
        "unit.req.batch",
        [7],
        {},
        {},
        "h@x",
        False,
        None,
        None,
        {"id": "settled-id", "task": "unit.req.batch"},
    )
    run_batch(tasks["batch"], [simple])
    assert simple.settled
    assert simple.state == states.SUCCESS
    # when it is pickled and unpickled
    copy = pickle.loads(pickle.dumps(simple))
    # then the copy is the same call but unsettled and bound to no task object:
    # an outcome or task recorded in one process means nothing in another
    assert fields_of(copy) == fields_of(simple)
    assert not copy.settled
    assert copy.state is None
    assert copy._outcome is None
    assert copy._task is None


def test_the_0_11_constructor_signature_works_positionally() -> None:
    # given the ten positional arguments celery-batches 0.11 took
    request = SimpleRequest(
        "an-id",
        "a.task",
        [1, 2],
        {"k": "v"},
        {"routing_key": "q"},
        "node@host",
        True,
        "reply-to",
        "correlation",
        {"chord": {"task": "a.chord"}, "retries": 2},
    )
    # then each lands in the field of the same name
    assert fields_of(request) == {
        "id": "an-id",
        "name": "a.task",
        "args": [1, 2],
        "kwargs": {"k": "v"},
        "delivery_info": {"routing_key": "q"},
        "hostname": "node@host",
        "ignore_result": True,
        "reply_to": "reply-to",
        "correlation_id": "correlation",
        "request_dict": {"chord": {"task": "a.chord"}, "retries": 2},
        "chord": {"task": "a.chord"},
    }
    # and a fresh request is unsettled
    assert not request.settled


def test_the_0_11_constructor_takes_keywords_and_no_request_dict() -> None:
    request = SimpleRequest(
        id="an-id",
        name="a.task",
        args=(),
        kwargs={},
        delivery_info={},
        hostname=None,
        ignore_result=False,
        reply_to=None,
        correlation_id=None,
        request_dict=None,
    )
    assert request.request_dict == {}
    assert request.chord is None
