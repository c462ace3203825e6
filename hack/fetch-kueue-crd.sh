#!/usr/bin/env bash
# Fetches Kueue's Workload CRD (config/components/crd/bases/kueue.x-k8s.io_workloads.yaml) from
# the pinned Go module sigs.k8s.io/kueue (KUEUE_VERSION in kueue.env) and caches it under
# ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/kueue-<version>/ (fetch-module-file.sh).
# The tests install it to suspend a queued job through its Workload, as Kueue expects
# (tests/cluster/test_kueue_suspend.py). Prints the CRD file's path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=kueue.env
source "$here/kueue.env"
exec bash "$here/fetch-module-file.sh" sigs.k8s.io/kueue "$KUEUE_VERSION" \
  config/components/crd/bases/kueue.x-k8s.io_workloads.yaml "kueue-$KUEUE_VERSION"
