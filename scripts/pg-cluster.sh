#!/usr/bin/env bash
# A Postgres cluster in a directory of its own, on 127.0.0.1, for `make run-fleet`.
#
#   scripts/pg-cluster.sh start DIR PORT   initialise DIR/data if there is no cluster yet, start it on
#                                          127.0.0.1:PORT, make sure the login role and the database
#                                          `keygate` exist (random password in DIR/password, mode 600);
#                                          prints the URL (nothing else on stdout)
#   scripts/pg-cluster.sh stop DIR         stop it (fast shutdown); nothing to do if it is not running
#   scripts/pg-cluster.sh url DIR PORT     print the URL: postgres://keygate:PASSWORD@127.0.0.1:PORT/keygate
#
# DIR holds data/ (the cluster), password, postgres.log and the Unix socket. initdb and postgres
# refuse to run as root: as root, every server binary runs as the `postgres` system user (runuser)
# and DIR is chowned to it; otherwise they run as the current user. The superuser `postgres` is
# reached only over the socket in DIR (trust; DIR is mode 700); `keygate` is an ordinary role that
# owns the database and logs in over TCP with its password (SCRAM-SHA-256).
# Binaries: KEYGATE_PG_BIN, else the newest /usr/lib/postgresql/*/bin (`make setup-fleet`), else PATH.
set -euo pipefail

die() { echo "pg-cluster: $*" >&2; exit 1; }
say() { echo "pg-cluster: $*" >&2; }
usage() { die "usage: $0 start DIR PORT | stop DIR | url DIR PORT"; }

# Variables that would point psql or pg_ctl somewhere else.
unset PGDATA PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE PGSERVICE PGOPTIONS

find_bin() {
  if [ -n "${KEYGATE_PG_BIN:-}" ]; then
    [ -x "$KEYGATE_PG_BIN/initdb" ] || die "KEYGATE_PG_BIN=$KEYGATE_PG_BIN has no initdb"
    echo "$KEYGATE_PG_BIN"; return
  fi
  local newest
  newest=$( { ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1; } || true)
  if [ -n "$newest" ]; then dirname "$newest"; return; fi
  if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
  die "no PostgreSQL server binaries (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH): run 'make setup-fleet' (installs Debian's postgresql package) or set KEYGATE_PG_BIN"
}

check_port() {
  [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "PORT must be a number from 1 to 65535, not '$1'"
}

# Runs a server binary as the user the server runs as.
as_server() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

url() {
  [ -f "$DIR/password" ] || die "$DIR/password is missing: no cluster was initialised in $DIR (run: $0 start $DIR PORT)"
  echo "postgres://keygate:$(cat "$DIR/password")@127.0.0.1:$1/keygate"
}

running() { as_server "$BIN/pg_ctl" status -D "$DIR/data" >/dev/null 2>&1; }

log_tail() { tail -n 20 "$1" 2>/dev/null | sed 's/^/  /' >&2 || true; }

start() {
  local port=$1
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  case "$DIR" in *"'"*|*\\*) die "DIR must not contain a quote or a backslash: $DIR" ;; esac
  # The socket path ($DIR/.s.PGSQL.$port) must fit in sockaddr_un.
  [ ${#DIR} -le 90 ] || die "DIR is too long for the Unix socket path (at most 90 bytes): $DIR"
  chmod 700 "$DIR"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 \
      || die "running as root, and initdb/postgres refuse root, but there is no 'postgres' system user: run 'make setup-fleet' (Debian's postgresql package creates it)"
    command -v runuser >/dev/null || die "running as root and runuser (util-linux) is missing: cannot start Postgres as the postgres user"
    chown postgres: "$DIR"
    runuser -u postgres -- test -w "$DIR" \
      || die "the postgres user cannot write $DIR: a parent directory is not searchable by others; choose a DIR under a directory others can enter"
  fi
  cd "$DIR"

  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    say "initialising a cluster in $DIR/data"
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/password")
    chmod 600 "$DIR/password"
    as_server "$BIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C > "$DIR/initdb.log" 2>&1 \
      || { log_tail "$DIR/initdb.log"; die "initdb failed (above: the end of $DIR/initdb.log)"; }
  fi
  [ -s "$DIR/password" ] || die "$DIR/data holds a cluster but $DIR/password is missing; remove $DIR to start afresh"

  if running; then
    local on
    on=$(sed -n 4p "$DIR/data/postmaster.pid" 2>/dev/null || true)
    [ "$on" = "$port" ] || die "the cluster in $DIR is already running on port ${on:-?}, not $port (stop it first: $0 stop $DIR)"
    say "already running on 127.0.0.1:$port"
  else
    say "starting Postgres on 127.0.0.1:$port (log: $DIR/postgres.log)"
    as_server "$BIN/pg_ctl" start -D "$DIR/data" -l "$DIR/postgres.log" -w -t 30 -o \
        "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$DIR' -c max_connections=200" \
        >/dev/null \
      || { log_tail "$DIR/postgres.log"; die "Postgres did not start on 127.0.0.1:$port (above: the end of $DIR/postgres.log)"; }
  fi

  # The role and the database, created if missing; the role's password is the one in DIR/password.
  # SQL goes through stdin, so the password never appears in a process list.
  as_server "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$port" -U postgres -d postgres >/dev/null <<SQL \
    || die "could not create the role and database keygate on 127.0.0.1:$port"
SELECT 'CREATE ROLE keygate LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keygate') \gexec
ALTER ROLE keygate LOGIN PASSWORD '$(cat "$DIR/password")';
SELECT 'CREATE DATABASE keygate OWNER keygate' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'keygate') \gexec
SQL
  url "$port"
}

stop() {
  DIR=$(cd "$DIR" 2>/dev/null && pwd) || die "no directory $DIR"
  [ -f "$DIR/data/PG_VERSION" ] || die "no cluster in $DIR"
  cd "$DIR"
  if ! running; then say "not running ($DIR)"; return; fi
  as_server "$BIN/pg_ctl" stop -D "$DIR/data" -m fast -w -t 30 >/dev/null \
    || { log_tail "$DIR/postgres.log"; die "pg_ctl stop failed for $DIR"; }
  say "stopped ($DIR)"
}

[ $# -ge 2 ] || usage
COMMAND=$1 DIR=$2
case "$COMMAND" in
  start) [ $# -eq 3 ] || usage; check_port "$3"; BIN=$(find_bin); start "$3" ;;
  stop)  [ $# -eq 2 ] || usage; BIN=$(find_bin); stop ;;
  url)   [ $# -eq 3 ] || usage; check_port "$3"; url "$3" ;;
  *) usage ;;
esac
