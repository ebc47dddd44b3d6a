"""SettledTags: when one multiple ack may settle a batch, and never more."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from celery_batches.acks import MAX_OUT_OF_ORDER, SettledTags, _track_settlements


def ledger() -> SettledTags:
    return SettledTags()


def test_a_fresh_channel_covers_a_contiguous_batch_from_the_first_tag() -> None:
    # given a channel on which nothing was settled yet
    tags = ledger()
    # then a batch of its first five deliveries is covered whole
    assert tags.coverable([1, 2, 3, 4, 5]) == 5
    # and a batch that leaves out delivery 1 is not covered at all
    assert tags.coverable([2, 3, 4]) == 0


def test_an_unsettled_older_delivery_stops_the_cover_before_it() -> None:
    # given deliveries 1-3 acked, and 4 (another task's) still outstanding
    tags = ledger()
    for tag in (1, 2, 3):
        tags.settle(tag)
    # then a batch of 5-9 cannot be acked with one frame
    assert tags.coverable([5, 6, 7, 8, 9]) == 0
    # and a batch of 4-9 can
    assert tags.coverable([4, 5, 6, 7, 8, 9]) == 6


def test_tags_settled_out_of_order_fill_the_gaps_of_a_batch() -> None:
    # given deliveries 1, 3 and 5 settled (the other key's batch was acked)
    tags = ledger()
    for tag in (1, 3, 5):
        tags.settle(tag)
    # then this key's batch 2, 4, 6 is covered whole
    assert tags.coverable([2, 4, 6]) == 3
    # and the settled watermark stops at the first gap
    assert tags.through == 1
    assert tags.above == {3, 5}


def test_only_the_prefix_before_an_outstanding_gap_is_covered() -> None:
    # given a batch 1, 2, 4 while delivery 3 is outstanding
    tags = ledger()
    # then the first two may go in one frame, the last on its own
    assert tags.coverable([1, 2, 4]) == 2


def test_a_multiple_ack_settles_everything_below_it() -> None:
    # given deliveries 7 and 12 settled out of order
    tags = ledger()
    tags.settle(7)
    tags.settle(12)
    # when everything up to 10 is acked in one frame
    tags.settle(10, multiple=True)
    # then the watermark is 10 and only 12 is remembered above it
    assert tags.through == 10
    assert tags.above == {12}
    # and once 11 is settled, the watermark passes 12
    tags.settle(11)
    assert tags.through == 12
    assert tags.above == set()


def test_an_already_settled_or_repeated_tag_is_never_covered() -> None:
    # given deliveries 1-3 settled
    tags = ledger()
    tags.settle(3, multiple=True)
    # then a batch that holds one of them again is not covered
    assert tags.coverable([3, 4]) == 0
    # and neither is a batch that names a delivery twice, past the repeat
    assert tags.coverable([4, 4, 5]) == 1


def test_acking_everything_outstanding_makes_the_ledger_unusable() -> None:
    # given a ledger that settles "every outstanding delivery" (tag 0)
    tags = ledger()
    tags.settle(0, multiple=True)
    # then it no longer allows any batch to be acked with one frame
    assert not tags.usable
    assert tags.coverable([1, 2]) == 0


def test_too_many_tags_settled_past_a_gap_make_the_ledger_give_up() -> None:
    # given delivery 1 outstanding for ever (a far ETA)
    tags = ledger()
    # when more tags than the ledger remembers are settled after it
    for tag in range(2, MAX_OUT_OF_ORDER + 3):
        tags.settle(tag)
    # then it forgets them, so its memory stays bounded, and stops covering
    assert not tags.usable
    assert tags.above == set()
    assert tags.coverable([1]) == 0


@given(
    settled=st.sets(st.integers(1, 40), max_size=40),
    batch=st.sets(st.integers(1, 40), min_size=1, max_size=20),
)
def test_a_covered_prefix_never_acks_an_outstanding_delivery(
    settled: set[int], batch: set[int]
) -> None:
    # given any set of settled deliveries, and a batch of others
    tags = ledger()
    for tag in sorted(settled):
        tags.settle(tag)
    ours = sorted(batch - settled)
    # when the covered prefix is acked through its last tag
    covered = tags.coverable(ours)
    if covered == 0:
        return
    through = ours[covered - 1]
    # then every delivery up to that tag was settled already or is ours
    acked = set(range(1, through + 1))
    assert acked <= settled | set(ours[:covered])


class ChannelDouble:
    """The settling methods of a py-amqp channel, recording their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", (delivery_tag, multiple)))

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self.calls.append(("reject", (delivery_tag, requeue)))

    def basic_recover(self, requeue: bool = False) -> None:
        self.calls.append(("recover", (requeue,)))


def test_every_ack_and_reject_on_the_channel_reaches_the_ledger() -> None:
    # given a channel whose settlements are tracked
    channel = ChannelDouble()
    tags = _track_settlements(channel)
    # when Celery acks 1, rejects 2 (requeued) and acks 4 on it
    channel.basic_ack(1)
    channel.basic_reject(2, requeue=True)
    channel.basic_ack(4, multiple=False)
    # then each call still reached the channel, and the ledger knows 1-2
    # are settled and 4 is, past the gap at 3
    assert [name for name, _ in channel.calls] == ["ack", "reject", "ack"]
    assert (tags.through, tags.above) == (2, {4})


def test_a_recover_on_the_channel_makes_its_ledger_unusable() -> None:
    # given a tracked channel
    channel = ChannelDouble()
    tags = _track_settlements(channel)
    # when someone asks the broker to redeliver everything unacked
    channel.basic_recover(requeue=True)
    # then the recover went out and no batch is acked in one frame any more
    assert channel.calls == [("recover", (True,))]
    assert not tags.usable
