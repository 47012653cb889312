#!/usr/bin/env bash
# Install the fedge agent on Raspberry Pi OS (64-bit) or any Debian-like Linux, as a systemd service.
#
#   sudo ./install.sh --broker mqtt://hub.local:1883 [--client-id NAME] [--policy pi]
#
# What it does, idempotently:
#   1. python3 >= 3.11 with venv (apt-get installs python3-venv when missing and we are root);
#   2. a virtualenv in PREFIX/venv; torch FIRST from the CPU index (a plain `torch` requirement
#      may pull gigabytes of CUDA), then fedge from this checkout (or --source);
#   3. PREFIX/etc/agent.toml (kept if it exists: re-running upgrades without losing your edits);
#   4. a `fedge` system user, /etc/fedge/agent.toml, the systemd unit, enabled and started.
# Options:
#   --prefix DIR        where the venv and config go (default /opt/fedge)
#   --no-systemd        stop after step 3 (containers, tests, or a user who runs the agent by hand)
#   --source SPEC       what to pip install (default: the checkout this script is in, else "fedge")
#   --broker URL        written to the config (required unless the config exists)
#   --client-id ID      default: this machine's hostname
#   --policy PRESET     pi (default), phone, laptop, always, auto
#   --ca-file FILE      the fleet CA (ca.crt from `fedge broker add-device`), for mqtts:// brokers
#   --cert-file FILE    a client certificate (`fedge broker add-device ID --cert`) ...
#   --key-file FILE     ... and its key: all three are copied next to the config (the key 0600/0640)
#   --torch-spec SPEC   default torch==2.13.0;  --torch-index URL (empty: PyPI)
#   --wheelhouse DIR    install offline from wheels in DIR (and from packages the venv already sees)
#   --python EXE        the interpreter to build the venv with
set -euo pipefail

PREFIX=/opt/fedge
SYSTEMD=1
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SOURCE=""
BROKER=""
CLIENT_ID="$(hostname -s 2>/dev/null || hostname)"
POLICY=pi
TORCH_SPEC="torch==2.13.0"
TORCH_INDEX="https://download.pytorch.org/whl/cpu"
WHEELHOUSE=""
PYTHON="${PYTHON:-}"
CA_FILE=""
CERT_FILE=""
KEY_FILE=""

die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --source) SOURCE="$2"; shift 2 ;;
    --broker) BROKER="$2"; shift 2 ;;
    --client-id) CLIENT_ID="$2"; shift 2 ;;
    --policy) POLICY="$2"; shift 2 ;;
    --ca-file) CA_FILE="$2"; shift 2 ;;
    --cert-file) CERT_FILE="$2"; shift 2 ;;
    --key-file) KEY_FILE="$2"; shift 2 ;;
    --torch-spec) TORCH_SPEC="$2"; shift 2 ;;
    --torch-index) TORCH_INDEX="$2"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
if [ -z "$SOURCE" ]; then
  if [ -f "$REPO/pyproject.toml" ]; then SOURCE="$REPO"; else SOURCE="fedge"; fi
fi

# 1. an interpreter that can make venvs
if [ -z "$PYTHON" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || die "fedge needs Python >= 3.11 (Raspberry Pi OS bookworm has 3.11: sudo apt-get install python3)"
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    die "$PYTHON cannot create virtualenvs: sudo apt-get install python3-venv"
  fi
fi

# 2. the venv: torch first, then fedge
mkdir -p "$PREFIX/etc"
VENV="$PREFIX/venv"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "$WHEELHOUSE" ]; then
  PIP+=(--no-index --find-links "$WHEELHOUSE" --no-build-isolation)
  "${PIP[@]}" "$TORCH_SPEC"
elif [ -n "$TORCH_INDEX" ]; then
  "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX"
else
  "${PIP[@]}" "$TORCH_SPEC"
fi
# PyPI's Linux torch wheels (aarch64 too, since torch 2.13 at least) are CUDA builds that pull
# several GB of CUDA libraries: measured by bench/pi_arm64, a 5 GB venv. Say so, and how to avoid it.
if "$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata, re, sys
needs = [r for r in metadata.requires("torch") or [] if "extra ==" not in r]
sys.exit(0 if any(re.match(r"(nvidia-|cuda-toolkit|triton)", r) for r in needs) else 1)
PY
then
  echo "install.sh: warning: $TORCH_SPEC from ${TORCH_INDEX:-PyPI} is a CUDA build with GBs of CUDA libraries this device" \
       "cannot use; the CPU build comes from the default --torch-index https://download.pytorch.org/whl/cpu ($(du -sh "$VENV" | cut -f1) now)" >&2
  # found by bench/pi_arm64 on an emulated Cortex-A72: its BLAS (NVIDIA's NVPL) uses Armv8.1 atomics on more than one thread
  if [ "$(uname -m)" = aarch64 ]; then
    echo "install.sh: warning: on a core older than Armv8.1 (Raspberry Pi 4 and earlier) that build dies of SIGILL when" \
         "torch uses more than one thread; keep torch_threads = 1 or use the CPU build" >&2
  fi
fi
# fedge's base install is the agent (no extras: those are for aggregator hosts and simulations)
"${PIP[@]}" "$SOURCE"
"$VENV/bin/fedge" agent --help >/dev/null || die "fedge did not install correctly into $VENV"

# 3. the credentials (replaced when given again) and the config (kept when present)
CONFIG="$PREFIX/etc/agent.toml"
ETC="$PREFIX/etc"
[ "$SYSTEMD" -eq 1 ] && ETC=/etc/fedge   # where the service reads them (the config's paths point there)
[ -n "$KEY_FILE" ] && [ -z "$CERT_FILE" ] && die "--key-file needs --cert-file (the certificate it belongs to)"
CREDENTIALS=()
for pair in "ca_file:$CA_FILE:0644" "cert_file:$CERT_FILE:0644" "key_file:$KEY_FILE:0600"; do
  key=${pair%%:*}; rest=${pair#*:}; file=${rest%:*}; mode=${rest##*:}
  [ -n "$file" ] || continue
  [ -r "$file" ] || die "cannot read $file (--${key//_/-})"
  install -m "$mode" "$file" "$PREFIX/etc/$(basename "$file")"
  CREDENTIALS+=("$key:$(basename "$file")")
done
if [ ! -f "$CONFIG" ]; then
  [ -n "$BROKER" ] || die "--broker mqtt://host:1883 is required for a first install"
  STATE_DIR="$PREFIX/state"
  [ "$SYSTEMD" -eq 1 ] && STATE_DIR=/var/lib/fedge-agent
  cat > "$CONFIG" <<TOML
# fedge agent settings; FEDGE_* environment variables and flags override them.
broker = "$BROKER"
client_id = "$CLIENT_ID"
state_dir = "$STATE_DIR"
task = "digits"
torch_threads = 1
train_nice = 10
isolate_training = true     # training runs in a child process that exits: ~40 MiB while waiting

TOML
  for entry in "${CREDENTIALS[@]}"; do
    echo "${entry%%:*} = \"$ETC/${entry#*:}\"" >> "$CONFIG"
  done
  cat >> "$CONFIG" <<TOML

[policy]
preset = "$POLICY"          # pi: idle and below 70 C; phone/laptop: also charging
TOML
  echo "install.sh: wrote $CONFIG"
fi

if [ "$SYSTEMD" -eq 0 ]; then
  echo "install.sh: installed in $PREFIX (no service). Run: $VENV/bin/fedge agent --config $CONFIG"
  exit 0
fi

# 4. the service
[ "$(id -u)" -eq 0 ] || die "installing the service needs root (sudo), or pass --no-systemd"
command -v systemctl >/dev/null 2>&1 || die "no systemctl here: pass --no-systemd and run the agent another way"
id -u fedge >/dev/null 2>&1 || useradd --system --home-dir /var/lib/fedge-agent --shell /usr/sbin/nologin fedge
mkdir -p /etc/fedge
install -m 0640 -g fedge "$CONFIG" /etc/fedge/agent.toml
for entry in "${CREDENTIALS[@]}"; do   # readable by the service's group only (the key must not be world-readable)
  install -m 0640 -g fedge "$PREFIX/etc/${entry#*:}" "/etc/fedge/${entry#*:}"
done
sed "s#/opt/fedge#$PREFIX#g" "$HERE/../systemd/fedge-agent.service" > /etc/systemd/system/fedge-agent.service
systemctl daemon-reload
systemctl enable --now fedge-agent.service
echo "install.sh: fedge-agent is running. Check it: $VENV/bin/fedge agent doctor --config /etc/fedge/agent.toml; journalctl -u fedge-agent -f"
