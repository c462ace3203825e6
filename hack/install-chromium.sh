#!/usr/bin/env bash
# Headless Chromium for the review page's browser test (tests/cluster/test_review_page.py):
# Debian's `chromium` package. Nothing to do when a chromium is on PATH already.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install-chromium: not root and no sudo: install Debian's chromium package yourself" >&2
    exit 1
  fi
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
