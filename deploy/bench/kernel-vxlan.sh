#!/bin/bash
# The kernel datapath as flannel's vxlan backend builds it: per node a bridge cbr0 holding the
# pods' veths and a vxlan VTEP with static FDB/neighbour entries for the other node. Two nodes and
# three pods in network namespaces, the shape every datapath of `vswitch-lab bench` gets:
#
#   $P-p1  10.244.1.2 --+                                           +-- $P-p2 10.244.2.2
#   $P-p1b 10.244.1.3 --+- cbr0 + vx ($P-n1) ==ul1/ul2== ($P-n2) vx + cbr0
#   underlay 192.168.100.1/24 <-> 192.168.100.2/24, pod MTU 1450
#
# and, when iptables is installed, a host outside the cluster behind node 1 ($P-out,
# 192.168.200.2/24 on n1's ulo 192.168.200.1/24) that pods reach through an iptables MASQUERADE
# rule on n1, as flannel's --ip-masq does: the anchor of egress translation.
#
# Usage: kernel-vxlan.sh up|down|pids   (prefix: $BENCH_PREFIX, default kx)
# `vswitch-lab bench` runs this script (a copy is compiled into the binary) and does the
# measuring; by hand: `kernel-vxlan.sh up; ip netns exec kx-p1 ping 10.244.2.2; kernel-vxlan.sh down`.
# Adapted from the project's anchor scripts.
set -euo pipefail
P=${BENCH_PREFIX:-kx}
NS="n1 n2 p1 p1b p2"
ns() { ip netns exec "$P-$1" "${@:2}"; }

down() {
  local n
  for n in $NS out; do ip netns del "$P-$n" 2>/dev/null || true; done
}

pod() { # pod node ip
  ip link add eth0 netns "$P-$1" mtu 1450 type veth peer name "v$1" netns "$P-$2" mtu 1450
  ns "$1" ip addr add "$3/24" dev eth0
  ns "$1" ip link set eth0 up
  ns "$1" ip route add default via "${3%.*}.1"
  ns "$2" ip link set "v$1" master cbr0 up
}

up() {
  down
  local n i
  for n in $NS; do ip netns add "$P-$n"; ns "$n" ip link set lo up; done
  # underlay: n1 <-> n2
  ip link add ul1 netns "$P-n1" type veth peer name ul2 netns "$P-n2"
  for i in 1 2; do
    ns n$i ip addr add 192.168.100.$i/24 dev ul$i
    ns n$i ip link set ul$i up
    ns n$i ip link add cbr0 type bridge
    ns n$i ip addr add 10.244.$i.1/24 dev cbr0
    ns n$i ip link set cbr0 up mtu 1450
    ns n$i ip link add vx type vxlan id 1 dstport 4789 local 192.168.100.$i dev ul$i nolearning
    ns n$i ip link set vx address 02:00:00:00:0$i:ff mtu 1450 up
    ns n$i ip addr add 10.244.$i.0/32 dev vx
    ns n$i sysctl -qw net.ipv4.ip_forward=1
  done
  for i in 1 2; do
    local o=$((3 - i))
    ns n$i ip route add 10.244.$o.0/24 via 10.244.$o.0 dev vx onlink
    ns n$i ip neigh add 10.244.$o.0 lladdr 02:00:00:00:0$o:ff dev vx nud permanent
    ns n$i bridge fdb add 02:00:00:00:0$o:ff dev vx dst 192.168.100.$o
  done
  pod p1 n1 10.244.1.2
  pod p1b n1 10.244.1.3
  pod p2 n2 10.244.2.2
  if command -v iptables >/dev/null 2>&1; then
    ip netns add "$P-out"
    ns out ip link set lo up
    ip link add ulo netns "$P-n1" type veth peer name eth0 netns "$P-out"
    ns n1 ip addr add 192.168.200.1/24 dev ulo
    ns n1 ip link set ulo up
    ns out ip addr add 192.168.200.2/24 dev eth0
    ns out ip link set eth0 up
    ns n1 iptables -t nat -A POSTROUTING -s 10.244.0.0/16 -o ulo -j MASQUERADE
  fi
}

# The kernel path has no datapath process: its work is softirq and system time.
pids() { :; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  pids) pids ;;
  *) echo "usage: $0 up|down|pids" >&2; exit 2 ;;
esac
