#!/usr/bin/env bash
# Runs the whole test suite: unit, property, interop with real NBD clients, and a kernel
# filesystem through nbdfuse and a loop device. Needs root (loop devices, mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node --test --test-reporter=spec --test-timeout=900000 "${@:-dist/test/}"
