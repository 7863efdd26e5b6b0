"""The top layer: the ``ppm`` command (:mod:`ppm.cli.main`) and the demo it runs."""
