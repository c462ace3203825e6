#!/usr/bin/env bash
# Builds the MinIO server (the dev cluster's S3-compatible store) from its Go
# module at the version pinned in versions.env (MINIO_VERSION) and caches it under
# ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/bin/minio-<key>, where the key is
# derived from the MINIO_ lines of versions.env only (so bumping MinIO rebuilds
# nothing else, and the reverse).
# Prints the directory holding the binary on stdout; a warm cache returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
key=$(grep -E '^MINIO_' "$here/versions.env" | sha256sum | cut -c1-12)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
bin="$cache/bin/minio-$key"

if [ -x "$bin/minio" ]; then echo "$bin"; exit 0; fi
mkdir -p "$bin" "$cache/work"
exec 9>"$cache/build-minio.lock"
flock 9
if [ -x "$bin/minio" ]; then echo "$bin"; exit 0; fi
log() { echo "[build-minio] $*" >&2; }
export CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)

w="$cache/work/minio-$MINIO_VERSION"
mkdir -p "$w"
printf 'module local/miniobuild\n\ngo 1.26\n' > "$w/go.mod"
cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/minio/minio"
GO
log "resolving github.com/minio/minio@$MINIO_VERSION"
(cd "$w" && go get "github.com/minio/minio@$MINIO_VERSION" >&2)
log "building minio"
(cd "$w" && go build -trimpath -ldflags "-s -w" -o "$bin/minio.tmp" github.com/minio/minio) && mv "$bin/minio.tmp" "$bin/minio"
[ -x "$bin/minio" ] || { log "build incomplete"; exit 1; }
log "done in $(( $(date +%s) - start ))s"
echo "$bin"
