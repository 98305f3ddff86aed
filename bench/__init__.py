"""Reproducible benchmarks of the engine: `python -m bench` (see bench/README.md)."""
