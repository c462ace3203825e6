#!/usr/bin/env bash
# Fetches KEDA's ScaledObject CRD (config/crd/bases/keda.sh_scaledobjects.yaml) from the
# pinned Go module github.com/kedacore/keda/v2 (KEDA_VERSION in versions.env) through the Go
# module proxy (checked against the checksum database, like any module download) and caches
# it under ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/keda-<version>/.
# The tests install it into the dev cluster to validate the ScaledObject the operator renders
# against KEDA's own schema (tests/cluster/test_autoscaling_objects.py).
# Prints the CRD file's path on stdout; a warm cache returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
dir="$cache/keda-$KEDA_VERSION"
crd="$dir/keda.sh_scaledobjects.yaml"
if [ -s "$crd" ]; then echo "$crd"; exit 0; fi

mkdir -p "$dir"
exec 9>"$cache/fetch-keda-crd.lock"
flock 9
if [ -s "$crd" ]; then echo "$crd"; exit 0; fi
echo "[fetch-keda-crd] go mod download github.com/kedacore/keda/v2@$KEDA_VERSION" >&2
src=$(GOFLAGS=-mod=mod go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -s "$src/config/crd/bases/keda.sh_scaledobjects.yaml" ] || {
  echo "[fetch-keda-crd] no config/crd/bases/keda.sh_scaledobjects.yaml in $src" >&2; exit 1; }
cp "$src/config/crd/bases/keda.sh_scaledobjects.yaml" "$crd.tmp" && mv "$crd.tmp" "$crd"
echo "$crd"
