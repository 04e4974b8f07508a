#!/usr/bin/env bash
# Supervisor benchmark: builds the release binary and bench/lg.c, starts `hydraflow supervisor`
# (process backend) in a temporary directory, registers REPOS repositories, restarts the
# supervisor so that it starts all of them (reconcile), then loads the control protocol with lg
# (one TCP connection per request, as the original's client) and prints the figures, among them
# ping while repositories are registered, added and removed, with the disk quiet and busy. It ends by
# comparing access control off and on (`[supervisor] authorization = "off"` and "groups") in
# alternating rounds; run as root, lg then runs as `nobody`, let in by `read_group = "*"`, so
# every list_repos connection is looked up (sock_diag) and checked against the group rules.
#
# usage: bench/supervisor.sh [REPOS (200)] [SECONDS per run (5)] [ROUNDS of off/on (3)]
set -euo pipefail

repos=${1:-200}
secs=${2:-5}
rounds=${3:-3}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet 2>/dev/null || cargo build --release
bin=$CARGO_TARGET_DIR/release/hydraflow

work=$(mktemp -d)
chmod 755 "$work"
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    kill $(jobs -p) 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cc -O2 -pthread -o "$work/lg" bench/lg.c
cat > "$work/worker.sh" <<'EOF'
#!/bin/sh
# slow-* instances take half a second to get ready (the add_repo-in-flight figure).
case "$2" in slow-*) sleep 0.5 ;; esac
systemd-notify --ready --status="bench worker $2"
sleep 100000 &
wait
EOF
# config AUTHORIZATION: the configuration with `[supervisor] authorization` set.
config() {
    cat > "$work/hydraflow.toml" <<EOF
repos_dir = "$work/repos"
[supervisor]
listen = "127.0.0.1:0"
backend = "process"
state_dir = "$work/state"
worker_command = ["/bin/sh", "$work/worker.sh"]
authorization = "$1"
read_group = "*"
EOF
}
config groups
export HYDRAFLOW_CONFIG=$work/hydraflow.toml
unset NOTIFY_SOCKET JOURNAL_STREAM HYDRAFLOW_HOME HF_SUPERVISOR_PORT_FILE LISTEN_FDS LISTEN_PID || true
port_file=$work/state/supervisor-port

now_ms() { date +%s%3N; }

# Start the supervisor; wait for its first answered ping. Sets $pid and $started_ms.
start() {
    rm -f "$port_file"
    local t0
    t0=$(now_ms)
    HYDRAFLOW_LOG=warn "$bin" supervisor >>"$work/supervisor.log" 2>&1 &
    pid=$!
    until [ -s "$port_file" ] && "$work/lg" -p "$(cat "$port_file")" -n 1 -q '{"action":"ping"}\n' | grep -q ' ok=1 '; do
        sleep 0.001
    done
    started_ms=$(($(now_ms) - t0))
}

stop() {
    kill "$pid"
    wait "$pid" || true
    pid=
}

# Print the supervisor's VmRSS and threads, then its anonymous and file-backed parts.
rss() {
    echo "$1: $(awk '/VmRSS/ {print $2, $3}' "/proc/$pid/status"), threads: $(awk '/Threads/ {print $2}' "/proc/$pid/status")"
    echo "  $(grep -E '^(RssAnon|RssFile)' "/proc/$pid/status" | tr -s ' \t\n' ' ')"
}

lg() { "$work/lg" -p "$(cat "$port_file")" -d "$secs" -q "$@"; }

start
echo "exec -> first ping answered (no repos): ${started_ms} ms"
sleep 1
rss "supervisor RSS, no repos"
echo "ping, 1 client:    $(lg -c 1 '{"action":"ping"}\n')"
echo "list_repos, 0 repos, 1 client: $(lg -c 1 '{"action":"list_repos"}\n')"

mkdir -p "$work/checkouts"
t0=$(now_ms)
for i in $(seq 1 "$repos"); do
    mkdir -p "$work/checkouts/repo-$i"
    "$work/lg" -p "$(cat "$port_file")" -n 1 -q "{\"action\":\"register_repo\",\"path\":\"$work/checkouts/repo-$i\"}\\n" >/dev/null
done
echo "register_repo x$repos (lg process per request): $(($(now_ms) - t0)) ms in all"
stop

start
echo "exec -> first ping answered ($repos registered repos): ${started_ms} ms"
t0=$(now_ms)
until [ "$("$bin" repo list | grep -c 'active (running)')" -eq "$repos" ]; do sleep 0.1; done
echo "all $repos instances active (READY=1) after: $(($(now_ms) - t0)) ms more"
rss "supervisor RSS"
echo "  resident by mapping (kB):"
awk '/^[0-9a-f]+-[0-9a-f]+ /{m=$2" "($6 == "" ? "[anon]" : $6)} /^Rss:/{if ($2 > 0) print "   ", $2, m}' \
    "/proc/$pid/smaps" | sort -k1,1nr | head -12

echo "ping, 1 client:    $(lg -c 1 '{"action":"ping"}\n')"
echo "ping, 16 clients:  $(lg -c 16 '{"action":"ping"}\n')"
echo "list_repos ($repos repos), 1 client:   $(lg -c 1 '{"action":"list_repos"}\n')"
echo "list_repos ($repos repos), 16 clients: $(lg -c 16 '{"action":"list_repos"}\n')"
echo "supervisor RSS after load: $(awk '/VmRSS/ {print $2, $3}' "/proc/$pid/status")"
exec 3<>"/dev/tcp/127.0.0.1/$(cat "$port_file")"
printf '{"action":"list_repos"}\n' >&3
cat <&3 >"$work/list-reply"
exec 3<&-

# ping from one client while register_repo, add_repo (of slow instances: 0.5 s to READY=1) and
# remove_repo run back to back: each writes the registry and an instance file durably (fsync).
# Once with the disk quiet, once with it kept busy by synchronous writes beside (dd
# oflag=sync, 64 MiB at a time, into the same file system), which make each fsync wait.
mkdir -p "$work/checkouts/slow-1" "$work/checkouts/slow-2" "$work/checkouts/fast-1" "$work/checkouts/fast-2"
churn() {
    local end n=0
    end=$(($(now_ms) + secs * 1000))
    while [ "$(now_ms)" -lt "$end" ]; do
        n=$((n % 2 + 1))
        for req in "{\"action\":\"register_repo\",\"path\":\"$work/checkouts/fast-$n\"}" \
                   "{\"action\":\"add_repo\",\"path\":\"$work/checkouts/slow-$n\"}" \
                   "{\"action\":\"remove_repo\",\"slug\":\"fast-$n\"}" \
                   "{\"action\":\"remove_repo\",\"slug\":\"slow-$n\"}"; do
            "$work/lg" -p "$(cat "$port_file")" -n 1 -q "$req\n" >/dev/null
        done
    done
}
for disk in quiet busy; do
    hog=
    if [ "$disk" = busy ]; then
        ( while :; do dd if=/dev/zero of="$work/hog" bs=1M count=64 oflag=sync status=none; done ) &
        hog=$!
        sleep 1
    fi
    churn &
    churner=$!
    echo "ping, 1 client, register_repo/add_repo/remove_repo in flight, $disk disk: $(lg -c 1 '{"action":"ping"}\n')"
    wait "$churner"
    if [ -n "$hog" ]; then kill "$hog"; wait "$hog" 2>/dev/null || true; rm -f "$work/hog"; fi
done

t0=$(now_ms)
stop
echo "SIGTERM -> exit with $repos instances stopped: $(($(now_ms) - t0)) ms"
left=$(pgrep -f "$work/worker.sh" | wc -l || true)
echo "workers left running after exit: $left"

# The yardstick: bench/floor.c answers with the same bytes and does nothing else (one thread,
# blocking calls, no parsing), so the machine's own cost of a loopback TCP connection per
# request, with lg on the same CPUs, shows beside the supervisor's figures.
cc -O2 -o "$work/floor" bench/floor.c
floor_port=$((20000 + RANDOM % 20000))
"$work/floor" "$floor_port" &
floor_pid=$!
sleep 0.2
echo "floor, ping reply, 16 clients: $("$work/lg" -p "$floor_port" -d "$secs" -q -c 16 '{"action":"ping"}\n')"
kill "$floor_pid"; wait "$floor_pid" 2>/dev/null || true
"$work/floor" "$floor_port" "$work/list-reply" &
floor_pid=$!
sleep 0.2
echo "floor, list_repos reply ($(wc -c <"$work/list-reply") bytes), 16 clients: $("$work/lg" -p "$floor_port" -d "$secs" -q -c 16 '{"action":"list_repos"}\n')"
kill "$floor_pid"; wait "$floor_pid" 2>/dev/null || true

# Access control off and on, in alternating rounds (so that drift hits both alike): the same
# registry of $repos repositories, the supervisor restarted with each setting.
if [ "$(id -u)" -eq 0 ]; then
    as_client() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
    client=nobody
else
    as_client() { "$@"; }
    client=$(id -un)
fi
alg() { as_client "$work/lg" -p "$(cat "$port_file")" -d "$secs" -q "$@"; }
declare -A sum
for round in $(seq 1 "$rounds"); do
    for mode in off groups; do
        config "$mode"
        start
        until [ "$("$bin" repo list | grep -c 'active (running)')" -eq "$repos" ]; do sleep 0.1; done
        for what in ping list_repos; do
            line=$(alg -c 16 "{\"action\":\"$what\"}\\n")
            echo "authorization=$mode round $round, $what ($repos repos), 16 clients as $client: $line"
            rate=$(echo "$line" | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
            sum[$mode,$what]=$(awk -v a="${sum[$mode,$what]:-0}" -v b="$rate" 'BEGIN { print a + b }')
        done
        stop
    done
done
for what in ping list_repos; do
    awk -v on="${sum[groups,$what]}" -v off="${sum[off,$what]}" -v what="$what" \
        -v n="$rounds" 'BEGIN { printf "%s, 16 clients, mean of %d rounds: off %.0f req/s, on %.0f req/s: on/off = %.3f\n", what, n, off / n, on / n, on / off }'
done
