"""One row per recorded event."""

from __future__ import annotations

from django.db import models


class Event(models.Model):
    """Something that happened: its kind, and what the caller said about it."""

    kind = models.CharField(max_length=50)
    payload = models.JSONField(default=dict)
    created = models.DateTimeField(auto_now_add=True)
