"""Benchmarks for Stockade (run ``python -m bench.ingest``; see docs/benchmarks.md)."""
