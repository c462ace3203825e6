#!/usr/bin/env bash
# `make images`: builds the project's images with buildah from the repository's
# Dockerfiles and writes them as OCI archives that containerd imports
# (`ctr -n k8s.io images import`), with no registry:
#
#   pause     the pod sandbox: FROM scratch + hack/pause (built by hack/build-node.sh)
#   operator  operator.Dockerfile
#   trainer   trainer_image/Dockerfile
#   vllm      serving/vllm-cpu.Dockerfile
#
#   bash hack/build-images.sh [NAME...]      (default: all of them)
#   bash hack/build-images.sh --key NAME...  (prints NAME KEY, builds nothing)
#   bash hack/build-images.sh --cached NAME... (NAME REF ARCHIVE of cached archives, builds
#                                              nothing; exits 3 when one is missing)
#
# Registries are unreachable here, so every build gets BASE_IMAGE (and the
# trainer CUDA_IMAGE) swapped for a base made from Debian's packages with
# mmdebstrap; FINETUNE_IMAGE_BASE=upstream keeps the Dockerfiles' own
# (digest-pinned) bases instead. Each image is cached by content: its key hashes
# the relative path and content of every file of its build context (so every
# checkout or worktree of the same content has the same key), its base's package
# list and RECIPE below, and names the archive
# ~/.cache/finetune-operator/images/<name>-<key>.tar; an archive that exists is
# not built again. Prints one line per image: NAME REF ARCHIVE.
#
# buildah keeps the last built image of each name (and so its layers, the pip
# install of torch among them): a change to the project's sources rebuilds only
# the layers that copy them. FINETUNE_KEEP_BUILDAH_IMAGES=0 drops them after the
# archive is written (saves ~20 GB of disk, and costs a full rebuild next time).
set -euo pipefail
# Bump when a change to this script changes what an image contains (a build
# argument, a label that is not metadata, the base's recipe): every key changes.
RECIPE=2
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
out="$cache/images"
base_mode=${FINETUNE_IMAGE_BASE:-debian}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)
suite=bookworm
log() { echo "[build-images] $*" >&2; }
mkdir -p "$out"
# One lock per image: a long trainer build does not hold up the operator's.
lock() { exec 8>"$out/.lock-$1"; flock 8; }

# name | Dockerfile | context paths (what the hash covers) | Debian packages of its offline base
spec() {
  case "$1" in
    operator) echo "operator.Dockerfile|operator.Dockerfile operator.Dockerfile.dockerignore pyproject.toml README.md requirements/constraints.txt api operator|python3,python3-venv,ca-certificates" ;;
    trainer) echo "trainer_image/Dockerfile|trainer_image api openai_api requirements/constraints.txt|python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates" ;;
    vllm) echo "serving/vllm-cpu.Dockerfile|serving requirements/vllm-cpu.txt requirements/constraints.txt api trainer_image|python3,python3-venv,python3-dev,gcc,g++,libc6-dev,libnuma1,libgomp1,ca-certificates" ;;
    *) log "unknown image $1 (pause, operator, trainer, vllm)"; exit 2 ;;
  esac
}

# The image references the chart and the dev cluster use.
ref() {
  case "$1" in
    pause) echo "localhost/finetune/pause:local" ;;
    operator) echo "ghcr.io/finetune-dev/finetune-operator:$version" ;;
    trainer) echo "ghcr.io/finetune-dev/finetune-trainer:$version" ;;
    vllm) echo "ghcr.io/finetune-dev/vllm-cpu:$version" ;;
  esac
}

# The content key of an image: relative path and sha256 of each tracked or
# untracked (not ignored) file of its context, sorted, plus what else decides the
# image. No absolute path enters it.
key() {
  local name=$1 dockerfile paths pkgs
  IFS='|' read -r dockerfile paths pkgs <<<"$(spec "$name")"
  (cd "$repo" && {
    git ls-files -co --exclude-standard -- $dockerfile $paths | LC_ALL=C sort -u |
      while IFS= read -r f; do
        [ -f "$f" ] && printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
      done
    echo "recipe=$RECIPE $base_mode $pkgs $suite $(ref "$name")"
  }) | sha256sum | cut -c1-12
}

if [ "${1:-}" = --key ]; then
  shift
  for n in "$@"; do echo "$n $(key "$n")"; done
  exit 0
fi

pause_key() { { sha256sum <"$1/pause" | cut -d' ' -f1; echo "recipe=$RECIPE"; } | sha256sum | cut -c1-12; }

# --cached NAME...: the NAME REF ARCHIVE lines of images whose archive exists for the
# current content; builds nothing, exits 3 if one is missing.
if [ "${1:-}" = --cached ]; then
  shift
  for n in "$@"; do
    if [ "$n" = pause ]; then
      bin=$(bash "$here/build-node.sh" --cached) || exit 3
      a="$out/pause-$(pause_key "$bin").tar"
    else
      a="$out/$n-$(key "$n").tar"
    fi
    [ -s "$a" ] || exit 3
    echo "$n $(ref "$n") $a"
  done
  exit 0
fi

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null && continue
  log "installing $tool (Debian package)"
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tool" >&2
done

# A base image from Debian's packages: mmdebstrap --variant=minbase, imported as
# FROM scratch + ADD rootfs.tar. Cached by package list; prints its reference.
debian_base() {
  local pkgs=$1 h ref tar ctx
  h=$(printf '%s|%s|%s' "$suite" "$pkgs" "$(grep -h '^URIs\|^# http' /etc/apt/sources.list.d/* 2>/dev/null | sort | tr -d '\n')" | sha256sum | cut -c1-12)
  ref="localhost/finetune/base:$h"
  exec 7>"$out/.lock-base-$h"
  flock 7
  if buildah inspect --type image "$ref" >/dev/null 2>&1; then echo "$ref"; return; fi
  tar="$out/base-$h.rootfs.tar"
  if [ ! -s "$tar" ]; then
    log "base $h: mmdebstrap --variant=minbase $suite ($pkgs)"
    local t0=$SECONDS
    mmdebstrap --quiet --variant=minbase --include="$pkgs" --aptopt='Acquire::Retries "3"' \
      --customize-hook='chroot "$1" sh -c "rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"' \
      "$suite" "$tar.partial.tar" >&2   # mmdebstrap picks the format from the extension
    mv "$tar.partial.tar" "$tar"
    log "base $h: rootfs $(du -h "$tar" | cut -f1) in $((SECONDS - t0))s"
  fi
  ctx=$(mktemp -d)
  ln "$tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$tar" "$ctx/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' > "$ctx/Containerfile"
  buildah bud --quiet --layers=false -f "$ctx/Containerfile" -t "$ref" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "$ref"
}

build_pause() {
  local bin h ref archive c
  lock pause
  bin=$(bash "$here/build-node.sh")
  ref=$(ref pause)
  h=$(pause_key "$bin")
  archive="$out/pause-$h.tar"
  if [ ! -s "$archive" ]; then
    c=$(buildah from scratch)
    buildah copy --quiet "$c" "$bin/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 \
      --label org.opencontainers.image.title=finetune-pause --label "dev.finetune.image.inputs=$h" "$c"
    buildah commit --quiet "$c" "$ref" >/dev/null
    buildah rm "$c" >/dev/null
    rm -f "$out"/pause-*.tar
    buildah push --quiet "$ref" "oci-archive:$archive.tmp:$ref" >/dev/null
    mv "$archive.tmp" "$archive"
  fi
  echo "pause $ref $archive"
}

build_one() {
  local name=$1 s dockerfile paths pkgs h ref archive base="" args=()
  s=$(spec "$name")
  IFS='|' read -r dockerfile paths pkgs <<<"$s"
  ref=$(ref "$name")
  h=$(key "$name")
  archive="$out/$name-$h.tar"
  lock "$name"
  if [ -s "$archive" ]; then echo "$name $ref $archive"; return; fi
  local t0=$SECONDS
  if [ "$base_mode" = debian ] && [ -n "$pkgs" ]; then
    base=$(debian_base "$pkgs")
    args+=(--build-arg "BASE_IMAGE=$base" --build-arg "CUDA_IMAGE=$base")
  fi
  # pip inside the build reaches PyPI through this machine's configuration: the
  # global pip.conf and the CA file PIP_CERT names, mounted read-only.
  local conf
  for conf in /etc/pip.conf /etc/xdg/pip/pip.conf; do
    [ -f "$conf" ] && args+=(--volume "$conf:$conf:ro")
  done
  if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    args+=(--volume "$PIP_CERT:$PIP_CERT:ro" --build-arg "PIP_CERT=$PIP_CERT")
  fi
  # The image this name had before: replaced below once the new one is written.
  local previous
  previous=$(buildah images --noheading --no-trunc --format '{{.ID}}' "$ref" 2>/dev/null | head -1 || true)
  log "$name: building $ref from $dockerfile (${base:-upstream base})"
  (cd "$repo" && buildah bud --network host --layers \
      --label "org.opencontainers.image.title=finetune-$name" \
      --label "org.opencontainers.image.version=$version" \
      --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
      --label "org.opencontainers.image.source=https://github.com/finetune-dev/finetune-operator" \
      --label "org.opencontainers.image.licenses=Apache-2.0" \
      --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      --label "dev.finetune.image.inputs=$h" \
      "${args[@]}" -f "$dockerfile" -t "$ref" . >&2)
  rm -f "$out/$name"-*.tar
  # OCI archives with zstd layers: about gzip's size, but compressed and (at import)
  # decompressed several times faster, which is most of the time for the ML images' gigabytes.
  buildah push --quiet --compression-format zstd "$ref" "oci-archive:$archive.tmp:$ref" >/dev/null
  mv "$archive.tmp" "$archive"
  # The archive is what the cluster imports; the image stays in buildah's storage so
  # that its layers (the dependencies') are the next build's cache. The previous
  # image of this name goes, with the layers only it used.
  local now
  now=$(buildah images --noheading --no-trunc --format '{{.ID}}' "$ref" | head -1)
  if [ -n "$previous" ] && [ "$previous" != "$now" ]; then
    buildah rmi "$previous" >/dev/null 2>&1 || true
  fi
  [ "${FINETUNE_KEEP_BUILDAH_IMAGES:-1}" = 1 ] || buildah rmi "$ref" >/dev/null 2>&1 || true
  log "$name: $(du -h "$archive" | cut -f1) archive in $((SECONDS - t0))s"
  echo "$name $ref $archive"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(pause operator trainer vllm)
for n in "${names[@]}"; do
  if [ "$n" = pause ]; then build_pause; else build_one "$n"; fi
done
