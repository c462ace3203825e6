#!/usr/bin/env bash
# Builds the real node's binaries from their Go modules and caches them outside
# the clone: kubelet and kube-proxy (the same k8s.io/kubernetes version as the
# control plane), containerd 2.x with its runc shim and ctr, and the CNI
# plugins bridge, host-local, loopback and portmap, and the pod sandbox's pause
# process (hack/pause; registry.k8s.io is unreachable offline). iptables and
# conntrack come from Debian's packages and are installed when missing; runc is
# built by hack/build-runc.sh (its own cache key, hack/runc.env).
# Prints the directory holding the binaries on stdout; a warm cache returns at once.
# `build-node.sh --cached` builds nothing: it prints the directory if it is complete,
# or exits 3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
key=$( (grep -E '^KUBERNETES_VERSION=' "$here/versions.env"; sed -n '/^# --- real node/,$p' "$here/versions.env") | sha256sum | cut -c1-12)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
bin="$cache/bin/node-$key"
want=(pause kubelet kube-proxy containerd containerd-shim-runc-v2 ctr cni/bridge cni/host-local cni/loopback cni/portmap)
debs=(iptables:iptables conntrack:conntrack)

log() { echo "[build-node] $*" >&2; }
complete() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
packages() {
  local missing=() d
  for d in "${debs[@]}"; do command -v "${d%%:*}" >/dev/null || missing+=("${d#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  command -v apt-get >/dev/null || { log "need ${missing[*]} (no apt-get here)"; exit 1; }
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
}
# --cached: print the directory only if everything is there already; build and install nothing
# (exit 3 otherwise). The test suite's real-node tests run without FINETUNE_NODE=kubelet then.
if [ "${1:-}" = --cached ]; then
  for d in "${debs[@]}"; do command -v "${d%%:*}" >/dev/null || exit 3; done
  complete && echo "$bin" && exit 0
  exit 3
fi
packages
if complete; then echo "$bin"; exit 0; fi

mkdir -p "$bin/cni" "$cache/work"
exec 9>"$cache/build-node.lock"
flock 9
if complete; then echo "$bin"; exit 0; fi
export GOFLAGS=-mod=mod CGO_ENABLED=0
start=$(date +%s)

build_kube_node() {
  # The control plane's wrapper module (hack/build-control-plane.sh) already
  # resolves k8s.io/kubernetes and its staging modules; build from a copy of it.
  local cp w minor
  cp=$(bash "$here/build-control-plane.sh") || return 1
  [ -n "$cp" ] || return 1
  w="$cache/work/kubernetes-node-$KUBERNETES_VERSION"
  mkdir -p "$w"
  cp "$cache/work/kubernetes-$KUBERNETES_VERSION/go.mod" "$cache/work/kubernetes-$KUBERNETES_VERSION/go.sum" "$w/"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  for c in kubelet kube-proxy; do
    [ -x "$bin/$c" ] && continue
    log "building $c $KUBERNETES_VERSION"
    (cd "$w" && go build -trimpath -ldflags "$ld" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c") && mv "$bin/$c.tmp" "$bin/$c"
  done
}

build_containerd() {
  local w="$cache/work/containerd-$CONTAINERD_VERSION" c
  mkdir -p "$w"
  printf 'module local/containerdbuild\n\ngo 1.26\n' > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
GO
  (cd "$w" && go get "github.com/containerd/containerd/v2@$CONTAINERD_VERSION" >&2) || return 1
  # Static builds: btrfs and devmapper snapshotters need cgo libraries; the
  # node uses the overlayfs snapshotter.
  local ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
  for c in containerd containerd-shim-runc-v2 ctr; do
    [ -x "$bin/$c" ] && continue
    log "building $c $CONTAINERD_VERSION"
    (cd "$w" && go build -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs urfave_cli_no_docs" -ldflags "$ld" \
      -o "$bin/$c.tmp" "github.com/containerd/containerd/v2/cmd/$c") && mv "$bin/$c.tmp" "$bin/$c"
  done
}

build_cni() {
  local p
  for p in bridge host-local loopback portmap; do
    [ -x "$bin/cni/$p" ] && continue
    local sub=main
    [ "$p" = host-local ] && sub=ipam
    [ "$p" = portmap ] && sub=meta
    log "building CNI $p $CNI_PLUGINS_VERSION"
    GOBIN="$cache/work/gobin-cni" go install -trimpath -ldflags "-s -w" \
      "github.com/containernetworking/plugins/plugins/$sub/$p@$CNI_PLUGINS_VERSION" >&2
    mv "$cache/work/gobin-cni/$p" "$bin/cni/$p"
  done
}

build_pause() {
  [ -x "$bin/pause" ] && return 0
  log "building pause (hack/pause)"
  (cd "$here/pause" && go build -trimpath -ldflags "-s -w" -o "$bin/pause.tmp" .) && mv "$bin/pause.tmp" "$bin/pause"
}

build_pause
build_cni
build_containerd
build_kube_node
complete || { log "build incomplete"; exit 1; }
log "done in $(( $(date +%s) - start ))s"
echo "$bin"
