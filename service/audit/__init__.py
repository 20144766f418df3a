"""Append-only, hash-chained audit trail."""

from service.audit.trail import AuditError, record, verify_chain

__all__ = ["AuditError", "record", "verify_chain"]
