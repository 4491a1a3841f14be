#!/usr/bin/env bash
# Starts a throwaway single-node Ceph cluster (one mon, one OSD, radosgw) as a real S3 endpoint on
# 127.0.0.1, for tests and for trying S3 repositories. No systemd, no cephx: loopback only.
# Everything lives in one new temp directory; stop it with scripts/ceph-rgw-down.sh DIR.
#
#   scripts/ceph-rgw-up.sh [bluestore|memstore]     # prints CEPH_DIR=, S3_ENDPOINT= and the keys
#
# Ports: RGW_PORT and MON_PORT if set, else free ones. Needs the Debian packages ceph-mon,
# ceph-osd, radosgw, ceph-common, uuid-runtime, curl (scripts/setup.sh installs them).
set -euo pipefail
STORE=${1:-bluestore}
case "$STORE" in bluestore|memstore) ;; *) echo "usage: $0 [bluestore|memstore]" >&2; exit 2 ;; esac
ACCESS_KEY=${S3_ACCESS_KEY:-TESTACCESSKEY}
SECRET_KEY=${S3_SECRET_KEY:-TESTSECRETKEY123}
START_TIMEOUT_S=${CEPH_START_TIMEOUT_S:-90}

for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool uuidgen curl ss; do
  command -v "$tool" >/dev/null || { echo "ceph-rgw-up: '$tool' is missing; run scripts/setup.sh (Debian packages ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl)" >&2; exit 1; }
done

# Below the kernel's ephemeral range (an outgoing connection may take any port in it between
# this check and the bind), and used by no TCP socket in any state.
free_port() {
  local p low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] 2>/dev/null || low=32768
  for _ in $(seq 1 200); do
    p=$(( 10000 + RANDOM % (low - 10000) ))
    [ -z "$(ss -Htan "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return; }
  done
  echo "ceph-rgw-up: no free port found" >&2; exit 1
}
MON_PORT=${MON_PORT:-$(free_port)}
RGW_PORT=${RGW_PORT:-$(free_port)}

D=$(mktemp -d -t ceph-XXXXXX)
# On any failure: stop what started, keep nothing, show why.
fail() {
  echo "ceph-rgw-up: $1; last log lines:" >&2
  tail -n 5 "$D"/log/*.log "$D"/log/*.err 2>/dev/null >&2 || true
  bash "$(dirname "$0")/ceph-rgw-down.sh" "$D"; rm -rf "$D"
  exit 1
}
trap 'fail "a step failed (line $LINENO)"' ERR
mkdir -p "$D/mon.a" "$D/osd.0" "$D/rgw" "$D/run" "$D/log"
FSID=$(uuidgen)
# Why each setting is here: see the comments of the project's radosgw notes; in short, no auth
# ("crc secure" lets radosgw reach the mon without cephx), one copy of everything, small pools,
# fast mon proposals (rgw creates its pools one proposal at a time), no full-disk shutdown.
cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
crash dir = $D/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.05
[mon]
mon data = $D/mon.\$id
mon cluster log file = $D/log/cluster.log
[osd]
osd data = $D/osd.\$id
osd objectstore = $STORE
bluestore block path = $D/osd.\$id/block.file
bluestore block create = true
bluestore block size = 10737418240
memstore device bytes = 4294967296
osd memory target = 939524096
[client.rgw]
rgw data = $D/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
CONF
C=(-c "$D/ceph.conf")
deadline=$(( $(date +%s) + START_TIMEOUT_S ))
wait_for() {  # wait_for WHAT COMMAND...: poll until it succeeds or the deadline passes
  local what=$1; shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what did not come up within ${START_TIMEOUT_S} s"
    sleep 0.2
  done
}
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
ceph-mon "${C[@]}" --mkfs -i a --monmap "$D/monmap"
ceph-mon "${C[@]}" -i a
wait_for "the mon" ceph "${C[@]}" --connect-timeout 5 mon stat
UUID=$(uuidgen)
ID=$(ceph "${C[@]}" --connect-timeout 10 osd new "$UUID")
ceph-osd "${C[@]}" -i "$ID" --mkfs --osd-uuid "$UUID" 2>>"$D/log/osd-mkfs.err"
ceph-osd "${C[@]}" -i "$ID" 2>>"$D/log/osd-start.err"
osd_up() { ceph "${C[@]}" --connect-timeout 5 osd stat 2>/dev/null | grep -q ' 1 up'; }
wait_for "the osd" osd_up
radosgw "${C[@]}" -n client.rgw --client-mount-timeout 30
rgw_ready() { [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$RGW_PORT/")" = 200 ]; }
wait_for "radosgw" rgw_ready
radosgw-admin "${C[@]}" user create --uid=test --display-name=test --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
trap - ERR
echo "CEPH_DIR=$D"
echo "S3_ENDPOINT=http://127.0.0.1:$RGW_PORT"
echo "AWS_ACCESS_KEY_ID=$ACCESS_KEY"
echo "AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
