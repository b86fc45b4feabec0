"""The revisions of the state index's schema, oldest first (``0001`` is the first release)."""
