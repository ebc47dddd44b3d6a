"""BatchBuffer: when a key's requests make a batch, and how the rest come out."""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from celery_batches.buffer import BatchBuffer


def fill(
    buffer: BatchBuffer[str], items: list[str], key: Hashable = None
) -> list[list[str]]:
    """Add ``items`` under ``key``; return the batches that came back, in order."""
    batches = []
    for item in items:
        batch = buffer.add(item, key)
        if batch is not None:
            batches.append(batch)
    return batches


def test_a_key_hands_out_a_batch_when_it_holds_flush_every_items() -> None:
    # given a buffer that batches three at a time
    buffer: BatchBuffer[str] = BatchBuffer(3)
    # when two items are added
    first = [buffer.add("a"), buffer.add("b")]
    # then nothing is handed out yet, and both wait
    assert first == [None, None]
    assert len(buffer) == 2
    # when the third arrives
    batch = buffer.add("c")
    # then the three come out together, oldest first, and nothing waits
    assert batch == ["a", "b", "c"]
    assert len(buffer) == 0
    assert not buffer


def test_each_key_counts_towards_its_own_batch() -> None:
    # given a buffer of two and two keys
    buffer: BatchBuffer[str] = BatchBuffer(2)
    # when one item of each key arrives
    assert buffer.add("a1", key="a") is None
    assert buffer.add("b1", key="b") is None
    # then neither key is full although the buffer holds two items
    assert len(buffer) == 2
    assert buffer.pending("a") == buffer.pending("b") == 1
    # when a second item of key b arrives
    # then only key b's items come out, and key a keeps waiting
    assert buffer.add("b2", key="b") == ["b1", "b2"]
    assert buffer.pending("a") == 1
    assert buffer.pending("b") == 0
    assert buffer.keys() == ["a"]


def test_flush_every_of_one_hands_out_every_item_at_once() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(1)
    assert fill(buffer, ["a", "b"]) == [["a"], ["b"]]
    assert not buffer


def test_take_hands_out_a_partial_batch_oldest_first() -> None:
    # given three items waiting under a key of a buffer of four
    buffer: BatchBuffer[str] = BatchBuffer(4)
    assert fill(buffer, ["a", "b", "c"], key="k") == []
    # when the key is taken (as the interval flush does)
    batch = buffer.take("k")
    # then every waiting item comes out, oldest first, and the key is gone
    assert batch == ["a", "b", "c"]
    assert buffer.keys() == []
    assert buffer.pending("k") == 0


def test_take_never_returns_more_than_flush_every() -> None:
    # given a buffer whose flush_every is lowered after items queued up
    # (flush_every is a public attribute a user may change)
    buffer: BatchBuffer[str] = BatchBuffer(10)
    fill(buffer, ["a", "b", "c", "d", "e"])
    buffer.flush_every = 2
    # when the key is taken repeatedly
    # then each batch holds at most two, in arrival order
    assert buffer.take() == ["a", "b"]
    assert buffer.take() == ["c", "d"]
    assert buffer.take() == ["e"]
    assert buffer.take() == []
    assert len(buffer) == 0


def test_take_of_an_unknown_key_is_empty_and_leaves_no_trace() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2)
    buffer.add("a", key="a")
    assert buffer.take("nobody") == []
    assert buffer.keys() == ["a"]
    assert len(buffer) == 1


def test_drain_empties_every_key_in_batches_of_at_most_flush_every() -> None:
    # given a buffer of three holding items under three keys, one of which
    # holds more than a batch (flush_every lowered after they queued up)
    buffer: BatchBuffer[str] = BatchBuffer(10)
    fill(buffer, ["a1", "a2", "a3", "a4", "a5"], key="a")
    fill(buffer, ["b1"], key="b")
    fill(buffer, ["c1", "c2"], key=None)
    buffer.flush_every = 3
    # when the buffer is drained
    drained = list(buffer.drain())
    # then every item comes out exactly once, each batch from a single key,
    # no batch larger than three, and each key's items in arrival order
    assert drained == [
        ("a", ["a1", "a2", "a3"]),
        ("a", ["a4", "a5"]),
        ("b", ["b1"]),
        (None, ["c1", "c2"]),
    ]
    # and the buffer is empty and forgot every key
    assert len(buffer) == 0
    assert not buffer
    assert buffer.keys() == []


def test_drain_of_an_empty_buffer_yields_nothing() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2)
    assert list(buffer.drain()) == []


def test_keys_are_forgotten_once_their_items_are_handed_out() -> None:
    # given many keys that each fill a batch
    buffer: BatchBuffer[str] = BatchBuffer(2)
    for n in range(100):
        fill(buffer, [f"{n}-1", f"{n}-2"], key=n)
    # then no key is remembered: keys leave no memory behind
    assert buffer.keys() == []
    assert len(buffer) == 0


def test_len_and_bool_count_waiting_items_across_keys() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(5)
    assert len(buffer) == 0
    assert not buffer
    buffer.add("a", key=1)
    buffer.add("b", key=2)
    buffer.add("c", key=2)
    assert len(buffer) == 3
    assert buffer
    buffer.take(2)
    assert len(buffer) == 1


def test_clear_returns_every_waiting_item_and_empties_the_buffer() -> None:
    # given items waiting under two keys
    buffer: BatchBuffer[str] = BatchBuffer(5)
    fill(buffer, ["a1", "a2"], key="a")
    fill(buffer, ["b1"], key="b")
    # when the buffer is cleared
    cleared = buffer.clear()
    # then every item is returned once and nothing waits any more
    assert sorted(cleared) == ["a1", "a2", "b1"]
    assert len(buffer) == 0
    assert buffer.keys() == []
    # and the buffer keeps working afterwards
    assert fill(buffer, ["x"] * 5) == [["x"] * 5]


@pytest.mark.parametrize("flush_every", [0, -1])
def test_flush_every_below_one_is_refused(flush_every: int) -> None:
    with pytest.raises(ValueError, match="flush_every"):
        BatchBuffer(flush_every)


# -- property: nothing is lost, duplicated, mixed or reordered --------------

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is optional: the cases above still run
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True

if HAVE_HYPOTHESIS:
    #: A run of operations: ("add", key) adds the next item under ``key``,
    #: ("take", key) takes that key, ("drain", None) drains everything.
    operations = st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 3)),
            st.tuples(st.just("take"), st.integers(0, 3)),
            st.tuples(st.just("drain"), st.none()),
        ),
        max_size=80,
    )

    # No example database: it would write .hypothesis/ into the work tree.
    # No deadline: a loaded CI machine must not turn slowness into failure.
    @settings(database=None, deadline=None)
    @given(flush_every=st.integers(1, 6), ops=operations)
    def test_every_item_comes_out_once_in_order_and_never_mixed(
        flush_every: int, ops: list[tuple[str, int | None]]
    ) -> None:
        # given a buffer driven by an arbitrary run of adds, takes and drains
        buffer: BatchBuffer[tuple[int | None, int]] = BatchBuffer(flush_every)
        out: list[tuple[Hashable, list[tuple[int | None, int]]]] = []
        batch: list[tuple[int | None, int]] | None
        added = 0
        for op, key in ops:
            if op == "add":
                batch = buffer.add((key, added), key)
                added += 1
                if batch is not None:
                    out.append((key, batch))
            elif op == "take":
                batch = buffer.take(key)
                if batch:
                    out.append((key, batch))
            else:
                out.extend(buffer.drain())
            # then the count always matches what is waiting, and no key
            # is remembered without waiting items
            keys = buffer.keys()
            waiting = [buffer.pending(k) for k in keys]
            assert len(buffer) == sum(waiting)
            assert bool(buffer) == (sum(waiting) > 0)
            assert all(n > 0 for n in waiting)
        out.extend(buffer.drain())
        # then every item came out exactly once
        seqs = sorted(seq for _, items in out for _, seq in items)
        assert seqs == list(range(added))
        for out_key, out_batch in out:
            # no batch is empty, larger than flush_every, or mixes keys
            assert 1 <= len(out_batch) <= flush_every
            assert {item_key for item_key, _ in out_batch} == {out_key}
        # and each key's items came out in the order they went in
        for key in range(4):
            order = [s for _, b in out for k, s in b if k == key]
            assert order == sorted(order)
        assert len(buffer) == 0
        assert buffer.keys() == []

else:

    def test_every_item_comes_out_once_in_order_and_never_mixed() -> None:
        pytest.skip("hypothesis is not installed")
