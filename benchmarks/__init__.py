"""Benchmarks for cgpu-kernel: ``python -m benchmarks`` (see docs/benchmarks.md)."""
