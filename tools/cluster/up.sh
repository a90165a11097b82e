#!/usr/bin/env bash
# A two-node Ray cluster on one Linux machine, each node in its own network namespace (own address, own network
# stack, traffic over a veth/bridge network), plus an S3-compatible store (moto's server) and a PostgreSQL server (the
# Serve gallery's database) both nodes reach.
#
#   sudo tools/cluster/up.sh STATE_DIR        # root: namespaces, links and mounts need it
#   . STATE_DIR/cluster.env                   # RAY_ADDRESS (jobs API), CMAN_S3_QUERY (the store's URI options), AWS_*,
#                                             # CMAN_PG_URL (serve.gallery_store), CMAN_SHARED (a folder both nodes read)
#   ray job submit --address "$RAY_ADDRESS" --working-dir . -- \
#     cman tune --config C --output-dir "s3://cman/sweep1?$CMAN_S3_QUERY" --local-dir "$STATE_DIR/head/sweep1"
#   sudo tools/cluster/down.sh STATE_DIR      # removes what up.sh made (recorded in STATE_DIR/made), idempotent
#
# Nodes: head HEAD_IP (GCS 6379, dashboard + jobs API 8265) and worker WORKER_IP, each CMAN_NODE_CPUS CPUs (1),
# each with its own Ray temp dir (/tmp/cmID/head, /tmp/cmID/worker: socket paths must stay short) and working
# directory (STATE_DIR/head, STATE_DIR/worker). The worker runs in its own mount namespace in which STATE_DIR/head and
# the head's Ray temp dir are empty: it cannot read or write the head's files, as on separate machines. The host
# reaches both through the bridge (HOST_IP), where the S3 store listens. Environment knobs: CMAN_NODE_CPUS,
# CMAN_CLUSTER_PYTHON (a venv's python; default the one on PATH), CMAN_CLUSTER_ENV (extra VAR=value lines passed to
# both nodes, space separated), CMAN_CLUSTER_NODES (2; 1 starts the head alone, for side-by-side timings).
set -euo pipefail

STATE=${1:?usage: up.sh STATE_DIR}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
PYTHON=${CMAN_CLUSTER_PYTHON:-$(command -v python)}
BIN=$(dirname "$PYTHON")
CPUS=${CMAN_NODE_CPUS:-1}
NODES=${CMAN_CLUSTER_NODES:-2}  # 1: the head alone (for side-by-side timings)
[ "$NODES" = 1 ] || [ "$NODES" = 2 ] || { echo "up.sh: CMAN_CLUSTER_NODES must be 1 or 2" >&2; exit 1; }

[ "$(id -u)" = 0 ] || { echo "up.sh: needs root (network namespaces, veth links, mounts)" >&2; exit 1; }
[ -e "$STATE/made" ] && { echo "up.sh: $STATE already holds a cluster; run down.sh $STATE first" >&2; exit 1; }
for tool in ip unshare mount; do
  command -v "$tool" >/dev/null || { echo "up.sh: $tool not found (Debian: apt-get install iproute2 util-linux)" >&2; exit 1; }
done

# One id per cluster: names and the subnet derive from it, so two clusters (two test runs) never collide.
ID=$(printf '%s' "$STATE" | cksum | awk '{printf "%04x", $1 % 65536}')
NET=$((16#${ID:0:2} % 200 + 20))
SUB=10.213.$NET
HOST_IP=$SUB.1 HEAD_IP=$SUB.2 WORKER_IP=$SUB.3
BR=cm${ID}br NS_HEAD=cman-$ID-head NS_WORKER=cman-$ID-worker
made() { echo "$1" >>"$STATE/made"; }
: >"$STATE/made"

ip link add "$BR" type bridge && made "link $BR"
ip addr add "$HOST_IP/24" dev "$BR"
ip link set "$BR" up
ROLES=head; [ "$NODES" = 2 ] && ROLES="head worker"
for role in $ROLES; do
  ns=cman-$ID-$role ip_var=$([ $role = head ] && echo "$HEAD_IP" || echo "$WORKER_IP")
  ip netns add "$ns" && made "netns $ns"
  ip link add "cm$ID${role:0:1}0" type veth peer name "cm$ID${role:0:1}1" && made "link cm$ID${role:0:1}0"
  ip link set "cm$ID${role:0:1}0" master "$BR" up
  ip link set "cm$ID${role:0:1}1" netns "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "cm$ID${role:0:1}1" name eth0
  ip -n "$ns" addr add "$ip_var/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$HOST_IP"
  mkdir -p "$STATE/$role"
done
# What both nodes read (a checkpoint and index to serve), as an NFS mount would be on separate machines.
mkdir -p "$STATE/shared"
# Ray's temp dirs hold unix sockets (paths of at most 107 bytes): short paths of their own, not under STATE_DIR.
RAYTMP=/tmp/cm$ID
mkdir "$RAYTMP" && made "dir $RAYTMP"
mkdir "$RAYTMP/head" "$RAYTMP/worker"

# The gallery's database (PostgreSQL, Debian's server binaries; `make install` installs them): listens on the bridge
# (HOST_IP:5432, trust for the cluster's subnet only); data and unix socket in /tmp/cmID/pg, owned by `postgres`
# (PostgreSQL refuses to run as root; STATE_DIR may be private to root). Serve's Retrievers on both nodes share it.
PG_BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
[ -x "$PG_BIN/pg_ctl" ] || { echo "up.sh: PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
PG_USER=$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)
PG=$RAYTMP/pg
mkdir "$PG" && chown "$PG_USER" "$PG" && made "pg $PG"
pg_failed() { echo "up.sh: PostgreSQL did not start: $(tail -5 "$STATE/pg.log") $(tail -5 "$PG/server.log" 2>/dev/null)" >&2; exit 1; }
runuser -u "$PG_USER" -- "$PG_BIN/initdb" -D "$PG/data" -A trust -U cman -E UTF8 --no-sync >"$STATE/pg.log" 2>&1 || pg_failed
echo "host all all $SUB.0/24 trust" >>"$PG/data/pg_hba.conf"
runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$PG/data" -l "$PG/server.log" -w -t 60 \
  -o "-p 5432 -k $PG -c listen_addresses=$HOST_IP -c max_connections=100" start >>"$STATE/pg.log" 2>&1 || pg_failed
runuser -u "$PG_USER" -- "$PG_BIN/createdb" -h "$PG" -p 5432 -U cman cman >>"$STATE/pg.log" 2>&1 || pg_failed

# The S3-compatible store (moto's server: in-memory, one process, speaks the S3 REST API pyarrow and boto3 use).
S3_PORT=9000
setsid "$BIN/python" -m moto.server -H "$HOST_IP" -p $S3_PORT >"$STATE/s3.log" 2>&1 &
echo $! >"$STATE/s3.pid" && made "pid $STATE/s3.pid"

NODE_ENV=(PATH="$BIN:/usr/sbin:/usr/bin:/sbin:/bin" HOME="${HOME:-/root}" RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
  AWS_ACCESS_KEY_ID=cman AWS_SECRET_ACCESS_KEY=cman-secret AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 ${CMAN_CLUSTER_ENV:-})
ip netns exec "$NS_HEAD" env -i "${NODE_ENV[@]}" setsid "$BIN/ray" start --head --block --node-ip-address "$HEAD_IP" \
  --port 6379 --dashboard-host 0.0.0.0 --dashboard-port 8265 --num-cpus "$CPUS" --temp-dir "$RAYTMP/head" \
  --disable-usage-stats >"$STATE/head.log" 2>&1 &
# The worker's own view of the disk: the head's directory is an empty tmpfs there.
if [ "$NODES" = 2 ]; then
  ip netns exec "$NS_WORKER" env -i "${NODE_ENV[@]}" setsid unshare --mount --propagation private sh -c "
    mount -t tmpfs cman-worker-private '$STATE/head' && mount -t tmpfs cman-worker-private '$RAYTMP/head' &&
    exec '$BIN/ray' start --block --address '$HEAD_IP:6379' --node-ip-address '$WORKER_IP' --num-cpus '$CPUS' \
      --temp-dir '$RAYTMP/worker' --disable-usage-stats" >"$STATE/worker.log" 2>&1 &
fi

cat >"$STATE/cluster.env" <<EOF
export RAY_ADDRESS=http://$HEAD_IP:8265
export CMAN_RAY_GCS=$HEAD_IP:6379
export CMAN_HEAD_IP=$HEAD_IP CMAN_WORKER_IP=$WORKER_IP CMAN_HOST_IP=$HOST_IP
export CMAN_NS_HEAD=$NS_HEAD CMAN_NS_WORKER=$NS_WORKER
export AWS_ACCESS_KEY_ID=cman AWS_SECRET_ACCESS_KEY=cman-secret AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export CMAN_S3_ENDPOINT=http://$HOST_IP:$S3_PORT
export CMAN_PG_URL=postgresql://cman@$HOST_IP:5432/cman
export CMAN_SHARED=$STATE/shared
export CMAN_S3_QUERY="endpoint_override=$HOST_IP:$S3_PORT&scheme=http&region=us-east-1"
EOF

# Ready when the store answers, the bucket exists and Ray counts both nodes alive.
deadline=$((SECONDS + ${CMAN_CLUSTER_TIMEOUT_S:-180}))
until "$BIN/python" - "$HOST_IP" "$S3_PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(f"http://{sys.argv[1]}:{sys.argv[2]}/cman", method="PUT"), timeout=2)
EOF
do
  [ $SECONDS -lt $deadline ] || { echo "up.sh: the S3 store did not start: $(tail -5 "$STATE/s3.log")" >&2; exit 1; }
  sleep 0.5
done
until [ "$(ip netns exec "$NS_HEAD" env -i "${NODE_ENV[@]}" "$BIN/ray" status --address "$HEAD_IP:6379" 2>/dev/null \
  | grep -c ' node_')" = "$NODES" ]; do
  [ $SECONDS -lt $deadline ] || {
    echo "up.sh: two Ray nodes did not come up; head: $(tail -5 "$STATE/head.log"); worker: $(tail -5 "$STATE/worker.log")" >&2
    exit 1
  }
  sleep 1
done
echo "cluster up: head $HEAD_IP ($NS_HEAD), worker $WORKER_IP ($NS_WORKER), S3 http://$HOST_IP:$S3_PORT/cman; . $STATE/cluster.env"
