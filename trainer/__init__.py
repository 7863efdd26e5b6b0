"""The unified ranker and its incremental trainer (ID transformer + PPM module + MMoE).

Empty until the ranker lands (issue #4); the package exists so the layout is fixed.
"""
