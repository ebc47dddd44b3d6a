"""Unit tests of a batch body with ``celery_batches.testing``: no worker needed.

The ``test_*`` functions are ordinary pytest tests; put them in your own
test suite next to the task they check.
"""

from __future__ import annotations

import pytest
from celery import Celery

from celery_batches import Batches, SimpleRequest
from celery_batches.testing import apply_batch, call

app = Celery("testing_helper")


@app.task(base=Batches, flush_every=100, flush_interval=1, per_request_results=True)
def price_with_tax(requests: list[SimpleRequest]) -> list[float | Exception]:
    """Add tax to each call's price; a negative price fails only its call."""
    prices: list[float | Exception] = []
    for request in requests:
        price = request.args[0]
        rate = request.kwargs.get("rate", 0.2)
        if price < 0:
            prices.append(ValueError(f"negative price {price!r}"))
        else:
            prices.append(round(price * (1 + rate), 2))
    return prices


def test_each_call_gets_its_own_price() -> None:
    # call(...) takes what .delay(...) would; a bare value is one argument
    results = apply_batch(price_with_tax, [call(10.0), call(10.0, rate=0.05), 4.0])
    assert [result.get() for result in results] == [12.0, 10.5, 4.8]


def test_a_negative_price_fails_only_its_own_call() -> None:
    good, bad = apply_batch(price_with_tax, [call(1.0), call(-1.0)])
    assert good.state == "SUCCESS" and good.get() == 1.2
    assert bad.state == "FAILURE"
    assert isinstance(bad.result, ValueError)


def test_throw_raises_the_first_failure() -> None:
    with pytest.raises(ValueError, match="negative price"):
        apply_batch(price_with_tax, [call(1.0), call(-1.0)], throw=True)


def test_one_call_through_apply() -> None:
    # Batches.apply() runs the body on a batch of one, in this process
    assert price_with_tax.apply((5.0,)).get() == 6.0
