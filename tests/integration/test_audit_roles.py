"""The deployment's runtime role (deploy/postgres/roles.sql) on the real PostgreSQL: it runs
the service's writes and appends audit events, and cannot change, remove or unprotect one."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from harness.services import missing
from service.audit import record, verify_chain
from service.db import migrate
from service.db.session import make_engine, make_session_factory, session_scope

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"


def psql(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    parsed = make_url(url)
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(parsed.host),
               "-p", str(parsed.port or 5432), "-U", str(parsed.username),
               "-d", str(parsed.database), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def app_url(postgres_url: str) -> Iterator[str]:
    """The migrated database, with a fresh runtime role made by roles.sql; its URL."""
    if shutil.which("psql") is None:
        missing("psql (PostgreSQL client) not on PATH")
    migrate.upgrade(postgres_url)
    role = f"triage_app_{uuid.uuid4().hex[:10]}"
    done = psql(postgres_url, "-v", f"app_role={role}", "-f", str(ROLES_SQL))
    assert done.returncode == 0, done.stderr
    try:
        yield make_url(postgres_url).set(username=role).render_as_string(hide_password=False)
    finally:
        owner = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with owner.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE usename = :r"), {"r": role})
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        owner.dispose()


def test_runtime_role_appends_but_cannot_rewrite(app_url: str, postgres_url: str) -> None:
    engine = make_engine(app_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for i in range(3):
            record(session, "login", actor=f"user{i}")
    for statement, refused in [
        ("UPDATE audit_event SET actor = 'forged' WHERE id = 2", "permission denied"),
        ("DELETE FROM audit_event WHERE id = 3", "permission denied"),
        ("TRUNCATE audit_event", "permission denied"),
        ("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only", "must be owner"),
        ("DROP TRIGGER audit_event_append_only ON audit_event", "must be owner"),
        ("UPDATE alembic_version SET version_num = '0001_initial_schema'", "permission denied"),
    ]:
        with engine.connect() as conn, pytest.raises(DBAPIError, match=refused):
            conn.execute(text(statement))
    with engine.connect() as conn:  # the rest of the schema is the service's to write
        conn.execute(text("UPDATE app_user SET active = active"))
        conn.commit()
    with factory() as session:
        report = verify_chain(session)
    assert report.intact and report.events == 3
    engine.dispose()

    # The superuser is refused by the trigger too, until it disables it.
    owner = make_engine(postgres_url)
    with owner.connect() as conn, pytest.raises(DBAPIError, match="append-only: UPDATE"):
        conn.execute(text("UPDATE audit_event SET actor = 'forged' WHERE id = 2"))
    owner.dispose()


def test_roles_sql_is_idempotent_and_refuses_an_unmigrated_database(app_url: str,
                                                                    postgres_url: str) -> None:
    role = make_url(app_url).username
    again = psql(postgres_url, "-v", f"app_role={role}", "-f", str(ROLES_SQL))
    assert again.returncode == 0, again.stderr

    empty = f"triage_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{empty}"'))
    try:
        url = make_url(postgres_url).set(database=empty).render_as_string(hide_password=False)
        refused = psql(url, "-v", f"app_role={role}", "-f", str(ROLES_SQL))
        assert refused.returncode != 0
        assert "triage db upgrade" in refused.stderr
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{empty}"'))
        admin.dispose()
