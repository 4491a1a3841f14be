#!/usr/bin/env bash
# Installs what bdsnap and its tests need on a Debian machine, then builds.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(libnbd-bin python3-libnbd qemu-utils fio nbdkit fuse3 e2fsprogs xfsprogs util-linux restic iproute2 libzstd1 jq openssl
  ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl  # a throwaway S3 server for tests: scripts/ceph-rgw-up.sh
  qemu-system-x86 busybox-static cpio kmod xz-utils  # a qemu guest on a bdsnap export: test/helpers/guest.ts
  strace)  # which files the daemon syncs, seen from outside: test/service/snapshots.test.ts

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The guest's kernel: Debian's, unpacked (not installed) where test/helpers/guest.ts looks for it.
GUEST_KERNEL_DIR=.cache/guest-kernel
if [ ! -d "$GUEST_KERNEL_DIR/boot" ]; then
  kernel_version() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -n 1; }
  version=$(kernel_version)
  if [ -z "$version" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    version=$(kernel_version)
  fi
  if [ -z "$version" ]; then
    echo "setup: apt-cache names no kernel for linux-image-amd64 (run apt-get update?)" >&2
    exit 1
  fi
  echo "setup: unpacking the guest kernel linux-image-$version"
  download=$(mktemp -d) && chmod 0755 "$download"  # readable by apt's _apt user, writable only by root
  (cd "$download" && apt-get download -qq "linux-image-$version")
  rm -rf "$GUEST_KERNEL_DIR.tmp" && mkdir -p "$GUEST_KERNEL_DIR.tmp"
  dpkg-deb -x "$download"/linux-image-*.deb "$GUEST_KERNEL_DIR.tmp"
  rm -rf "$download"
  depmod -b "$GUEST_KERNEL_DIR.tmp" "$version"  # the package leaves modules.dep to its postinst
  mv "$GUEST_KERNEL_DIR.tmp" "$GUEST_KERNEL_DIR"
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

npm run -s build
