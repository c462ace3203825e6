#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok and helm from Go modules and caches them outside the clone, keyed by the
# pinned versions. Prints the directory holding the binaries on stdout.
# A warm cache returns in well under a second.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
# The key hashes the control plane's lines only: PROMETHEUS_ lines are hack/build-prometheus.sh's,
# and the real node's pins (below the marker) have their own key in hack/build-node.sh.
key=$(sed '/^# --- real node/,$d' "$here/versions.env" | grep -v -E '^(PROMETHEUS|MINIO|KEDA)_' | sha256sum | cut -c1-12)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
bin="$cache/bin/$key"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

complete() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if complete; then echo "$bin"; exit 0; fi

mkdir -p "$bin" "$cache/work"
exec 9>"$cache/build.lock"
flock 9
if complete; then echo "$bin"; exit 0; fi
log() { echo "[build-control-plane] $*" >&2; }
export CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)

build_kubernetes() {
  local w="$cache/work/kubernetes-$KUBERNETES_VERSION" minor
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  mkdir -p "$w"
  log "kubernetes $KUBERNETES_VERSION: resolving staging modules"
  local gomod
  gomod=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module local/kubebuild"
    echo "go 1.26"
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    grep -E '^\s*k8s\.io/[a-zA-Z0-9._/-]+ v0\.0\.0(\s*//.*)?$' "$gomod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m v0.$minor.${KUBERNETES_VERSION##*.}"; done
  } > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$w" && go mod tidy -e >/dev/null 2>&1 || true; cd "$w" && go get "k8s.io/kubernetes@$KUBERNETES_VERSION" >&2)
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    log "building $c"
    (cd "$w" && go build -trimpath -ldflags "$ld" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c") && mv "$bin/$c.tmp" "$bin/$c"
  done
}

build_etcd() {
  local w="$cache/work/etcd-$ETCD_VERSION"
  mkdir -p "$w"
  log "building etcd $ETCD_VERSION"
  printf 'module local/etcdbuild\n\ngo 1.26\n' > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$w" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2 &&
    go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3) && mv "$bin/etcd.tmp" "$bin/etcd"
}

build_go_install() {  # name module@version
  log "building $1 ($2)"
  GOBIN="$cache/work/gobin-$1" go install -trimpath -ldflags "-s -w" "$2" >&2
  mv "$cache/work/gobin-$1/$1" "$bin/$1"
}

[ -x "$bin/etcd" ] || build_etcd
[ -x "$bin/kwok" ] || build_go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
[ -x "$bin/helm" ] || build_go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
[ -x "$bin/kube-apiserver" ] && [ -x "$bin/kubectl" ] && [ -x "$bin/kube-scheduler" ] && [ -x "$bin/kube-controller-manager" ] || build_kubernetes
# kwok's stage configs live in its module source; keep a copy beside the binaries.
if [ ! -d "$bin/kwok-stages" ]; then
  src=$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage
  mkdir -p "$bin/kwok-stages.tmp" && cp -r "$src"/. "$bin/kwok-stages.tmp/" && chmod -R u+w "$bin/kwok-stages.tmp" && mv "$bin/kwok-stages.tmp" "$bin/kwok-stages"
fi
complete || { log "build incomplete"; exit 1; }
log "done in $(( $(date +%s) - start ))s"
echo "$bin"
