"""The worker's prefetch budget, held against a plain model with hypothesis."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_batches.prefetch import PrefetchBudget

TASKS = ["a", "b", "c"]
KEYS = [None, "k1", "k2", "k3"]


@dataclass
class Model:
    """What the budget should have granted, kept the obvious way."""

    limit: int
    tasks: list[str] = field(default_factory=list)
    grants: dict[tuple[str, object], int] = field(default_factory=dict)

    def used(self) -> int:
        return sum(self.grants.values())

    def used_by(self, task: str) -> int:
        return sum(n for (name, _), n in self.grants.items() if name == task)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(TASKS)),
        st.tuples(
            st.just("grant"),
            st.sampled_from(TASKS),
            st.sampled_from(KEYS),
            st.integers(min_value=0, max_value=5000),
            st.integers(min_value=1, max_value=4),
        ),
        st.tuples(st.just("release"), st.sampled_from(TASKS), st.sampled_from(KEYS)),
        st.tuples(st.just("release_task"), st.sampled_from(TASKS)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(min_value=0, max_value=20_000), ops=operations)
def test_grants_stay_within_the_limit_and_each_tasks_share(
    limit: int, ops: list[tuple[object, ...]]
) -> None:
    budget = PrefetchBudget(limit)
    model = Model(limit)
    for op in ops:
        kind = op[0]
        if kind == "add":
            task = str(op[1])
            budget.add_task(task)
            if task not in model.tasks:
                model.tasks.append(task)
        elif kind == "grant":
            _, name, key, want, max_keys = op
            assert isinstance(name, str) and isinstance(want, int)
            assert isinstance(max_keys, int)
            task = name
            share = budget.share()
            granted = budget.grant(task, key, want, max_keys=max_keys)
            # never more than asked, nor past the task's share or the limit
            assert 0 <= granted <= want
            if granted:
                assert (task, key) not in model.grants
                assert model.used_by(task) + granted <= share
                keys = sum(1 for name, _ in model.grants if name == task)
                assert keys < max_keys
                model.grants[(task, key)] = granted
            elif (task, key) not in model.grants and want:
                # refused only when the task has no key slot or no room left
                # in its share or in the limit
                keys = sum(1 for name, _ in model.grants if name == task)
                room = min(share - model.used_by(task), limit - model.used())
                assert keys >= max_keys or room <= 0
        elif kind == "release":
            _, name, key = op
            assert isinstance(name, str)
            assert budget.release(name, key) == model.grants.pop((name, key), 0)
        elif kind == "release_task":
            task = str(op[1])
            mine = [grant for grant in model.grants if grant[0] == task]
            assert budget.release_task(task) == sum(model.grants.pop(g) for g in mine)
        assert budget.used == model.used() <= limit


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=20_000),
    tasks=st.integers(min_value=1, max_value=6),
    want=st.integers(min_value=1, max_value=5000),
)
def test_a_task_with_nothing_granted_always_gets_its_share(
    limit: int, tasks: int, want: int
) -> None:
    # given a budget shared by several batch tasks, all but the last of
    # which took all they could, over as many keys as they like
    budget = PrefetchBudget(limit)
    names = [f"t{n}" for n in range(tasks)]
    for name in names:
        budget.add_task(name)
    for name in names[:-1]:
        for key in range(50):
            budget.grant(name, key, want, max_keys=50)
    # when the last task's first key asks, then it gets its full share
    assert budget.grant(names[-1], "k", want, max_keys=1) == min(want, limit // tasks)


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PrefetchBudget(-1)


def test_a_limit_of_zero_grants_nothing() -> None:
    budget = PrefetchBudget(0)
    budget.add_task("a")
    assert budget.grant("a", None, 10, max_keys=3) == 0
