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

import pickle
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals, states
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import run_batch
from tests.property.conftest import clean_worker_state, property_settings
from tests.property.messages import backend_writes
from tests.property.values import json_scalars, json_values
from tests.unit.conftest import recording
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
