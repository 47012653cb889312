#!/usr/bin/env bash
# Sets up what fedge needs on a Debian/Ubuntu machine, idempotently:
#   - Mosquitto (apt, when missing and we are root or have sudo; otherwise a clear message),
#   - systemd-analyze (Debian's systemd package) for tests/deploy, when missing and possible,
#   - a virtualenv in .venv with torch==2.13.0 installed FIRST (CPU wheel; a plain 'torch'
#     requirement would pull gigabytes of CUDA packages), then fedge with its test extras.
# Re-running is cheap: the venv step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "bootstrap: fedge needs Python >= 3.11 (sudo apt-get install python3.11 python3.11-venv)" >&2
  exit 1
fi

find_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ -x /usr/local/sbin/mosquitto ]
}
if ! find_mosquitto; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "bootstrap: Mosquitto is missing and I am not root: run 'sudo apt-get install mosquitto' and retry" >&2
        exit 1
      fi
    fi
    echo "bootstrap: installing Mosquitto with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  else
    echo "bootstrap: Mosquitto is missing and this is not a Debian/Ubuntu machine: install mosquitto (2.0+) and retry" >&2
    exit 1
  fi
fi

# Optional tools that some tests use; each test skips without its tool, so these never fail the
# bootstrap: systemd-analyze (tests/deploy verifies the systemd units; installing Debian's systemd
# package in a container does not make it the init), chromium (tests/fedge/test_dashboard_browser.py
# loads the dashboard headless), haproxy (tests/deploy checks deploy/cluster's config with haproxy -c),
# strace (tests/aggregator/test_spool.py checks which writes the store forces to disk).
optional_apt() {  # optional_apt PACKAGE PROGRAM
  local package=$1 program=$2 sudo=""
  command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || [ -x "/usr/bin/$program" ] && return 0
  [ "$(id -u)" -eq 0 ] || sudo=$(command -v sudo || true)
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "bootstrap: installing $package with apt-get (optional, for tests)"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null; } ||
      echo "bootstrap: $package could not be installed; the tests that need it will skip" >&2
  else
    echo "bootstrap: $package is missing (sudo apt-get install $package); the tests that need it will skip" >&2
  fi
}
optional_apt systemd systemd-analyze
optional_apt chromium chromium
optional_apt haproxy haproxy
optional_apt strace strace

stamp=.venv/.fedge-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || {
      echo "bootstrap: could not create a virtualenv: sudo apt-get install python3-venv (or python3.11-venv)" >&2
      exit 1
    }
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
echo "bootstrap: ready ($(.venv/bin/python --version), $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
