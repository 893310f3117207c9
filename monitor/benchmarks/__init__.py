"""Benchmarks that print figures (run by ``qcloop bench``); never part of the test suite.

Each benchmark module exposes one ``run_*_benchmark(...) -> dict`` returning plain JSON-able
figures; the ``bench`` command formats them.
"""
