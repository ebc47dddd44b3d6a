"""SettledTags: when one multiple ack may settle a batch, and never more."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from celery_batches.acks import MAX_RUNS, SettledTags, _track_settlements


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
    assert tags.runs == [(3, 3), (5, 5)]


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
    # then the watermark is 10 and only 12 is remembered past it
    assert tags.through == 10
    assert tags.runs == [(12, 12)]
    # and once 11 is settled, the watermark passes 12
    tags.settle(11)
    assert tags.through == 12
    assert tags.runs == []


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


def test_tags_settled_past_a_gap_are_kept_as_one_run() -> None:
    # given delivery 1 outstanding for a long time (a far ETA)
    tags = ledger()
    # when a hundred thousand tags are settled after it, in order
    for tag in range(2, 100_002):
        tags.settle(tag)
    # then they take one run, and a batch after them cannot pass the gap
    assert tags.runs == [(2, 100_001)]
    assert tags.coverable([100_002]) == 0
    # and once delivery 1 is settled, the watermark passes them all and the
    # next batch is covered again
    tags.settle(1)
    assert (tags.through, tags.runs) == (100_001, [])
    assert tags.coverable([100_002, 100_003]) == 2


def test_too_many_gaps_make_the_ledger_give_up() -> None:
    # given every other delivery outstanding (an unlimited prefetch window
    # full of held messages)
    tags = ledger()
    # when more runs than the ledger keeps are settled between them
    for tag in range(2, 2 * MAX_RUNS + 4, 2):
        tags.settle(tag)
    # then it forgets them, so its memory stays bounded, and stops covering
    assert not tags.usable
    assert tags.runs == []
    assert tags.coverable([1]) == 0


def _covered_by_model(settled: set[int], tags: list[int]) -> int:
    """What ``coverable`` must return, computed from the plain set of settled tags."""
    covered = 0
    for count in range(1, len(tags) + 1):
        prefix = tags[:count]
        if len(set(prefix)) != count or set(prefix) & settled:
            break
        if set(range(1, prefix[-1] + 1)) <= settled | set(prefix):
            covered = count
        else:
            break
    return covered


@example(operations=[(2, False)], batch=[1, 2])  # 2 is settled already
@given(
    operations=st.lists(st.tuples(st.integers(1, 60), st.booleans()), max_size=40),
    batch=st.lists(st.integers(1, 70), min_size=1, max_size=20),
)
def test_the_ledger_agrees_with_a_plain_set_of_settled_tags(
    operations: list[tuple[int, bool]], batch: list[int]
) -> None:
    # given any sequence of acks and multiple acks, each of a tag not yet
    # settled (the broker closes a channel that settles a tag twice)
    tags = ledger()
    settled: set[int] = set()
    for tag, multiple in operations:
        if tag in settled:
            continue
        tags.settle(tag, multiple)
        settled |= set(range(1, tag + 1)) if multiple else {tag}
    # then the ledger's watermark and runs are exactly that set
    expanded = set(range(1, tags.through + 1))
    for first, last in tags.runs:
        expanded |= set(range(first, last + 1))
    assert expanded == settled
    # and it covers exactly the prefix of an ascending batch that one
    # multiple ack may settle without settling anything else
    ours = sorted(batch)
    assert tags.coverable(ours) == _covered_by_model(settled, ours)


class ChannelDouble:
    """The settling and consuming parts of a py-amqp channel, recording calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        #: As py-amqp keeps them: consumer tag -> callback, and the tags of
        #: consumers that ack nothing.
        self.callbacks: dict[str, Any] = {}
        self.no_ack_consumers: set[str] = set()

    def basic_consume(
        self,
        queue: str = "",
        consumer_tag: str = "",
        no_ack: bool = False,
        callback: Any = None,
        **kwargs: Any,
    ) -> str:
        self.callbacks[consumer_tag] = callback
        if no_ack:
            self.no_ack_consumers.add(consumer_tag)
        return consumer_tag

    def deliver(self, consumer_tag: str, delivery_tag: int) -> None:
        """Hand a message to a consumer, as py-amqp's _on_basic_deliver does."""
        message = SimpleNamespace(
            delivery_info={"consumer_tag": consumer_tag, "delivery_tag": delivery_tag}
        )
        self.callbacks[consumer_tag](message)

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
    assert (tags.through, tags.runs) == (2, [(4, 4)])


def test_a_recover_on_the_channel_makes_its_ledger_unusable() -> None:
    # given a tracked channel
    channel = ChannelDouble()
    tags = _track_settlements(channel)
    # when someone asks the broker to redeliver everything unacked
    channel.basic_recover(requeue=True)
    # then the recover went out and no batch is acked in one frame any more
    assert channel.calls == [("recover", (True,))]
    assert not tags.usable


def test_deliveries_to_a_no_ack_consumer_never_hold_back_a_multiple_ack() -> None:
    # given a tracked channel with a consumer that acks (tasks) and one that
    # does not (broadcast replies), their deliveries interleaved
    channel = ChannelDouble()
    tags = _track_settlements(channel)
    seen: list[int] = []
    channel.basic_consume("tasks", "t", callback=lambda m: seen.append(1))
    channel.basic_consume("replies", "r", no_ack=True, callback=lambda m: None)
    channel.deliver("r", 1)
    channel.deliver("t", 2)
    channel.deliver("r", 3)
    channel.deliver("t", 4)
    # then the task messages 2 and 4 may be acked in one frame: 1 and 3
    # needed no ack and count as settled; the callbacks still ran
    assert tags.coverable([2, 4]) == 2
    assert seen == [1, 1]


def test_tags_delivered_before_the_ledger_to_no_ack_consumers_are_settled() -> None:
    # given a channel that delivered tags 1-3 to a no-ack consumer (Celery's
    # mingle replies) before the ledger was installed, and no consumer that
    # acks yet
    channel = ChannelDouble()
    tags = _track_settlements(channel)
    channel.basic_consume("tasks", "t", callback=lambda m: None)
    # when the task consumer's first delivery is tag 4
    channel.deliver("t", 4)
    channel.deliver("t", 5)
    # then 4 and 5 may go in one frame
    assert tags.coverable([4, 5]) == 2


def test_earlier_tags_stay_unsettled_if_a_consumer_that_acks_existed() -> None:
    # given a channel whose acking consumer started before the ledger
    channel = ChannelDouble()
    channel.basic_consume("tasks", "t", callback=lambda m: None)
    tags = _track_settlements(channel)
    # when its delivery 4 is seen, then 1-3 may still be unacked messages
    channel.deliver("t", 4)
    assert tags.coverable([4]) == 0
