#!/usr/bin/env bash
# Create or reuse the project's virtual environment and print its path on stdout.
#
# The venv lives outside the checkout, keyed by a hash of the requirement files, so CI and every
# fresh clone reuse one install (about 4 minutes cold) until the requirements change. A venv whose
# install was interrupted has no '.complete' marker and is rebuilt. The project itself is
# installed editable from whichever checkout calls this script.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${VPR_PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "vpr_ros needs Python 3.11 (set VPR_PYTHON to its interpreter)" >&2; exit 1; }
key=$(cat "$here/requirements.txt" "$here/requirements-dev.txt" "$here/scripts/venv.sh" \
      | sha256sum | cut -c1-16)
cache=${VPR_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vpr_ros}
venv="$cache/venv-$key"
log() { echo "[venv] $*" >&2; }
mkdir -p "$cache"
# One builder at a time: concurrent callers (parallel CI steps, several shells) wait here.
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  log "building $venv (requirements changed or first run; a few minutes)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel 2>&1 \
    | grep -v 'is ignored' >&2 || true
  "$venv/bin/python" -m pip install -q -r "$here/requirements.txt" -r "$here/requirements-dev.txt" \
    2> >(grep -v 'is ignored' >&2)
  touch "$venv/.complete"
  # Old venvs of this project are dead weight (GBs each): keep only the current one.
  find "$cache" -maxdepth 1 -name 'venv-*' ! -name "venv-$key" -exec rm -rf {} + 2>/dev/null || true
fi
marker="$venv/.vpr_ros_checkout"
if [ "$(cat "$marker" 2>/dev/null)" != "$here" ]; then
  log "installing vpr_ros (editable) from $here"
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" \
    2> >(grep -v 'is ignored' >&2)
  echo "$here" > "$marker"
fi
echo "$venv"
