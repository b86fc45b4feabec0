"""The reliability harness: crash, network and broker faults against the real services.

``python -m tests.faults`` (``make reliability``) runs the full form and prints the totals;
the ``test_*.py`` files here run a short form as part of the test suite.
"""
