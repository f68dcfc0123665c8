"""pyvhost.cli: the ``pyvhost`` command and its subcommands. The top layer: it may import
every other pyvhost package; nothing imports it."""
