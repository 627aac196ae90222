#!/usr/bin/env bash
# The main job (README): builds vswitch and drives the lab, a cluster of nodes and pods in network
# namespaces on this machine, each node running the real vswitchd and each pod attached through
# the real CNI plugin. `deploy/lab.sh up` brings it up; `status`, `down` and every other
# vswitch-lab command pass through. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ip >/dev/null 2>&1 || ! command -v ping >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 iputils-ping >/dev/null
fi
cargo build --release --workspace --bins --quiet
# What the lab prints as the command to run it again.
export VSWITCH_LAB_CMD=deploy/lab.sh
exec target/release/vswitch-lab "${@:-up}"
