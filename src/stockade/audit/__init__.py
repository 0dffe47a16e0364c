"""Audit events emitted by the core, and the sinks that keep them."""
