"""Give every call of a batch its own outcome: result, failure or retry.

Each task below settles its calls in a different way. Run a worker with::

    CELERY_BROKER_URL=redis://localhost:6379/0 \\
    CELERY_RESULT_BACKEND=redis://localhost:6379/1 \\
    celery -A per_request worker
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from celery_batches import Batches, SimpleRequest

app = Celery("per_request")

#: Seconds before a call is tried again (short, so the example runs quickly).
RETRY_IN = 5.0


class QuoteService:
    """Stands in for a pricing API with a bulk endpoint.

    A symbol in ``warming_up`` has no price on its first lookup, only on the
    next one: the caller should ask again later.
    """

    def __init__(self, prices: dict[str, float], warming_up: set[str]) -> None:
        self.prices = prices
        self.warming_up = warming_up
        #: How many times the service was called: one per batch.
        self.calls = 0

    def lookup(self, symbols: Iterable[str]) -> tuple[dict[str, float], set[str]]:
        """Return the prices found, and the symbols to ask for again later."""
        self.calls += 1
        wanted = set(symbols)
        later = wanted & self.warming_up
        self.warming_up -= later
        found = {s: self.prices[s] for s in wanted - later if s in self.prices}
        return found, later


quotes = QuoteService({"ACME": 12.5, "INITECH": 3.25}, warming_up={"INITECH"})


@app.task(base=Batches, flush_every=50, flush_interval=1, max_retries=3)
def fetch_quote(requests: list[SimpleRequest]) -> None:
    """Ask the service once for the whole batch, then settle each call."""
    found, later = quotes.lookup(request.args[0] for request in requests)
    for request in requests:
        symbol = request.args[0]
        if symbol in found:
            request.mark_as_done(found[symbol])
        elif symbol in later:
            # This call alone goes back to the broker, keeping its task id.
            request.retry(countdown=RETRY_IN)
        else:
            request.mark_as_failure(LookupError(f"unknown symbol {symbol!r}"))


@app.task(base=Batches, flush_every=100, flush_interval=1, per_request_results=True)
def normalize_email(requests: list[SimpleRequest]) -> list[str | Exception]:
    """Return one value per call, in order; an exception fails only its call."""
    results: list[str | Exception] = []
    for request in requests:
        local, at, domain = request.args[0].partition("@")
        if at and local and domain:
            results.append(f"{local}@{domain.lower()}")
        else:
            results.append(ValueError(f"not an email address: {request.args[0]!r}"))
    return results


#: Units in stock, by SKU; stands in for a database table.
STOCK = {"apple": 12, "pear": 0}


@app.task(base=Batches, flush_every=100, flush_interval=1, per_request_results=True)
def stock_level(requests: list[SimpleRequest]) -> dict[str, int]:
    """Look each distinct SKU up once; map every call's id to its answer."""
    skus = {request.args[0] for request in requests}
    levels = {sku: STOCK.get(sku, 0) for sku in skus}
    return {request.id: levels[request.args[0]] for request in requests}


class SmsGateway:
    """Stands in for an SMS provider whose bulk endpoint is down at times."""

    def __init__(self, outages: int) -> None:
        #: How many of the next calls fail with ConnectionError.
        self.outages = outages
        self.sent: list[tuple[str, str]] = []

    def send_many(self, messages: list[tuple[str, str]]) -> list[str]:
        """Send every message; return one receipt per message, in order."""
        if self.outages:
            self.outages -= 1
            raise ConnectionError("SMS gateway unreachable")
        first = len(self.sent)
        self.sent.extend(messages)
        return [f"receipt-{n}" for n in range(first, len(self.sent))]


gateway = SmsGateway(outages=1)


@app.task(
    base=Batches,
    flush_every=100,
    flush_interval=1,
    per_request_results=True,
    autoretry_for=(ConnectionError,),
    retry_kwargs={"countdown": RETRY_IN, "max_retries": 5},
)
def send_sms(requests: list[SimpleRequest]) -> list[str]:
    """Send the batch in one gateway call; retry every call if it is down."""
    return gateway.send_many([(r.args[0], r.args[1]) for r in requests])


#: Whether the push provider accepts requests right now.
push_provider = {"available": False}


@app.task(
    base=Batches,
    bind=True,
    flush_every=100,
    flush_interval=1,
    per_request_results=True,
    max_retries=5,
)
def push_notification(self: Batches, requests: list[SimpleRequest]) -> list[str]:
    """Retry the whole batch with ``self.retry`` while the provider is away."""
    if not push_provider["available"]:
        push_provider["available"] = True  # it will be back for the retry
        raise self.retry(countdown=RETRY_IN)
    return [f"pushed to {request.args[0]}" for request in requests]
