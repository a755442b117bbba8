"""Benchmarks of memory, speed and convergence (``python -m zotune.bench.<name>``)."""
