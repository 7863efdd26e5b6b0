"""Training and online scoring of the unified ranker (ID transformer + PPM module + MMoE).

``features`` builds the model's input for both; ``dataset`` reads the pipeline's windows,
``model`` is the network, ``train`` the loop and incremental promotion, ``registry`` the
versions, ``metrics`` the offline report; ``serving/`` scores requests from the online store.
"""
