"""Loading the documentation's example modules (``docs/examples``) afresh."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from celery import _state

from tests.harness.brokers import ROOT

__all__ = ["EXAMPLES", "Load", "loading"]

#: The runnable examples the documentation includes.
EXAMPLES = ROOT / "docs" / "examples"

#: Imports an example by name. Its module is typed Any: it is loaded from a
#: path, so mypy cannot know its attributes.
Load = Callable[[str], Any]


@contextmanager
def loading() -> Iterator[Load]:
    """Import modules of docs/examples afresh, so each test has its own state."""
    finalizers = set(_state._on_app_finalizers)

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    try:
        yield load
    finally:
        # The examples' tasks are shared tasks (Celery's default): forget
        # them, or every app finalized later in the session would get them.
        _state._on_app_finalizers.intersection_update(finalizers)
