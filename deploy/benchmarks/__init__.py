"""The deploy plugin's benchmarks (run by ``qcloop bench inference`` and ``qcloop bench serve``);
never part of the test suite. Each exposes one ``run_*_benchmark(...) -> dict`` of plain JSON-able
figures; the command formats them."""
