"""The :class:`Batches` task class."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Callable

from celery import Task
from celery.exceptions import Retry
from kombu.utils.uuid import uuid

from . import bulk
from .dispatch import dispatch_batch
from .eager import eager_request, eager_result
from .errors import BatchRetry
from .request import SimpleRequest
from .settings import batch_key_of, check_options
from .step import BatchesStep
from .strategy import batches_strategy
from .trace import retry_running_batch, run_batch

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from celery import Celery
    from celery.result import EagerResult, ResultSet
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request

__all__ = ["Batches"]


class Batches(Task):  # type: ignore[misc]
    """A task whose calls the worker runs in batches.

    The worker buffers this task's messages and calls :meth:`run` once with
    a list of :class:`~celery_batches.SimpleRequest`, when ``flush_every``
    calls are waiting or ``flush_interval`` seconds have passed::

        @app.task(base=Batches, flush_every=100, flush_interval=10)
        def count_click(requests): ...

    Every option can be set in the decorator, as for any Celery task.
    """

    abstract = True

    #: Calls may pass any arguments: they are checked by the body, not Celery.
    typing = False

    #: Number of buffered calls (of one batch key) that triggers a flush:
    #: an ``int`` of at least 1. Default: 10.
    flush_every: int = 10

    #: Seconds after which buffered calls are flushed anyway: a number
    #: greater than 0 (``0.5`` is half a second). Default: 30.
    flush_interval: float = 30

    #: If true, :meth:`run` returns one value per request (a sequence in the
    #: order of ``requests`` or a mapping of request id to value), stored as
    #: that request's result; an exception instance fails only its request.
    #: Default: ``False`` (return values only reach ``task_success``).
    per_request_results = False

    #: Groups calls into separate batches: a callable taking a
    #: :class:`~celery_batches.SimpleRequest` and returning a hashable key,
    #: or the name of a keyword argument. Each key has its own buffer and
    #: ``flush_every``. Default: ``None`` (one buffer).
    batch_key: Callable[[SimpleRequest], Hashable] | str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The task decorator creates a subclass holding the options given
        # to it, so a bad option fails where the task is defined, naming it.
        super().__init_subclass__(**kwargs)
        cls.check_options()

    @classmethod
    def check_options(cls, task: Any = None) -> None:
        """Raise :exc:`~celery_batches.errors.InvalidBatchSetting` for a bad option.

        Checks the class's options, or those of the task instance ``task``
        (which ``task_annotations`` or a test may have changed): the worker
        checks them again when it starts the task.
        """
        source = cls if task is None else task
        check_options(
            getattr(source, "name", None) or cls.__qualname__,
            flush_every=source.flush_every,
            flush_interval=source.flush_interval,
            per_request_results=source.per_request_results,
            batch_key=batch_key_of(source),
        )

    def run(self, requests: list[SimpleRequest]) -> Any:
        """The batch body: override it (or decorate a function) to take ``requests``."""
        raise NotImplementedError("Batches tasks must implement run(requests)")

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        """Check the options and add :class:`~celery_batches.step.BatchesStep`.

        Runs when the task is bound to ``app``, after ``task_annotations``
        were applied to it, so a bad annotated value fails here too.
        """
        super().on_bound(app)
        cls.check_options()
        app.steps["consumer"].add(BatchesStep)

    def Strategy(self, task: Batches, app: Celery, consumer: Consumer) -> Any:
        """Return the worker's message handler for this task (buffers messages)."""
        type(task).check_options(task)
        return batches_strategy(task, app, consumer)

    def flush(self, requests: list[Request]) -> Any:
        """Run ``requests`` (worker requests) as one batch in the worker's pool.

        The worker calls this for every batch it runs, whatever made it
        flush: override it to see or change each batch before it runs (call
        ``super().flush(requests)`` to run it). Only the worker can call it:
        it raises ``RuntimeError`` elsewhere.
        """
        hostname = requests[0].hostname if requests else None
        return dispatch_batch(self, requests, hostname=hostname)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | str | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Retry every request of the running batch the body left unsettled.

        Inside a batch body, ``self.retry(countdown=..., exc=...)`` works as
        :meth:`SimpleRequest.retry` on each unsettled request: each is sent
        again with its own id, honouring ``max_retries``. Raises
        :exc:`~celery.exceptions.Retry` (as Celery's ``Task.retry`` does),
        which the worker handles; with ``throw=False`` the requests are
        sent again at once and the ``Retry`` is returned instead, and the
        body goes on. ``args``, ``kwargs`` and other options of Celery's
        ``retry`` do not apply to a batch and are ignored.
        """
        retry = BatchRetry(exc, countdown=countdown, eta=eta, max_retries=max_retries)
        if throw:
            raise retry
        # Celery's Task.retry(throw=False) sends the retry all the same.
        retry_running_batch(self, exc, retry.options)
        return retry

    def delay_many(self, calls: Iterable[Sequence[Any]]) -> ResultSet:
        """Send ``self.delay(*args)`` for each ``args`` in ``calls``, together.

        ``task.delay_many([(1,), (2,)])`` sends what ``task.delay(1)`` and
        ``task.delay(2)`` send, in one round trip to the broker per
        thousand calls. See :func:`celery_batches.bulk.apply_many`.

        Returns:
            A :class:`~celery.result.ResultSet`: one
            :class:`~celery.result.AsyncResult` per call, in call order.
        """
        return bulk.delay_many(self, calls)

    def apply_many(
        self,
        calls: Iterable[tuple[Sequence[Any] | None, Mapping[str, Any] | None]],
        **options: Any,
    ) -> ResultSet:
        """Send ``self.apply_async(args, kwargs, **options)`` per call, together.

        ``calls`` holds one ``(args, kwargs)`` pair per call; ``options``
        are ``apply_async``'s (``countdown``, ``priority``, ``queue``, ...)
        and apply to every call, plus ``task_ids`` and ``chunk_size``. See
        :func:`celery_batches.bulk.apply_many`.

        Returns:
            A :class:`~celery.result.ResultSet`: one
            :class:`~celery.result.AsyncResult` per call, in call order.
        """
        return bulk.apply_many(self, calls, **options)

    def apply(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *_args: Any,
        **options: Any,
    ) -> EagerResult:
        """Run the body now, in this process, as a batch of one call.

        Returns:
            An :class:`~celery.result.EagerResult` holding this call's own
            result if the body settled it (or ``per_request_results`` did),
            else what the body returned. A call the body retried runs again
            at once, in this process, as Celery's ``apply()`` runs a retry
            (``countdown`` and ``eta`` are not waited for), and the result is
            that of its last run. If the call failed and
            ``throw=True`` or ``task_eager_propagates`` is set, the
            exception is raised.
        """
        task_id = options.get("task_id") or uuid()
        request = eager_request(self, task_id, args, kwargs, options)
        # As Celery's eager calls: stored only with task_store_eager_result,
        # and a retry runs here, at once, its outcome the call's.
        retval, _ = run_batch(
            self,
            [request],
            eager=True,
            hostname=request.hostname,
            store_results=bool(getattr(self, "store_eager_result", False)),
            retry_here=True,
        )
        throw = options.get("throw")
        if throw is None:
            throw = self.app.conf.task_eager_propagates
        return eager_result(request, retval, throw=bool(throw))
