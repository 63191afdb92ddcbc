#!/usr/bin/env bash
# One-step set-up on a fresh Debian or Ubuntu machine: qemu-utils (the reference VHDX
# implementation the interop tests and the QEMU scenario run) and a venv with crashsim.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y qemu-utils
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,dask]'
