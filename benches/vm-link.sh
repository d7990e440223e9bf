#!/usr/bin/env bash
# Section of benches/harness.sh: the store behind an emulated link (PROFILE,
# default wan: 100 Mbit/s, 20 ms RTT; examples/lib/link.sh), measured on a
# machine with an empty cache:
#  - demand latency: 4 KiB reads of chunks not yet local while the prefetcher
#    keeps the link busy, against RTT + one chunk's transfer time;
#  - resume-to-running of the test guest from its memory image, cold cache,
#    against (the memory image's stored bytes ÷ link rate), and warm cache;
#    plain QEMU resuming from local files (examples/qemu_baseline.rs) as well.
# Prints ROW lines (benches/lib.sh). Needs root, FUSE, QEMU, weed, ip, tc.
#   sudo bash benches/vm-link.sh          # PROFILE=wan RUNS=3 DEMAND_MIB=256
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$bench_root/examples/lib/link.sh"
profile=${PROFILE:-wan}; demand_mib=${DEMAND_MIB:-256}
need qemu-system-x86_64 "bash .ci/install-deps.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-vmlink.XXXXXX")
cleanup() { set +e; stop_machines; link_down; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd && cargo build --release --quiet -p isr --example qemu_baseline)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n\n[upload]\ntrickle = false\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
isrctl() { "$bin/isrctl" "$@"; }

# The test guest with its vm.toml.
guest=$work/guest
bash "$bench_root/tests/fixtures/make-guest.sh" "$guest" > /dev/null
rm -f "$guest/MANIFEST.txt"
cp "$bench_root/tests/fixtures/guest-vm.toml" "$guest/vm.toml"

say "plain QEMU from local files (baseline)"
base=$(for _ in $(seq "$runs"); do "$bin/examples/qemu_baseline" "$guest" 3; done)
qemu_resume=$(echo "$base" | python3 -c 'import json,sys; print("\n".join(str(json.loads(l)["qemu_resume_seconds"]) for l in sys.stdin))' | median)
qemu_resume=$(printf "%.3f" "$qemu_resume")

link_up "$work" "$profile"
rate_bps=$LINK_RATE_BPS; rtt_ms=$LINK_RTT_MS
say "link $profile: $rate_bps bit/s, RTT $rtt_ms ms"

wait_counting() { # machine-run-dir count
  local log=$1/vm/vm/serial.log
  for _ in $(seq 600); do
    [ "$(grep -c 'ISR-COUNTER' "$log" 2>/dev/null || true)" -ge "$2" ] && return 0
    sleep 0.2
  done
  echo "the guest did not count to $2; serial console:" >&2; cat "$log" >&2; exit 1
}

say "machine A: import the guest, boot it from the mount, suspend it (version 2 has a memory image)"
machine A
isrctl import vm "$guest" > /dev/null
isrctl resume vm > /dev/null 2>&1
wait_counting "$ISR_RUNTIME_DIR" 3
isrctl suspend vm > /dev/null
memory_stored=$(isrctl --json info --files vm | json '[f["stored_bytes"] for f in d["files"] if f["path"] == "memory.img"][0]')
ideal=$(python3 -c "print(f'{$memory_stored * 8 / $rate_bps:.3f}')")
say "memory image: $memory_stored stored bytes = $ideal s at the link rate"
# With direct kernel boot QEMU reads the kernel and initrd whole as it starts,
# before it loads the memory image: what it must have before the VM runs.
boot_stored=$(isrctl --json info --files vm | json 'sum(f["stored_bytes"] for f in d["files"] if f["path"] in ("memory.img", "vmlinuz", "initrd.img"))')
ideal_boot=$(python3 -c "print(f'{$boot_stored * 8 / $rate_bps:.3f}')")
say "memory image, kernel and initrd: $boot_stored stored bytes = $ideal_boot s at the link rate"

cold=(); warm=(); fetched=()
for r in $(seq "$runs"); do
  machine "B$r"
  t0=$(now); out=$(isrctl --json resume vm 2>/dev/null); t1=$(now)
  cold+=("$(elapsed "$t0" "$t1")")
  fetched+=("$(isrctl --json status vm | json 's[0]["fetch"]["fetched_bytes"]')")
  [ "$(echo "$out" | json 'd["vm"]["resumed_from_memory"]')" = True ] || { echo "B$r did not resume from memory: $out" >&2; exit 1; }
  isrctl hoard vm > /dev/null   # everything local: the next resume here is warm
  isrctl discard vm > /dev/null
  t0=$(now); isrctl resume vm > /dev/null 2>&1; t1=$(now)
  warm+=("$(elapsed "$t0" "$t1")")
  isrctl discard vm > /dev/null
  say "run $r: cold ${cold[-1]} s (${fetched[-1]} bytes fetched by then), warm ${warm[-1]} s"
done
cold_m=$(printf '%s\n' "${cold[@]}" | median); warm_m=$(printf '%s\n' "${warm[@]}" | median)
row "resume-to-running, cold cache over $profile, s" "$cold_m" s "memory image ÷ link rate" "$ideal" "<= 1.2"
row "resume-to-running, cold cache over $profile, s" "$cold_m" s "memory image + kernel + initrd ÷ link rate" "$ideal_boot" ""
row "resume-to-running, warm cache, s" "$warm_m" s "plain QEMU, local files" "$qemu_resume" ""
row "resume-to-running, cold cache over $profile, MB fetched by then" \
  "$(printf '%s\n' "${fetched[@]}" | median | awk '{printf "%.1f", $1/1e6}')" MB "memory image stored" \
  "$(awk -v b="$memory_stored" 'BEGIN {printf "%.1f", b/1e6}')" ""

say "demand latency while prefetch fills the link: ${demand_mib} MiB random image"
machine A
mkdir -p "$work/demand"; head -c "${demand_mib}M" /dev/urandom > "$work/demand/disk.img"
isrctl import demand "$work/demand" > /dev/null
chunk_stored=$(isrctl --json info --files demand | json 'd["files"][0]["stored_bytes"] // d["files"][0]["chunks"]')  # one chunk
expected=$(python3 -c "print(f'{$rtt_ms + $chunk_stored * 8 / $rate_bps * 1000:.1f}')")
lat=()
for r in $(seq "$runs"); do
  machine "D$r"
  mount=$(isrctl resume --vmm none demand 2>/dev/null)
  # 20 reads, 100 ms apart, each of a chunk the prefetcher (which goes in file
  # order) has not reached: from the end of the file backwards.
  lat+=($(python3 - "$mount" <<'PY'
import os, sys, time
mount = sys.argv[1]
fd = os.open(os.path.join(mount, "disk.img"), os.O_RDONLY)
chunk = 128 * 1024
size = os.fstat(fd).st_size
def remote(index):
    with open(os.path.join(mount, ".isr/chunks")) as f:
        for line in f:
            name, _, chars = line.rstrip("\n").partition(": ")
            if name == "disk.img":
                return chars[index] == "R"
    return False
index = size // chunk - 1
for _ in range(20):
    while index > 0 and not remote(index):
        index -= 1
    t = time.perf_counter()
    os.pread(fd, 4096, index * chunk + 1000)
    print(f"{(time.perf_counter() - t) * 1000:.2f}")
    index -= 7
    time.sleep(0.1)
PY
  ))
  busy=$(isrctl --json status demand | json 's[0]["fetch"]["fetched_bytes"]')
  say "run $r: $busy bytes fetched meanwhile"
  isrctl discard demand > /dev/null
done
row "demand read of a missing chunk under prefetch load over $profile, median ms" \
  "$(printf '%s\n' "${lat[@]}" | median)" ms "RTT + one chunk's transfer" "$expected" "<= $(python3 -c "print(f'{(2 * $rtt_ms + $chunk_stored * 8 / $rate_bps * 1000) / $expected:.2f}')")"
row "demand read of a missing chunk under prefetch load over $profile, p90 ms" \
  "$(printf '%s\n' "${lat[@]}" | percentile 90)" ms "RTT + one chunk's transfer" "$expected" ""
