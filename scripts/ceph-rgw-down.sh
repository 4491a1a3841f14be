#!/usr/bin/env bash
# Stops a cluster started by ceph-rgw-up.sh and removes its directory. Only the processes named
# by that cluster's own pid files are killed (SIGKILL: the data is throwaway, and a clean stop
# takes seconds per daemon), so clusters side by side are safe.
D=${1:?usage: ceph-rgw-down.sh CEPH_DIR}
[ -f "$D/ceph.conf" ] || exit 0
pids=$(cat "$D"/run/client.rgw.pid "$D"/run/osd.*.pid "$D"/run/mon.*.pid 2>/dev/null || true)
for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
for p in $pids; do for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done; done
rm -rf "$D"
