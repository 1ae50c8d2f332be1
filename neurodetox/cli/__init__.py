"""The ``neurodetox`` command line: one module per command, dispatched by :func:`main`."""

from neurodetox.cli.main import main

__all__ = ["main"]
