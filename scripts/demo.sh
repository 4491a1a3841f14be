#!/usr/bin/env bash
# The main job end to end on a built-in example (see `bdsnap demo --help`). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node dist/src/cli/main.js demo "$@"
