#!/usr/bin/env bash
# The full crash-state exploration (test/crash/): records each workload, builds the states a
# power loss allows, checks bdsnap's recovery on each, and prints the counts and any defect.
# CRASH_MAX_STATES bounds the states checked per workload (a seeded sample beyond it),
# CRASH_SEED picks the sample. Exit status 1 when a defect was found.
set -euo pipefail
cd "$(dirname "$0")/.."
npm run -s build
exec node dist/test/crash/explore-cli.js "$@"
