"""Celery tasks whose calls the worker runs in batches."""

from __future__ import annotations

from .request import SimpleRequest
from .task import Batches

__all__ = ["Batches", "SimpleRequest", "__version__"]

__version__ = "1.0.0.dev0"
