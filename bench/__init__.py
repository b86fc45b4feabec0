"""Benchmarks of amqp-queue against the raw broker, kombu and Mosquitto, on the real services.

``python -m bench`` (``make bench``) runs every benchmark and writes a markdown table and a JSON
file under ``bench/results/``; ``python -m bench --quick`` runs each one with tiny sizes so they
never rot (the test command runs it). Each module measures one subject; :mod:`bench.harness`
holds the figures, ratios and sizes, :mod:`bench.report` writes them out.
"""
