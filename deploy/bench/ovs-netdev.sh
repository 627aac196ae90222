#!/bin/bash
# Open vSwitch's userspace datapath (datapath_type=netdev, no DPDK) as the per-node switch, with
# its userspace VXLAN tunnel: per node an ovsdb-server and an ovs-vswitchd in the node's namespace,
# bridge br-phy on the underlay veth and br-int holding the pods' veths and the tunnel port.
# Same two-node, three-pod shape as kernel-vxlan.sh:
#
#   $P-p1  10.244.1.2 --+                                               +-- $P-p2 10.244.2.2
#   $P-p1b 10.244.1.3 --+- br-int + vx ($P-n1) ==ul1/ul2== ($P-n2) vx + br-int
#
# OVS_TSO=1 turns on its experimental userspace TSO (seen on the project's machines: same-node
# 10x faster, but TCP across its VXLAN tunnel stops working). Needs openvswitch-switch.
# Usage: ovs-netdev.sh up|down|pids   (prefix: $BENCH_PREFIX, default ox; files in
# /run/vswitch-bench/$P). `vswitch-lab bench` runs this script (a copy is compiled into the
# binary). Adapted from the project's anchor scripts.
set -euo pipefail
P=${BENCH_PREFIX:-ox}
NS="n1 n2 p1 p1b p2"
D=/run/vswitch-bench/$P
ns() { ip netns exec "$P-$1" "${@:2}"; }
vs() { local i=$1; shift; ovs-vsctl --timeout=10 --db=unix:$D/n$i/db.sock "$@"; }
app() { local i=$1; shift; ovs-appctl --timeout=10 -t $D/n$i/vswitchd.ctl "$@"; }

down() {
  local i p n
  for i in 1 2; do
    for p in vswitchd ovsdb; do
      if [ -f "$D/n$i/$p.pid" ]; then kill "$(cat "$D/n$i/$p.pid")" 2>/dev/null || true; fi
    done
  done
  sleep 0.5
  for i in 1 2; do
    for p in vswitchd ovsdb; do
      if [ -f "$D/n$i/$p.pid" ]; then kill -9 "$(cat "$D/n$i/$p.pid")" 2>/dev/null || true; fi
    done
  done
  for n in $NS; do ip netns del "$P-$n" 2>/dev/null || true; done
  rm -rf "$D"
  rmdir /run/vswitch-bench 2>/dev/null || true
}

pod() { # pod node ip
  ip link add eth0 netns "$P-$1" mtu 1450 type veth peer name "v$1" netns "$P-$2" mtu 1450
  ns "$1" ip addr add "$3/16" dev eth0
  ns "$1" ip link set eth0 up
  # Without its TSO support the userspace datapath drops TCP with offloaded checksums (as
  # Antrea documents), so the pods checksum in software.
  if [ -z "${OVS_TSO:-}" ]; then ns "$1" ethtool -K eth0 tx off >/dev/null; fi
  ns "$2" ip link set "v$1" up
  vs "${2#n}" add-port br-int "v$1"
}

up() {
  for c in ovsdb-tool ovsdb-server ovs-vswitchd ovs-vsctl ovs-appctl ethtool; do
    command -v $c >/dev/null || { echo "$c not found: install openvswitch-switch and ethtool" >&2; exit 3; }
  done
  down
  local n i
  for n in $NS; do ip netns add "$P-$n"; ns "$n" ip link set lo up; done
  ip link add ul1 netns "$P-n1" type veth peer name ul2 netns "$P-n2"
  for i in 1 2; do
    mkdir -p $D/n$i
    ovsdb-tool create $D/n$i/conf.db /usr/share/openvswitch/vswitch.ovsschema
    ns n$i ovsdb-server --remote=punix:$D/n$i/db.sock --pidfile=$D/n$i/ovsdb.pid \
      --unixctl=$D/n$i/ovsdb.ctl --detach --log-file=$D/n$i/ovsdb.log $D/n$i/conf.db
    vs $i --no-wait init
    if [ -n "${OVS_TSO:-}" ]; then
      vs $i --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
    fi
    ns n$i ovs-vswitchd unix:$D/n$i/db.sock --pidfile=$D/n$i/vswitchd.pid \
      --unixctl=$D/n$i/vswitchd.ctl --detach --log-file=$D/n$i/vswitchd.log
    ns n$i ip link set ul$i up
    vs $i add-br br-phy -- set bridge br-phy datapath_type=netdev
    vs $i add-port br-phy ul$i
    ns n$i ip addr add 192.168.100.$i/24 dev br-phy
    ns n$i ip link set br-phy up
    app $i ovs/route/add 192.168.100.0/24 br-phy >/dev/null
    vs $i add-br br-int -- set bridge br-int datapath_type=netdev
    vs $i add-port br-int vx -- set interface vx type=vxlan \
      options:remote_ip=192.168.100.$((3 - i)) options:local_ip=192.168.100.$i options:key=1
  done
  pod p1 n1 10.244.1.2
  pod p1b n1 10.244.1.3
  pod p2 n2 10.244.2.2
}

# The datapath processes: one ovs-vswitchd per node.
pids() {
  local i
  for i in 1 2; do
    if [ -f "$D/n$i/vswitchd.pid" ]; then cat "$D/n$i/vswitchd.pid"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  pids) pids ;;
  *) echo "usage: $0 up|down|pids" >&2; exit 2 ;;
esac
