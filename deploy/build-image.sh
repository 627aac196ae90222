#!/usr/bin/env bash
# Builds the vswitch container image from this repository without pulling anything from a
# container registry: cargo builds the binaries statically on this machine (glibc with
# crt-static), and the image is FROM scratch with only those binaries (deploy/Containerfile).
#
#   deploy/build-image.sh [--tag TAG] [--archive FILE] [--engine podman|docker]
#
#   --tag TAG       image name (default: localhost/vswitch:VERSION, as deploy/kubernetes uses)
#   --archive FILE  also save the image as a docker-archive tar, for `kind load image-archive`
#   --engine E      podman or docker (default: $CONTAINER_ENGINE, else podman, else docker)
#
# Environment: VSWITCH_TARGET (default: this machine's <arch>-unknown-linux-gnu). Podman's own
# settings apply as usual (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF).
set -euo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/.."

die() { echo "build-image.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$self"; }

version=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' Cargo.toml | head -n1)
[[ -n $version ]] || die "cannot read the workspace version from Cargo.toml"
tag="localhost/vswitch:$version"
archive=""
engine=${CONTAINER_ENGINE:-}
target=${VSWITCH_TARGET:-$(uname -m)-unknown-linux-gnu}
bins=(vswitchd vswitch vswitchctl vswitch-install)

while (($#)); do
  case $1 in
    --tag) [[ $# -ge 2 ]] || die "--tag needs a value"; tag=$2; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --archive) [[ $# -ge 2 ]] || die "--archive needs a value"; archive=$2; shift 2 ;;
    --archive=*) archive=${1#*=}; shift ;;
    --engine) [[ $# -ge 2 ]] || die "--engine needs a value"; engine=$2; shift 2 ;;
    --engine=*) engine=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
if [[ -z $engine ]]; then
  if command -v podman >/dev/null 2>&1; then engine=podman
  elif command -v docker >/dev/null 2>&1; then engine=docker
  else die "neither podman nor docker is installed"; fi
fi
command -v "$engine" >/dev/null 2>&1 || die "$engine is not installed"

# Static binaries: every crate here is pure Rust or libc but for libpcap (the capture filter's
# compiler, see vswitch/build.rs), whose static archive and libdbus-1's come from Debian, so
# glibc's crt-static links them with no shared library left (checked below).
static_libs=(libpcap.a:libpcap-dev libdbus-1.a:libdbus-1-dev)
missing=()
for pair in "${static_libs[@]}"; do
  [[ $(cc -print-file-name="${pair%%:*}") == /* ]] || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "build-image.sh: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    die "the static build needs the Debian packages ${missing[*]} (apt-get install ${missing[*]})"
  fi
fi
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, and the output apart
# from target/release.
echo "build-image.sh: cargo build --release --target $target (static)" >&2
unset CARGO_ENCODED_RUSTFLAGS
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target "$target" --workspace --bins
out="${CARGO_TARGET_DIR:-target}/$target/release"

ctx=$(mktemp -d "${TMPDIR:-/tmp}/vswitch-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
for b in "${bins[@]}"; do
  [[ -x $out/$b ]] || die "$out/$b was not built"
  cp "$out/$b" "$ctx/$b"
  # The release profile keeps line tables for backtraces on the host; the image needs none.
  if command -v strip >/dev/null 2>&1; then strip --strip-debug "$ctx/$b"; fi
  if command -v file >/dev/null 2>&1; then
    desc=$(file -b "$ctx/$b")
    [[ $desc == *"statically linked"* || $desc == *"static-pie linked"* ]] \
      || die "$b is not statically linked: $desc"
  elif command -v ldd >/dev/null 2>&1; then
    if ldd "$ctx/$b" 2>&1 | grep -q '=>'; then die "$b links shared libraries: $(ldd "$ctx/$b")"; fi
  fi
done

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "build-image.sh: $engine build -t $tag" >&2
"$engine" build -f deploy/Containerfile -t "$tag" \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" "$ctx"

if [[ -n $archive ]]; then
  mkdir -p "$(dirname "$archive")"
  rm -f "$archive"
  "$engine" save -o "$archive" "$tag"
  echo "build-image.sh: saved $tag to $archive" >&2
fi
echo "build-image.sh: built $tag" >&2
