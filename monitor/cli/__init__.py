"""The `qcloop` command line: the root group (`main.py`) and one module per command."""
