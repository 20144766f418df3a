"""Append-only, hash-chained audit trail, anchored outside the database."""

from service.audit.trail import (
    Anchor,
    AnchorMismatch,
    AuditError,
    ChainReport,
    chain_head,
    read_anchors,
    record,
    verify_chain,
    write_anchor,
)

__all__ = ["Anchor", "AnchorMismatch", "AuditError", "ChainReport", "chain_head",
           "read_anchors", "record", "verify_chain", "write_anchor"]
