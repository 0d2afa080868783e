#!/bin/sh
# Runs once, when the historian's database is created (the image's docker-entrypoint-initdb.d):
# the read-only role Grafana logs in with (docs/grafana.md, "The read-only database user").
# Nexus creates its tables and views later, as the owner POSTGRES_USER: default privileges
# give the role SELECT on each of them as it is created.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" \
  -v reader_password="$NEXUS_GRAFANA_DB_PASSWORD" <<'SQL'
CREATE ROLE nexus_grafana LOGIN PASSWORD :'reader_password';
GRANT CONNECT ON DATABASE :"db" TO nexus_grafana;
GRANT USAGE ON SCHEMA public TO nexus_grafana;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO nexus_grafana;
ALTER ROLE nexus_grafana SET default_transaction_read_only = on;
ALTER ROLE nexus_grafana SET statement_timeout = '30s';
SQL
