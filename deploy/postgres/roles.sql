-- The runtime database role of a PostgreSQL deployment: everything the SCP, the worker and the
-- web app need, and no right to change or remove an audit event.
--
--   psql -v ON_ERROR_STOP=1 -v app_role=triage_app -d triage -f deploy/postgres/roles.sql
--
-- Run it as the role that owns the schema (the one `triage db upgrade` connects as; the
-- default `owner_role` is the current user) or a superuser, after the first migration and
-- again after any upgrade that adds a table (it is idempotent). Then point the runtime
-- processes at the app role (TRIAGE_DATABASE_URL=postgresql+psycopg://triage_app@db/triage)
-- and keep the owner's URL for the migration job only.
--
-- Why two roles: migration 0006 puts triggers on audit_event that refuse UPDATE, DELETE and
-- TRUNCATE, but a table's owner can disable them (ALTER TABLE ... DISABLE TRIGGER). The app
-- role does not own the table and holds only SELECT and INSERT on it, so a compromised
-- service or a leaked app password cannot rewrite the trail; the owner and superusers still
-- can, and the anchors of the chain head (`triage audit anchor`, kept elsewhere) catch that.
\set ON_ERROR_STOP on
\if :{?app_role}
\else
\set app_role triage_app
\endif
\if :{?owner_role}
\else
SELECT current_user AS owner_role \gset
\endif

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT', :'app_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'app_role') \gexec

-- The app role must not own audit_event (an owner can disable the triggers).
SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'public'
               AND tablename = 'audit_event' AND tableowner = :'app_role') AS app_owns_audit \gset
\if :app_owns_audit
DO $$ BEGIN RAISE EXCEPTION 'the app role owns audit_event: run migrations as another role'; END $$;
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'public'
                   AND tablename = 'audit_event') AS not_migrated \gset
\if :not_migrated
DO $$ BEGIN RAISE EXCEPTION 'no audit_event table: run `triage db upgrade` first'; END $$;
\endif

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'app_role') \gexec
GRANT USAGE ON SCHEMA public TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
-- The trail: append and read, nothing else.
REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON audit_event FROM :"app_role";
-- The schema changes only through Alembic, as the owner.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM :"app_role";
-- Tables a later migration creates get the same rights (audit_event is not among them).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"app_role";
