"""The unit tier: no Prefect API, no subprocess, no network but in-process transports.

Nothing here starts a Prefect server; `make test-unit` runs this tier with PREFECT_API_URL at a
closed port, so a test that reaches for Prefect fails instead of quietly starting one.
"""
