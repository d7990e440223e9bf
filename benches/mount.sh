#!/usr/bin/env bash
# Section of benches/harness.sh: the mount with every chunk local (hoarded),
# against the same file read natively and through bindfs (a FUSE pass-through),
# page cache dropped before each sequential run; 4 KiB random-read latency
# (fio, psync); isrfsd's peak RSS serving a 16 GiB sparse image.
# Prints ROW lines (benches/lib.sh). Needs root, FUSE, bindfs, fio.
#   sudo bash benches/mount.sh            # SIZE_MIB=1024 RUNS=3
set -euo pipefail
source "$(dirname "$0")/lib.sh"
size_mib=${SIZE_MIB:-1024}
need bindfs "apt-get install bindfs"; need fio "apt-get install fio"
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-mount.XXXXXX")
cleanup() { set +e; mountpoint -q "$work/bindfs" && umount -l "$work/bindfs"; stop_machines; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml" ISR_STORE="$work/store"
isrctl() { "$bin/isrctl" "$@"; }
isrctl init > /dev/null 2>&1 || true  # a named store must exist (a baseline before init makes it on import)
seq_read() { # file → MB/s, median of $runs, caches dropped
  for _ in $(seq "$runs"); do
    drop_caches
    dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {print $(NF-1) * ($NF == "GB/s" ? 1000 : 1)}'
  done | median
}
rand_lat() { # file → "median p99" µs of 4 KiB random reads, page cache dropped first
  drop_caches
  fio --name=r --filename="$1" --rw=randread --bs=4k --ioengine=psync --runtime=5 --time_based \
      --readonly --output-format=json 2>/dev/null | python3 -c '
import json, sys
p = json.load(sys.stdin)["jobs"][0]["read"]["clat_ns"]["percentile"]
print("%.0f %.0f" % (p["50.000000"] / 1000, p["99.000000"] / 1000))'
}

say "warm reads: a ${size_mib} MiB random image, every chunk local"
mkdir -p "$work/src" "$work/bindfs"
head -c "${size_mib}M" /dev/urandom > "$work/src/disk.img"
machine A
isrctl import vm "$work/src" > /dev/null
mount=$(isrctl resume --vmm none vm 2>/dev/null)
isrctl hoard vm > /dev/null
bindfs "$work/src" "$work/bindfs"
native=$(seq_read "$work/src/disk.img"); bind=$(seq_read "$work/bindfs/disk.img"); isr=$(seq_read "$mount/disk.img")
read -r n50 n99 <<<"$(rand_lat "$work/src/disk.img")"
read -r b50 b99 <<<"$(rand_lat "$work/bindfs/disk.img")"
read -r i50 i99 <<<"$(rand_lat "$mount/disk.img")"
umount -l "$work/bindfs"
isrctl discard vm > /dev/null
row "warm sequential read, MB/s" "$isr" MB/s "native read" "$native" ">= 0.8"
row "warm sequential read, MB/s" "$isr" MB/s "bindfs" "$bind" ">= 1.0"
row "warm 4 KiB random read, median µs" "$i50" µs "native" "$n50" ""
row "warm 4 KiB random read, median µs" "$i50" µs "bindfs" "$b50" ""
row "warm 4 KiB random read, p99 µs" "$i99" µs "bindfs" "$b99" ""

say "isrfsd peak RSS serving a 16 GiB sparse image (256 MiB of data), read whole"
# A fresh daemon (machine B): VmHWM is a lifetime peak, and A's daemon has
# just served the warm reads above.
machine B
rm -rf "$work/src"; mkdir -p "$work/sparse"; truncate -s 16G "$work/sparse/disk.img"
head -c 256M /dev/urandom | dd of="$work/sparse/disk.img" bs=1M seek=8000 conv=notrunc status=none
isrctl import big "$work/sparse" > /dev/null
mount=$(isrctl resume --vmm none big 2>/dev/null)
dd if="$mount/disk.img" of=/dev/null bs=1M status=none
rss=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$(cat "$ISR_RUNTIME_DIR/isrfsd.pid")/status")
isrctl discard big > /dev/null
# The target is 64 MiB + the configured memory cache (decoded chunks: 64 x 128 KiB = 8 MiB).
row "isrfsd peak RSS, 16 GiB sparse image, MiB" "$rss" MiB "64 MiB + memory cache" 72 "<= 1.0"
