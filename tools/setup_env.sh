#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine (Python 3.11): the system packages FFCV compiles
# against, then a virtual environment at $VENV (default .venv) with trex_fast and all extras.
# Rerunning it is cheap: apt and pip skip what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# The exact versions CI is tested with; setup.py only requires the supported ranges, so that
# installing trex_fast elsewhere keeps the torch that is there. They are installed first, and
# `pip install -e '.[all]'` then finds its requirements met.
TESTED="torch==2.14.1 torchvision==0.29.1 nvidia-dali-cuda130==2.4.0"

APT_PACKAGES="pkg-config g++ libopencv-dev libturbojpeg0-dev"
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[setup_env] installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log=$(mktemp)
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
         --no-install-recommends $missing; } >"$log" 2>&1; then
    cat "$log"; echo "[setup_env] apt-get failed (log above)" >&2; exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_env] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall when setup.py or the tested versions changed since the last install (the stamp
# holds their hash).
stamp="$VENV/.trex_fast_setup_stamp"
want=$( { cat setup.py; echo "$TESTED"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
   || ! "$VENV/bin/python" -c "import trex_fast, ffcv, nvidia.dali, pytest" 2>/dev/null; then
  echo "[setup_env] installing trex_fast[all] into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # numpy must exist before ffcv's build imports it.
  "$VENV/bin/python" -m pip install -q numpy $TESTED
  "$VENV/bin/python" -m pip install -q -e '.[all]' 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import trex_fast, ffcv, nvidia.dali, pytest" \
    || { echo "[setup_env] the install is incomplete (see pip's output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[setup_env] ready: $VENV/bin/python"
