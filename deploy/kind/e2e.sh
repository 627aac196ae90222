#!/usr/bin/env bash
# The kind path: a cluster without a default CNI and without kube-proxy, vswitch built and
# deployed from this repository, and the upstream sig-network e2e suite run against it.
#
#   deploy/kind/e2e.sh [all|up|deploy|test|logs|down]      (default: all)
#
#   up      create the kind cluster (deploy/kind/kind-config.yaml)
#   deploy  build the image, load it into the nodes, apply deploy/kubernetes, wait for Ready
#   test    run e2e.test with ginkgo: focus \[sig-network\], the usual skips
#   logs    export the cluster's logs into $ARTIFACTS/logs
#   down    delete the cluster
#   all     up, deploy, test, logs, then down unless KEEP_CLUSTER=1; exits with the tests' status
#
# Needs, on your machine: docker (or podman with KIND_EXPERIMENTAL_PROVIDER=podman), kind >= 0.20
# (for kubeProxyMode: none), kubectl, a Rust toolchain (cargo), and curl + tar to fetch the
# e2e.test and ginkgo binaries of the cluster's Kubernetes version (or set E2E_TEST and GINKGO).
#
# Environment:
#   CLUSTER_NAME  kind cluster name (default: vswitch)
#   NODE_IMAGE    kindest/node image for `kind create cluster --image` (default: kind's own)
#   ARTIFACTS     kubeconfig, image archive, e2e binaries, JUnit reports, logs (default: target/kind-e2e)
#   E2E_FOCUS     ginkgo --focus (default: \[sig-network\])
#   E2E_SKIP      ginkgo --skip (default: IPv6|DualStack|SCTP|Disruptive|Serial|Feature|Flaky)
#   E2E_NODES     parallel ginkgo processes (default: 8)
#   E2E_TIMEOUT   ginkgo suite timeout (default: 3h)
#   E2E_TEST, GINKGO  paths of prebuilt e2e.test and ginkgo binaries (skips the download)
#   KEEP_CLUSTER  1: `all` leaves the cluster up afterwards
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

CLUSTER_NAME=${CLUSTER_NAME:-vswitch}
NODE_IMAGE=${NODE_IMAGE:-}
ARTIFACTS=${ARTIFACTS:-$repo/target/kind-e2e}
E2E_FOCUS=${E2E_FOCUS:-'\[sig-network\]'}
E2E_SKIP=${E2E_SKIP:-'IPv6|DualStack|SCTP|Disruptive|Serial|Feature|Flaky'}
E2E_NODES=${E2E_NODES:-8}
E2E_TIMEOUT=${E2E_TIMEOUT:-3h}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}

manifests=$repo/deploy/kubernetes
kubeconfig=$ARTIFACTS/kubeconfig
# Every kubectl here (and in nodes-configmap.sh) talks to this cluster only.
export KUBECONFIG=$kubeconfig

log() { echo "e2e.sh: $*" >&2; }
die() { log "$*"; exit 1; }

need() {
  local missing=()
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  ((${#missing[@]} == 0)) || die "missing prerequisites: ${missing[*]} (see the top of $0)"
}

# The image the DaemonSet runs; the build is tagged to match, so nothing is pulled.
image() {
  local img
  img=$(sed -n 's/^ *image: *//p' "$manifests/30-daemonset.yaml" | head -n1)
  [[ -n $img ]] || die "no image in $manifests/30-daemonset.yaml"
  echo "$img"
}

cmd_up() {
  need kind kubectl
  mkdir -p "$ARTIFACTS"
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    log "cluster $CLUSTER_NAME exists; reusing it"
  else
    log "creating kind cluster $CLUSTER_NAME (no CNI, no kube-proxy)"
    # Nodes stay NotReady until vswitch writes its conflist, so do not wait for Ready here.
    kind create cluster --name "$CLUSTER_NAME" --config "$here/kind-config.yaml" \
      ${NODE_IMAGE:+--image "$NODE_IMAGE"} --wait 0s
  fi
  kind get kubeconfig --name "$CLUSTER_NAME" >"$kubeconfig"
  log "kubeconfig: $kubeconfig"
}

# Waits until the controller manager has given every node its pod CIDR.
wait_pod_cidrs() {
  local deadline=$((SECONDS + 120)) missing
  while :; do
    missing=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"="}{.spec.podCIDR}{"\n"}{end}' | sed -n 's/=$//p')
    [[ -z $missing ]] && return 0
    ((SECONDS < deadline)) || die "nodes without a pod CIDR after 120 s: $missing"
    sleep 2
  done
}

cmd_deploy() {
  need kind kubectl cargo
  [[ -s $kubeconfig ]] || kind get kubeconfig --name "$CLUSTER_NAME" >"$kubeconfig"
  local img archive=$ARTIFACTS/vswitch-image.tar
  img=$(image)
  "$repo/deploy/build-image.sh" --tag "$img" --archive "$archive"
  log "loading $img into the nodes of $CLUSTER_NAME"
  kind load image-archive "$archive" --name "$CLUSTER_NAME"

  kubectl apply -f "$manifests/00-namespace.yaml"
  wait_pod_cidrs
  # The per-node table first, so the DaemonSet's pods find it when they start.
  "$manifests/nodes-configmap.sh" | kubectl apply -f -
  kubectl apply -f "$manifests"
  log "waiting for the vswitch DaemonSet and for every node to be Ready"
  kubectl -n vswitch rollout status daemonset/vswitch --timeout=5m
  kubectl wait --for=condition=Ready nodes --all --timeout=5m
  kubectl get nodes -o wide
  kubectl -n vswitch get pods -o wide
}

# e2e.test and ginkgo for the cluster's Kubernetes version, from the kubernetes-test tarball.
e2e_binaries() {
  if [[ -n ${E2E_TEST:-} || -n ${GINKGO:-} ]]; then
    [[ -x ${E2E_TEST:-} && -x ${GINKGO:-} ]] || die "set both E2E_TEST and GINKGO to executables"
    return 0
  fi
  need curl tar
  local version arch dir
  version=$(kubectl get nodes -o jsonpath='{.items[0].status.nodeInfo.kubeletVersion}')
  [[ $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+ ]] || die "cannot tell the cluster's version (got '$version')"
  version=${BASH_REMATCH[0]}
  case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "no kubernetes-test binaries for $(uname -m); set E2E_TEST and GINKGO" ;;
  esac
  dir=$ARTIFACTS/bin/$version
  if [[ ! -x $dir/e2e.test || ! -x $dir/ginkgo ]]; then
    mkdir -p "$dir"
    log "fetching e2e.test and ginkgo $version ($arch)"
    curl -fsSL "https://dl.k8s.io/$version/kubernetes-test-linux-$arch.tar.gz" |
      tar -xz -C "$dir" --strip-components=3 kubernetes/test/bin/e2e.test kubernetes/test/bin/ginkgo
  fi
  E2E_TEST=$dir/e2e.test
  GINKGO=$dir/ginkgo
}

cmd_test() {
  need kubectl
  [[ -s $kubeconfig ]] || die "no kubeconfig at $kubeconfig: run '$0 up' first"
  e2e_binaries
  mkdir -p "$ARTIFACTS/reports"
  log "ginkgo --focus='$E2E_FOCUS' --skip='$E2E_SKIP' ($E2E_NODES processes)"
  KUBERNETES_CONFORMANCE_TEST=y "$GINKGO" \
    --nodes="$E2E_NODES" \
    --focus="$E2E_FOCUS" \
    --skip="$E2E_SKIP" \
    --timeout="$E2E_TIMEOUT" \
    "$E2E_TEST" -- \
    --kubeconfig="$kubeconfig" \
    --provider=local \
    --report-dir="$ARTIFACTS/reports" \
    --dump-logs-on-failure=false \
    --disable-log-dump=true
}

cmd_logs() {
  need kind
  kind export logs "$ARTIFACTS/logs" --name "$CLUSTER_NAME" || log "could not export logs"
}

cmd_down() {
  need kind
  kind delete cluster --name "$CLUSTER_NAME"
}

cmd_all() {
  cmd_up
  cmd_deploy
  local rc=0
  cmd_test || rc=$?
  cmd_logs
  if [[ $KEEP_CLUSTER == 1 ]]; then
    log "keeping cluster $CLUSTER_NAME (KUBECONFIG=$kubeconfig)"
  else
    cmd_down
  fi
  if ((rc == 0)); then log "sig-network e2e passed"; else log "sig-network e2e failed (exit $rc)"; fi
  return "$rc"
}

case ${1:-all} in
  all) cmd_all ;;
  up) cmd_up ;;
  deploy) cmd_deploy ;;
  test) cmd_test ;;
  logs) cmd_logs ;;
  down) cmd_down ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" ;;
  *) die "unknown command '$1' (all, up, deploy, test, logs, down)" ;;
esac
