#!/usr/bin/env bash
# Builds runc from its Go module (RUNC_VERSION in hack/runc.env) with seccomp
# support (cgo, libseccomp-dev from Debian's packages, installed when missing) and
# caches it under ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/bin/runc-<key>, the
# key a hash of hack/runc.env. containerd's runc shim runs this binary (BinaryName
# in the real node's containerd configuration).
# Prints the directory holding the binary on stdout; a warm cache returns at once
# (`--cached`: builds nothing, exits 3 when it is not there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=runc.env
source "$here/runc.env"
key=$(grep -E '^RUNC_' "$here/runc.env" | sha256sum | cut -c1-12)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
bin="$cache/bin/runc-$key"
log() { echo "[build-runc] $*" >&2; }
complete() { [ -x "$bin/runc" ] && "$bin/runc" --version >/dev/null 2>&1; }
if complete; then echo "$bin"; exit 0; fi
[ "${1:-}" != --cached ] || exit 3   # --cached: build nothing

mkdir -p "$bin" "$cache/work"
exec 9>"$cache/build-runc.lock"
flock 9
if complete; then echo "$bin"; exit 0; fi
start=$(date +%s)
if ! pkg-config --exists libseccomp 2>/dev/null; then
  command -v apt-get >/dev/null || { log "need libseccomp-dev and pkg-config (no apt-get here)"; exit 1; }
  log "installing Debian packages: libseccomp-dev pkg-config"
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libseccomp-dev pkg-config >&2
fi
w="$cache/work/runc-$RUNC_VERSION"
mkdir -p "$w"
printf 'module local/runcbuild\n\ngo 1.26\n' > "$w/go.mod"
cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/opencontainers/runc"
GO
log "resolving github.com/opencontainers/runc@$RUNC_VERSION"
(cd "$w" && GOFLAGS=-mod=mod go get "github.com/opencontainers/runc@$RUNC_VERSION" >&2)
log "building runc $RUNC_VERSION (cgo, seccomp)"
(cd "$w" && GOFLAGS=-mod=mod CGO_ENABLED=1 go build -trimpath -buildmode=pie -tags "seccomp urfave_cli_no_docs" \
  -ldflags "-s -w -X main.version=${RUNC_VERSION#v} -X main.gitCommit=module" \
  -o "$bin/runc.tmp" github.com/opencontainers/runc) && mv "$bin/runc.tmp" "$bin/runc"
complete || { log "build incomplete"; exit 1; }
log "done in $(( $(date +%s) - start ))s"
echo "$bin"
