#!/usr/bin/env bash
# The README's main job: a VM suspended on one machine continues on another.
#
# Installs what it needs (.ci/install-deps.sh), builds isrctl and isrfsd (release),
# builds the tiny test guest (tests/fixtures/make-guest.sh: it counts once a second
# on its serial console and on its disk) and imports it into this machine's default
# store (root: /var/lib/isr/store) as the parcel `isr-quickstart`. Then, through
# the real `isrctl` only:
#   machine A (its own state, cache and daemon): `isrctl resume` boots the VM from
#     the lazy mount, its RAM a file on the mount (lazy memory, QEMU's default);
#     once it has counted 5 times, `isrctl suspend` saves its device state beside
#     that RAM file and checks a new version in;
#   machine B (empty state and cache, the same store, background prefetch off so
#     that it fetches only what the VM asks for): `isrctl resume` continues
#     the VM at once, its memory arriving as the guest touches it, and the counter
#     goes on where A stopped, with the same boot id; then `isrctl suspend` again,
#     uploading far less (only the RAM chunks that changed, and chunks dedup);
#   for comparison, the same guest in image mode (`memory_mode = "image"`: the
#     whole memory image read before the guest runs) as the parcel
#     `isr-quickstart-image`, suspended on A and resumed on B.
# It ends with a table of each step's time, bytes fetched and bytes uploaded.
#
#   bash examples/quickstart.sh         # from any directory; ~30 s once built (TCG)
#   KEEP=1 bash examples/quickstart.sh  # keep the work directory (logs, consoles)
#
# The machines live in ${ISR_QUICKSTART_DIR:-${TMPDIR:-/tmp}/isr-quickstart}/{A,B}.
# The parcel's passphrase is "quickstart": a demo passphrase for this throwaway
# parcel (never give a real parcel a passphrase that is written in a script).
# Runs again as often as you like: a rerun adds a fresh version (disk as built, no
# saved memory, so the VM boots afresh), and cleans up what an interrupted run left
# (its sessions, daemons and lock). Each run adds three versions to each parcel, ~50 MiB of chunks
# (`ISR_PASSPHRASE=quickstart isrctl history isr-quickstart`; `isrctl gc` trims old
# versions). Needs root or sudo (apt, FUSE), the Rust toolchain and Python 3.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
repo=$PWD
parcel=isr-quickstart
image_parcel=isr-quickstart-image
work=${ISR_QUICKSTART_DIR:-${TMPDIR:-/tmp}/isr-quickstart}
# Liveness limits (not timings): a boot under TCG takes ~5 s, a count 1 s.
boot_limit=300 run_limit=180 stop_limit=60

# The default store and configuration; the demo passphrase.
unset ISR_STORE ISR_KEY_FILE ISR_PASSPHRASE_FILE ISR_STATE_DIR ISR_CACHE_DIR ISR_RUNTIME_DIR
export ISR_PASSPHRASE=quickstart

step() { printf '\n== %s\n' "$*"; }
say() { printf '   %s\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
# JSON: jget JSON EXPR prints EXPR (Python, over the parsed JSON `d`).
jget() {
  python3 -c 'import json, sys
d = json.loads(sys.argv[1]); v = eval(sys.argv[2])
print(json.dumps(v) if isinstance(v, (bool, type(None), dict, list)) else v)' "$1" "$2"
}
human() {
  python3 -c 'import sys
n = float(sys.argv[1]); u = ["B", "KiB", "MiB", "GiB", "TiB"]; i = 0
while n >= 1024 and i < len(u) - 1: n /= 1024; i += 1
print(f"{n:.0f} B" if i == 0 else f"{n:.1f} {u[i]}")' "$1"
}

# ---- 1. what it needs -------------------------------------------------------------------
step "installing what is missing (.ci/install-deps.sh --without-seaweedfs --without-libvirt)"
t=$(now)
bash .ci/install-deps.sh --without-seaweedfs --without-libvirt
t_install=$(since "$t")

# ---- 2. build ---------------------------------------------------------------------------
step "cargo build --release --workspace"
t=$(now)
cargo build --release --workspace
t_build=$(since "$t")
ISRCTL=$repo/target/release/isrctl
[ -x "$ISRCTL" ] && [ -x "$repo/target/release/isrfsd" ] || die "target/release/isrctl or isrfsd is missing after the build"

# One run at a time: the lock is fd 9, which no isrctl (nor the isrfsd and QEMU it
# starts) inherits, so a daemon that outlives a killed run does not hold it.
mkdir -p "$(dirname "$work")"
exec 9>"$work.lock"
flock -n 9 || die "another examples/quickstart.sh is running (lock $work.lock)"

# isrctl_on MACHINE ARGS: isrctl as machine MACHINE (its state, cache, runtime dir).
# A machine with a config.toml of its own (B: no background prefetch, so that
# what it fetches is what its VM needs) uses it.
isrctl_on() {
  local m=$1; shift
  if [ -f "$work/$m/config.toml" ]; then
    ISR_CONFIG=$work/$m/config.toml ISR_STATE_DIR=$work/$m/state ISR_CACHE_DIR=$work/$m/cache \
      ISR_RUNTIME_DIR=$work/$m/run "$ISRCTL" "$@" 9>&-
  else
    ISR_STATE_DIR=$work/$m/state ISR_CACHE_DIR=$work/$m/cache ISR_RUNTIME_DIR=$work/$m/run \
      "$ISRCTL" "$@" 9>&-
  fi
}

# alive PID NEEDLE: PID runs (not a zombie) and its command line contains NEEDLE.
alive() {
  [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
  [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || return 1
  tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# stop_machine MACHINE: discards its session if it has one (this run's or an
# interrupted run's), stops its QEMU and its isrfsd (SIGTERM, then wait), and lazily
# unmounts whatever a killed daemon left mounted under it.
stop_machine() {
  local m=$1 dir=$work/$1 out pid i p
  [ -d "$dir" ] || return 0
  for p in "$parcel" "$image_parcel"; do
    if out=$(isrctl_on "$m" discard "$p" 2>&1); then say "$m: $out"; fi
  done
  # Its QEMU (this script records the pid at resume; a QEMU whose isrfsd was killed
  # during a resume has no record, but runs from files under $dir), then its isrfsd.
  for pid in $(head -qn1 "$dir/qemu.pid" 2>/dev/null) \
             $(grep -lsF -- "$dir/" /proc/[0-9]*/cmdline | grep -v self | cut -d/ -f3 \
               | while read -r p; do [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == qemu-system* ]] && echo "$p"; done) \
             $(head -qn1 "$dir/run/isrfsd.pid" 2>/dev/null); do
    alive "$pid" "$dir/" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < stop_limit * 10; i++)); do alive "$pid" "$dir/" || break; sleep 0.1; done
    if alive "$pid" "$dir/"; then
      say "$m: pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) ignored SIGTERM for ${stop_limit} s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  awk -v p="$dir/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r \
    | while read -r mnt; do umount -l "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true; done
}

finished=0
cleanup() {
  local rc=$?
  set +e
  trap - INT TERM
  if [ -d "$work" ]; then
    [ "$finished" = 1 ] || printf '\n== cleaning up after a failure or an interrupt\n'
    stop_machine B
    stop_machine A
    if [ "$finished" = 1 ] && [ -z "${KEEP:-}" ]; then
      rm -rf --one-file-system "$work"
    else
      say "kept $work (logs: */run/log/isrfsd.*, */run/vm/$parcel/{serial,qemu}.log)"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# What an interrupted earlier run left behind.
if [ -e "$work" ]; then
  stop_machine B
  stop_machine A
  rm -rf --one-file-system "$work" || die "cannot remove $work (a mount left there? see: findmnt | grep $work)"
fi
mkdir -p "$work/A" "$work/B"
printf '[fetch]\nprefetch = false\n' > "$work/B/config.toml"

# ---- 3. the test guest --------------------------------------------------------------------
step "building the test guest (tests/fixtures/make-guest.sh, cached)"
t=$(now)
guest=$work/guest
bash tests/fixtures/make-guest.sh "$guest" | sed 's/^/   /'
rm -f "$guest/MANIFEST.txt"
cp tests/fixtures/guest-vm.toml "$guest/vm.toml"
t_guest=$(since "$t")

# ---- 4. import -------------------------------------------------------------------------
import_parcel() {  # import_parcel NAME DIR: prints the JSON answer (a new version on a rerun)
  local listing exists lock
  listing=$(isrctl_on A --json ls)
  exists=$(jget "$listing" "any(p['name'] == '$1' for p in d['parcels'])")
  if [ "$exists" = true ]; then
    lock=$(jget "$listing" "next(p['lock'] for p in d['parcels'] if p['name'] == '$1')")
    if [ "$lock" != null ]; then
      say "$1 is still locked ($(jget "$lock" "d['holder'] + '@' + d['host'] + ' since ' + d['since']")), presumably by an interrupted run: breaking the lock" >&2
      isrctl_on A unlock --force "$1" | sed 's/^/   /' >&2
    fi
    step "isrctl import --new-version -m \"quickstart rerun\" $1 $2" >&2
    isrctl_on A --json import --new-version -m "quickstart rerun" "$1" "$2"
  else
    step "isrctl import $1 $2" >&2
    isrctl_on A --json import "$1" "$2"
  fi
}
t=$(now)
imported=$(import_parcel "$parcel" "$guest")
t_import=$(since "$t")
v_import=$(jget "$imported" "d['version']")
up_import=$(jget "$imported" "d['uploaded_bytes']")
store=$(jget "$(isrctl_on A --json info "$parcel")" "d['store']")
say "version $v_import of $parcel in $store: $(jget "$imported" "d['files']") files, $(human "$(jget "$imported" "d['logical_bytes']")"), uploaded $(human "$up_import") in $(jget "$imported" "d['uploaded_chunks']") chunks"

# ---- the VM on a machine --------------------------------------------------------------------
serial_log() { echo "$work/$1/run/vm/$parcel/serial.log"; }
qemu_log() { echo "$work/$1/run/vm/$parcel/qemu.log"; }

# counters FILE: one line "N BOOT" per complete counter line of the console, "BOOT ID"
# per boot line, and "PARTIAL N" when the last (unfinished) line already shows N.
counters() {
  python3 -c 'import re, sys
try:
    text = open(sys.argv[1], "rb").read().decode("utf-8", "replace")
except FileNotFoundError:
    text = ""
cut = text.rfind("\n") + 1
for line in text[:cut].splitlines():
    m = re.search(r"ISR-COUNTER n=(\d+) boot=(\S+)", line)
    if m:
        print(m.group(1), m.group(2))
    elif "ISR-BOOT boot=" in line:
        print("BOOT", line.split("ISR-BOOT boot=", 1)[1].split()[0])
m = re.search(r"ISR-COUNTER n=(\d+) ", text[cut:])
if m:
    print("PARTIAL", m.group(1))' "$1"
}
count_lines() { counters "$1" | grep -c '^[0-9]' || true; }

vm_failed() {  # vm_failed MACHINE WHY
  {
    printf '\nquickstart: machine %s: %s\n' "$1" "$2"
    printf -- '--- serial console (%s), last 60 lines:\n' "$(serial_log "$1")"
    tail -n 60 "$(serial_log "$1")" 2>/dev/null | tr -d '\r'
    printf -- '--- qemu log (%s):\n' "$(qemu_log "$1")"
    tail -n 60 "$(qemu_log "$1")" 2>/dev/null
    printf -- '--- isrfsd log (%s), last 20 lines:\n' "$work/$1/run/log/"
    cat "$work/$1/run/log/"isrfsd.* 2>/dev/null | tail -n 20
  } >&2
  exit 1
}

# wait_counting MACHINE TOTAL LIMIT: polls the console until it has TOTAL counter lines;
# fails with the console and QEMU's log when the VM stops or LIMIT seconds pass.
wait_counting() {
  local m=$1 total=$2 limit=$3 start state have
  start=$(date +%s)
  while :; do
    have=$(count_lines "$(serial_log "$m")")
    [ "$have" -ge "$total" ] && return 0
    state=$(jget "$(isrctl_on "$m" --json status "$parcel")" "(d['sessions'][0].get('vm') or {}).get('state', 'none')") \
      || vm_failed "$m" "isrctl status failed while waiting for the counter"
    case $state in running|busy) ;; *) vm_failed "$m" "the VM is $state, not running, with $have of $total counter lines" ;; esac
    [ $(($(date +%s) - start)) -lt "$limit" ] \
      || vm_failed "$m" "only $have of $total counter lines after ${limit} s"
    sleep 0.5
  done
}

fetched() { jget "$(isrctl_on "$1" --json status "$parcel")" "d['sessions'][0]['fetch']['fetched_bytes']"; }

resume_on() {  # resume_on MACHINE: prints the JSON answer; checks the VM runs
  local answer
  answer=$(isrctl_on "$1" --json resume "$parcel") || vm_failed "$1" "isrctl resume $parcel failed"
  [ "$(jget "$answer" "(d.get('vm') or {}).get('state')")" = running ] \
    || vm_failed "$1" "isrctl resume answered without a running VM: $answer"
  jget "$answer" "d['vm']['pid']" > "$work/$1/qemu.pid"
  echo "$answer"
}

suspend_on() {  # suspend_on MACHINE: prints the JSON answer; checks memory was saved and a version committed
  local answer
  answer=$(isrctl_on "$1" --json suspend "$parcel") || vm_failed "$1" "isrctl suspend $parcel failed"
  [ "$(jget "$answer" "(d.get('saved') or {}).get('memory_bytes', 0) > 0 and d['checkin'].get('committed', True)")" = true ] \
    || die "isrctl suspend on $1 saved no memory or committed nothing: $answer"
  rm -f "$work/$1/qemu.pid"
  echo "$answer"
}

report_suspend() {  # report_suspend MACHINE JSON
  say "saved state: $(human "$(jget "$2" "d['saved']['memory_bytes']")") saved in $(jget "$2" "'%.2f' % d['saved']['seconds']") s ($(jget "$2" "d['saved']['memory_image']"); RAM file: $(jget "$2" "d['saved'].get('ram_file') or 'none, image mode'"))"
  say "checkin: version $(jget "$2" "d['checkin']['version']"), uploaded $(human "$(jget "$2" "d['checkin']['uploaded_bytes']")") in $(jget "$2" "d['checkin']['uploaded_chunks']") chunks, $(jget "$2" "'%.2f' % d['checkin']['seconds']") s"
}

# ---- 5. machine A ---------------------------------------------------------------------------
step "machine A ($work/A): isrctl --json resume $parcel"
t=$(now)
answer=$(resume_on A)
t_resume_a=$(since "$t")
[ "$(jget "$answer" "d['vm']['resumed_from_memory']")" = false ] \
  || die "machine A resumed from memory, but version $v_import has no memory image: $answer"
start_a=$(jget "$answer" "'%.2f' % d['vm']['start_seconds']")
fetched_resume_a=$(fetched A)
say "mounted at $(jget "$answer" "d['mount']"); QEMU pid $(jget "$answer" "d['vm']['pid']") booting (VM running $start_a s after the request, $(human "$fetched_resume_a") fetched)"
say "serial console: $(serial_log A)"

step "machine A: waiting for 5 counter lines on the console"
t=$(now)
wait_counting A 5 "$boot_limit"
t_count_a=$(since "$t")
read -r last_n boot_a < <(counters "$(serial_log A)" | grep '^[0-9]' | tail -1)
say "last: ISR-COUNTER n=$last_n boot=$boot_a"
fetched_a=$(fetched A)
say "fetched so far (isrctl status): $(human "$fetched_a")"

step "machine A: isrctl --json suspend $parcel"
t=$(now)
suspended=$(suspend_on A)
t_suspend_a=$(since "$t")
report_suspend A "$suspended"
up_a=$(jget "$suspended" "d['checkin']['uploaded_bytes']")
v_a=$(jget "$suspended" "d['checkin']['version']")
# The last count A showed (an unfinished last line counts: B prints the next one).
last_a=$(counters "$(serial_log A)" | awk '$1 ~ /^[0-9]+$/ { n = $1 } $1 == "PARTIAL" { n = $2 } END { print n }')
say "A stopped at n=$last_a"

# ---- 6. machine B ---------------------------------------------------------------------------
step "machine B ($work/B, empty): isrctl --json resume $parcel"
t=$(now)
answer=$(resume_on B)
t_resume_b=$(since "$t")
[ "$(jget "$answer" "d['vm']['resumed_from_memory']")" = true ] \
  || die "machine B did not resume from the memory A saved in version $v_a: $answer"
start_b=$(jget "$answer" "'%.2f' % d['vm']['start_seconds']")
fetched_resume_b=$(fetched B)
say "VM running from A's device state and RAM file $start_b s after the request; $(human "$fetched_resume_b") fetched by then (the RAM file arrives as the guest touches it)"

step "machine B: waiting for 3 counter lines on its console"
t=$(now)
wait_counting B 3 "$run_limit"
t_count_b=$(since "$t")
read -r first_n first_boot < <(counters "$(serial_log B)" | grep '^[0-9]' | head -1)
read -r now_n _ < <(counters "$(serial_log B)" | grep '^[0-9]' | tail -1)
if counters "$(serial_log B)" | grep -q '^BOOT'; then
  vm_failed B "the guest booted again on B (an ISR-BOOT line) instead of continuing A's boot $boot_a"
fi
if [ "$first_n" != $((last_a + 1)) ] || [ "$first_boot" != "$boot_a" ]; then
  vm_failed B "B's first counter is n=$first_n boot=$first_boot, expected n=$((last_a + 1)) boot=$boot_a (A's last + 1, the same boot)"
fi
say "first on B: ISR-COUNTER n=$first_n boot=$first_boot = A's last ($last_a) + 1, same boot: it continued"
say "now at n=$now_n"
fetched_b=$(fetched B)
say "fetched so far (isrctl status): $(human "$fetched_b")"

step "machine B: isrctl --json suspend $parcel"
t=$(now)
suspended=$(suspend_on B)
t_suspend_b=$(since "$t")
report_suspend B "$suspended"
up_b=$(jget "$suspended" "d['checkin']['uploaded_bytes']")
v_b=$(jget "$suspended" "d['checkin']['version']")
say "B's checkin uploaded $(human "$up_b"), A's $(human "$up_a") (the RAM file's unchanged pages stay in unchanged chunks)"

# ---- 7. the same guest in image mode, for comparison -----------------------------------------
image_guest=$work/image-guest
cp -r --sparse=always "$guest" "$image_guest"
{ echo 'memory_mode = "image"'; cat tests/fixtures/guest-vm.toml; } > "$image_guest/vm.toml"
main_parcel=$parcel parcel=$image_parcel
import_parcel "$parcel" "$image_guest" > /dev/null
step "image mode: machine A boots $parcel, counts to 5, suspends (the whole memory image)"
resume_on A > /dev/null
wait_counting A 5 "$boot_limit"
suspended=$(suspend_on A)
report_suspend A "$suspended"
up_image_a=$(jget "$suspended" "d['checkin']['uploaded_bytes']")
step "image mode: machine B resumes $parcel (reads the whole memory image first)"
t=$(now)
answer=$(resume_on B)
t_resume_image=$(since "$t")
[ "$(jget "$answer" "d['vm']['resumed_from_memory']")" = true ] || die "image mode: B did not resume from memory: $answer"
start_image=$(jget "$answer" "'%.2f' % d['vm']['start_seconds']")
fetched_resume_image=$(fetched B)
say "VM running from the memory image $start_image s after the request; $(human "$fetched_resume_image") fetched by then"
suspended=$(suspend_on B)
up_image_b=$(jget "$suspended" "d['checkin']['uploaded_bytes']")
parcel=$main_parcel
# ---- 7. summary ---------------------------------------------------------------------------
step "summary: $parcel in $store, versions $v_import -> $v_a (A) -> $v_b (B)"
row() { printf '   %-40s %9s  %11s  %11s\n' "$@"; }
row "step" "time, s" "fetched" "uploaded"
row "install (.ci/install-deps.sh)" "$t_install" "" ""
row "cargo build --release --workspace" "$t_build" "" ""
row "test guest (make-guest.sh)" "$t_guest" "" ""
row "import (version $v_import)" "$t_import" "" "$(human "$up_import")"
row "A: resume, boots (VM up after $start_a s)" "$t_resume_a" "$(human "$fetched_resume_a")" ""
row "A: count to 5 (total fetched)" "$t_count_a" "$(human "$fetched_a")" ""
row "A: suspend + checkin (version $v_a)" "$t_suspend_a" "" "$(human "$up_a")"
row "B: resume, lazy (up after $start_b s)" "$t_resume_b" "$(human "$fetched_resume_b")" ""
row "B: count 3 more (total fetched)" "$t_count_b" "$(human "$fetched_b")" ""
row "B: suspend + checkin (version $v_b)" "$t_suspend_b" "" "$(human "$up_b")"
row "image mode: A suspend + checkin" "" "" "$(human "$up_image_a")"
row "image mode: B resume (up after $start_image s)" "$t_resume_image" "$(human "$fetched_resume_image")" ""
row "image mode: B suspend + checkin" "" "" "$(human "$up_image_b")"
echo
echo "== done: booted on A, suspended, continued on B (n=$first_n after n=$last_a, boot $boot_a), suspended again"
finished=1
