#!/usr/bin/env bash
# The test command (README, .ci/run): installs the Debian packages the tests drive when any is
# missing, builds every binary, and runs the whole test suite. Needs root (namespaces, TAP).
set -euo pipefail
cd "$(dirname "$0")/.."

# command:package pairs the end-to-end tests use.
need=(ip:iproute2 ping:iputils-ping iperf3:iperf3 tcpdump:tcpdump tshark:tshark
      podman:podman runc:runc busybox:busybox-static nc:netcat-openbsd
      socat:socat ethtool:ethtool
      /usr/lib/cni/loopback:containernetworking-plugins)
missing=()
for pair in "${need[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  if [[ $cmd == /* ]]; then [[ -e $cmd ]] || missing+=("$pkg")
  else command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg"); fi
done
if ((${#missing[@]})); then
  echo "tests/run.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo build --workspace --bins
cargo test --workspace "$@"
