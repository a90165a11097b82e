#!/usr/bin/env bash
# Stops and removes what tools/cluster/up.sh STATE_DIR made (listed in STATE_DIR/made): every process in its
# namespaces, the namespaces, the bridge and veth links, the S3 store, the PostgreSQL server. Idempotent; touches nothing it did not make.
#   sudo tools/cluster/down.sh STATE_DIR
set -uo pipefail

STATE=${1:?usage: down.sh STATE_DIR}
[ -f "$STATE/made" ] || { echo "down.sh: nothing recorded in $STATE (no cluster, or already down)"; exit 0; }

kill_group() {  # SIGTERM, then SIGKILL after a grace period, to the process group led by $1
  kill -TERM -- "-$1" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 0.25; done
  kill -KILL -- "-$1" 2>/dev/null || true
}

# Namespaces first (their processes are the Ray nodes), then links, then the store; newest first.
tac "$STATE/made" | while read -r kind name; do
  case $kind in
    netns)
      if ip netns list | grep -qw "$name"; then
        for _ in 1 2 3; do  # a dying raylet may still fork: sweep until the namespace is empty
          pids=$(ip netns pids "$name" 2>/dev/null)
          [ -z "$pids" ] && break
          kill -KILL $pids 2>/dev/null
          sleep 0.5
        done
        ip netns del "$name"
      fi ;;
    link) ip link show "$name" >/dev/null 2>&1 && ip link del "$name" ;;
    pid) [ -f "$name" ] && kill_group "$(cat "$name")" && rm -f "$name" ;;
    dir) rm -rf "$name" ;;
    pg)
      if [ -f "$name/data/postmaster.pid" ]; then
        pg_ctl=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")/pg_ctl
        runuser -u "$(stat -c %U "$name")" -- "$pg_ctl" -D "$name/data" -m immediate -w stop >/dev/null 2>&1 ||
          kill -KILL "$(head -1 "$name/data/postmaster.pid")" 2>/dev/null
      fi
      rm -rf "$name" ;;
  esac
done
rm -f "$STATE/made" "$STATE/cluster.env"
echo "cluster in $STATE down"
