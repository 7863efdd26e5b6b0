"""ppm-stream's shared glue: the configuration, the event contracts and the ``ppm`` CLI."""
