#!/usr/bin/env bash
# Section `bigimage` of benches/harness.sh (issue 17, part 4): a big sparse
# disk image with some of it written, through the whole cycle on one machine
# with a local-directory store:
#  - import time (and isrctl's peak RSS, /usr/bin/time);
#  - resume-to-mounted (`isrctl resume --vmm none`, a fresh isrfsd);
#  - random 4 KiB reads at offsets inside the written extents, for READ_SECS
#    seconds, cold (each first touch of a chunk a demand fetch from the store;
#    background prefetch is off so the cache holds only what was read);
#  - a small write (WRITE_MIB of random data at random offsets, fsynced);
#  - checkin time, bytes uploaded;
#  - isrfsd's peak RSS (VmHWM before the checkin ends it) and isrctl's;
#  - the store's bytes under parcels/NAME/ after each version (the version
#    records: in format 2 the manifests' roots; their segments are chunk
#    objects), the manifest bytes the checkin uploaded (root and changed
#    segments) and the bytes under chunks/.
# Baselines in the same run: the same steps for an image of BASE_PCT % of the
# size and written amount (how each figure grows with the image), and the
# same random reads on the source file itself (native, page cache dropped).
# The written data is like a real disk's: a quarter each random, zeros,
# text, and one 128 KiB block repeated, in 4 MiB segments, as islands of
# ISLAND_MIB spread evenly over the image (the zero quarter is left as holes
# in the source file: to isr the same zero chunks, and a quarter less disk).
#   sudo bash benches/big-image.sh                        # IMAGE_GIB=1024 WRITTEN_GIB=20
#   IMAGE_GIB=64 WRITTEN_GIB=1 sudo bash benches/big-image.sh   # seconds
# Needs root (FUSE, drop_caches) and disk: the source takes 3/4 of
# WRITTEN_GIB, the store about a quarter of it. Everything is deleted at the end.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
image_gib=${IMAGE_GIB:-1024}; written_gib=${WRITTEN_GIB:-20}
read_secs=${READ_SECS:-20}; write_mib=${WRITE_MIB:-64}; base_pct=${BASE_PCT:-1}
island_mib=${ISLAND_MIB:-256}
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-bigimage.XXXXXX")
cleanup() { set +e; stop_machines; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n\n[fetch]\nprefetch = false\n\n[upload]\ntrickle = false\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml" ISR_STORE="$work/store"
isrctl() { "$bin/isrctl" "$@"; }
isrctl init > /dev/null 2>&1 || true

# make_image FILE SIZE_BYTES WRITTEN_BYTES: the sparse image; prints its islands "offset length" per line.
make_image() {
  python3 - "$@" "$((island_mib << 20))" <<'PY'
import os, sys
path, size, written, island = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
island = min(island, written)
count = max(1, written // island)
stride = size // count
seg = 4 << 20
repeated = os.urandom(128 << 10) * (seg // (128 << 10))
line = b"log line of a guest file system, compressible like text on a real disk\n"
text = (line * (seg // len(line) + 1))[:seg]
with open(path, "wb") as f:
    f.truncate(size)
    n = 0
    for i in range(count):
        start = i * stride + 12345  # not chunk-aligned
        f.seek(start)
        left = island
        while left > 0:
            k = min(seg, left)
            kind = n % 4
            if kind == 1:
                f.seek(k, 1)  # zeros: left a hole (the same zero chunks to isr, no disk)
            else:
                f.write((os.urandom(k), None, text[:k], repeated[:k])[kind])
            n += 1; left -= k
        print(start, island)
PY
}
rss_of() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; } # pid → peak RSS MiB
bytes_under() { [ -d "$1" ] && du -sb "$1" | cut -f1 || echo 0; }
# timed_rss OUTFILE CMD...: runs CMD under /usr/bin/time; prints "seconds peak-RSS-MiB"
timed_rss() {
  local out=$1; shift
  /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" > "$out"
  awk '{printf "%s %.0f\n", $1, $2 / 1024}' "$work/time.txt"
}
# rand_reads FILE ISLANDS SECONDS → "reads/s MB/s" of 4 KiB reads at random offsets inside the islands
rand_reads() {
  python3 - "$@" <<'PY'
import os, random, sys, time
path, islands, secs = sys.argv[1], [tuple(map(int, l.split())) for l in open(sys.argv[2])], float(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
rng = random.Random(7)
n = 0; t0 = time.monotonic()
while time.monotonic() - t0 < secs:
    start, length = rng.choice(islands)
    off = start + rng.randrange(0, length - 4096) // 4096 * 4096
    n += len(os.pread(fd, 4096, off))
dt = time.monotonic() - t0
print(f"{n / 4096 / dt:.0f} {n / 1e6 / dt:.2f}")
PY
}
# cycle LABEL IMAGE_BYTES WRITTEN_BYTES: the whole cycle for one image; sets r_* variables
cycle() {
  local label=$1 size=$2 written=$3
  local src="$work/src-$label"; mkdir -p "$src"
  say "$label: making a $(mb "$size") MB sparse image with $(mb "$written") MB written"
  make_image "$src/disk.img" "$size" "$written" > "$work/islands-$label"
  machine "$label"
  drop_caches
  say "$label: import"
  read -r r_import_s r_import_rss <<<"$(timed_rss "$work/import-$label.json" "$bin/isrctl" --json import "$label" "$src")"
  r_parcel_v1=$(bytes_under "$work/store/parcels/$label")
  r_chunks=$(bytes_under "$work/store/chunks")
  say "$label: native random reads of the source, ${read_secs} s"
  drop_caches
  read -r r_native_iops r_native_mbs <<<"$(rand_reads "$src/disk.img" "$work/islands-$label" "$read_secs")"
  say "$label: resume"
  local t0; t0=$(now)
  local mount; mount=$("$bin/isrctl" resume --vmm none "$label")
  r_resume_s=$(elapsed "$t0" "$(now)")
  local pid; pid=$(cat "$ISR_RUNTIME_DIR/isrfsd.pid")
  say "$label: random reads through the mount, ${read_secs} s"
  drop_caches
  read -r r_iops r_mbs <<<"$(rand_reads "$mount/disk.img" "$work/islands-$label" "$read_secs")"
  say "$label: write $write_mib MiB at random offsets, fsync"
  python3 - "$mount/disk.img" "$work/islands-$label" "$write_mib" <<'PY'
import os, random, sys
path, islands, mib = sys.argv[1], [tuple(map(int, l.split())) for l in open(sys.argv[2])], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
rng = random.Random(11)
for _ in range(mib * 16):  # 64 KiB writes
    start, length = rng.choice(islands)
    os.pwrite(fd, os.urandom(65536), start + rng.randrange(0, length - 65536))
os.fsync(fd); os.close(fd)
PY
  say "$label: checkin"
  r_daemon_rss_before=$(rss_of "$pid")
  read -r r_checkin_s r_checkin_rss <<<"$(timed_rss "$work/checkin-$label.json" "$bin/isrctl" --json checkin "$label")"
  r_daemon_rss=$(rss_of "$pid" 2>/dev/null || echo "$r_daemon_rss_before")
  r_uploaded=$(json 'd.get("uploaded_bytes", d.get("checkin", {}).get("uploaded_bytes"))' < "$work/checkin-$label.json")
  r_manifest=$(json 'd.get("manifest_bytes", d.get("checkin", {}).get("manifest_bytes", 0))' < "$work/checkin-$label.json")
  r_parcel_v2=$(bytes_under "$work/store/parcels/$label")
  r_chunks_after=$(bytes_under "$work/store/chunks")
  say "$label: import ${r_import_s}s (isrctl ${r_import_rss} MiB), resume ${r_resume_s}s, reads ${r_iops}/s ${r_mbs} MB/s (native ${r_native_iops}/s), checkin ${r_checkin_s}s ${r_uploaded} B, isrfsd ${r_daemon_rss_before} MiB before the checkin, ${r_daemon_rss} MiB after, parcels/ v1 ${r_parcel_v1} B v2 ${r_parcel_v2} B, chunks ${r_chunks} B"
  rm -rf "$src"
}

gib=$((1 << 30))
cycle big "$((image_gib * gib))" "$((written_gib * gib))"
big=("$r_import_s" "$r_import_rss" "$r_resume_s" "$r_iops" "$r_mbs" "$r_native_iops" "$r_native_mbs" "$r_checkin_s" "$r_checkin_rss" "$r_uploaded" "$r_daemon_rss" "$r_parcel_v1" "$r_parcel_v2" "$r_chunks" "$r_chunks_after" "$r_manifest" "$r_daemon_rss_before")
chunks_before_small=$r_chunks_after
cycle small "$((image_gib * gib * base_pct / 100))" "$((written_gib * gib * base_pct / 100))"
small_chunks=$((r_chunks_after - chunks_before_small))
b="${base_pct} % image"
t="${image_gib} GiB image, ${written_gib} GiB written"
row "import, s ($t)" "${big[0]}" s "$b" "$r_import_s"
row "isrctl import peak RSS, MiB ($t)" "${big[1]}" MiB "$b" "$r_import_rss"
row "resume to mounted, s ($t)" "${big[2]}" s "$b" "$r_resume_s"
row "random 4 KiB reads in written extents, cold, reads/s ($t)" "${big[3]}" reads/s "native reads of the source file" "${big[5]}"
row "random 4 KiB reads in written extents, cold, reads/s ($t)" "${big[3]}" reads/s "$b" "$r_iops"
row "checkin after ${write_mib} MiB of random writes, s ($t)" "${big[7]}" s "$b" "$r_checkin_s"
row "checkin bytes uploaded ($t)" "${big[9]}" B "$b" "$r_uploaded"
row "isrfsd peak RSS before the checkin (resume, reads, writes), MiB ($t)" "${big[16]}" MiB "$b" "$r_daemon_rss_before"
row "isrfsd peak RSS, MiB ($t)" "${big[10]}" MiB "$b" "$r_daemon_rss"
row "isrctl checkin peak RSS, MiB ($t)" "${big[8]}" MiB "$b" "$r_checkin_rss"
row "store bytes under parcels/NAME/ after import (v1) ($t)" "${big[11]}" B "$b" "$r_parcel_v1"
row "store bytes under parcels/NAME/ added by the checkin (v2) ($t)" "$((big[12] - big[11]))" B "$b" "$((r_parcel_v2 - r_parcel_v1))"
row "manifest bytes the checkin uploaded (root + changed segments) ($t)" "${big[15]}" B "$b" "$r_manifest"
row "store chunk bytes after import and checkin ($t)" "${big[14]}" B "$b" "$small_chunks"
