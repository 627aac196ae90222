#!/usr/bin/env bash
# DNS benchmark (issue 7; a benchmark, not a test): how many queries a second the switch's
# resolver answers for a pod, and how fast.
#
# Brings up a lab of one node and two pods with release binaries, writes Services into the
# node's config (ClusterIP Services with a named port, headless Services with three ready
# endpoints and hostnames each), waits until the switch serves them, and runs dnsperf in pod
# n1-p1 against the cluster DNS address 10.96.0.10:
#   1. cluster names: A of ClusterIP and headless Services and of endpoint hostnames, SRV of
#      named ports, PTR of ClusterIPs, pod names a-b-c-d.default.pod.cluster.local;
#   2. the same with NXDOMAIN names mixed in, half of the queries (missing Services, and the
#      misses a search list makes: example.com.default.svc.cluster.local);
#   3. latency at a fixed, modest rate (-Q) with every reply's latency recorded (-v), for
#      percentiles.
# Runs 1 and 2 are closed loop: -c clients with -q queries outstanding, as fast as answers come.
# dnsperf runs on the same machine as the switch, so both share its CPUs: the numbers are a
# floor for the switch, and its CPU time during each run is printed alongside.
#
# Usage: deploy/bench/dns-bench.sh            (as root; installs dnsperf if missing)
# Knobs (environment): DURATION=10 (seconds per run), CLIENTS=4, OUTSTANDING=100,
#   SERVICES=200, HEADLESS=20, FIXED_QPS=2000, BENCH_LAB=<lab name, default db + pid in hex>.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-100}
SERVICES=${SERVICES:-200}
HEADLESS=${HEADLESS:-20}
FIXED_QPS=${FIXED_QPS:-2000}
LAB=${BENCH_LAB:-db$(printf '%x' $$)}
DNS=10.96.0.10
LAB_BIN=target/release/vswitch-lab

if [[ $(id -u) != 0 ]]; then
  echo "dns-bench: needs root (network namespaces, TAP devices)" >&2
  exit 1
fi
missing=()
command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
if ((${#missing[@]})); then
  echo "dns-bench: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo build --release --workspace --bins --quiet

WORK=$(mktemp -d /tmp/dns-bench.XXXXXX)
cleanup() {
  timeout 120 "$LAB_BIN" --name "$LAB" down >/dev/null 2>&1 || true
  rm -rf /etc/netns/"$LAB"-* "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

timeout 120 "$LAB_BIN" --name "$LAB" up --nodes 1 --pods-per-node 2 >"$WORK/up.txt"
NODE_DIR=/run/vswitch-lab/$LAB/n1
CONFIG=$NODE_DIR/vswitchd.toml
PID=$(cat "$NODE_DIR/vswitchd.pid")
POD=$LAB-n1-p1
P2=$(timeout 10 ip netns exec "$LAB-n1-p2" ip -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}')

# ClusterIPs 10.96.1.1 onwards; headless endpoints 10.244.1.100 onwards (A records do not
# need live pods).
clusterip() { echo "10.96.$((1 + $1 / 250)).$((1 + $1 % 250))"; }
{
  for ((i = 0; i < SERVICES; i++)); do
    cat <<EOF

[[services]]
namespace = "default"
name = "svc$i"
cluster_ips = ["$(clusterip "$i")"]
ports = [{ name = "http", protocol = "TCP", port = 80, target_port = 8080 }]
endpoints = [{ ip = "$P2" }]
EOF
  done
  for ((h = 0; h < HEADLESS; h++)); do
    b=$((100 + 3 * (h % 50)))
    cat <<EOF

[[services]]
namespace = "default"
name = "hl$h"
cluster_ips = []
ports = [{ name = "db", protocol = "TCP", port = 5432 }]
endpoints = [{ ip = "10.244.1.$b", hostname = "m0" }, { ip = "10.244.1.$((b + 1))", hostname = "m1" },
             { ip = "10.244.1.$((b + 2))", hostname = "m2" }]
EOF
  done
} >>"$CONFIG"

last=svc$((SERVICES - 1)).default.svc.cluster.local
for ((i = 0; i < 50; i++)); do
  if [[ -n $(timeout 5 ip netns exec "$POD" dig +short +time=1 +tries=1 "$last") ]]; then break; fi
  sleep 0.2
done
if [[ -z $(timeout 5 ip netns exec "$POD" dig +short +time=1 +tries=1 "$last") ]]; then
  echo "dns-bench: $last does not resolve after the config write; vswitchd's log:" >&2
  tail -20 "$NODE_DIR/vswitchd.log" >&2
  exit 1
fi

# Query files (dnsperf format: NAME TYPE).
{
  for ((i = 0; i < SERVICES; i++)); do
    echo "svc$i.default.svc.cluster.local A"
    ip=$(clusterip "$i")
    IFS=. read -r a b c d <<<"$ip"
    if ((i % 4 == 0)); then echo "_http._tcp.svc$i.default.svc.cluster.local SRV"; fi
    if ((i % 4 == 1)); then echo "$d.$c.$b.$a.in-addr.arpa PTR"; fi
    if ((i % 4 == 2)); then echo "10-244-1-$((2 + i % 200)).default.pod.cluster.local A"; fi
  done
  for ((h = 0; h < HEADLESS; h++)); do
    echo "hl$h.default.svc.cluster.local A"
    echo "m$((h % 3)).hl$h.default.svc.cluster.local A"
  done
} >"$WORK/cluster.txt"
n=0
{
  while read -r line; do
    echo "$line"
    n=$((n + 1))
    if ((n % 2 == 0)); then
      echo "missing$n.default.svc.cluster.local A"
    else
      echo "host$n.example.com.default.svc.cluster.local A"
    fi
  done <"$WORK/cluster.txt"
} >"$WORK/mixed.txt"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

# run LABEL FILE DNSPERF-ARGS...: prints dnsperf's summary and the switch's CPU use.
run() {
  local label=$1 file=$2
  shift 2
  local before after
  before=$(cpu_ticks)
  echo
  echo "== $label: $(wc -l <"$file") distinct queries; dnsperf -s $DNS -d $(basename "$file") -l $DURATION $*"
  timeout $((DURATION + 30)) ip netns exec "$POD" \
    dnsperf -s "$DNS" -d "$file" -l "$DURATION" "$@" >"$WORK/out.txt" 2>&1 || true
  after=$(cpu_ticks)
  grep -E 'Queries (sent|completed|lost)|Response codes|Run time|Queries per second|Average Latency|Latency StdDev' \
    "$WORK/out.txt" | grep -v '^>' | sed 's/^ */  /'
  awk -v t=$((after - before)) -v hz="$HZ" -v d="$DURATION" \
    'BEGIN { printf "  vswitchd CPU: %.2f s over the %d s run (%.0f%% of one CPU)\n", t / hz, d, 100 * t / hz / d }'
}

echo "dns-bench: lab $LAB, $(nproc) CPUs (load average $(cut -d' ' -f1-3 /proc/loadavg)), vswitchd pid $PID,"
echo "  $SERVICES ClusterIP + $HEADLESS headless Services; dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ {print $2}')"
run "1. cluster names" "$WORK/cluster.txt" -c "$CLIENTS" -q "$OUTSTANDING" -t 2
run "2. cluster names + 50% NXDOMAIN" "$WORK/mixed.txt" -c "$CLIENTS" -q "$OUTSTANDING" -t 2

# 3. Latency percentiles at a fixed rate: -v prints one line per reply, its latency last.
echo
echo "== 3. latency at $FIXED_QPS queries/s: dnsperf -s $DNS -d mixed.txt -l $DURATION -Q $FIXED_QPS -c 1 -q 20 -v"
timeout $((DURATION + 30)) ip netns exec "$POD" \
  dnsperf -s "$DNS" -d "$WORK/mixed.txt" -l "$DURATION" -Q "$FIXED_QPS" -c 1 -q 20 -t 2 -v \
  >"$WORK/fixed.txt" 2>&1 || true
grep -E 'Queries (completed|lost)|Queries per second' "$WORK/fixed.txt" | grep -v '^>' | sed 's/^ */  /'
grep -E '^> ' "$WORK/fixed.txt" | awk '{print $NF}' | sort -g | awk '
  { v[NR] = $1 }
  END {
    if (NR == 0) { print "  no per-query latencies in the output"; exit }
    split("50 90 99 99.9", ps, " ")
    line = "  latency:"
    for (i = 1; i <= 4; i++) {
      k = int(NR * ps[i] / 100 + 0.5); if (k < 1) k = 1; if (k > NR) k = NR
      line = line sprintf(" p%s %.0f us", ps[i], v[k] * 1e6)
    }
    print line sprintf(" (max %.0f us, %d replies)", v[NR] * 1e6, NR)
  }'
