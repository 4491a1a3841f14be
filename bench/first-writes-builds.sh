#!/bin/bash
# Random 4 KiB first writes through a session, two or more built trees in turns: each run a
# fresh `bdsnap serve --snapshot-root` of the tree (one thread, as a session is served), fio's
# 16384 random 4 KiB writes at depth 16 into the lower GiB of a 2 GiB image of random data in
# the page cache, and the server's CPU time per write (perf stat's task-clock, every thread).
# WARM=1 first makes 16384 first writes into the upper GiB in the same session, so the
# measured ones run on warmed-up code, as a long-running daemon's do.
#
#   bash bench/first-writes-builds.sh RUNS TREE... (each TREE a checkout after npm run build)
#
# Prints one line per run: the tree, IOPS, CPU microseconds per write, the load. Needs fio and perf.
set -eu
runs=${1:?usage: first-writes-builds.sh RUNS TREE...}
shift
[ $# -gt 0 ] || { echo "no tree given" >&2; exit 2; }
dir=$(mktemp -d "${TMPDIR:-/tmp}/bdsnap-fw-builds-XXXXXX")
pid=
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT INT TERM
head -c 2G /dev/urandom >"$dir/img"
fio_writes() { # SOCKET OFFSET [fio args...]
  sock=$1 offset=$2
  shift 2
  fio --name=x --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randwrite --bs=4k --offset="$offset" --size=1G \
    --number_ios=16384 --randrepeat=0 --iodepth=16 "$@"
}
for i in $(seq "$runs"); do
  for tree in "$@"; do
    rm -rf "$dir/root" "$dir/s"
    mkdir "$dir/root"
    sync "$dir/img"
    cat "$dir/img" >/dev/null
    BDSNAP_NBD_THREADS=1 node "$tree/dist/src/cli/main.js" serve --socket "$dir/s" --snapshot-root "$dir/root" "$dir/img" 2>"$dir/serve.log" &
    pid=$!
    k=0
    while [ ! -S "$dir/s" ]; do
      k=$((k + 1))
      [ $k -lt 200 ] || { echo "no socket from $tree" >&2; cat "$dir/serve.log" >&2; exit 1; }
      sleep 0.05
    done
    if [ "${WARM:-0}" = 1 ]; then fio_writes "$dir/s" 1G --output=/dev/null >/dev/null; fi
    perf stat -x, -e task-clock -p "$pid" -o "$dir/perf.txt" &
    perf=$!
    sleep 0.1
    fio_writes "$dir/s" 0 --output-format=json --output="$dir/fio.json" >/dev/null
    kill -INT $perf
    wait $perf || true
    node -e '
      const fs = require("fs");
      const t = fs.readFileSync(process.argv[1], "utf8");
      const iops = JSON.parse(t.slice(t.indexOf("{"))).jobs[0].write.iops;
      const ms = Number(fs.readFileSync(process.argv[2], "utf8").split("\n").find((l) => l.includes("task-clock")).split(",")[0]);
      console.log(process.argv[3], `${iops.toFixed(0)} IOPS`, `${((ms * 1000) / 16384).toFixed(1)} us CPU per write`, `load ${fs.readFileSync("/proc/loadavg", "utf8").split(" ")[0]}`);
    ' "$dir/fio.json" "$dir/perf.txt" "$tree"
    kill $pid
    wait $pid || true
  done
done
