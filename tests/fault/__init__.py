"""Fault injection: killed workers, restarted brokers, poison messages."""
