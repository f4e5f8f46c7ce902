"""muscle_fast benchmarks: ``python -m benchmarks --help`` (harness in harness.py)."""
