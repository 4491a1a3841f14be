#!/usr/bin/env bash
# A bounded soak of the daemon: abuse on both sockets, mount/umount cycles, snapshots and
# backups for --minutes N (default 30), then a check of every device, the repository and a
# restore. Prints resident memory and descriptors every 30 s and a JSON summary at the end.
# Needs root, FUSE (nbdfuse) and loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."
npm run -s build
exec node dist/bench/soak.js "$@"
