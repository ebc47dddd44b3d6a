"""Any batch body, any return value: each call ends once, in its own state.

``run_batch`` runs in this process against the app's ``cache+memory://``
backend, with the store and the signals counted per request id. Hypothesis
draws what the body does to each request (settle it as done, failed or
retried, sometimes twice), how it ends (returns, raises, ``self.retry``,
an error in ``autoretry_for``) and, under ``per_request_results``, what it
returns (sequences of any length, generators, mappings with unknown or
missing ids, exceptions among the values, ``None``). A plain model says
which state each call must end in; the batch must agree call by call.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic
from typing import Any
from unittest.mock import Mock

from celery import Celery, signals, states
from celery.exceptions import Ignore, MaxRetriesExceededError, Reject
from hypothesis import example, given
from hypothesis import strategies as st
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import run_batch
from tests.property.conftest import clean_worker_state, property_settings
from tests.property.messages import backend_writes
from tests.property.values import json_scalars, json_values
from tests.unit.conftest import FakeWorker, make_message, recording
from tests.unit.test_trace import calls as requests_of

#: Exceptions a body may return as a value, or fail a request with.
ERRORS = [KeyError("no such key"), ValueError("bad value"), RuntimeError()]


@dataclass(frozen=True)
class Act:
    """What the body does to one request: ``done``, ``fail`` or ``retry``."""

    index: int
    kind: str
    value: Any = None
    max_retries: int | None = None


@dataclass(frozen=True)
class Returns:
    """The body's return value, in terms of the batch it runs for.

    ``shape``: ``list``, ``tuple`` or ``generator`` of ``values`` (one per
    request, ``extra`` more or fewer); ``mapping`` of request id to value,
    without the ids in ``drop`` and with ``unknown`` ids added; or
    ``scalar`` (``values[0]`` itself: ``None``, a number, a string).
    """

    shape: str
    values: tuple[Any, ...]
    extra: int = 0
    drop: tuple[int, ...] = ()
    unknown: int = 0

    def build(self, requests: list[SimpleRequest]) -> Any:
        n = len(requests)
        values = [self.values[i % len(self.values)] for i in range(n + self.extra)]
        if self.shape == "list":
            return values
        if self.shape == "tuple":
            return tuple(values)
        if self.shape == "generator":
            return (value for value in values)
        if self.shape == "mapping":
            mapping = {
                r.id: values[i] for i, r in enumerate(requests) if i not in self.drop
            }
            mapping.update({f"unknown-{k}": 0 for k in range(self.unknown)})
            return mapping
        return self.values[0]


@dataclass(frozen=True)
class Plan:
    """One batch: its size, what the body does, and how it ends."""

    size: int
    retries: int
    acts: tuple[Act, ...]
    #: ``return``, ``raise`` (ValueError), ``self.retry``, ``autoretry``.
    ending: str
    returns: Returns


values_or_errors = st.one_of(json_values, st.sampled_from(ERRORS))


def returns_of(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Returns]:
    return st.one_of(
        st.builds(
            Returns,
            shape=st.sampled_from(["list", "list", "tuple", "generator"]),
            values=st.lists(values, min_size=1, max_size=5).map(tuple),
            extra=st.sampled_from([0, 0, 0, -1, 1]),
        ),
        st.builds(
            Returns,
            shape=st.just("mapping"),
            values=st.lists(values, min_size=1, max_size=5).map(tuple),
            drop=st.lists(st.integers(0, 4), max_size=2).map(tuple),
            unknown=st.sampled_from([0, 0, 1]),
        ),
        st.builds(
            Returns,
            shape=st.just("scalar"),
            values=st.tuples(json_scalars),
        ),
    )


#: How a body ends: mostly by returning.
any_ending = st.sampled_from(
    ["return", "return", "return", "raise", "self.retry", "autoretry"]
)


@st.composite
def plans(
    draw: st.DrawFn,
    *,
    values: st.SearchStrategy[Any] = values_or_errors,
    endings: st.SearchStrategy[str] = any_ending,
) -> Plan:
    size = draw(st.integers(1, 5))
    acts = draw(
        st.lists(
            st.one_of(
                st.builds(
                    Act,
                    st.integers(0, size - 1),
                    st.just("done"),
                    json_values,
                ),
                st.builds(
                    Act,
                    st.integers(0, size - 1),
                    st.just("fail"),
                    st.sampled_from(ERRORS),
                ),
                st.builds(
                    Act,
                    st.integers(0, size - 1),
                    st.just("retry"),
                    st.none(),
                    st.sampled_from([None, 0, 2, 5]),
                ),
            ),
            max_size=6,
        ).map(tuple)
    )
    return Plan(
        size=size,
        retries=draw(st.sampled_from([0, 1, 3])),
        acts=acts,
        ending=draw(endings),
        returns=draw(returns_of(values)),
    )


def batch_task(app: Celery, plan: Plan, **options: Any) -> Any:
    """A batch task whose body plays ``plan`` on the requests it gets."""

    def body(self: Any, requests: list[SimpleRequest]) -> Any:
        for act in plan.acts:
            request = requests[act.index]
            if act.kind == "done":
                request.mark_as_done(act.value)
            elif act.kind == "fail":
                request.mark_as_failure(act.value)
            else:
                request.retry(countdown=30, max_retries=act.max_retries)
        if plan.ending == "raise":
            raise ValueError("the body failed")
        if plan.ending == "self.retry":
            self.retry(countdown=30)
        if plan.ending == "autoretry":
            raise ConnectionError("the backend went away")
        return plan.returns.build(requests)

    name = f"property.outcomes.{uuid()}"
    app.task(
        base=Batches,
        name=name,
        shared=False,
        bind=True,
        autoretry_for=(ConnectionError,),
        retry_kwargs={"countdown": 30},
        **options,
    )(body)
    return app.tasks[name]


def retry_state(retries: int, limit: int | None) -> str:
    return states.FAILURE if limit is not None and retries >= limit else states.RETRY


def expected_states(plan: Plan, ids: list[str], task: Any) -> list[str | None]:
    """The state each request must end in, by the documented rules alone."""
    per_request = bool(task.per_request_results)
    out: list[str | None] = []
    for index in range(len(ids)):
        first = next((a for a in plan.acts if a.index == index), None)
        if first is not None:
            # The first settlement stands; later ones are refused.
            if first.kind == "done":
                out.append(states.SUCCESS)
            elif first.kind == "fail":
                out.append(states.FAILURE)
            else:
                limit = (
                    task.max_retries if first.max_retries is None else first.max_retries
                )
                out.append(retry_state(plan.retries, limit))
        elif plan.ending == "raise":
            out.append(states.FAILURE)
        elif plan.ending in ("self.retry", "autoretry"):
            out.append(retry_state(plan.retries, task.max_retries))
        elif not per_request:
            # Left alone by a body that returned: no result (0.11's rule).
            out.append(None)
        else:
            out.append(value_state(task, plan.returns, index, len(ids)))
    return out


def value_state(task: Any, returns: Returns, index: int, size: int) -> str:
    """The state ``per_request_results`` gives request ``index``."""
    values = [
        returns.values[i % len(returns.values)] for i in range(size + returns.extra)
    ]
    if returns.shape in ("list", "tuple"):
        if returns.extra:
            return states.FAILURE  # not one value per request
        value = values[index]
    elif returns.shape == "mapping":
        if returns.unknown or index in returns.drop:
            return states.FAILURE  # ids that are no request's, or none for this one
        value = values[index]
    else:
        return states.FAILURE  # a generator, a scalar, None: no value per request
    if isinstance(value, BaseException) or not storable(task, value):
        return states.FAILURE
    return states.SUCCESS


def storable(task: Any, value: Any) -> bool:
    """Whether the result serializer of ``task``'s backend can encode ``value``."""
    try:
        task.backend.encode(value)
    # Whatever the serializer raises, the answer is the same: not storable.
    except Exception:
        return False
    return True


@contextmanager
def per_request_signals() -> Iterator[Counter[tuple[str, Any]]]:
    """Count task_success, task_failure and task_retry by (signal, request id)."""
    counts: Counter[tuple[str, Any]] = Counter()

    def on_success(sender: Any = None, **kwargs: Any) -> None:
        counts[("success", sender.request.id)] += 1

    def on_failure(sender: Any = None, task_id: Any = None, **kwargs: Any) -> None:
        counts[("failure", task_id)] += 1

    def on_retry(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
        counts[("retry", request.id)] += 1

    receivers = [
        (signals.task_success, on_success),
        (signals.task_failure, on_failure),
        (signals.task_retry, on_retry),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False)
    try:
        yield counts
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver)


SIGNAL_OF = {
    states.SUCCESS: "success",
    states.FAILURE: "failure",
    states.RETRY: "retry",
}


def check_outcomes(app: Celery, task: Any, plan: Plan) -> None:
    """Run ``plan`` as one batch; every request must end as the model says."""
    requests = requests_of(task, *range(plan.size), retries=plan.retries)
    ids = [r.id for r in requests]
    expected = expected_states(plan, ids, task)
    publishing = recording(signals.before_task_publish)
    with (
        backend_writes(app) as writes,
        per_request_signals() as fired,
        publishing as sent,
    ):
        _, outcomes = run_batch(task, requests)
    stored = {task_id: [s for i, s in writes if i == task_id] for task_id in ids}
    # then each request's state was stored once, and it is the model's
    assert [stored[i] for i in ids] == [[s] if s else [] for s in expected], writes
    # and its one signal fired once (task_success also fires for the batch)
    mine = Counter({key: n for key, n in fired.items() if key[1] in ids})
    assert mine == Counter({(SIGNAL_OF[s], i): 1 for s, i in zip(expected, ids) if s})
    # and each retried request went back to the broker once, on its own
    resent = Counter(p["headers"]["id"] for p in sent)
    assert resent == Counter(i for s, i in zip(expected, ids) if s == states.RETRY)
    # and the pool gets one outcome per request, in order, that pickles
    assert len(outcomes) == len(requests)
    assert [failed for failed, _, _ in outcomes] == [
        int(s in (states.FAILURE, states.RETRY)) for s in expected
    ]
    pickle.loads(pickle.dumps(outcomes))


# -- any body, any return value (less the known defects) ------------------------


@property_settings(max_examples=400)
@given(
    plan=plans(), per_request=st.booleans(), max_retries=st.sampled_from([None, 1, 3])
)
def test_every_request_ends_once_in_the_state_its_own_value_gives(
    app: Celery, plan: Plan, per_request: bool, max_retries: int | None
) -> None:
    # given a batch task whose body settles some requests, maybe twice, and
    # returns, raises, retries or hits an error it retries for
    task = batch_task(
        app, plan, per_request_results=per_request, max_retries=max_retries
    )
    # when a batch runs
    # then every request ends once, in the state the rules give it alone
    with clean_worker_state():
        check_outcomes(app, task, plan)


# -- known defects (issue 9) ------------------------------------------------------

#: Values the JSON result serializer may not encode. Which ones it cannot
#: depends on the kombu release (5.7 encodes bytes), so the model asks the
#: backend's own serializer (``storable``).
UNENCODABLE = [{1, 2}, frozenset(), object(), 1j, bytearray(b"x"), b"\xff"]


@property_settings(max_examples=40)
@example(
    plan=Plan(2, 0, (), "return", Returns("list", ({1, 2}, 7))),
)
@given(
    plan=plans(
        values=st.one_of(values_or_errors, st.sampled_from(UNENCODABLE)),
        endings=st.just("return"),
    )
)
def test_a_value_the_serializer_cannot_encode_fails_only_its_request(
    app: Celery, plan: Plan
) -> None:
    # given a per_request_results body returning values of which some
    # cannot be stored as JSON
    task = batch_task(app, plan, per_request_results=True)
    # when the batch runs
    # then such a value fails its own request, once; every other request
    # ends in the state of its own value
    with clean_worker_state():
        check_outcomes(app, task, plan)


@property_settings(max_examples=25)
@example(size=2, settled=())
@given(
    size=st.integers(1, 4),
    settled=st.lists(st.integers(0, 3), max_size=3).map(tuple),
)
def test_self_retry_without_throw_resends_every_unsettled_request(
    app: Celery, size: int, settled: tuple[int, ...]
) -> None:
    # given a body that settles some requests, then asks Celery to retry
    # without raising (Task.retry(throw=False) still re-sends the task)
    def body(self: Any, requests: list[SimpleRequest]) -> str:
        for index in settled:
            if index < len(requests):
                requests[index].mark_as_done("settled")
        retry = self.retry(countdown=30, throw=False)
        return repr(retry)

    name = f"property.retry.{uuid()}"
    app.task(base=Batches, name=name, shared=False, bind=True)(body)
    task = app.tasks[name]
    requests = requests_of(task, *range(size))
    unsettled = [r.id for i, r in enumerate(requests) if i not in settled]
    # when the batch runs
    publishing = recording(signals.before_task_publish)
    with clean_worker_state(), backend_writes(app) as writes, publishing as published:
        run_batch(task, requests)
    # then each unsettled request is sent again once and stored as RETRY
    assert sorted(p["headers"]["id"] for p in published) == sorted(unsettled)
    assert sorted(i for i, s in writes if s == states.RETRY) == sorted(unsettled)


@dataclass
class CallEnd:
    """How one call ended, as a user and the broker see it."""

    stored: list[str]
    failure_signals: int
    acks: int
    rejects: list[Any]


def _ends(
    messages: list[Any],
    writes: list[tuple[Any, str]],
    failed: Counter[Any],
) -> list[CallEnd]:
    ends = []
    for message in messages:
        task_id = message.headers["id"]
        ends.append(
            CallEnd(
                stored=[s for i, s in writes if i == task_id],
                failure_signals=failed[task_id],
                acks=message.ack.call_count,
                rejects=[c.args[-1] for c in message.reject.call_args_list],
            )
        )
    return ends


def _run_pool_call(call: dict[str, Any], **target_options: Any) -> None:
    """Do what a pool does with a job: accept it, run it, call back with the result."""
    call["accept_callback"](1234, monotonic())
    result = call["target"](*call["args"], **target_options)
    call["callback"](result)


def plain_task_ends(
    app: Celery, raised: BaseException, acks_late: bool, size: int
) -> list[CallEnd]:
    """How ``size`` calls of a plain task raising ``raised`` end in Celery's worker."""

    def body(*args: Any) -> None:
        raise raised

    name = f"property.plain.{uuid()}"
    app.task(name=name, shared=False, acks_late=acks_late)(body)
    task = app.tasks[name]
    worker = FakeWorker(app)
    # What Celery's default strategy reads from its consumer besides what
    # the double already has; calls without ETA go to on_task_request.
    worker.consumer.disable_rate_limits = True
    worker.consumer.task_buckets = {}
    worker.consumer.on_task_request = Mock(name="on_task_request")
    handler = task.start_strategy(app, worker.consumer)
    messages = [make_message(app, task.s(n)) for n in range(size)]
    with backend_writes(app) as writes, per_request_signals() as fired:
        for message in messages:
            handler(message, None, message.ack, message.reject, None)
        for (request,), _ in worker.consumer.on_task_request.call_args_list:
            request.execute_using_pool(worker.pool)
        for call in worker.pool.calls:
            _run_pool_call(call, app=app)
    failed = Counter({i: n for (kind, i), n in fired.items() if kind == "failure"})
    return _ends(messages, writes, failed)


def batch_task_ends(
    app: Celery, raised: BaseException, acks_late: bool, size: int
) -> list[CallEnd]:
    """How ``size`` calls of a batch task whose body raises ``raised`` end."""

    def body(requests: list[SimpleRequest]) -> None:
        raise raised

    name = f"property.raising.{uuid()}"
    app.task(
        base=Batches, name=name, shared=False, acks_late=acks_late, flush_every=size
    )(body)
    task = app.tasks[name]
    worker = FakeWorker(app)
    handler = worker.strategy(task)
    messages = [make_message(app, task.s(n)) for n in range(size)]
    with backend_writes(app) as writes, per_request_signals() as fired:
        for message in messages:
            worker.deliver(handler, message)
        (call,) = worker.pool.calls
        _run_pool_call(call)
    failed = Counter({i: n for (kind, i), n in fired.items() if kind == "failure"})
    return _ends(messages, writes, failed)


RAISED = {
    "Reject(requeue=False)": lambda: Reject("rejected", requeue=False),
    "Reject(requeue=True)": lambda: Reject("rejected", requeue=True),
    "Ignore()": lambda: Ignore(),
}


@property_settings(max_examples=20)
@example(raised="Reject(requeue=False)", acks_late=True, size=2)
@given(
    raised=st.sampled_from(sorted(RAISED)),
    acks_late=st.booleans(),
    size=st.integers(1, 3),
)
def test_a_body_raising_reject_or_ignore_ends_each_call_as_a_plain_task_does(
    app: Celery, raised: str, acks_late: bool, size: int
) -> None:
    # given a plain task and a batch task that both raise the same
    # Reject or Ignore, with acks_late or not
    with clean_worker_state():
        # when their calls run through Celery's worker code and the pool
        plain = plain_task_ends(app, RAISED[raised](), acks_late, size)
        batched = batch_task_ends(app, RAISED[raised](), acks_late, size)
    # then each batched call ends as each plain call does: the same states
    # stored (once at most), the same task_failure, the same ack or reject
    assert batched == plain


@contextmanager
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """Collect records of ERROR and above from celery_batches' loggers.

    Not the per-call lines (``celery_batches.calls``): a call the body
    failed itself is logged as a failed task is, at ERROR; what is checked
    is that the batch itself is not reported as an error.
    """
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name != "celery_batches.calls":
                records.append(record)

    handler = Keep(logging.ERROR)
    logger = logging.getLogger("celery_batches")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@property_settings(max_examples=25)
@example(kinds=("done",))
@given(
    kinds=st.lists(
        st.sampled_from(["done", "fail", "retry"]), min_size=1, max_size=4
    ).map(tuple)
)
def test_a_body_that_settles_every_call_and_returns_none_is_a_success(
    app: Celery, kinds: tuple[str, ...]
) -> None:
    # given a per_request_results body that settles every request itself
    acts = tuple(
        Act(i, kind, ERRORS[0] if kind == "fail" else i) for i, kind in enumerate(kinds)
    )
    plan = Plan(len(kinds), 0, acts, "return", Returns("scalar", (None,)))
    task = batch_task(app, plan, per_request_results=True)
    requests = requests_of(task, *range(plan.size))
    # when it runs and returns None
    postrunning = recording(signals.task_postrun)
    with clean_worker_state(), errors_logged() as errors, postrunning as postrun:
        run_batch(task, requests)
    # then nothing is logged as an error and the batch ran successfully
    assert [r.getMessage() for r in errors] == []
    assert [p["state"] for p in postrun if p["sender"] is task] == [states.SUCCESS]


# -- new findings ---------------------------------------------------------------


@property_settings(max_examples=10)
@example(size=1, retries=1)
@given(size=st.integers(1, 3), retries=st.integers(1, 3))
def test_self_retry_past_max_retries_fails_with_max_retries_exceeded(
    app: Celery, size: int, retries: int
) -> None:
    # given calls retried as often as the task allows
    plan = Plan(size, retries, (), "self.retry", Returns("scalar", (None,)))
    task = batch_task(app, plan, max_retries=1)
    requests = requests_of(task, *range(size), retries=retries)
    # when the body calls self.retry() once more
    with clean_worker_state():
        run_batch(task, requests)
    # then each fails as a plain task would: MaxRetriesExceededError
    for request in requests:
        result = app.AsyncResult(request.id)
        assert result.state == states.FAILURE
        assert isinstance(result.result, MaxRetriesExceededError), result.result
