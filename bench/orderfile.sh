#!/usr/bin/env bash
# Writes packaging/link-order.txt: the functions an idle worker, the supervisor and a pipeline
# run execute, in the order they first run, so that the linker (rust-lld's
# --symbol-ordering-file, passed by build.rs for release builds) puts them next to each other.
# The kernel maps an executable's code into a process in blocks of 64 KiB or more (fault-around,
# large page-cache folios), so scattered hot functions cost far more resident memory than their
# size; see BENCHMARKS.md, "Idle memory".
#
# usage: bench/orderfile.sh          (Linux x86-64, needs cc; takes about two minutes)
#
# Scenarios, each under bench/fncov.c (ptrace, one breakpoint per function):
#   1. `hydraflow run` on a fresh repository, idle for 40 s (past one 30 s heartbeat)
#   2. `hydraflow supervisor` (process backend): register, list, ping, add and remove repos
#   3. `hydraflow demo`: four issues through the whole pipeline
# A function keeps its first position; names from an older build that no longer exist are
# ignored by the linker, so a stale file costs memory, never correctness.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
bin=$(realpath "$CARGO_TARGET_DIR/release/hydraflow")

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cc -O2 -o "$work/fncov" bench/fncov.c
cc -O2 -pthread -o "$work/lg" bench/lg.c
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $1, $3}' >"$work/symbols"
unset NOTIFY_SOCKET JOURNAL_STREAM HYDRAFLOW_HOME HYDRAFLOW_CONFIG LISTEN_FDS LISTEN_PID || true
export HYDRAFLOW_LOG=info

echo "1. idle worker (40 s)"
git init -q -b main "$work/idle"
git -C "$work/idle" -c user.name=b -c user.email=b@example.invalid commit -q --allow-empty -m init
"$work/fncov" "$work/symbols" "$work/1" 40 -- "$bin" run --repo "$work/idle" >/dev/null

echo "2. supervisor"
cat >"$work/worker.sh" <<'EOF'
#!/bin/sh
systemd-notify --ready --status="orderfile worker $2"
sleep 100000 &
wait
EOF
cat >"$work/hydraflow.toml" <<EOF
repos_dir = "$work/repos"
[supervisor]
listen = "127.0.0.1:0"
backend = "process"
state_dir = "$work/state"
worker_command = ["/bin/sh", "$work/worker.sh"]
EOF
export HYDRAFLOW_CONFIG=$work/hydraflow.toml
req() { "$work/lg" -p "$(cat "$work/state/supervisor-port")" -n "${2:-1}" -q "$1\\n" >/dev/null; }
# Registered repositories first (untraced), so that the traced start reconciles them.
"$bin" supervisor >"$work/supervisor.log" 2>&1 &
first=$!
until [ -s "$work/state/supervisor-port" ]; do sleep 0.1; done
for i in 1 2 3 4 5; do
    mkdir -p "$work/checkouts/repo-$i"
    req "{\"action\":\"register_repo\",\"path\":\"$work/checkouts/repo-$i\"}"
done
kill "$first"
wait "$first" || true
rm -f "$work/state/supervisor-port"
"$work/fncov" "$work/symbols" "$work/2" 30 -- "$bin" supervisor >>"$work/supervisor.log" 2>&1 &
until [ -s "$work/state/supervisor-port" ]; do sleep 0.1; done
# (Under the tracer the first answers are slow: reconciling traps on every new function.)
until "$bin" ping >/dev/null 2>&1; do sleep 0.2; done
"$bin" repo list >/dev/null
mkdir -p "$work/checkouts/added"
req '{"action":"ping"}' 200
req '{"action":"list_repos"}' 200
req "{\"action\":\"add_repo\",\"path\":\"$work/checkouts/added\"}"
req '{"action":"list_repos"}' 50
req '{"action":"repo_status","slug":"added"}'
req '{"action":"restart_repo","slug":"added"}'
req '{"action":"remove_repo","slug":"added"}'
req '{"action":"version"}'
req '{"action":"nonsense"}'
req 'not json'
wait
unset HYDRAFLOW_CONFIG

echo "3. demo pipeline"
(cd "$work" && "$work/fncov" "$work/symbols" "$work/3" 0 -- "$bin" demo --dir "$work/demo" >/dev/null)

# What both the idle worker and the supervisor run first, then what only the worker runs, then
# what only the supervisor runs, then the rest of the pipeline: each process's code stays in
# at most two runs of pages.
awk 'FNR == NR { sup[$0] = 1; next } ($0 in sup)' "$work/2" "$work/1" >"$work/both"
awk '!seen[$0]++' "$work/both" "$work/1" "$work/2" "$work/3" >packaging/link-order.txt
echo "$(wc -l <packaging/link-order.txt) functions in $root/packaging/link-order.txt"
