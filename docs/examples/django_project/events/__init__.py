"""An app whose events are recorded by a batch task."""
