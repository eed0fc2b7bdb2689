#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: Debian packages, the virtual
# environment at .venv, and the project installed into it. Quiet when all is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(libvirt-daemon-system libvirt-dev pkg-config qemu-system-x86 qemu-utils
          wireguard-go wireguard-tools busybox-static iproute2 iputils-ping procps rsync gcc python3-venv)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages (need root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.gleaner-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing gleaner into .venv"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,sim]'; } >"$log" 2>&1
  then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  .venv/bin/python -c 'import node, overlay, segments, trio, nacl, msgpack, libvirt, zeroconf, matplotlib'
  touch "$stamp"
fi

# The demo guest image (Debian's cloud kernel + a busybox initramfs), built once.
image_stamp=.cache/demo-image
if [ ! -f "$image_stamp" ] || [ deploy/recipes/demo.toml -nt "$image_stamp" ]; then
  echo "setup: building the demo guest image"
  mkdir -p .cache
  .venv/bin/python -m node image build deploy/recipes/demo.toml --store .cache/images --json \
    > "$image_stamp.tmp"
  mv "$image_stamp.tmp" "$image_stamp"
fi
