#!/usr/bin/env bash
# Usage: fetch-module-file.sh MODULE VERSION PATH-IN-MODULE CACHE-NAME
# Fetches one file (a CRD) from a pinned Go module through the Go module proxy (checked against
# the checksum database, like any module download; nothing is built) and caches it under
# ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/CACHE-NAME/. Prints the file's path on stdout;
# a warm cache returns at once. Used by fetch-keda-crd.sh and fetch-kueue-crd.sh.
set -euo pipefail
module=$1 version=$2 path=$3 name=$4
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
dir="$cache/$name"
out="$dir/$(basename "$path")"
if [ -s "$out" ]; then echo "$out"; exit 0; fi

mkdir -p "$dir"
exec 9>"$cache/fetch-$name.lock"
flock 9
if [ -s "$out" ]; then echo "$out"; exit 0; fi
echo "[fetch-module-file] go mod download $module@$version" >&2
src=$(GOFLAGS=-mod=mod go mod download -json "$module@$version" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -s "$src/$path" ] || { echo "[fetch-module-file] no $path in $src" >&2; exit 1; }
cp "$src/$path" "$out.tmp" && mv "$out.tmp" "$out"
echo "$out"
