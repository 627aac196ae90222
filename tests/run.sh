#!/usr/bin/env bash
# The test command (README, .ci/run): installs the Debian packages the tests drive when any is
# missing, builds every binary, and runs the whole test suite. Needs root (namespaces, TAP).
set -euo pipefail
cd "$(dirname "$0")/.."

# command:package pairs the end-to-end tests use.
need=(ip:iproute2 ping:iputils-ping iperf3:iperf3 tcpdump:tcpdump tshark:tshark
      podman:podman runc:runc busybox:busybox-static nc:netcat-openbsd
      socat:socat ethtool:ethtool shellcheck:shellcheck dig:dnsutils file:file
      pip3:python3-pip curl:curl kubectl:kubernetes-client
      /usr/lib/cni/loopback:containernetworking-plugins
      # The capture filter links libpcap; the image's static build also libdbus-1's archive.
      pcap-config:libpcap-dev "/usr/lib/$(uname -m)-linux-gnu/libdbus-1.a:libdbus-1-dev")
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

# Offline validation of the Kubernetes manifests (the deploy tests); pinned, it ships the schemas.
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  python3 -m pip install --quiet kubernetes-validate==1.37.0 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate==1.37.0
fi

# The host as a fresh machine has it: IPv4 forwarding off. New network namespaces copy the
# host's IPv4 settings, so a suite run where something had turned it on (podman, the anchors'
# scripts, a test run earlier) would hide a lab node that forgets to set its own. Restored on
# exit; VSWITCH_TESTS_KEEP_HOST_SYSCTLS=1 leaves the host alone (a workstation whose containers
# need forwarding during the run).
fwd=/proc/sys/net/ipv4/ip_forward
if [[ ${VSWITCH_TESTS_KEEP_HOST_SYSCTLS:-0} != 1 && -w $fwd ]]; then
  was=$(<"$fwd")
  if [[ $was != 0 ]]; then
    echo "tests/run.sh: net.ipv4.ip_forward = 0 on the host for the run (was $was; restored after)"
    trap 'echo "$was" > '"$fwd" EXIT
    echo 0 > "$fwd"
  fi
fi

cargo build --workspace --bins
# Every test binary runs even when one fails, so a run shows all that is wrong.
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?

# Egress translation and the Services' outside paths need no netfilter at all (issue 27):
# their tests again on a machine without iptables or nft, made by hiding every such binary
# (an empty file bound over it) in a mount namespace of the run's own.
if (($# == 0)); then
  hide=()
  for t in iptables iptables-legacy iptables-nft ip6tables ip6tables-legacy ip6tables-nft \
           iptables-save iptables-restore ip6tables-save ip6tables-restore nft xtables-multi \
           xtables-legacy-multi xtables-nft-multi; do
    p=$(command -v "$t" 2>/dev/null) && hide+=("$(readlink -f "$p")")
  done
  echo "tests/run.sh: egress and Services again with no iptables or nft (${#hide[@]} binaries hidden)"
  # shellcheck disable=SC2016 # expanded by the inner shell
  unshare --mount --propagation private bash -c '
    set -euo pipefail
    for f in $(printf "%s\n" "$@" | sort -u); do mount --bind /dev/null "$f"; done
    for t in iptables nft; do
      if "$t" --version >/dev/null 2>&1; then echo "tests/run.sh: $t still runs" >&2; exit 1; fi
    done
    exec cargo test -p vswitch-tests --test egress_e2e --test services_e2e
  ' _ "${hide[@]}" || status=$?
fi
exit "$status"
