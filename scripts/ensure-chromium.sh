#!/usr/bin/env bash
# The console's browser tests drive Debian's Chromium through pytest-playwright (Playwright's own
# browser download cannot run here). Installs it when it is missing.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "installing chromium (console browser tests)"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium
