"""The top layer: the ``ppm`` command (:mod:`ppm.cli.commands`) and the demo it runs."""

from ppm.cli.commands import main

__all__ = ["main"]
