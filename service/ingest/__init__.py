"""Ingest: the durable spool, series bookkeeping, completeness tracking and qualification.

The spool on disk is the truth: an instance is acknowledged only after its bytes are there,
and the database rows are derived from it (batched by the bookkeeper, rebuilt on start).
"""
