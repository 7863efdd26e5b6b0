"""Training and online scoring of the unified ranker (ID transformer + PPM module + MMoE).

Training: ``windows`` lists the closed training windows over every writer of the training
log (no torch: ``ppm status`` reads it too); ``dataset`` reads them, with the cached item
vectors of the offline item log; ``features`` builds the model's input, for training and
serving alike; ``model`` is the network; ``train`` the loop, incremental fine-tuning and
promotion; ``registry`` the versions and the champion; ``metrics`` the offline report.

Serving (``serving/``): ``ranker`` scores a user's candidates from the online store with
the current champion; ``http_server`` puts it behind HTTP (``ppm serve``).
"""
