#!/usr/bin/env bash
# Throughput with packet capture off, on, and on with a filter that matches nothing.
#
# Builds a 2-node lab (release binaries) and runs iperf3 TCP from n1-p1 to n2-p1 across the
# overlay in three modes, interleaved, REPEAT times each, and prints the median of each:
#   off      no capture session;
#   on       `vswitchctl capture` on node 1 at every point (pod, host, NAT, overlay inner and
#            outer), no filter, streamed to /dev/null: every packet is copied (64 KiB
#            super-frames included) and the session's queue drops what the reader cannot keep
#            up with (the drop count is printed);
#   filter   the same session with a filter that matches nothing (`host 192.0.2.1`): every
#            packet is parsed and tested at each point, none is copied.
# Needs root and iperf3. Env: TIME (seconds per run, default 5), REPEAT (default 3),
# NAME (lab name, default capb + pid), SKIP_BUILD=1 to use the binaries as built.
set -euo pipefail
cd "$(dirname "$0")/../.."
TIME=${TIME:-5}
REPEAT=${REPEAT:-3}
NAME=${NAME:-capb$(( $$ % 10000 ))}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --workspace --bins --quiet
BIN=target/release
lab() { "$BIN/vswitch-lab" --name "$NAME" "$@"; }
CAP=
cleanup() {
  [ -z "$CAP" ] || kill "$CAP" 2>/dev/null || true
  lab down >/dev/null 2>&1 || true
}
trap cleanup EXIT
lab up --nodes 2 --pods-per-node 1 >/dev/null
SOCK=/run/vswitch-lab/$NAME/n1/vswitchd.sock
DST=$(ip -n "$NAME-n2-p1" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)

# One run: Gbit/s received, from iperf3's receiver line.
run() {
  ip netns exec "$NAME-n2-p1" timeout $((TIME + 15)) iperf3 -s -1 >/dev/null 2>&1 &
  local server=$!
  sleep 0.3
  local g
  g=$(ip netns exec "$NAME-n1-p1" timeout $((TIME + 10)) iperf3 -c "$DST" -t "$TIME" -f g \
        | awk '/receiver/ {print $(NF-2)}')
  wait "$server" 2>/dev/null || true
  echo "${g:-0}"
}

# Starts a capture session on node 1 (arguments: a filter, or none) and waits until it runs.
start_capture() {
  "$BIN/vswitchctl" --socket "$SOCK" capture "$@" >/dev/null 2>"/tmp/$NAME-capture.err" &
  CAP=$!
  command -v curl >/dev/null || { sleep 1; return; }
  for _ in $(seq 50); do
    if curl -sf --unix-socket "$SOCK" http://vswitchd/v1/capture/sessions 2>/dev/null \
         | grep -q '"running":true'; then
      return
    fi
    sleep 0.1
  done
}

stop_capture() {
  kill -INT "$CAP" 2>/dev/null || true
  wait "$CAP" 2>/dev/null || true
  CAP=
  sed 's/^/    /' "/tmp/$NAME-capture.err" >&2
  rm -f "/tmp/$NAME-capture.err"
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

off=() on=() filt=()
for i in $(seq "$REPEAT"); do
  off+=("$(run)")
  start_capture
  on+=("$(run)")
  echo "  run $i, capture on:" >&2
  stop_capture
  start_capture host 192.0.2.1
  filt+=("$(run)")
  echo "  run $i, capture on with a filter matching nothing:" >&2
  stop_capture
  echo "  run $i: off ${off[-1]}, on ${on[-1]}, filter ${filt[-1]} Gbit/s" >&2
done
printf 'TCP n1-p1 -> n2-p1 across the overlay, %ss x %s, median Gbit/s\n' "$TIME" "$REPEAT"
printf '  capture off:                         %s\n' "$(printf '%s\n' "${off[@]}" | median)"
printf '  capture on (all points, no filter):  %s\n' "$(printf '%s\n' "${on[@]}" | median)"
printf '  capture on, filter matching nothing: %s\n' "$(printf '%s\n' "${filt[@]}" | median)"
