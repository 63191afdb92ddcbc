#!/usr/bin/env bash
# One-step set-up on a fresh Debian or Ubuntu machine: qemu-utils (the reference VHDX
# implementation the interop tests and the QEMU scenario run) and a venv with crashsim.
# Safe to run again: it installs only what is missing and repairs a half-made .venv.
set -euo pipefail
cd "$(dirname "$0")"

# PYTHON picks another interpreter when the system python3 is too old.
py="${PYTHON:-python3}"

need_python() {  # 3.11: pyproject.toml's requires-python
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' && return
  echo "setup.sh: crashsim needs Python 3.11 or newer and $py is" \
       "$("$py" -c 'import platform; print(platform.python_version())'); install" \
       "python3.11 and python3.11-venv (or newer) and run PYTHON=python3.11 ./setup.sh" >&2
  exit 1
}

packages=()
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
  packages+=(qemu-utils)
fi
if command -v "$py" >/dev/null 2>&1; then
  need_python  # before installing anything: a newer venv package would not help
  if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian ships venv's pip bootstrap (ensurepip) apart, and a fresh install lacks it:
    # `python3 -m venv` then fails.
    if [ "$py" = python3 ]; then
      packages+=(python3-venv)
    else
      packages+=("${py##*/}-venv")
    fi
  fi
elif [ "$py" = python3 ]; then
  packages+=(python3 python3-venv)
else
  echo "setup.sh: $py not found; install it or leave PYTHON unset" >&2
  exit 1
fi
if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${packages[@]}"
fi
need_python  # again, for a python3 just installed

# A venv made before ensurepip was installed has a python but no pip; one made by an
# older interpreter cannot run crashsim. Either is made again.
if ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' \
    >/dev/null 2>&1; then
  "$py" -m venv --clear .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,dask]'
