#!/usr/bin/env bash
# Installs the Debian 12 packages diffq needs, only those missing. Usage: cmake/install_deps.sh [extra packages]
set -euo pipefail
# libgloo-dev: the gloo headers for diffq/distributed.h (c10d's Gloo backend, data parallelism).
packages=(libtorch-dev zlib1g-dev libgtest-dev libbenchmark-dev cmake g++ libopenblas0-pthread
  libgloo-dev "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "diffq: installing ${missing[*]}" >&2
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo > /dev/null; then
      echo "diffq: installing packages needs root: run this as root, or install sudo" >&2
      exit 1
    fi
    SUDO=(sudo)
  fi
  "${SUDO[@]}" apt-get update -q
  # Through env: sudo's env_reset (Debian's default) would drop a variable set before it.
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
fi
