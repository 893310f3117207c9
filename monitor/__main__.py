"""``python -m qcloop.monitor`` runs the command line."""

from qcloop.monitor.cli.main import main

main()
