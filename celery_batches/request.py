"""The picklable snapshot of one call that a batch body receives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.app.task import Context
from celery.utils.log import get_logger

from ._compat import request_context

if TYPE_CHECKING:
    from datetime import datetime

    from celery.app.task import Task
    from celery.canvas import Signature
    from celery.worker.request import Request

    from .types import Outcomes

__all__ = ["RetryRequested", "SimpleRequest"]

logger = get_logger(__name__)


class SimpleRequest:
    """One call of a batch task, as the batch body sees it.

    The worker turns every buffered message into a :class:`SimpleRequest`
    before it hands the batch to the pool, so the object pickles and carries
    everything a result backend needs to store a result for this one call
    (``rpc://``, chords and ``link`` callbacks included).

    Settle a request from inside the body with :meth:`mark_as_done`,
    :meth:`mark_as_failure` or :meth:`retry`; a request left unsettled is
    settled by the worker when the body returns or raises.
    """

    __slots__ = (
        "_context",
        "_eager_retry",
        "_outcome",
        "_outcomes",
        "_task",
        "args",
        "chord",
        "correlation_id",
        "delivery_info",
        "hostname",
        "id",
        "ignore_result",
        "kwargs",
        "name",
        "reply_to",
        "request_dict",
    )

    #: The task id of this call.
    id: str
    #: The task name (the ``shadow`` name when one was given).
    name: str
    #: Positional arguments of this call.
    args: list[Any] | tuple[Any, ...]
    #: Keyword arguments of this call.
    kwargs: dict[str, Any]
    #: Exchange, routing key, priority and ``redelivered`` of the message.
    delivery_info: dict[str, Any]
    #: Node name of the worker that received the message.
    hostname: str | None
    #: Whether the result of this call is stored.
    ignore_result: bool
    #: Queue that ``rpc://`` results are sent to.
    reply_to: str | None
    #: Correlation id that ``rpc://`` results are tagged with.
    correlation_id: str | None
    #: The full request as Celery's worker decoded it (headers and body).
    request_dict: dict[str, Any]
    #: The chord this call is a member of, if any.
    chord: Any

    def __init__(
        self,
        id: str,
        name: str,
        args: list[Any] | tuple[Any, ...],
        kwargs: dict[str, Any],
        delivery_info: dict[str, Any],
        hostname: str | None,
        ignore_result: bool,
        reply_to: str | None,
        correlation_id: str | None,
        request_dict: dict[str, Any] | None,
    ) -> None:
        self.id = id
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.delivery_info = delivery_info
        self.hostname = hostname
        self.ignore_result = ignore_result
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.request_dict = request_dict if request_dict is not None else {}
        self.chord = self.request_dict.get("chord")
        self._context: Context | None = None
        #: ``(state, value)`` once settled in the pool, else ``None``.
        self._outcome: tuple[str, Any] | None = None
        #: The task running this request, set in the process that runs it.
        self._task: Task | None = None
        #: What settles this request: the outcome recorder of the batch that
        #: runs it, set in the process that runs it.
        self._outcomes: Outcomes | None = None
        #: The retry of an eager call, run once its batch has ended.
        self._eager_retry: Signature | None = None

    @classmethod
    def from_request(cls, request: Request) -> SimpleRequest:
        """Build a :class:`SimpleRequest` from a worker request.

        Arguments:
            request: the :class:`celery.worker.request.Request` the worker
                built from the message.
        """
        # The execution context adds callbacks, errbacks, chain and chord to
        # the request dict, which the result backend and link callbacks need.
        request_dict = request_context(request)
        return cls(
            request.id,
            request.name,
            request.args,
            request.kwargs,
            request.delivery_info,
            request.hostname,
            request.ignore_result,
            request.reply_to,
            request.correlation_id,
            request_dict,
        )

    def __repr__(self) -> str:
        return f"<SimpleRequest: {self.name}[{self.id}] {self.args!r} {self.kwargs!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Send only what the constructor takes: a cached Context or an
        # outcome recorded in one process means nothing in another.
        return (
            type(self),
            (
                self.id,
                self.name,
                self.args,
                self.kwargs,
                self.delivery_info,
                self.hostname,
                self.ignore_result,
                self.reply_to,
                self.correlation_id,
                self.request_dict,
            ),
        )

    # -- settling ---------------------------------------------------------

    @property
    def settled(self) -> bool:
        """``True`` once this request has a result, a failure or a retry."""
        return self._outcome is not None

    @property
    def state(self) -> str | None:
        """The state this request was settled with, or ``None``."""
        return None if self._outcome is None else self._outcome[0]

    @property
    def _settlement(self) -> tuple[str, Any] | None:
        """``(state, value)`` once settled, else ``None`` (for the outcome recorder)."""
        return self._outcome

    def _settle(self, state: str, value: Any) -> None:
        """Record this request's outcome; only the outcome recorder calls this."""
        self._outcome = (state, value)

    def _refuses(self, what: str) -> bool:
        """Return ``True`` (and warn) if settled already: the first outcome stands."""
        if self._outcome is None:
            return False
        logger.warning(
            "Request %s[%s] was already settled as %s; ignoring %s",
            self.name,
            self.id,
            self._outcome[0],
            what,
        )
        return True

    @property
    def context(self) -> Context:
        """This call's :class:`celery.app.task.Context` (``task.request``)."""
        ctx = self._context
        if ctx is None:
            ctx = self._context = Context(self.request_dict)
            ctx.id = self.id
            ctx.called_directly = False
        return ctx

    def _context_value(self, name: str) -> Any:
        """``context.<name>``, read from the message while no context is built.

        Building a :class:`~celery.app.task.Context` costs more than the
        rest of settling a call; a context is built from the same
        ``request_dict``, with ``None`` for what the message lacks.
        """
        ctx = self._context
        if ctx is None:
            return self.request_dict.get(name)
        return getattr(ctx, name, None)

    @property
    def task(self) -> str:
        """The name of the task this request is a call of, as ``Context.task``.

        A result backend given this request reads it (the ``name`` of an
        extended result): ``app.backend.mark_as_done(request.id, value,
        request=request)``, the 0.11 way of storing a result, passes it.
        Unlike :attr:`name`, never a ``shadow`` name.
        """
        task: str = self.request_dict.get("task") or self.name
        return task

    def _recorder(self) -> Outcomes:
        outcomes = self._outcomes
        if outcomes is None:
            raise RuntimeError(
                f"{self!r} is not a call of a running batch: mark_as_done(), "
                "mark_as_failure() and retry() settle the calls a batch body "
                "receives (celery_batches.testing.apply_batch runs a body in a "
                "test)"
            )
        return outcomes

    def mark_as_done(self, result: Any) -> None:
        """Store ``result`` as this request's result, as a plain task would.

        ``link`` callbacks and the next task of a chain are sent with
        ``result``, a chord counts this member, ``rpc://`` callers receive
        it, and ``task_success`` fires for this request. A result that cannot
        be stored (the result serializer refuses it) fails the request
        instead.
        """
        self._recorder().success(self, result)

    def mark_as_failure(self, exc: BaseException, traceback: str | None = None) -> None:
        """Store ``exc`` as this request's failure, as a plain task would.

        ``link_error`` callbacks run, a chord counts this member as failed,
        and ``task_failure`` fires for this request.
        """
        self._recorder().failure(self, exc, traceback)

    def retry(
        self,
        countdown: float | None = None,
        eta: datetime | str | None = None,
        exc: BaseException | str | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Send this one call again, with the same task id, to run later.

        The message is re-published with ``retries + 1`` and batched again
        like any other. The delay is ``countdown``, else ``eta``, else the
        task's ``retry_backoff`` schedule or ``default_retry_delay``; ``eta``
        may be a datetime or an ISO 8601 string. RETRY is stored (with
        ``exc`` as the reason; a string is taken as its message, as Celery's
        ``Task.retry`` takes it) and ``task_retry`` fires. Past
        ``max_retries`` (this argument, else the task's) the request fails
        with ``exc`` or :exc:`~celery.exceptions.MaxRetriesExceededError`
        instead. A retry that cannot be sent fails the request.
        """
        self._recorder().retry(
            self, countdown=countdown, eta=eta, exc=exc, max_retries=max_retries
        )


class RetryRequested(Exception):
    """The reason stored with RETRY when :meth:`SimpleRequest.retry` got none."""

    @classmethod
    def after(
        cls, countdown: float | None, eta: datetime | str | None
    ) -> RetryRequested:
        """Say when the retry runs. (One message argument keeps it picklable.)"""
        if eta is None:
            when = f"in {countdown}s"
        else:
            when = f"at {eta if isinstance(eta, str) else eta.isoformat()}"
        return cls(f"Retry {when}")
