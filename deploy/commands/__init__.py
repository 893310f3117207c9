"""The command-line commands the deploy plugin adds to ``qcloop``: ``serve``, ``export-onnx``,
``export-triton``, and the benchmarks ``bench inference`` and ``bench serve``.

These modules import only click at import time (``qcloop --help`` stays fast and works without
the optional extras); each command checks its extra when it runs (`qcloop.monitor.cli.extras.need`)."""
