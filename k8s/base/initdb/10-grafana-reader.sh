#!/bin/sh
# Runs once, when the historian's database is created (the image's docker-entrypoint-initdb.d),
# in Kubernetes (k8s/base/database.yaml) and in the compose stack (deploy/compose/compose.yaml):
# the read-only role Grafana logs in with (docs/grafana.md, "The read-only database user").
# Nexus creates its tables and views later, as the owner POSTGRES_USER: default privileges
# give the role SELECT on each of them as it is created.
#
# The role's password is NEXUS_GRAFANA_DB_PASSWORD (in Kubernetes the key historian-password
# of the Secret nexus-grafana, optional). Without it no role is made: create it later by hand
# (docs/grafana.md).
set -eu
if [ -z "${NEXUS_GRAFANA_DB_PASSWORD:-}" ]; then
  echo "10-grafana-reader.sh: NEXUS_GRAFANA_DB_PASSWORD is not set; role nexus_grafana not created (docs/grafana.md)"
  exit 0
fi
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
