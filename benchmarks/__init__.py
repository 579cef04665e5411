"""Benchmarks: `python -m benchmarks.run` (or `nox -s bench`); results go to docs/benchmarks.md."""
