"""The migrated schema is exactly the ORM metadata, on SQLite and on PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db import migrate
from service.db.session import make_engine
from service.db.tables import Base


def test_autogenerate_diff_is_empty(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_is_at_head_and_idempotent(migrated_url: str) -> None:
    migrate.upgrade(migrated_url)  # second run: nothing to do, no error
    engine = make_engine(migrated_url)
    assert migrate.current_revision(engine) == migrate.head_revision(migrated_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"study", "series", "instance", "analysis", "finding", "export", "audit_event",
            "app_user"} <= tables


def test_downgrade_to_base_and_back(migrated_url: str) -> None:
    migrate.upgrade(migrated_url, "head")
    from alembic import command

    command.downgrade(migrate.alembic_config(migrated_url), "base")
    engine = make_engine(migrated_url)
    assert "study" not in inspect(engine).get_table_names()
    engine.dispose()
    migrate.upgrade(migrated_url)
