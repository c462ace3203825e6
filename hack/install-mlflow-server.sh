#!/usr/bin/env bash
# Installs the MLflow tracking server the dev cluster runs (requirements/mlflow-server.txt)
# into its own virtualenv, cached under ${XDG_CACHE_HOME:-~/.cache}/finetune-operator/
# mlflow-server-<key> (key: that file's content). Prints the virtualenv's directory.
# A warm cache returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
reqs="$here/../requirements/mlflow-server.txt"
key=$(sha256sum "$reqs" | cut -c1-12)
cache=${FINETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
venv="$cache/mlflow-server-$key"
if [ -f "$venv/.installed" ]; then echo "$venv"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/mlflow-server.lock"
flock 9
if [ -f "$venv/.installed" ]; then echo "$venv"; exit 0; fi
start=$(date +%s)
echo "[install-mlflow-server] installing $(grep -v '^#' "$reqs" | xargs) into $venv" >&2
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q -U pip >&2
"$venv/bin/python" -m pip install -q -r "$reqs" >&2
touch "$venv/.installed"
echo "[install-mlflow-server] done in $(( $(date +%s) - start ))s" >&2
echo "$venv"
