#!/usr/bin/env bash
# Builds prometheus and promtool from the pinned Go module (PROMETHEUS_VERSION in
# versions.env) and caches them beside the control-plane binaries, under
# ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/bin/prometheus-<key>, where the
# key is derived from the PROMETHEUS_ lines of versions.env only (so bumping
# Prometheus does not rebuild Kubernetes, and the reverse).
# Prints the directory holding the binaries on stdout; a warm cache returns at once.
#
# The web UI's assets are not embedded (no `builtinassets` build tag): the tests
# and the dev cluster use Prometheus's HTTP API only, and skipping the UI build
# (npm) keeps this a pure Go build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
key=$(grep -E '^PROMETHEUS_' "$here/versions.env" | sha256sum | cut -c1-12)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
bin="$cache/bin/prometheus-$key"
want=(prometheus promtool)

complete() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if complete; then echo "$bin"; exit 0; fi

mkdir -p "$bin" "$cache/work"
exec 9>"$cache/build-prometheus.lock"
flock 9
if complete; then echo "$bin"; exit 0; fi
log() { echo "[build-prometheus] $*" >&2; }
export CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)

# Module tags are v0.3MM.P for Prometheus 3.MM.P.
mod=$PROMETHEUS_VERSION
minor=$(echo "$mod" | cut -d. -f2)
release="3.$((10#${minor:1})).${mod##*.}"
w="$cache/work/prometheus-$mod"
mkdir -p "$w"
printf 'module local/prometheusbuild\n\ngo 1.26\n' > "$w/go.mod"
cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
GO
log "resolving github.com/prometheus/prometheus@$mod (Prometheus $release)"
(cd "$w" && go get "github.com/prometheus/prometheus@$mod" >&2)
ld="-s -w -X github.com/prometheus/common/version.Version=$release -X github.com/prometheus/common/version.Branch=module -X github.com/prometheus/common/version.Revision=$mod"
for c in prometheus promtool; do
  log "building $c"
  (cd "$w" && go build -trimpath -ldflags "$ld" -o "$bin/$c.tmp" "github.com/prometheus/prometheus/cmd/$c") && mv "$bin/$c.tmp" "$bin/$c"
done
complete || { log "build incomplete"; exit 1; }
log "done in $(( $(date +%s) - start ))s"
echo "$bin"
