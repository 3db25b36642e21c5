"""The service layer: the rules of an erasure, in plain Python.

One concern per module: the request lifecycle (``lifecycle``), ingest, locate,
erasure, retraining, membership probe, certificates and signing, lineage
export, screening, and ``processing`` (one request's steps, each idempotent).
It imports ``db``, ``shards`` and ``dedup``, never Prefect; ``flows/`` orders
these steps under Prefect and ``api/`` calls them for intake and audit.
"""
