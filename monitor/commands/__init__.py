"""One module per ``qcloop`` subcommand, imported only when that command runs."""
