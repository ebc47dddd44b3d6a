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
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest
from celery import Celery
from celery.worker import control as worker_control
from hypothesis import example, given
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


# -- known defects (issue 9), one test each ---------------------------------------


@property_settings(max_examples=40)
@example(
    config=Settings(2, 30.0, "tenant", 4, 1),
    plan=[("deliver", Call("proto2", kwargs={"tenant": ["a"]}))],
)
@given(
    config=settings_drawn.filter(lambda c: c.batch_key is not None).map(
        lambda c: Settings(
            c.flush_every,
            c.flush_interval,
            first_argument_as_list if c.batch_key is first_argument else "tenant",
            c.prefetch,
            c.processes,
        )
    ),
    plan=steps(calls(tenants=json_values)),
)
def test_a_batch_key_of_any_json_type_batches_or_rejects_each_call(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given a task keyed by a keyword whose values may be lists or objects,
    # or by a callable that returns a list
    # when calls arrive with such keys
    # then each is batched or rejected, never an error out of the strategy
    play(app, config, plan)


@property_settings(max_examples=40)
@example(
    config=Settings(1, 30.0, None, 4, 1),
    plan=[("deliver", Call("proto2", body=[[1], {}, "x"]))],
)
@given(
    config=settings_drawn,
    plan=steps(calls(embeds=json_values.filter(lambda e: not isinstance(e, dict)))),
)
def test_an_options_part_of_any_json_type_is_batched_or_rejected(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given protocol 2 bodies whose third part is any JSON value
    # when they are delivered, flushed, revoked or expire
    # then each is rejected or batched; nothing raises at flush
    play(app, config, plan)


#: ETAs near enough to come due while a test lets time pass, and past ones.
near_etas = st.builds(
    lambda seconds: (
        datetime.now(timezone.utc) + timedelta(seconds=seconds)
    ).isoformat(),
    st.sampled_from([-60.0, 0.5, 30.0, 90.0]),
)


@property_settings(max_examples=40)
@example(
    config=Settings(3, 30.0, None, 4, 1),
    plan=[
        ("deliver", Call("proto2", task_id="id-a", eta="2999-01-01T00:00:00+00:00")),
        ("deliver", Call("proto2", task_id="id-a", eta="2999-01-02T00:00:00+00:00")),
    ],
)
@given(
    config=settings_drawn,
    plan=st.lists(
        st.one_of(
            st.tuples(
                st.just("deliver"),
                st.builds(
                    Call,
                    protocol=st.sampled_from(PROTOCOLS),
                    task_id=st.sampled_from(SHARED_IDS),
                    eta=st.one_of(st.just(KEEP), near_etas),
                ),
            ),
            st.tuples(st.just("advance"), st.sampled_from([1.0, 31.0, 120.0])),
            st.tuples(st.just("revoke"), st.integers(0, 6)),
        ),
        max_size=8,
    ),
)
def test_calls_sharing_an_id_each_meet_their_own_fate_with_or_without_eta(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given calls with ETAs or countdowns that share their task id (a retry
    # sent again while the first is still held, a producer reusing ids)
    # when they come due and the worker shuts down
    # then each message is batched (or revoked) on its own
    play(app, config, plan)


STAMPED = ["proto2", "hybrid"]


@pytest.mark.skipif(
    not hasattr(worker_control, "revoke_by_stamped_headers"),
    reason="this Celery has no revoke by stamped headers (5.3+)",
)
@property_settings(max_examples=40)
@example(protocols=["proto2"], colours=["blue"], revoked="blue", revoke_at=1)
@given(
    protocols=st.lists(st.sampled_from(STAMPED), min_size=1, max_size=5),
    colours=st.lists(st.sampled_from(["blue", "red", None]), min_size=5, max_size=5),
    revoked=st.sampled_from(["blue", "red"]),
    revoke_at=st.integers(0, 5),
)
def test_calls_revoked_by_stamped_header_are_dropped_as_revoked(
    app: Celery,
    protocols: list[str],
    colours: list[str | None],
    revoked: str,
    revoke_at: int,
) -> None:
    with clean_worker_state(), backend_writes(app) as writes:
        # given calls stamped with a colour, waiting in a buffer that does
        # not fill before the worker stops
        worker = FakeWorker(app)
        task = batch_task(app, Settings(10, 30.0, None, 4, 1))
        run = Run(app, worker, task, floor=4)
        stamped = []
        for index, (protocol, colour) in enumerate(zip(protocols, colours)):
            # when one colour is revoked before or after they arrive
            if index == revoke_at:
                run.revoke_stamped("colour", revoked)
            fields = {}
            if colour is not None:
                fields = {"stamped_headers": ["colour"], "stamps": {"colour": colour}}
            run.deliver(Call(protocol, fields=fields))
            stamped.append(colour)
        if revoke_at >= len(protocols):
            run.revoke_stamped("colour", revoked)
        run.finish()
        # then the calls of that colour are revoked, the others run
        run.check_every_message_accounted(writes)
        fates = [fate.name() for fate in run.fates()]
        expected = ["revoked" if c == revoked else "dispatched" for c in stamped]
        assert fates == expected


@property_settings(max_examples=30)
@example(flush_every=40_000, tenants=["a"], prefetch=4, processes=1)
@given(
    flush_every=st.integers(1, 100_000),
    tenants=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6),
    prefetch=st.sampled_from([1, 4, 64]),
    processes=st.sampled_from([1, 2, 8]),
)
def test_the_prefetch_window_never_exceeds_what_kombu_can_send(
    app: Celery, flush_every: int, tenants: list[str], prefetch: int, processes: int
) -> None:
    # given a task with any flush_every, keyed by tenant, on any worker
    config = Settings(flush_every, 30.0, "tenant", prefetch, processes)
    # when calls of several tenants wait, and then flush
    plan: list[Any] = [
        ("deliver", Call("proto2", kwargs={"tenant": tenant})) for tenant in tenants
    ]
    # then the window stays a count kombu sends as it is (not 0, "no
    # limit"), within the documented bound, and comes back to its floor
    play(app, config, plan)


# -- new findings (not in issue 9) ------------------------------------------------

#: Task ids a producer may send that are no usable id: absent, empty,
#: not a string.
odd_ids = st.one_of(
    st.sampled_from([MISSING, "", None, 0, 7, 1.5, True]),
    st.lists(st.text(max_size=2), max_size=1),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@property_settings(max_examples=40)
@example(
    config=Settings(2, 30.0, None, 4, 1),
    plan=[("deliver", Call("proto2", task_id="", expires="2000-01-01T00:00:00"))],
)
@given(
    config=settings_drawn,
    plan=steps(
        st.builds(
            Call,
            protocol=st.sampled_from(PROTOCOLS),
            task_id=odd_ids,
            eta=st.one_of(st.just(KEEP), st.just("9999-12-31T23:59:59-12:00")),
            expires=st.one_of(st.just(KEEP), st.just("2000-01-01T00:00:00")),
        )
    ),
)
def test_a_message_without_a_usable_task_id_is_rejected_or_batched(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given messages whose id is absent, empty, or of another JSON type
    # when they arrive, expired, with an ETA that overflows, or revoked
    # then each is rejected (or batched), never an error out of the strategy
    play(app, config, plan)


@property_settings(max_examples=40)
@example(
    config=Settings(2, 30.0, None, 4, 1),
    plan=[
        (
            "deliver",
            Call(
                "proto2", expires="2999-01-01T00:00:00", fields={"stamped_headers": 5}
            ),
        )
    ],
)
@given(
    config=settings_drawn,
    plan=steps(
        st.builds(
            Call,
            protocol=st.sampled_from(STAMPED),
            expires=st.one_of(st.just(KEEP), st.just("2999-01-01T00:00:00")),
            fields=st.fixed_dictionaries(
                {"stamped_headers": json_values},
                optional={"stamps": json_values},
            ),
        )
    ),
)
def test_odd_stamped_headers_are_batched_or_rejected(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given messages whose stamped_headers / stamps hold any JSON value
    # when they arrive with or without an expiry
    # then each is batched or rejected, never an error out of the strategy
    play(app, config, plan)


@property_settings(max_examples=40)
@example(
    config=Settings(2, 30.0, None, 4, 1),
    plan=[
        (
            "deliver",
            Call("proto2", embed={"chain": [1]}, eta="9999-12-31T23:59:59-12:00"),
        )
    ],
)
@given(
    config=settings_drawn,
    plan=steps(
        st.builds(
            Call,
            protocol=st.just("proto2"),
            embed=st.fixed_dictionaries(
                {},
                optional={
                    key: json_values
                    for key in ("callbacks", "errbacks", "chain", "chord")
                },
            ),
            eta=st.one_of(st.just(KEEP), st.just("9999-12-31T23:59:59-12:00")),
            expires=st.one_of(st.just(KEEP), st.just("2000-01-01T00:00:00")),
        )
    ),
)
def test_malformed_canvas_options_are_rejected_or_batched(
    app: Celery, config: Settings, plan: list[Any]
) -> None:
    # given protocol 2 messages whose callbacks, errbacks, chain or chord
    # hold any JSON value
    # when they arrive, expire, are revoked, or carry an ETA out of range
    # then each is rejected, revoked or batched, never an error out of the
    # strategy
    play(app, config, plan)
