#!/usr/bin/env bash
# Runs the whole test suite: unit, property, interop with real NBD clients, a kernel
# filesystem through nbdfuse and a loop device, and S3 repositories against a real radosgw
# started here for the whole run (tests that must kill their server start their own).
# Needs root (loop devices, mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

if [ -z "${BDSNAP_TEST_S3_ENDPOINT:-}" ]; then
  rgw_env=$(bash scripts/ceph-rgw-up.sh bluestore)
  CEPH_DIR=$(sed -n 's/^CEPH_DIR=//p' <<<"$rgw_env")
  trap 'bash scripts/ceph-rgw-down.sh "$CEPH_DIR"' EXIT
  export BDSNAP_TEST_CEPH_DIR=$CEPH_DIR
  export BDSNAP_TEST_S3_ENDPOINT=$(sed -n 's/^S3_ENDPOINT=//p' <<<"$rgw_env")
  export BDSNAP_TEST_S3_ACCESS_KEY=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' <<<"$rgw_env")
  export BDSNAP_TEST_S3_SECRET_KEY=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' <<<"$rgw_env")
fi
node --test --test-reporter=spec --test-timeout=900000 "${@:-dist/test/}"
