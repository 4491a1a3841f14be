#!/bin/sh
# The bench's fio rows as a user runs them by hand, to check that the rows agree with it:
# two 1 GiB images of random data read into the page cache, `bdsnap serve` on one and
# `nbdkit file` (or a bdsnap session) on the other, one fio job each, the servers alternating.
# Nothing else happens between the runs: no write-back, no memory handed back, no warm-up
# (unless asked, below).
#
#   sh bench/by-hand.sh seq-write|first-rand-4k|first-rand-4k-iolog [REPEAT]     (from the checkout, after npm run build)
#
# Prints one line per run: the server, fio's write bandwidth (MB/s) or IOPS, and the CPU time
# the server used per GB written (all its threads, from /proc). FIO_OPTIONS adds options to
# every fio job (e.g. "--runtime=3 --time_based"); FLOOR=1 runs the Node.js floor too
# (bench/nbd-floor.ts on one worker thread, synchronous and thread-pool writes) on the seq-write row,
# and on the first-rand-4k rows the floor on one event loop, plain and with copy-before-write
# (node-floor-cow: each first write reads, checksums and appends its 16 KiB chunk to a store).
# WARM=1 gives each bdsnap server one untimed pass of the same fio job before the timed one, as
# the nbdcopy rows compare a running server's second copy: a session server makes it into
# another image of its own (a session of its own), so the timed pass is a fresh session's
# first writes on code that has run before, as in a daemon that has served for a while. The
# floors and nbdkit run cold either way (their code is a few hundred lines or not JIT-compiled).
# WARM=N makes N such passes; PAUSE=S then waits S seconds with no client before the timed pass
# (seq-write: what a long-running server's next client meets, e.g. WARM=3 PAUSE=10).
# SESSION_OPTIONS adds options to the session's `bdsnap serve` (e.g. "--chunk-size 4K"),
# FLOOR_COW_OPTIONS to node-floor-cow's (e.g. "--chunk-size 4096", "--no-checksum").
set -eu
row=${1:?usage: by-hand.sh seq-write|first-rand-4k|first-rand-4k-iolog [REPEAT]}
repeat=${2:-3}
bdsnap="node $(dirname "$0")/../dist/src/cli/main.js"
dir=$(mktemp -d "${TMPDIR:-/tmp}/bdsnap-by-hand-XXXXXX")
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT INT TERM
pid=
head -c 1G /dev/urandom >"$dir/image1"
head -c 1G /dev/urandom >"$dir/image2"
if [ "${WARM:-0}" -ge 1 ]; then head -c 1G /dev/urandom >"$dir/image3"; fi
# Written back before the first run, which would otherwise share the machine with it (a user's
# images are not being written as they start): then read into the page cache.
sync
cat "$dir"/image* >/dev/null
# The bench's own first-write log (every write in a chunk of its own), for first-rand-4k-iolog.
node -e 'import(process.argv[1]).then((m) => m.writeFirstWriteLog(process.argv[2], 2 ** 30, 16384, 16384))' \
  "$(cd "$(dirname "$0")/.." && pwd)/dist/bench/rows.js" "$dir/iolog"

wait_socket() {
  i=0
  while [ ! -S "$1" ]; do
    i=$((i + 1))
    [ $i -lt 200 ] || { echo "no socket $1" >&2; exit 1; }
    sleep 0.05
  done
}

# fio_args: the options of the row's fio command as the issue gives it.
fio_args() {
  case $row in
    seq-write) echo --rw=write --bs=1M --size=1G --iodepth=4 ;;
    first-rand-4k) echo --rw=randwrite --bs=4k --size=1G --number_ios=16384 --randrepeat=0 --iodepth=16 ;;
    first-rand-4k-iolog) echo --rw=randwrite --bs=4k --size=1G --iodepth=16 --read_iolog="$dir/iolog" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
}

# fio_warm URI: the row's fio command once, untimed (WARM=1: the server's code runs warm after).
fio_warm() {
  # shellcheck disable=SC2046,SC2086 # word splitting of the argument lists is meant
  fio --name=x --ioengine=nbd --uri="$1" $(fio_args) ${FIO_OPTIONS:-} --output=/dev/null >/dev/null
}

# fio_job NAME URI: the row's fio command, timed; prints NAME and the figure.
fio_job() {
  name=$1 uri=$2
  args=$(fio_args)
  ticks=$(cpu_ticks)
  # shellcheck disable=SC2086 # FIO_OPTIONS and args are lists of options
  fio --name=x --ioengine=nbd --uri="$uri" $args ${FIO_OPTIONS:-} --output-format=json --output="$dir/fio.json" >/dev/null
  ticks=$(($(cpu_ticks) - ticks))
  node -e '
    const t = require("fs").readFileSync(process.argv[1], "utf8"); const w = JSON.parse(t.slice(t.indexOf("{"))).jobs[0].write;
    const cpu = Number(process.argv[4]) / Number(process.argv[5]) / (w.io_bytes / 1e9);
    console.log(process.argv[2], process.argv[3] === "seq-write" ? `${(w.bw_bytes / 1e6).toFixed(0)} MB/s` : `${w.iops.toFixed(0)} IOPS`,
      `(server CPU ${cpu.toFixed(2)} s/GB)`);
  ' "$dir/fio.json" "$name" "$row" "$ticks" "$(getconf CLK_TCK)"
}

# CPU time (clock ticks, user and system, all threads) the server $pid has used.
cpu_ticks() {
  awk '{ print $14 + $15 }' "/proc/$pid/stat"
}

# What the bench did before each cell, to tell which part of it makes the difference:
# SETTLE=1 writes the image back (its pages clean), FILL=1 then gets 1 GiB of memory back
# from the host (writes and deletes a scratch file).
prep() { # IMAGE
  if [ "${SETTLE:-0}" = 1 ]; then sync "$1"; cat "$1" >/dev/null; fi
  if [ "${FILL:-0}" = 1 ]; then dd if=/dev/zero of="$dir/fill" bs=8M count=128 conv=fdatasync status=none; rm -f "$dir/fill"; fi
}

bdsnap_serve() { # NAME IMAGE [ARGS...]
  name=$1 image=$2
  shift 2
  prep "$image"
  rm -f "$dir/s1"
  # WARM=1: one untimed pass first, into image3 where the server keeps sessions (each image its
  # own fresh session, so the timed one is still all first writes), else into the same image.
  # The image measured goes first (the default export); a session server also serves image3.
  set -- "$@" "$image"
  warm=
  if [ "${WARM:-0}" -ge 1 ]; then
    warm=$image
    case " $* " in *" --snapshot-root "*) warm=$dir/image3; set -- "$@" "$warm" ;; esac
  fi
  $bdsnap serve --socket "$dir/s1" "$@" 2>"$dir/serve.log" &
  pid=$!
  wait_socket "$dir/s1"
  if [ -n "$warm" ]; then
    n=0
    while [ $n -lt "$WARM" ]; do
      fio_warm "nbd+unix:///$warm?socket=$dir/s1"
      n=$((n + 1))
    done
    # The warm pass's write-back (a session's deferred sync starts a second after writes pause)
    # is over before the clock starts, so the timed pass does not share the machine with it.
    sleep 2
    sync
    sleep "${PAUSE:-0}"
  fi
  fio_job "$name" "nbd+unix:///$image?socket=$dir/s1"
  kill $pid; wait $pid || true
}

nbdkit_serve() {
  prep "$dir/image2"
  rm -f "$dir/s2"
  nbdkit -f -U "$dir/s2" file "$dir/image2" &
  pid=$!
  wait_socket "$dir/s2"
  fio_job nbdkit "nbd+unix://?socket=$dir/s2"
  kill $pid; wait $pid || true
}

floor_serve() { # NAME IMAGE [ARGS...]
  name=$1 image=$2
  shift 2
  prep "$image"
  rm -f "$dir/s1"
  node "$(dirname "$0")/../dist/bench/nbd-floor.js" --threads 1 "$@" "$dir/s1" "$image" 2>/dev/null &
  pid=$!
  wait_socket "$dir/s1"
  fio_job "$name" "nbd+unix://?socket=$dir/s1"
  kill $pid; wait $pid || true
}

# The copy-before-write floor on the session's image, its store where the session's goes.
floor_cow() {
  rm -rf "$dir/root"; mkdir "$dir/root"
  # shellcheck disable=SC2086 # FLOOR_COW_OPTIONS is a list of options
  floor_serve node-floor-cow "$dir/image2" --cow-store "$dir/root/store" ${FLOOR_COW_OPTIONS:-}
  rm -rf "$dir/root"
}

session() {
  rm -rf "$dir/root"; mkdir "$dir/root"
  # shellcheck disable=SC2086 # SESSION_OPTIONS is a list of options
  bdsnap_serve bdsnap+session "$dir/image2" --snapshot-root "$dir/root" ${SESSION_OPTIONS:-}
  rm -rf "$dir/root"
}

for i in $(seq "$repeat"); do
  case $row in
    seq-write)
      bdsnap_serve bdsnap "$dir/image1"
      if [ "${FLOOR:-0}" = 1 ]; then floor_serve node-floor "$dir/image1"; floor_serve node-floor-async "$dir/image1" --async; fi
      nbdkit_serve ;;
    first-rand-4k*)
      session; bdsnap_serve bdsnap "$dir/image1"
      if [ "${FLOOR:-0}" = 1 ]; then floor_cow; floor_serve node-floor "$dir/image1"; fi ;;
  esac
done
