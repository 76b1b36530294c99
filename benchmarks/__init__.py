"""Benchmarks of gpt2kit against its peers; `python -m benchmarks` runs the suite (see __main__.py)."""
