#!/usr/bin/env bash
# End-to-end check of docker/compose.yaml's CPU profile on a real Docker Engine:
#
#   sudo bash docker/smoke.sh
#
# 1. Engine: when `docker info` fails, installs Debian's docker.io (and docker-compose when no Compose
#    is present) and starts dockerd in the background (log in $PDSERVE_SMOKE_DIR), stopped again at
#    exit. The storage driver is dockerd's own choice (overlay2 where the kernel has it, else vfs);
#    DOCKERD_STORAGE_DRIVER forces one.
# 2. Images: the base is $PDSERVE_PYTHON_IMAGE if set, else a Debian bookworm image built locally
#    (docker/base-image.sh, cached by its tag); every wheel comes from docker/wheels/ (docker/wheels.sh,
#    cached), so the build reaches no registry. `compose build`, then `compose up -d`.
# 3. Serving: completions through the gateway's published port on 127.0.0.1 (greedy, ignore_eos, so
#    each answer has exactly max_tokens tokens and the same prompt gives the same text), one streamed.
# 4. Restart policy: SIGKILL to the decode server process (as a crash or the OOM killer would; `docker
#    kill` counts as a manual stop, which no restart policy undoes): Docker restarts the container, it
#    turns healthy again, and the gateway serves the same greedy completion as before the crash.
# 5. Teardown on any exit: `compose down -v`, then a check that no container, network or volume of the
#    project is left.
#
# Project `pdserve-smoke` (not `pdserve`, so a stack a user runs is left alone), host ports picked
# free at start. Compose: `docker compose` (v2) if present, else `docker-compose` (v2 standalone or
# Debian's 1.29). Every wait is bounded; exit status 0 only if every check passed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${PDSERVE_SMOKE_DIR:-/tmp/pdserve-smoke}
mkdir -p "$out"
project=pdserve-smoke
t0=$SECONDS
step() { printf '== [%4ds] %s\n' $((SECONDS - t0)) "$*"; }
fail() { printf 'docker/smoke.sh: FAIL: %s\n' "$*" >&2; exit 1; }
# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND every second until it succeeds or time is up.
wait_for() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${limit}s"
        sleep 1
    done
}
as_root() { [ "$(id -u)" = 0 ] || fail "$1 needs root"; }
# bounded SECONDS COMMAND...: COMMAND under `timeout`, waited for in the background, so that a signal
# to this script (Ctrl-C, CI's own timeout) runs the teardown at once, not when COMMAND ends.
bounded_pid=""
bounded() {
    timeout "$@" &
    bounded_pid=$!
    local rc=0
    wait "$bounded_pid" || rc=$?
    bounded_pid=""
    return "$rc"
}
apt_install() {
    as_root "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update only when the install fails.
    bounded 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
        || { bounded 300 apt-get update -qq && bounded 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } \
        || fail "apt-get install $* failed"
}

# --- 1. engine and Compose ------------------------------------------------------------------------
dockerd_pid=""
wheels_pid=""
compose=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [ -z "$wheels_pid" ] || kill -TERM -- "-$wheels_pid" 2>/dev/null
    [ -z "$bounded_pid" ] || { kill -TERM "$bounded_pid" 2>/dev/null; wait "$bounded_pid" 2>/dev/null; }
    if [ ${#compose[@]} -gt 0 ] && docker info >/dev/null 2>&1; then
        if [ "$rc" != 0 ]; then
            echo "--- compose ps / logs (last 40 lines per service) ---" >&2
            "${compose[@]}" ps >&2
            "${compose[@]}" logs --no-color --tail 40 >&2
        fi
        step "teardown: compose down -v"
        timeout 120 "${compose[@]}" down -v --remove-orphans --timeout 10 >/dev/null 2>&1
        local left
        left=$({
            docker ps -aq --filter "label=com.docker.compose.project=$project"
            docker network ls -q --filter "label=com.docker.compose.project=$project"
            docker volume ls -q --filter "label=com.docker.compose.project=$project"
        } | wc -l)
        if [ "$left" != 0 ]; then
            echo "docker/smoke.sh: FAIL: $left container(s), network(s) or volume(s) of $project left" >&2
            rc=1
        fi
    fi
    if [ -n "$dockerd_pid" ]; then
        step "stopping the dockerd this script started (pid $dockerd_pid)"
        kill -TERM "$dockerd_pid" 2>/dev/null
        timeout 60 tail --pid="$dockerd_pid" -f /dev/null || kill -KILL "$dockerd_pid"
    fi
    if [ "$rc" = 0 ]; then step "docker/smoke.sh: OK"; else step "docker/smoke.sh: FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null 2>&1 || { step "installing docker.io"; apt_install docker.io; }
    as_root "starting dockerd"
    driver=()
    [ -z "${DOCKERD_STORAGE_DRIVER:-}" ] || driver=(--storage-driver "$DOCKERD_STORAGE_DRIVER")
    step "starting dockerd${driver[*]:+ ${driver[*]}} (log: $out/dockerd.log)"
    dockerd ${driver[@]+"${driver[@]}"} >"$out/dockerd.log" 2>&1 &
    dockerd_pid=$!
    wait_for 60 "dockerd answering on its socket" docker info
fi
step "engine: $(docker info -f 'Docker {{.ServerVersion}}, storage driver {{.Driver}}')"

if docker compose version >/dev/null 2>&1; then
    compose_bin=(docker compose)
else
    command -v docker-compose >/dev/null 2>&1 || { step "installing docker-compose"; apt_install docker-compose; }
    compose_bin=(docker-compose)
fi
step "compose: ${compose_bin[*]} $("${compose_bin[@]}" version --short 2>/dev/null)"

# Nothing from the caller's environment changes what runs, except the documented knobs below.
unset COMPOSE_FILE COMPOSE_PROFILES COMPOSE_PROJECT_NAME PDSERVE_BIND PDSERVE_LOG_LEVEL
read -r http_port grpc_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export PDSERVE_HTTP_PORT=$http_port PDSERVE_GRPC_PORT=$grpc_port
compose=("${compose_bin[@]}" -p "$project" -f docker/compose.yaml --profile cpu)

# --- 2. images ------------------------------------------------------------------------------------
# Both mostly download (Debian's mirror, the package index): side by side.
step "wheels: docker/wheels.sh in the background (log: $out/wheels.log)"
# Its own process group, so that the teardown can stop it and its pip if the base image fails.
setsid bash docker/wheels.sh >"$out/wheels.log" 2>&1 &
wheels_pid=$!
if [ -z "${PDSERVE_PYTHON_IMAGE:-}" ]; then
    step "base image: docker/base-image.sh"
    bounded 1200 bash docker/base-image.sh pdserve-base:bookworm || fail "docker/base-image.sh"
    export PDSERVE_PYTHON_IMAGE=pdserve-base:bookworm
fi
wait "$wheels_pid" || { tail -20 "$out/wheels.log" >&2; fail "docker/wheels.sh"; }
wheels_pid=""
step "$(tail -1 "$out/wheels.log")"
export PDSERVE_PIP_OFFLINE=1
step "compose build (base $PDSERVE_PYTHON_IMAGE, log: $out/build.log)"
if ! bounded 1200 "${compose[@]}" build model >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log" >&2
    fail "compose build"
fi

# --- 3. up and serving ----------------------------------------------------------------------------
step "compose up -d (gateway on 127.0.0.1:$http_port, gRPC :$grpc_port)"
bounded 600 "${compose[@]}" up -d --no-build || fail "compose up"
container() { "${compose[@]}" ps -q "$1"; }
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(container "$1")")" = healthy ]; }
wait_for 300 "gateway healthy" healthy gateway
for svc in prefill decode; do healthy "$svc" || fail "$svc is not healthy while the gateway is"; done

# complete.py: greedy completions through the published port; prints the first answer's text.
client() {
    timeout 180 python3 - "$http_port" "$@" <<'EOF'
import json, sys, urllib.request

port, count, max_tokens = int(sys.argv[1]), int(sys.argv[2]), 8
url = f"http://127.0.0.1:{port}/v1/completions"
body = {"model": "tiny-qwen3", "prompt": "The lighthouse keeper", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True}

def post(payload):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)

texts = []
for _ in range(count):
    with post(body) as resp:
        out = json.load(resp)
    assert resp.status == 200, resp.status
    usage = out["usage"]
    assert usage["completion_tokens"] == max_tokens, usage
    assert usage["prompt_tokens"] > 0, usage
    texts.append(out["choices"][0]["text"])
assert len(set(texts)) == 1, f"greedy completions of one prompt differ: {texts}"
with post(body | {"stream": True}) as resp:
    events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
assert events and events[-1] == "[DONE]", events[-3:]
streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
assert streamed == texts[0], f"streamed {streamed!r} != {texts[0]!r}"
print(json.dumps(texts[0]))
EOF
}
step "completions through 127.0.0.1:$http_port"
before=$(client 4) || fail "completions before the crash"
step "4 completions + 1 streamed, each 8 tokens: $before"

# --- 4. crash decode, watch the restart policy bring it back --------------------------------------
decode_id=$(container decode)
restarts=$(docker inspect -f '{{.RestartCount}}' "$decode_id")
init_pid=$(docker inspect -f '{{.State.Pid}}' "$decode_id")  # docker-init (compose `init: true`)
server_pid=$(awk '{print $1}' "/proc/$init_pid/task/$init_pid/children" 2>/dev/null || true)
[ -n "$server_pid" ] || server_pid=$init_pid
step "SIGKILL to the decode server (host pid $server_pid: $(tr '\0' ' ' <"/proc/$server_pid/cmdline" | cut -c1-60))"
as_root "killing a container's process"
kill -KILL "$server_pid"
restarted() { [ "$(docker inspect -f '{{.RestartCount}}' "$decode_id")" -gt "$restarts" ]; }
wait_for 60 "decode restarted by its restart policy" restarted
# Healthy again: a passing health check that began after the container's latest start (the status
# alone could be the one from before the crash).
healthy_since_start() {
    docker inspect "$1" | python3 -c '
import json, re, sys
from datetime import datetime

def when(text):  # RFC 3339 with up to 9 fractional digits, which datetime does not parse
    m = re.fullmatch(r"([^.]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    fraction = (m[2] or "")[:6].ljust(6, "0")
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(f"{m[1]}.{fraction}{zone}")

state = json.load(sys.stdin)[0]["State"]
started = when(state["StartedAt"])
sys.exit(not any(e["ExitCode"] == 0 and when(e["Start"]) > started for e in state["Health"]["Log"]))'
}
step "decode restarted (RestartCount $(docker inspect -f '{{.RestartCount}}' "$decode_id")); waiting for healthy"
wait_for 300 "decode healthy after the restart" healthy_since_start "$decode_id"
# The gateway reconnects by itself; until it has, requests may fail, so retry for a bounded time.
wait_for 180 "gateway healthy after the decode restart" healthy gateway
deadline=$((SECONDS + 120))
until after=$(client 2 2>"$out/client.err"); do
    [ "$SECONDS" -lt "$deadline" ] || { cat "$out/client.err" >&2; fail "completions after the decode restart"; }
    sleep 2
done
[ "$after" = "$before" ] || fail "after the restart the same greedy request gave $after, before $before"
step "completions after the decode restart: the same text"
