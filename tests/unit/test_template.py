"""The quick argsrepr and uuid4s of bulk messages equal Celery's and Python's."""

from __future__ import annotations

import uuid
from typing import Any

from celery.utils.saferepr import saferepr
from hypothesis import given
from hypothesis import strategies as st

from celery_batches.template import flat_repr, uuid4_strings

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
)
_flat = st.one_of(
    st.lists(_scalars, max_size=8).map(tuple),
    st.lists(_scalars, max_size=8),
    st.dictionaries(
        st.one_of(st.text(max_size=10), st.integers()), _scalars, max_size=8
    ),
)
_anything = st.recursive(
    _scalars | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(value=_flat, limit=st.sampled_from([1024, 4096, 60]))
def test_flat_arguments_read_as_saferepr_writes_them(value: Any, limit: int) -> None:
    # given flat arguments of numbers, text and None, and a size limit
    text = flat_repr(value, limit)
    # then the quick text is saferepr's, or there is none (too long for a
    # quick one)
    if text is not None:
        assert text == saferepr(value, limit)
        assert text == saferepr(value, limit, maxlevels=3)
    else:
        assert len(saferepr(value, None)) >= limit // 2


@given(value=_anything)
def test_anything_else_is_left_to_saferepr(value: Any) -> None:
    text = flat_repr(value, 1024)
    assert text is None or text == saferepr(value, 1024)


def test_uuid4s_are_what_uuid4_makes() -> None:
    made = uuid4_strings(5000)
    assert len(set(made)) == 5000
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
