#!/usr/bin/env bash
# Fetches KEDA's ScaledObject CRD (config/crd/bases/keda.sh_scaledobjects.yaml) from the
# pinned Go module github.com/kedacore/keda/v2 (KEDA_VERSION in versions.env) and caches it
# under ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/keda-<version>/ (fetch-module-file.sh).
# The tests install it into the dev cluster to validate the ScaledObject the operator renders
# against KEDA's own schema (tests/cluster/test_autoscaling_objects.py).
# Prints the CRD file's path on stdout; a warm cache returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
exec bash "$here/fetch-module-file.sh" github.com/kedacore/keda/v2 "$KEDA_VERSION" \
  config/crd/bases/keda.sh_scaledobjects.yaml "keda-$KEDA_VERSION"
