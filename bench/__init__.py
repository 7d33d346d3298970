"""Benchmarks; run them from the repository root as modules (`python -m bench.benchmark`)."""
