#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data directory, as POSTGRES_USER on
# POSTGRES_DB. Creates the owner role (migrations: may create, alter and drop), the runtime role (agents:
# may read and write rows, may not create, alter or drop anything) and, when DB_READER_PASSWORD is set, the
# reader role (the dashboard: may only read). Passwords are read by psql's \getenv, so they never appear on
# a command line.
set -euo pipefail
: "${POSTGRES_USER:?}" "${POSTGRES_DB:?}" "${DB_OWNER_PASSWORD:?}" "${DB_RUNTIME_PASSWORD:?}"
export DB_OWNER_USER="${DB_OWNER_USER:-agent_owner}" DB_RUNTIME_USER="${DB_RUNTIME_USER:-agent_runtime}"
export DB_READER_USER="${DB_READER_USER:-agent_reader}"

psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv db POSTGRES_DB
\getenv owner DB_OWNER_USER
\getenv owner_password DB_OWNER_PASSWORD
\getenv runtime DB_RUNTIME_USER
\getenv runtime_password DB_RUNTIME_PASSWORD

-- The CREATE ROLE statements carry passwords: keep them out of pg_stat_statements and the server log.
SET pg_stat_statements.track_utility = off;
SET log_statement = 'none';
SET log_min_duration_statement = -1;

CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE ROLE :"runtime" LOGIN PASSWORD :'runtime_password' NOSUPERUSER NOCREATEDB NOCREATEROLE;

ALTER DATABASE :"db" OWNER TO :"owner";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"runtime";

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"runtime";

-- Every table the owner creates (tasks, alembic_version) is readable and writable row by row by the runtime.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"runtime";

-- The schema's record belongs to the owner alone: the runtime may read which revision is applied, never
-- change it. Created here (as Alembic would create it) so that the default privileges above can be narrowed.
SET ROLE :"owner";
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM :"runtime";
RESET ROLE;

-- The agents' statements are bounded by the role too, so that they stay bounded behind PgBouncer, which
-- does not pass on the connection options that set these (DATABASE_STATEMENT_TIMEOUT, DATABASE_LOCK_TIMEOUT).
ALTER ROLE :"runtime" SET statement_timeout = '30s';
ALTER ROLE :"runtime" SET lock_timeout = '5s';

-- Monitoring (python main.py db stats): query texts of every role.
GRANT pg_read_all_stats TO :"owner";
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SQL

# The dashboard's role: reads the tables, nothing else, in transactions that are read-only by default.
if [ -n "${DB_READER_PASSWORD:-}" ]; then
    psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv db POSTGRES_DB
\getenv owner DB_OWNER_USER
\getenv reader DB_READER_USER
\getenv reader_password DB_READER_PASSWORD
SET pg_stat_statements.track_utility = off;
SET log_statement = 'none';
SET log_min_duration_statement = -1;

CREATE ROLE :"reader" LOGIN PASSWORD :'reader_password' NOSUPERUSER NOCREATEDB NOCREATEROLE;
GRANT CONNECT ON DATABASE :"db" TO :"reader";
GRANT USAGE ON SCHEMA public TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader";
ALTER ROLE :"reader" SET default_transaction_read_only = on;
ALTER ROLE :"reader" SET statement_timeout = '30s';
SQL
fi
