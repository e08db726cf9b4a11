"""Performance harness: our Durable Streams service on Postgres vs the reference Node server.

Run with `make bench` or `python -m benchmarks --help`. Not part of the test suite.
"""
