"""Any message, through the real strategy and collector: each call has one fate.

Hypothesis draws messages of task protocol 1, 2 and hybrid with any JSON in
each slot of the body, odd or missing headers, ETA and ``expires`` fields of
any shape, batch keys of any type and repeated task ids, and plays them
against the real strategy on the unit tier's consumer double, with revokes
and timer ticks in between; at the end every ETA comes due and the buffer
is flushed as a warm shutdown flushes it. Then each message was exactly one
of: handed to the pool once; rejected (FAILURE stored when its id is
known); or dropped as revoked or expired (REVOKED stored), and the prefetch
window stayed within its bound and went back to its floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from celery import Celery
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.uuid import uuid

from celery_batches import Batches, SimpleRequest
from tests.property.conftest import clean_worker_state, property_settings
from tests.property.messages import (
    FRESH,
    KEEP,
    MISSING,
    Call,
    Run,
    backend_writes,
)
from tests.property.values import (
    dates,
    hashable_scalars,
    json_mappings,
    json_scalars,
    json_values,
)
from tests.unit.conftest import PROTOCOLS, FakeWorker

#: Ids that several calls of one example share.
SHARED_IDS = ["id-a", "id-b"]

#: Headers a producer may set (protocol 2 and hybrid) or body fields
#: (protocol 1) whose values the worker reads.
ODD_FIELDS = [
    "shadow",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "group",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "lang",
    "utc",
    "reply_to",
    "priority",
    "replaced_task_nesting",
]

#: What the options part of a protocol 2 body holds: Celery's own keys,
#: with anything in them, and keys of its own.
options_parts = st.one_of(
    st.just(KEEP),
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "callbacks": st.none(),
            "errbacks": st.none(),
            "chain": st.none(),
            "chord": st.none(),
            "group_index": json_scalars,
            "extra": json_values,
        },
    ),
)


def first_argument(request: SimpleRequest) -> Any:
    """A batch key: the first positional argument (IndexError if none)."""
    first = request.args[0]
    return first if isinstance(first, (str, int, float, type(None))) else repr(first)


def first_argument_as_list(request: SimpleRequest) -> Any:
    """A batch key returning a list: unhashable."""
    return list(request.args[:1])


#: Task ids of the main test: unique, shared by several calls, or absent.
usual_ids = st.sampled_from([FRESH, FRESH, *SHARED_IDS, MISSING])


def mostly(value: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``value`` seven times in eight, else a draw of ``other``."""
    return st.one_of(*[st.just(value)] * 7, other)


@st.composite
def calls(
    draw: st.DrawFn,
    *,
    tenants: st.SearchStrategy[Any] = hashable_scalars,
    embeds: st.SearchStrategy[Any] = options_parts,
    ids: st.SearchStrategy[Any] = usual_ids,
    unique_eta_ids: bool = True,
) -> Call:
    """One message of any protocol, with something unusual in any slot.

    Most slots keep what Celery's helper puts there, so that most messages
    are valid calls and reach the buffer; each is odd often enough.
    """
    protocol = draw(st.sampled_from(PROTOCOLS))
    task_id = draw(ids)
    if task_id is MISSING and protocol != "proto2":
        # Protocol 1 and hybrid messages without an id are the subject of
        # a test of their own (they are not rejected).
        task_id = FRESH
    args = draw(mostly(KEEP, st.one_of(st.lists(json_values, max_size=3), json_values)))
    kwargs = draw(
        st.one_of(
            st.just(KEEP),
            st.fixed_dictionaries({}, optional={"tenant": tenants, "x": json_values}),
            st.fixed_dictionaries({"tenant": tenants}),
            st.fixed_dictionaries({"tenant": tenants}),
            json_values,
        )
    )
    embed = draw(embeds) if protocol == "proto2" else KEEP
    eta = draw(mostly(KEEP, dates))
    expires = draw(mostly(KEEP, dates))
    if unique_eta_ids and eta is not KEEP and task_id is not MISSING:
        # Two held calls with one id are the subject of a test of their own.
        task_id = FRESH
    fields = draw(
        mostly(
            {},
            st.dictionaries(
                st.sampled_from(ODD_FIELDS),
                st.one_of(st.just(MISSING), json_scalars),
                max_size=2,
            ),
        )
    )
    whole_body = (
        st.one_of(
            json_values,
            st.tuples(
                json_values, json_values, embeds.filter(lambda e: e is not KEEP)
            ).map(list),
        ).filter(lambda body: not is_odd_options_part(body, embeds))
        if protocol == "proto2"
        else json_mappings.filter(lambda body: "id" not in body)
    )
    body = draw(mostly(KEEP, whole_body))
    return Call(protocol, task_id, args, kwargs, embed, body, eta, expires, fields)


def is_odd_options_part(body: Any, embeds: st.SearchStrategy[Any]) -> bool:
    """Whether ``body`` is a triple whose options part is a non-empty non-mapping.

    Such bodies are left to the test of defect 2 unless ``embeds`` is that
    test's strategy.
    """
    if embeds is not options_parts:
        return False
    return (
        isinstance(body, list)
        and len(body) == 3
        and bool(body[2])
        and not isinstance(body[2], dict)
    )


@dataclass(frozen=True)
class Settings:
    """How the batch task and the worker are configured for one example."""

    flush_every: int
    flush_interval: float
    batch_key: Any
    prefetch: int
    processes: int


settings_drawn = st.builds(
    Settings,
    flush_every=st.integers(1, 4),
    flush_interval=st.sampled_from([0.5, 30.0]),
    batch_key=st.sampled_from([None, "tenant", first_argument]),
    prefetch=st.sampled_from([0, 1, 4]),
    processes=st.sampled_from([1, 3]),
)


def steps(call_strategy: st.SearchStrategy[Call]) -> st.SearchStrategy[list[Any]]:
    """Deliveries interleaved with revokes, time passing and interval ticks."""
    return st.lists(
        st.one_of(
            st.tuples(st.just("deliver"), call_strategy),
            st.tuples(st.just("deliver"), call_strategy),
            st.tuples(st.just("revoke"), st.integers(0, 20)),
            st.tuples(st.just("advance"), st.sampled_from([0.1, 1.0, 31.0, 120.0])),
            st.tuples(st.just("interval")),
        ),
        max_size=12,
    )


def batch_task(app: Celery, config: Settings) -> Any:
    name = f"property.batch.{uuid()}"

    def body(requests: list[SimpleRequest]) -> None:
        pass

    app.task(
        base=Batches,
        name=name,
        shared=False,
        flush_every=config.flush_every,
        flush_interval=config.flush_interval,
        batch_key=config.batch_key,
    )(body)
    return app.tasks[name]


def play(app: Celery, config: Settings, plan: list[Any]) -> None:
    """Play ``plan`` against a fresh worker; check every message's fate."""
    with clean_worker_state(), backend_writes(app) as writes:
        worker = FakeWorker(app, prefetch=config.prefetch)
        worker.pool.num_processes = config.processes
        worker.consumer.initial_prefetch_count = config.prefetch
        task = batch_task(app, config)
        run = Run(app, worker, task, floor=config.prefetch)
        actions: dict[str, Callable[..., object]] = {
            "deliver": run.deliver,
            "revoke": run.revoke,
            "advance": run.advance,
            "interval": run.fire_interval,
        }
        for step, *arguments in plan:
            actions[step](*arguments)
        run.finish()
        run.check_every_message_accounted(writes)


# -- the whole input space, less the known defects -------------------------------


@property_settings(max_examples=500)
@given(config=settings_drawn, plan=steps(calls()))
def test_every_message_is_dispatched_rejected_or_revoked_exactly_once(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given a batch task and a worker configured as drawn
    # when any sequence of messages, revokes and timer ticks is played,
    # and the worker shuts down warm at the end
    # then every message met exactly one fate and the window is back
    play(app, config, plan)
