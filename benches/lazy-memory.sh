#!/usr/bin/env bash
# Section of benches/harness.sh (`lazy`): lazy memory (guest RAM as a file on
# the mount) against image mode (the whole memory image read before the guest
# runs) and plain QEMU from local files, for guests of SIZES_MIB (default
# "256 1024 4096") over each link of PROFILES (default "wan dsl";
# examples/lib/link.sh). For each size and mode, machine A imports the test
# guest, boots it, suspends, resumes and suspends again (in lazy mode the second
# version holds the working set of that resume); then, RUNS times, a machine
# with an empty cache resumes it over the link:
#  - resume-to-running (isrctl resume returns, the VM runs) and
#    resume-to-first-progress (the guest's next counter line on its console),
#    and the bytes fetched by then;
#  - the second suspend on A: seconds and bytes uploaded, and in lazy mode the
#    upload against the stored bytes of the chunks that changed;
#  - guest memory writes (`mem MB zero` in the guest, its own clock): RAM on
#    the mount against RAM in a local file (plain QEMU, lazy mode).
# Prints ROW lines (benches/lib.sh). Needs root, FUSE, QEMU, weed, ip, tc.
#   sudo bash benches/lazy-memory.sh                     # wan and dsl, 256 MiB to 4 GiB
#   SIZES_MIB=256 PROFILES=wan RUNS=1 sudo bash benches/lazy-memory.sh
#   PROFILES=none sudo bash benches/lazy-memory.sh        # the memory writes only
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$bench_root/examples/lib/link.sh"
profiles=${PROFILES:-wan dsl}
sizes=${SIZES_MIB:-256 1024 4096}
write_mb=${WRITE_MB:-128}
need qemu-system-x86_64 "bash .ci/install-deps.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-lazy.XXXXXX")
cleanup() { set +e; stop_machines; link_down; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd && cargo build --release --quiet -p isr --example qemu_baseline --example delay_proxy)
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
write_config() { printf '[kdf]\nmemory_kib = 1024\niterations = 1\n\n[upload]\ntrickle = false\n' > "$work/config.toml"; }
write_config
isrctl() { "$bin/isrctl" "$@"; }

guest=$work/guest
bash "$bench_root/tests/fixtures/make-guest.sh" "$guest" > /dev/null
rm -f "$guest/MANIFEST.txt"

# parcel_dir DIR SIZE MODE [EXTRA-ARGS-TOML]: the guest with a vm.toml for SIZE MiB in MODE.
parcel_dir() {
  mkdir -p "$1"
  cp --sparse=always "$guest"/{vmlinuz,initrd.img,disk.img} "$1/"
  { echo "memory_mode = \"$3\""
    sed -e "s/^memory = .*/memory = $2/" -e "s|^extra_args = .*|extra_args = [\"-no-reboot\"${4:-}]|" \
      "$bench_root/tests/fixtures/guest-vm.toml"; } > "$1/vm.toml"
}

counters() { grep -c 'ISR-COUNTER' "$1" 2>/dev/null || true; }
wait_counters() { # serial-log count
  for _ in $(seq 3000); do
    [ "$(counters "$1")" -ge "$2" ] && return 0
    sleep 0.02
  done
  echo "the guest did not count to $2; serial console:" >&2; cat "$1" >&2; exit 1
}

for profile in $profiles; do
  [ "$profile" = none ] && continue
  # link_up appends the link's [s3] section: a fresh configuration per link.
  write_config
  link_up "$work" "$profile"
  rate_bps=$LINK_RATE_BPS; rtt_ms=$LINK_RTT_MS
  say "link $profile: $rate_bps bit/s, RTT $rtt_ms ms"
  for size in $sizes; do
    for mode in image lazy; do
      p="$mode-$size-$profile"
      parcel_dir "$work/src-$p" "$size" "$mode"
      say "$p: machine A imports, boots, suspends, resumes and suspends again"
      machine "A-$p"
      log=$ISR_RUNTIME_DIR/vm/$p/serial.log
      isrctl import "$p" "$work/src-$p" > /dev/null
      boot_bytes=$(isrctl --json info --files "$p" | json 'sum(f["stored_bytes"] for f in d["files"] if f["path"] in ("vmlinuz", "initrd.img"))')
      isrctl resume "$p" > /dev/null 2>&1
      wait_counters "$log" 3
      isrctl suspend "$p" > /dev/null
      isrctl resume "$p" > /dev/null 2>&1
      wait_counters "$log" 6
      out=$(isrctl --json suspend "$p")
      printf -v "suspend_s_$mode" %s "$(echo "$out" | json 'round(d["saved"]["seconds"] + d["checkin"]["seconds"], 3)')"
      printf -v "uploaded_$mode" %s "$(echo "$out" | json 'd["checkin"]["uploaded_bytes"]')"
      printf -v "new_bytes_$mode" %s "$(echo "$out" | json 'd["checkin"]["new_bytes"]')"
      r=(); f=(); fr=(); ff=(); ws=()
      for i in $(seq "$runs"); do
        machine "B$i-$p"
        log=$ISR_RUNTIME_DIR/vm/$p/serial.log
        t0=$(now)
        isrctl resume "$p" > /dev/null 2>&1
        t1=$(now)
        fr+=("$(isrctl --json status "$p" | json 's[0]["fetch"]["fetched_bytes"]')")
        wait_counters "$log" 1
        t2=$(now)
        status=$(isrctl --json status "$p")
        ff+=("$(echo "$status" | json 's[0]["fetch"]["fetched_bytes"]')")
        ws+=("$(echo "$status" | json 's[0]["working_set_bytes"]')")
        r+=("$(elapsed "$t0" "$t1")"); f+=("$(elapsed "$t0" "$t2")")
        isrctl discard "$p" > /dev/null
        say "$p run $i: running after ${r[-1]} s (${fr[-1]} bytes fetched), first progress after ${f[-1]} s (${ff[-1]} bytes; working set ${ws[-1]} bytes)"
      done
      printf -v "run_$mode" %s "$(printf '%s\n' "${r[@]}" | median)"
      printf -v "first_$mode" %s "$(printf '%s\n' "${f[@]}" | median)"
      printf -v "fetched_run_$mode" %s "$(printf '%s\n' "${fr[@]}" | median)"
      printf -v "fetched_first_$mode" %s "$(printf '%s\n' "${ff[@]}" | median)"
      [ "$mode" = lazy ] && ws_bytes=$(printf '%s\n' "${ws[@]}" | median)
    done

    say "$size MiB: plain QEMU from local files, lazy mode (RAM in a local file)"
    parcel_dir "$work/local-$size-$profile" "$size" lazy
    base=$(for _ in $(seq "$runs"); do "$bin/examples/qemu_baseline" "$work/local-$size-$profile" 2; done)
    qemu_run=$(echo "$base" | json_lines qemu_resume_seconds | median)
    qemu_first=$(echo "$base" | json_lines qemu_first_progress_seconds | median)
    rm -rf "$work/local-$size-$profile" "$work"/src-*-"$size-$profile"

    two_rtt=$(python3 -c "print(f'{2 * $rtt_ms / 1000 + 0.2:.3f}')")
    # Direct kernel boot: QEMU reads the kernel and initrd whole as it starts,
    # also when it then loads a saved state (a guest booting from its disk has
    # nothing of the kind).
    two_rtt_boot=$(python3 -c "print(f'{2 * $rtt_ms / 1000 + 0.2 + $boot_bytes * 8 / $rate_bps:.3f}')")
    ideal_first=$(python3 -c "print(f'{$ws_bytes * 8 / $rate_bps + 2 * $rtt_ms / 1000:.3f}')")
    ideal_first_boot=$(python3 -c "print(f'{($ws_bytes + $boot_bytes) * 8 / $rate_bps + 2 * $rtt_ms / 1000:.3f}')")
    g="${size} MiB guest, cold cache over $profile"
    row "resume-to-running, $g, lazy, s" "${run_lazy}" s "image mode" "${run_image}" ""
    row "resume-to-running, $g, lazy, s" "${run_lazy}" s "2 RTT + 0.2 s" "$two_rtt" "<= 1.0"
    row "resume-to-running, $g, lazy, s" "${run_lazy}" s "2 RTT + 0.2 s + kernel and initrd ÷ link rate" "$two_rtt_boot" ""
    row "resume-to-running, $g, lazy, s" "${run_lazy}" s "plain QEMU, local files, lazy" "$qemu_run" ""
    row "resume-to-first-progress, $g, lazy, s" "${first_lazy}" s "image mode" "${first_image}" ""
    row "resume-to-first-progress, $g, lazy, s" "${first_lazy}" s "working set ÷ link rate + 2 RTT" "$ideal_first" "<= 1.2"
    row "resume-to-first-progress, $g, lazy, s" "${first_lazy}" s "(working set + kernel and initrd) ÷ link rate + 2 RTT" "$ideal_first_boot" ""
    row "resume-to-first-progress, $g, lazy, s" "${first_lazy}" s "plain QEMU, local files, lazy" "$qemu_first" ""
    row "MB fetched by running, $g, lazy" "$(mb "${fetched_run_lazy}")" MB "image mode" "$(mb "${fetched_run_image}")" ""
    row "MB fetched by first progress, $g, lazy" "$(mb "${fetched_first_lazy}")" MB "image mode" "$(mb "${fetched_first_image}")" ""
    row "second suspend + checkin, ${size} MiB guest over $profile, lazy, s" "${suspend_s_lazy}" s "image mode" "${suspend_s_image}" ""
    row "MB uploaded by the second suspend, ${size} MiB guest, lazy" "$(mb "${uploaded_lazy}")" MB "image mode" "$(mb "${uploaded_image}")" ""
    row "MB uploaded by the second suspend, ${size} MiB guest, lazy" "$(mb "${uploaded_lazy}")" MB "changed chunks, stored" "$(mb "${new_bytes_lazy}")" "<= 1.05"
  done
  link_down
done

write_config
say "guest memory writes: RAM on the mount vs RAM in a local file (${write_mb} MiB of zeros, guest clock)"
socket=$work/ctl.sock
extra=", \"-chardev\", \"socket,id=isrctl,path=$socket,server=on,wait=off\", \"-device\", \"isa-serial,chardev=isrctl,index=1\""
mount_w=(); local_w=()
for i in $(seq "$runs"); do
  p=write$i
  parcel_dir "$work/src-$p" 256 lazy "$extra"
  machine "W$i"
  export ISR_STORE=$work/store-$p
  isrctl init > /dev/null 2>&1 || true  # a named store must exist (a baseline before init makes it on import)
  isrctl import "$p" "$work/src-$p" > /dev/null
  isrctl resume "$p" > /dev/null 2>&1
  log=$ISR_RUNTIME_DIR/vm/$p/serial.log
  wait_counters "$log" 6
  printf 'mem %s zero\n' "$write_mb" | python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.buffer.read()); s.recv(100)' "$socket"
  for _ in $(seq 3000); do grep -q 'ISR-CTL mem' "$log" && break; sleep 0.1; done
  mount_w+=("$(python3 -c 'import re,sys; m=re.search(r"mem done bytes=(\d+) uptime=([\d.]+)-([\d.]+)", open(sys.argv[1]).read()); print(f"{int(m[1])/1e6/max(float(m[3])-float(m[2]),0.01):.1f}")' "$log")")
  isrctl discard "$p" > /dev/null
  parcel_dir "$work/local-$p" 256 lazy "$extra"
  local_w+=("$(CONTROL=$socket MEM_MB=$write_mb "$bin/examples/qemu_baseline" "$work/local-$p" 1 | json_lines guest_memory_write_mb_per_s)")
  say "run $i: ${mount_w[-1]} MB/s on the mount, ${local_w[-1]} MB/s local"
  rm -rf "$work/src-$p" "$work/local-$p"
done
row "guest memory writes, RAM on the mount, MB/s" "$(printf '%s\n' "${mount_w[@]}" | median)" MB/s \
  "RAM in a local file" "$(printf '%s\n' "${local_w[@]}" | median)" ">= 0.8"
