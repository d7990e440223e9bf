#!/usr/bin/env bash
# Section of benches/harness.sh: the mount with every chunk local (hoarded),
# against the same file natively and through bindfs (a FUSE pass-through):
#  - warm sequential read, page cache dropped before each run (dd bs=1M), and
#    the CPU seconds isrfsd (and bindfs) spend per GiB of it (utime + stime
#    from /proc/PID/stat, before and after);
#  - warm re-read, the page cache KEPT: the file read once, then read again;
#  - 4 KiB random-read latency (fio, psync, page cache dropped first);
#  - sequential write (fio, bs=1M, psync, end_fsync=1) and 4 KiB random write
#    with an fsync after every FSYNC_EVERY writes (default 1; fio, psync,
#    10 s) into the same file, overwriting it in place as a VM overwrites its
#    disk: MB/s and IOPS;
#  - write amplification: the bytes the daemon caused to be written to disk
#    (/proc/PID/io write_bytes, before and after, counted when it dirties the
#    page cache) per byte fio wrote, for both writes; the baseline is bindfs's
#    same ratio (about 1.0: it writes each byte once into the file beneath);
#  - isrfsd's peak RSS serving a 16 GiB sparse image.
# Trickle upload is off (the store is on the same disk: its writes would count
# as the daemon's); the write figures are the I/O path's alone.
# Prints ROW lines (benches/lib.sh). Needs root, FUSE, bindfs, fio.
#   sudo bash benches/mount.sh            # SIZE_MIB=1024 RUNS=3 FSYNC_EVERY=1
set -euo pipefail
source "$(dirname "$0")/lib.sh"
size_mib=${SIZE_MIB:-1024}; fsync_every=${FSYNC_EVERY:-1}
need bindfs "apt-get install bindfs"; need fio "apt-get install fio"
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-mount.XXXXXX")
cleanup() { set +e; mountpoint -q "$work/bindfs" && umount -l "$work/bindfs"; stop_machines; rm -rf "$work"; }
# (bindfs runs in the foreground, as a child, so that its CPU time and I/O can be read.)
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n\n[upload]\ntrickle = false\n' > "$work/config.toml"
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
reread() { # file → MB/s of reads with the page cache kept, median of $runs (after one first read)
  drop_caches
  cat "$1" > /dev/null
  for _ in $(seq "$runs"); do
    dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {print $(NF-1) * ($NF == "GB/s" ? 1000 : 1)}'
  done | median
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; } # pid → utime + stime
disk_writes() { awk '/^write_bytes:/ {print $2}' "/proc/$1/io"; } # pid → bytes it had written to disk
fio_write() { # file mode → "value bytes-fio-wrote" per run; mode seq: MB/s, rand: IOPS
  local args
  case $2 in
    seq) args=(--rw=write --bs=1M --end_fsync=1) ;;
    rand) args=(--rw=randwrite --bs=4k --fsync="$fsync_every" --runtime=10 --time_based) ;;
  esac
  fio --name=w --filename="$1" --size="${size_mib}M" --ioengine=psync --refill_buffers \
      "${args[@]}" --output-format=json 2>/dev/null | python3 -c '
import json, sys
w = json.load(sys.stdin)["jobs"][0]["write"]
print("%.1f %d" % (w["bw_bytes"] / 1e6 if sys.argv[1] == "seq" else w["iops"], w["io_bytes"]))' "$2"
}
# write_runs file mode pid → "median-value amplification": $runs runs of fio_write,
# the process's disk writes over them ÷ what fio wrote (no pid: no amplification).
write_runs() {
  local before after values=() fio_bytes=0 v b
  [ -z "${3:-}" ] || before=$(disk_writes "$3")
  for _ in $(seq "$runs"); do
    read -r v b <<<"$(fio_write "$1" "$2")"
    values+=("$v"); fio_bytes=$((fio_bytes + b))
  done
  sleep 1 # what the close set off (FUSE FLUSH) is done
  [ -z "${3:-}" ] || after=$(disk_writes "$3")
  printf '%s %s\n' "$(printf '%s\n' "${values[@]}" | median)" \
    "$( [ -z "${3:-}" ] || python3 -c "print(f'{($after - $before) / $fio_bytes:.2f}')")"
}

say "warm reads: a ${size_mib} MiB random image, every chunk local"
mkdir -p "$work/src" "$work/bindfs"
head -c "${size_mib}M" /dev/urandom > "$work/src/disk.img"
machine A
isrctl import vm "$work/src" > /dev/null
mount=$(isrctl resume --vmm none vm 2>/dev/null)
isrctl hoard vm > /dev/null
bindfs -f "$work/src" "$work/bindfs" & bindfs_pid=$!
for _ in $(seq 100); do mountpoint -q "$work/bindfs" && break; sleep 0.1; done
isrfsd_pid=$(cat "$ISR_RUNTIME_DIR/isrfsd.pid")
clk_tck=$(getconf CLK_TCK)
native=$(seq_read "$work/src/disk.img")
t0=$(cpu_ticks "$bindfs_pid"); bind=$(seq_read "$work/bindfs/disk.img"); t1=$(cpu_ticks "$bindfs_pid")
bind_cpu=$(python3 -c "print(f'{($t1 - $t0) / $clk_tck / ($runs * $size_mib / 1024):.2f}')")
t0=$(cpu_ticks "$isrfsd_pid"); isr=$(seq_read "$mount/disk.img"); t1=$(cpu_ticks "$isrfsd_pid")
isr_cpu=$(python3 -c "print(f'{($t1 - $t0) / $clk_tck / ($runs * $size_mib / 1024):.2f}')")
say "warm re-reads, page cache kept"
native_re=$(reread "$work/src/disk.img"); bind_re=$(reread "$work/bindfs/disk.img"); isr_re=$(reread "$mount/disk.img")
read -r n50 n99 <<<"$(rand_lat "$work/src/disk.img")"
read -r b50 b99 <<<"$(rand_lat "$work/bindfs/disk.img")"
read -r i50 i99 <<<"$(rand_lat "$mount/disk.img")"
say "writes into the same file: sequential (1 MiB, end_fsync), 4 KiB random (fsync every $fsync_every)"
read -r nsw _ <<<"$(write_runs "$work/src/disk.img" seq)"
read -r bsw bsw_amp <<<"$(write_runs "$work/bindfs/disk.img" seq "$bindfs_pid")"
read -r isw isw_amp <<<"$(write_runs "$mount/disk.img" seq "$isrfsd_pid")"
read -r nrw _ <<<"$(write_runs "$work/src/disk.img" rand)"
read -r brw brw_amp <<<"$(write_runs "$work/bindfs/disk.img" rand "$bindfs_pid")"
read -r irw irw_amp <<<"$(write_runs "$mount/disk.img" rand "$isrfsd_pid")"
umount "$work/bindfs" || umount -l "$work/bindfs"
wait "$bindfs_pid" 2>/dev/null || true
isrctl discard vm > /dev/null
row "warm sequential read, MB/s" "$isr" MB/s "native read" "$native" ">= 0.8"
row "warm sequential read, MB/s" "$isr" MB/s "bindfs" "$bind" ">= 1.0"
row "warm 4 KiB random read, median µs" "$i50" µs "native" "$n50" ""
row "warm 4 KiB random read, median µs" "$i50" µs "bindfs" "$b50" ""
row "warm 4 KiB random read, p99 µs" "$i99" µs "bindfs" "$b99" ""
row "warm re-read, page cache kept, MB/s" "$isr_re" MB/s "native re-read" "$native_re" ""
row "warm re-read, page cache kept, MB/s" "$isr_re" MB/s "bindfs re-read" "$bind_re" ""
row "daemon CPU per GiB of warm sequential read, s/GiB" "$isr_cpu" s/GiB "bindfs" "$bind_cpu" ""
row "sequential write 1 MiB + end fsync, MB/s" "$isw" MB/s "native" "$nsw" ""
row "sequential write 1 MiB + end fsync, MB/s" "$isw" MB/s "bindfs" "$bsw" ""
row "4 KiB random write, fsync every $fsync_every, IOPS" "$irw" IOPS "native" "$nrw" ""
row "4 KiB random write, fsync every $fsync_every, IOPS" "$irw" IOPS "bindfs" "$brw" ""
row "write amplification, sequential 1 MiB writes, disk bytes per byte" "$isw_amp" × "bindfs" "$bsw_amp" ""
row "write amplification, 4 KiB random writes + fsync every $fsync_every, disk bytes per byte" "$irw_amp" × "bindfs" "$brw_amp" ""

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
