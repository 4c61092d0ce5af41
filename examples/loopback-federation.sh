#!/usr/bin/env bash
# A three-hospital fedcare federation on this machine, as docs/deployment.md's "A real federation" runs
# it: the consortium's PKI, the coordinator, three hospitals that each make their own key pair,
# are added to the running coordinator, approve the app bundle and start their daemon; then one
# short DP run, and everything stops. Loopback addresses and free ports only.
#
# usage: examples/loopback-federation.sh [STATE_DIR]
#
#   STATE_DIR  a new or empty folder outside any git checkout for the keys, ledgers, exported
#              data, logs and the run folder (runs/first); kept. Default: a new temporary
#              folder, removed when the run succeeded (kept, and named, when it failed).
#   ROUNDS     (environment) rounds of the run, default 2.
#
# `fedcare` must be on PATH (activate the environment it is installed in). Exit status: the run's
# (0 when it completed); every process started here is stopped on exit, Ctrl-C included.
set -euo pipefail
set -m  # each daemon in a process group of its own, stopped with everything it started

ROUNDS=${ROUNDS:-2}
HOSPITALS=(a b c)
if ((BASH_VERSINFO[0] < 4)); then
    echo "this script needs bash 4 or newer (found $BASH_VERSION)" >&2
    exit 2
fi
if ! command -v fedcare >/dev/null; then
    echo "fedcare is not on PATH: activate the environment fedcare is installed in" >&2
    exit 2
fi
if [[ $# -ge 1 ]]; then
    STATE=$1 KEEP=1
    mkdir -p "$STATE"
    if [[ -n $(ls -A "$STATE") ]]; then
        echo "$STATE is not empty: give a new or empty folder" >&2
        exit 2
    fi
    STATE=$(cd "$STATE" && pwd)
else
    STATE=$(mktemp -d "${TMPDIR:-/tmp}/fedcare-loopback.XXXXXX") KEEP=0
fi
cd "$STATE"
mkdir -p logs
echo "== fedcare loopback federation in $STATE (logs in logs/)"

# five free ports on 127.0.0.1, held at once so that they differ: the gateway (the public side),
# the SuperLink (the loopback side) and each hospital's SuperNode
read -r PUBLIC INTERNAL PORT_A PORT_B PORT_C < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
declare -A PORT=([a]=$PORT_A [b]=$PORT_B [c]=$PORT_C) DATA=([a]=1 [b]=2 [c]=3)

DAEMONS=()
stop_daemons() {  # the hospitals, then the coordinator: SIGTERM, up to 30 s, then the group
    local i pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${DAEMONS[i]}" 2>/dev/null || true
    done
    for pid in "${DAEMONS[@]}"; do
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
finish() {
    local code=$?
    trap - EXIT INT TERM
    stop_daemons
    if [[ $code -ne 0 ]]; then
        echo "== failed (exit $code); logs and state kept in $STATE" >&2
    elif [[ $KEEP -eq 0 ]]; then
        cd / && rm -rf "$STATE"
    fi
    exit "$code"
}
trap finish EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for SECONDS LOG TEXT PID: until TEXT is in LOG, while PID runs
    local deadline=$((SECONDS + $1))
    until grep -q "$3" "$2" 2>/dev/null; do
        if ! kill -0 "$4" 2>/dev/null; then
            echo "$2: the process stopped" >&2
            tail -n 20 "$2" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "$2: no '$3' within $1 s" >&2
            return 1
        fi
        sleep 0.5
    done
}
wait_all() {  # wait_all PID...: each of these commands succeeded
    local pid
    for pid in "$@"; do
        wait "$pid" || { echo "a command failed; see $STATE/logs" >&2; return 1; }
    done
}

echo "== coordinator: the consortium CA and TLS certificate, then the coordinator itself"
fedcare server init --out pki --address 127.0.0.1
fedcare server start --pki pki --host 127.0.0.1 --port "$PUBLIC" --internal-port "$INTERNAL" \
    --state coordinator >logs/coordinator.log 2>&1 &
DAEMONS+=($!)
wait_for 120 logs/coordinator.log "fedcare coordinator listening" "$!"

echo "== each hospital makes its own key pair (only NAME.pub goes to the coordinator)"
pids=()
for h in "${HOSPITALS[@]}"; do
    fedcare client keygen --out "hospital-$h/keys" --name "$h" >"logs/keygen-$h.log" 2>&1 &
    pids+=($!)
done
wait_all "${pids[@]}"

echo "== the coordinator adds each hospital's public key (the coordinator keeps running)"
for h in "${HOSPITALS[@]}"; do
    fedcare server add-hospital "$h" "hospital-$h/keys/$h.pub" --pki pki --superlink "127.0.0.1:$INTERNAL"
done

echo "== each hospital: its data (demo: three CSV files), approves the app bundle, starts its daemon"
fedcare simulate --export-hospitals data
pids=()
for h in "${HOSPITALS[@]}"; do
    fedcare client approve --ledger "hospital-$h/ledger" --yes >"logs/approve-$h.log" 2>&1 &
    pids+=($!)
done
wait_all "${pids[@]}"
for h in "${HOSPITALS[@]}"; do
    fedcare client start --superlink "127.0.0.1:$PUBLIC" --ca pki/ca.pem --key "hospital-$h/keys/$h.key" \
        --hospital "$h" --data "data/hospital-${DATA[$h]}.csv" --port "${PORT[$h]}" --state "hospital-$h" \
        >"logs/hospital-$h.log" 2>&1 &
    DAEMONS+=($!)
done

echo "== the coordinator: a DP run of $ROUNDS round(s) once a, b and c are online, then status"
fedcare server run --pki pki --superlink "127.0.0.1:$INTERNAL" --rounds "$ROUNDS" --epsilon 2 \
    --out runs/first --wait-timeout 120
fedcare server status --pki pki --superlink "127.0.0.1:$INTERNAL"
echo "== done: run folder $STATE/runs/first"
