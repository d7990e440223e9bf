#!/usr/bin/env bash
# Section of benches/harness.sh: disk I/O measured inside the test guest, on its
# virtio disk, with the disk image on the isr mount (every chunk local: hoarded)
# against the same guest with the disk on a local raw file. The guest is the test
# guest with fio in a second initrd (tests/fixtures/make-fio-guest.sh); QEMU runs
# directly (-accel tcg, -m 512, 1 vCPU), with the drive options isrctl gives a
# parcel's disk (raw, cache=writeback, discard=unmap, detect-zeroes=unmap); for the
# isr side its file is the disk image in the mount `isrctl resume --vmm none` makes.
# In the guest, fio on /dev/vda (direct=1, libaio), one pass each over the first
# GUEST_FIO_MIB MiB (default 128): sequential read and write (bs=1M, MB/s), 4 KiB
# random read and write (IOPS); the writes end with a flush. The disk is that much
# random data; the host's page cache is dropped before each boot.
# Under TCG (no KVM here) the guest's fio is CPU-bound: the figures are far below
# what the host's disk does, and the sizes are kept small (each job also stops
# after GUEST_FIO_RUNTIME seconds, default 30). A boot takes about 15 s.
# Prints ROW lines (benches/lib.sh). Needs root, FUSE, QEMU, fio (on the host: it
# is copied into the guest's initrd).
#   sudo bash benches/guest-io.sh         # RUNS=3 GUEST_FIO_MIB=128 GUEST_FIO_RUNTIME=30
set -euo pipefail
source "$(dirname "$0")/lib.sh"
fio_mib=${GUEST_FIO_MIB:-128}; fio_runtime=${GUEST_FIO_RUNTIME:-30}
need qemu-system-x86_64 "bash .ci/install-deps.sh"; need fio "apt-get install fio"
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-guestio.XXXXXX")
cleanup() { set +e; [ -z "${qemu_pid:-}" ] || kill "$qemu_pid" 2>/dev/null; stop_machines; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n\n[upload]\ntrickle = false\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml" ISR_STORE="$work/store"
isrctl() { "$bin/isrctl" "$@"; }
isrctl init > /dev/null 2>&1 || true

guest=$work/guest
bash "$bench_root/tests/fixtures/make-fio-guest.sh" "$guest" 2> /dev/null

# guest_fio DISK SIDE → appends one line per job to $work/results:
#   "SIDE JOB read_kib_s read_iops write_kib_s write_iops"
guest_fio() {
  local log=$work/serial.log
  rm -f "$log"
  drop_caches
  timeout $((120 + 4 * fio_runtime)) qemu-system-x86_64 -accel tcg -m 512 -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$log" \
    -kernel "$guest/vmlinuz" -initrd "$guest/initrd-fio.img" \
    -append "console=ttyS0 quiet panic=-1 isr_fio=1 isr_fio_size=$fio_mib isr_fio_runtime=$fio_runtime" \
    -drive "file=$1,if=none,id=disk0,format=raw,cache=writeback,discard=unmap,detect-zeroes=unmap" \
    -device virtio-blk-pci,drive=disk0 > /dev/null 2>&1 &
  qemu_pid=$!
  wait "$qemu_pid" || true
  qemu_pid=
  if ! grep -q '^ISR-FIO done' "$log" 2>/dev/null || grep -q '^ISR-FIO.*failed' "$log"; then
    echo "the fio guest did not finish its jobs on $1; serial console:" >&2
    cat "$log" >&2 2>/dev/null
    exit 1
  fi
  tr -d '\r' < "$log" | sed -n "s/^ISR-FIO job=\([a-z]*\) read_kib_s=\([0-9]*\) read_iops=\([0-9.]*\) write_kib_s=\([0-9]*\) write_iops=\([0-9.]*\) .*/$2 \1 \2 \3 \4 \5/p" >> "$work/results"
}

say "guest disk I/O: a ${fio_mib} MiB random disk, on the mount (hoarded) and on a local file"
mkdir -p "$work/src"
head -c "${fio_mib}M" /dev/urandom > "$work/src/disk.img"
cp "$work/src/disk.img" "$work/local.img"
machine A
isrctl import vm "$work/src" > /dev/null
mount=$(isrctl resume --vmm none vm 2>/dev/null)
isrctl hoard vm > /dev/null
rm -rf "$work/src"
for r in $(seq "$runs"); do
  # Alternating sides spreads the machine's other load over both.
  t0=$(now); guest_fio "$work/local.img" local; t1=$(now)
  say "run $r: local file $(elapsed "$t0" "$t1") s"
  t0=$(now); guest_fio "$mount/disk.img" isr; t1=$(now)
  say "run $r: isr mount $(elapsed "$t0" "$t1") s"
done
isrctl discard vm > /dev/null
cat "$work/results" >&2
# figure SIDE JOB FIELD → median over the runs (fields: 3 read KiB/s, 4 read IOPS, 5 write KiB/s, 6 write IOPS)
figure() { awk -v s="$1" -v j="$2" -v f="$3" '$1 == s && $2 == j {print $f}' "$work/results" | median; }
mbs() { awk -v k="$1" 'BEGIN {printf "%.1f", k * 1024 / 1e6}'; }
row "guest sequential read (fio, 1 MiB, direct), MB/s" "$(mbs "$(figure isr seqread 3)")" MB/s \
  "local raw file" "$(mbs "$(figure local seqread 3)")" ">= 0.8"
row "guest sequential write (fio, 1 MiB, direct), MB/s" "$(mbs "$(figure isr seqwrite 5)")" MB/s \
  "local raw file" "$(mbs "$(figure local seqwrite 5)")" ">= 0.8"
row "guest 4 KiB random read (fio, direct, depth 8), IOPS" "$(figure isr randread 4)" IOPS \
  "local raw file" "$(figure local randread 4)" ">= 0.8"
row "guest 4 KiB random write (fio, direct, depth 8), IOPS" "$(figure isr randwrite 6)" IOPS \
  "local raw file" "$(figure local randwrite 6)" ">= 0.8"
