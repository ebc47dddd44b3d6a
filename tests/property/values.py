"""Hypothesis strategies for what a message may carry: JSON values and dates."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "dates",
    "hashable_scalars",
    "json_mappings",
    "json_scalars",
    "json_values",
]

#: What a JSON document decodes to at its leaves. NaN is left out: no JSON
#: encoder a producer would use writes it, and NaN != NaN would make every
#: comparison in the invariants about it vacuous.
json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=6),
)

#: Any JSON value: scalars, lists and objects (string keys), a few levels deep.
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
    ),
    max_leaves=6,
)

#: A JSON object.
json_mappings: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    st.text(max_size=4), json_values, max_size=3
)

#: The JSON values a dict can use as a key (no lists, no objects).
hashable_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=4),
)

_OFFSETS: st.SearchStrategy[Any] = st.sampled_from(
    [
        None,
        timezone.utc,
        timezone(timedelta(hours=14)),
        timezone(timedelta(hours=-12)),
        timezone(timedelta(hours=5, minutes=30)),
    ]
)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _from_now(seconds: float, aware: bool) -> str:
    now = datetime.now(timezone.utc)
    moment = now + timedelta(seconds=seconds)
    return (moment if aware else moment.replace(tzinfo=None)).isoformat()


#: An ETA or ``expires`` field as a producer (or a broken one) may send it:
#: ISO dates anywhere from year 1 to 9999, naive or with an offset (the far
#: ends overflow when converted), dates relative to now, strings that are
#: no date, and values of other JSON types.
dates: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        _iso,
        st.datetimes(
            min_value=datetime(1, 1, 1),
            max_value=datetime(9999, 12, 31, 23, 59, 59),
            timezones=_OFFSETS,
        ),
    ),
    st.builds(
        _from_now,
        st.sampled_from([-86400.0, -1.0, 0.5, 30.0, 86400.0, 3e10]),
        st.booleans(),
    ),
    st.sampled_from(
        [
            "9999-12-31T23:59:59-12:00",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59",
            "not a date",
            "",
            "2024-02-30T00:00:00",
            "24:00",
            "1e9",
        ]
    ),
    st.text(max_size=12),
    json_scalars,
    st.lists(json_scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), json_scalars, max_size=2),
)
