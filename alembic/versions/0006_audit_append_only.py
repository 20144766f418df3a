"""the audit trail is append-only in the database, not only in the application

Revision ID: 0006_audit_append_only
Revises: 0005_reason_vocabulary
Create Date: 2026-12-03 18:20:00

The hash chain (``service.audit.trail``) shows an edit; it cannot prevent one. These triggers
make the database itself refuse to change or remove an audit row, whoever asks:

* PostgreSQL: a row trigger refuses UPDATE and DELETE, a statement trigger refuses TRUNCATE,
  and PUBLIC loses those rights on the table. The runtime role of a deployment
  (``deploy/postgres/roles.sql``) holds SELECT and INSERT on ``audit_event`` only and does not
  own it, so it can neither write around the triggers nor disable them. The owner or a
  superuser still can (``ALTER TABLE ... DISABLE TRIGGER``): the periodic anchors of the chain
  head (``triage audit anchor``) are what catch that.
* SQLite (the embedded default): BEFORE UPDATE / BEFORE DELETE triggers that abort. SQLite
  has no TRUNCATE; an unqualified DELETE runs the delete trigger row by row.

The row triggers fire per row, so ``service.audit.trail.record``'s SQLite write-lock
statement (``UPDATE audit_event ... WHERE id < 0``, which matches no row) is not refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0006_audit_append_only'
down_revision: str | None = '0005_reason_vocabulary'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSAL = 'audit_event is append-only'

PG_UPGRADE = [
    f"""
    CREATE OR REPLACE FUNCTION audit_event_refuse_change() RETURNS trigger
    LANGUAGE plpgsql AS $body$
    BEGIN
        RAISE EXCEPTION '{REFUSAL}: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $body$
    """,
    """
    CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event
    FOR EACH ROW EXECUTE FUNCTION audit_event_refuse_change()
    """,
    """
    CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
    FOR EACH STATEMENT EXECUTE FUNCTION audit_event_refuse_change()
    """,
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_event FROM PUBLIC",
]
PG_DOWNGRADE = [
    "DROP TRIGGER IF EXISTS audit_event_no_truncate ON audit_event",
    "DROP TRIGGER IF EXISTS audit_event_append_only ON audit_event",
    "DROP FUNCTION IF EXISTS audit_event_refuse_change()",
]
SQLITE_UPGRADE = [
    f"""
    CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event
    BEGIN SELECT RAISE(ABORT, '{REFUSAL}: UPDATE refused'); END
    """,
    f"""
    CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
    BEGIN SELECT RAISE(ABORT, '{REFUSAL}: DELETE refused'); END
    """,
]
SQLITE_DOWNGRADE = [
    "DROP TRIGGER IF EXISTS audit_event_no_update",
    "DROP TRIGGER IF EXISTS audit_event_no_delete",
]


def _run(statements: dict[str, list[str]]) -> None:
    dialect = op.get_bind().dialect.name
    if dialect not in statements:
        raise NotImplementedError(f"no append-only triggers for dialect {dialect!r}")
    for statement in statements[dialect]:
        op.execute(statement)


def upgrade() -> None:
    _run({'postgresql': PG_UPGRADE, 'sqlite': SQLITE_UPGRADE})


def downgrade() -> None:
    _run({'postgresql': PG_DOWNGRADE, 'sqlite': SQLITE_DOWNGRADE})
