#!/usr/bin/env bash
# Section `dedup` of benches/harness.sh: the measured inputs of docs/scale.md.
#
# Real Debian disk images, built here: a base (the cached minbase of
# tests/systemd_units.rs, /var/cache/isr-tests/nspawn-base, in an ext4 image),
# flavours derived from it the way an administrator derives them (a copy of the
# base image, loop-mounted, packages installed with apt in a chroot), and a
# week of simulated use of the first flavour (each day a copy of the day
# before with logs grown, a browser-like cache churned, /etc edited, a package
# installed or removed, apt's lists refreshed). Every image is imported into
# one store per chunk size (64, 128, 512 KiB): the base as parcel `base`, each
# flavour as its own parcel sharing base's dedup secret (`--dedup-with base`),
# each day as the next version of the first flavour's parcel.
#
# Per step and chunk size it reports (stderr, and the markdown file $REPORT if
# set): the image's size and allocated bytes, the version's stored bytes
# alone, the bytes the import uploaded, and the store's chunk objects and
# bytes. Then, per chunk size, a machine with an empty cache resumes the last
# version (no VM, prefetch off), loop-mounts its disk read-only from the mount
# and runs a start-up workload in a chroot (systemd's and apt's binaries, every
# unit file and /etc read, the dpkg database queried, the flavour's application
# started): chunks and bytes fetched for that working set; then `hoard`: chunks
# and bytes to fetch everything; then a warm resume on the same machine (the
# ordinary morning) with isrctl's and isrfsd's store operations counted from
# their system calls on the local store's files (strace): GETs and their
# bytes, HEADs, directory reads (LISTs), PUTs, DELETEs.
#
# ROW lines (benches/lib.sh) with same-run baselines:
#  - store bytes of base + flavours with one shared dedup secret vs each parcel
#    under its own secret (the sum of their versions' stored bytes alone);
#  - store bytes after the week vs the sum of every version stored alone;
#  - per chunk size: objects, store bytes, working-set requests and bytes, all
#    against the same figure at 128 KiB (the default).
#
#   sudo bash benches/dedup.sh               # 2 GiB images, 3 flavours, 7 days
#   QUICK=1 sudo bash benches/dedup.sh       # 1 GiB, small flavours, 2 days (~2 min)
#   CHUNK_KIB="128" DAYS=3 sudo bash benches/dedup.sh
# Needs root (loop devices, chroot), the network (apt inside the images), and
# about 4 × the allocated size of one image in free disk (images are imported
# as they are made and deleted). Counts and bytes only: the build profile of
# the binaries (ISR_BIN) does not change them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then
  img_mib=${IMG_MIB:-1024}; days=${DAYS:-2}
  flavours=${FLAVOURS:-"py=python3 web=nginx-light,curl"}
else
  img_mib=${IMG_MIB:-2048}; days=${DAYS:-7}
  flavours=${FLAVOURS:-"browser=firefox-esr office=libreoffice-writer-nogui dev=python3,perl,vim-nox,git,less"}
fi
chunk_kib=${CHUNK_KIB:-"64 128 512"}
base_tree=${BASE_TREE:-/var/cache/isr-tests/nspawn-base}
[ -x "$base_tree/usr/lib/systemd/systemd" ] || {
  echo "needs the Debian minbase at $base_tree: run cargo test --test systemd_units once (it debootstraps it), or set BASE_TREE" >&2
  exit 1
}
need mkfs.ext4 "apt-get install e2fsprogs"
need chroot "coreutils"
need strace "apt-get install strace"
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd)

work=$(mktemp -d "${TMPDIR:-/tmp}/isr-dedup.XXXXXX")
cleanup() {
  set +e
  stop_machines
  awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  losetup -a 2>/dev/null | awk -F: -v w="$work" 'index($0, w) {print $1}' | xargs -r -n1 losetup -d 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n\n[fetch]\nprefetch = false\n\n[upload]\ntrickle = false\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
isrctl() { "$bin/isrctl" "$@"; }
machine importer
mkdir -p "$work/debs/partial" "$work/m"
report=${REPORT:-$work/report.md}

# --- images -------------------------------------------------------------------
# Mount an image at $work/m with what apt in a chroot needs.
open_image() {
  mount -o loop "$1" "$work/m"
  mount -t proc proc "$work/m/proc"
  mount --bind /dev "$work/m/dev"
  mount --bind "$work/debs" "$work/m/var/cache/apt/archives"
  cp /etc/resolv.conf "$work/m/etc/resolv.conf" 2>/dev/null || true
  printf '#!/bin/sh\nexit 101\n' > "$work/m/usr/sbin/policy-rc.d"; chmod +x "$work/m/usr/sbin/policy-rc.d"
}
close_image() {
  rm -f "$work/m/usr/sbin/policy-rc.d"
  umount "$work/m/var/cache/apt/archives" "$work/m/dev" "$work/m/proc"
  umount "$work/m"
}
in_image() { chroot "$work/m" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
apt_install() { in_image apt-get install -y -qq --no-install-recommends "$@" > "$work/apt.log" 2>&1 || { tail -20 "$work/apt.log" >&2; exit 1; }; }

# A day of simulated use: logs grow, a browser-like cache churns, /etc is
# edited, packages come and go. Deterministic for a given day.
use_one_day() {
  local d=$1 root=$work/m
  python3 - "$root" "$d" <<'PY'
import os, random, sys
root, day = sys.argv[1], int(sys.argv[2])
rng = random.Random(day)
def p(*a): return os.path.join(root, *a)
os.makedirs(p("var/log/kiosk"), exist_ok=True)
# 6 MB of application log lines, 4 MB of a journal-like binary file.
with open(p("var/log/kiosk/app.log"), "a") as f:
    for i in range(60000):
        f.write(f"2026-12-{day:02d}T{9 + i // 7200:02d}:{i // 120 % 60:02d}:{i % 60:02d} kiosk[{1000 + rng.randrange(50)}]: "
                f"page {rng.randrange(10**6)} served in {rng.randrange(900)} ms, session {rng.getrandbits(64):016x}\n")
os.makedirs(p("var/log/journal"), exist_ok=True)
with open(p("var/log/journal", f"system@{day}.journal"), "wb") as f:
    for _ in range(64):
        f.write(rng.randbytes(32 << 10) + bytes(32 << 10))
# Browser-like cache: half of yesterday's entries go, 12 MB of new ones come.
cache = p("home/kiosk/.cache/browser")
os.makedirs(cache, exist_ok=True)
for name in sorted(os.listdir(cache)):
    if rng.random() < 0.5:
        os.remove(os.path.join(cache, name))
for i in range(300):
    with open(os.path.join(cache, f"d{day}-{i:03d}"), "wb") as f:
        f.write(rng.randbytes(rng.randrange(4 << 10, 76 << 10)))
# A document edited in place, a few /etc files.
os.makedirs(p("home/kiosk/Documents"), exist_ok=True)
doc = p("home/kiosk/Documents/notes.txt")
with open(doc, "a") as f:
    f.write("".join(f"day {day} note {rng.getrandbits(48):x}\n" for _ in range(20000)))
with open(p("etc/motd"), "w") as f:
    f.write(f"kiosk, day {day}\n")
with open(p("etc/hostname"), "w") as f:
    f.write(f"kiosk-{day:02d}\n")
PY
  # Log rotation on day 3, packages on even days, one removed on day 5,
  # apt's lists refreshed on day 7.
  if [ "$d" = 3 ] && [ -f "$root/var/log/kiosk/app.log" ]; then
    gzip -f -n "$root/var/log/kiosk/app.log"; mv "$root/var/log/kiosk/app.log.gz" "$root/var/log/kiosk/app.log.1.gz"
  fi
  local week=(jq htop tree rsync)
  if [ $((d % 2)) = 0 ]; then apt_install "${week[$(((d / 2 - 1) % 4))]}"; fi
  if [ "$d" = 5 ]; then in_image apt-get purge -y -qq jq > /dev/null 2>&1 || true; fi
  if [ "$d" = 7 ]; then in_image apt-get update -qq > /dev/null 2>&1 || true; fi
}

# --- imports ------------------------------------------------------------------
# One store per chunk size; per step a row in $work/steps.tsv:
# chunk step image-bytes allocated stored-alone uploaded objects store-bytes
for c in $chunk_kib; do isrctl --store "$work/store$c" init > /dev/null; done
: > "$work/steps.tsv"
import_step() { # step parcel image [import options...]
  local step=$1 parcel=$2 image=$3; shift 3
  local size alloc; size=$(stat -c %s "$image"); alloc=$(( $(stat -c %b "$image") * 512 ))
  mkdir -p "$work/in"; ln -f "$image" "$work/in/disk.img"
  local c
  for c in $chunk_kib; do
    local opts=("$@")
    [ "${opts[0]:-}" = --new-version ] || opts+=(--chunk-size $((c * 1024)))
    local out; out=$(isrctl --store "$work/store$c" --json -q import "${opts[@]}" "$parcel" "$work/in/disk.img")
    local stored uploaded; stored=$(echo "$out" | json 'd["stored_bytes"]'); uploaded=$(echo "$out" | json 'd["uploaded_bytes"]')
    local objects bytes
    objects=$(find "$work/store$c/chunks" -type f | wc -l)
    bytes=$(find "$work/store$c/chunks" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$step" "$size" "$alloc" "$stored" "$uploaded" "$objects" "$bytes" >> "$work/steps.tsv"
    say "$step @ ${c} KiB: stored alone $(mb "$stored") MB, uploaded $(mb "$uploaded") MB, store $(mb "$bytes") MB in $objects objects"
  done
  rm -f "$work/in/disk.img"
}

say "base image: $base_tree in ext4, $img_mib MiB"
cp -a "$base_tree" "$work/rootfs"
rm -f "$work/rootfs"/var/cache/apt/archives/*.deb
truncate -s "${img_mib}M" "$work/base.img"
# A fixed UUID and hash seed: the same tree gives the same image.
mkfs.ext4 -q -F -U 6b1c3c1e-5a0e-4f7e-9d2a-1f0e5c3b2a10 -E hash_seed=6b1c3c1e-5a0e-4f7e-9d2a-1f0e5c3b2a10 -d "$work/rootfs" "$work/base.img"
rm -rf "$work/rootfs"
import_step base base "$work/base.img"

first=""
for f in $flavours; do
  name=${f%%=*}; pkgs=${f#*=}
  say "flavour $name: base + ${pkgs//,/ }"
  cp --sparse=always "$work/base.img" "$work/$name.img"
  open_image "$work/$name.img"
  # shellcheck disable=SC2086
  apt_install ${pkgs//,/ }
  in_image apt-get clean
  close_image
  import_step "$name" "$name" "$work/$name.img" --dedup-with base
  if [ -z "$first" ]; then first=$name; else rm -f "$work/$name.img"; fi
done
rm -f "$work/base.img"

prev=$work/$first.img
for d in $(seq "$days"); do
  say "day $d of $first"
  cp --sparse=always "$prev" "$work/day$d.img"
  open_image "$work/day$d.img"
  use_one_day "$d"
  in_image apt-get clean
  close_image
  import_step "day$d" "$first" "$work/day$d.img" --new-version
  rm -f "$prev"; prev=$work/day$d.img
done
rm -f "$prev"
rm -rf "$work/debs"

# --- working set and full fetch, per chunk size -------------------------------
# The start-up workload: what a kiosk's boot and application start read.
startup() {
  local r=$1
  chroot "$r" /usr/lib/systemd/systemd --version > /dev/null
  chroot "$r" /usr/bin/systemctl --version > /dev/null
  chroot "$r" /usr/bin/apt-get --version > /dev/null
  chroot "$r" /usr/bin/dpkg-query -W > /dev/null
  find "$r/etc" "$r/usr/lib/systemd" -xdev -type f -size -1M -exec cat {} + > /dev/null 2>&1 || true
  case $first in
    browser) HOME=/tmp timeout 120 chroot "$r" /usr/bin/firefox-esr --headless --screenshot /tmp/shot.png about:blank > /dev/null 2>&1 || true ;;
    office) HOME=/tmp timeout 120 chroot "$r" /usr/bin/soffice --headless --version > /dev/null 2>&1 || true ;;
    *) chroot "$r" /usr/bin/python3 -c 'import json, ssl, urllib.request, http.server' 2> /dev/null || chroot "$r" /bin/bash -c 'ls -l / >/dev/null' ;;
  esac
}
: > "$work/ws.tsv"
for c in $chunk_kib; do
  machine "ws$c"
  export ISR_STORE=$work/store$c
  isrctl resume --vmm none "$first" > /dev/null 2>&1
  mnt=$ISR_RUNTIME_DIR/mnt/$first
  drop_caches
  dev=$(losetup -r -f --show "$mnt/disk.img")
  mkdir -p "$work/root$c"
  mount -o ro,noload "$dev" "$work/root$c"
  mount -t tmpfs tmpfs "$work/root$c/tmp"
  mount -t proc proc "$work/root$c/proc"
  mount --bind /dev "$work/root$c/dev"
  startup "$work/root$c"
  st=$(isrctl --json status "$first")
  ws_chunks=$(echo "$st" | json 's[0]["fetch"]["fetched_chunks"]'); ws_bytes=$(echo "$st" | json 's[0]["fetch"]["fetched_bytes"]')
  umount "$work/root$c/dev" "$work/root$c/proc" "$work/root$c/tmp" "$work/root$c"
  losetup -d "$dev"
  isrctl hoard "$first" > /dev/null 2>&1
  st=$(isrctl --json status "$first")
  all_chunks=$(echo "$st" | json 's[0]["fetch"]["fetched_chunks"]'); all_bytes=$(echo "$st" | json 's[0]["fetch"]["fetched_bytes"]')
  isrctl discard "$first" > /dev/null 2>&1
  # An ordinary morning: the same machine resumes again, every chunk in its
  # cache. The store operations of isrctl and isrfsd meanwhile, from their
  # system calls on the local store's files.
  pid=$(cat "$ISR_RUNTIME_DIR/isrfsd.pid")
  strace -f -qq -s 4096 -e trace=openat,linkat,unlinkat,newfstatat,statx -o "$work/daemon.trace" -p "$pid" & tracer=$!
  sleep 1
  strace -f -qq -s 4096 -e trace=openat,linkat,unlinkat,newfstatat,statx -o "$work/isrctl.trace" \
    "$bin/isrctl" resume --vmm none "$first" > /dev/null 2>&1
  sleep 1; kill "$tracer"; wait "$tracer" 2> /dev/null || true
  warm_fetched=$(isrctl --json status "$first" | json 's[0]["fetch"]["fetched_chunks"]')
  warm=$(python3 - "$work/store$c" "$work/daemon.trace" "$work/isrctl.trace" <<'PY'
import os, re, sys
root = os.path.realpath(sys.argv[1]) + "/"
ops = {"get": 0, "get_bytes": 0, "head": 0, "list": 0, "put": 0, "delete": 0}
for trace in sys.argv[2:]:
    for line in open(trace):
        m = re.search(r'(openat|linkat|unlinkat|newfstatat|statx)\(.*?"(' + re.escape(root) + r'[^"]*)"(.*)', line)
        if not m or "resumed>" in line:
            continue
        call, path, rest = m.groups()
        name = os.path.basename(path)
        if call == "openat":
            if "O_DIRECTORY" in rest:
                ops["list"] += 1
            elif "O_CREAT" in rest or "O_WRONLY" in rest:
                pass  # a put's temporary file; counted at its link
            elif path != root.rstrip("/"):
                ops["get"] += 1
                if "= -1" not in rest and os.path.isfile(path):
                    ops["get_bytes"] += os.path.getsize(path)
        elif call == "linkat":
            ops["put"] += 1
        elif call == "unlinkat":
            if not name.startswith(".tmp-"):
                ops["delete"] += 1
        else:
            ops["head"] += 1
print("\t".join(str(ops[k]) for k in ("get", "get_bytes", "head", "list", "put", "delete")))
PY
)
  isrctl discard "$first" > /dev/null 2>&1
  kill "$pid" 2>/dev/null || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$ws_chunks" "$ws_bytes" "$all_chunks" "$all_bytes" "$warm_fetched" "$warm" >> "$work/ws.tsv"
  say "@ ${c} KiB: start-up working set $ws_chunks chunks, $(mb "$ws_bytes") MB; everything $all_chunks chunks, $(mb "$all_bytes") MB"
  say "@ ${c} KiB: warm resume: $warm_fetched chunks fetched; store get, get bytes, head, list, put, delete: $warm"
  unset ISR_STORE
done

# --- report -------------------------------------------------------------------
python3 - "$work/steps.tsv" "$work/ws.tsv" "$report" "$flavours" "$first" <<'PY'
import sys
steps_path, ws_path, report, flavours, first = sys.argv[1:6]
steps = [l.rstrip("\n").split("\t") for l in open(steps_path) if l.strip()]
ws = {r[0]: [int(x) for x in r[1:]] for r in (l.split() for l in open(ws_path) if l.strip())}
sizes = sorted({int(r[0]) for r in steps})
names = [f.split("=")[0] for f in flavours.split()]
mb = lambda b: f"{b / 1e6:,.1f}"
out = []
for c in sizes:
    rows = [r for r in steps if int(r[0]) == c]
    out.append(f"\n### {c} KiB chunks\n")
    out.append("| step | image size | allocated | stored alone | uploaded | store objects | store MB | Σ allocated | Σ stored alone | dedup (Σ stored alone ÷ store) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    sa = ss = 0
    for r in rows:
        _, step, size, alloc, stored, up, objs, byts = r
        sa += int(alloc); ss += int(stored)
        out.append(f"| {step} | {int(size) / 2**30:.1f} GiB | {mb(int(alloc))} | {mb(int(stored))} | {mb(int(up))} | {int(objs):,} | {mb(int(byts))} | {mb(sa)} | {mb(ss)} | {ss / int(byts):.2f} |")
    if str(c) in ws:
        wc, wb, ac, ab, wf, g, gb, h, li, pu, de = ws[str(c)]
        out.append(f"\nLast version of `{first}`, empty cache: start-up working set {wc:,} chunks, {mb(wb)} MB; everything {ac:,} chunks, {mb(ab)} MB.")
        out.append(f"Warm resume on the same machine: {wf} chunks fetched; store operations: {g} GET ({gb / 1e3:,.0f} kB), {h} HEAD, {li} directory reads (LIST), {pu} PUT, {de} DELETE.")
open(report, "w").write("\n".join(out) + "\n")
print("\n".join(out), file=sys.stderr)

def row(fig, val, unit, blabel, bval, target=""):
    ratio = f"{val / bval:.2f}" if bval else ""
    print(f"ROW\t{fig}\t{val}\t{unit}\t{blabel}\t{bval}\t{ratio}\t{target}")
ref = 128 if 128 in sizes else sizes[0]
for c in sizes:
    rows = {r[1]: r for r in steps if int(r[0]) == c}
    last_flavour = rows[names[-1]]
    shared = int(last_flavour[7])
    own = sum(int(rows[n][4]) for n in ["base"] + names)
    row(f"store MB, base + {len(names)} flavours, one dedup secret, {c} KiB chunks", round(shared / 1e6, 1), "MB",
        "each parcel its own secret", round(own / 1e6, 1))
    last = list(rows.values())[-1]
    alone = sum(int(r[4]) for r in rows.values())
    row(f"store MB after {len(rows)} versions (base, flavours, days), {c} KiB chunks", round(int(last[7]) / 1e6, 1), "MB",
        "Σ every version stored alone", round(alone / 1e6, 1))
ref_rows = [r for r in steps if int(r[0]) == ref]
for c in sizes:
    if c == ref:
        continue
    last = [r for r in steps if int(r[0]) == c][-1]
    row(f"store objects at {c} KiB", int(last[6]), "objects", f"at {ref} KiB", int(ref_rows[-1][6]))
    row(f"store MB at {c} KiB", round(int(last[7]) / 1e6, 1), "MB", f"at {ref} KiB", round(int(ref_rows[-1][7]) / 1e6, 1))
    if str(c) in ws and str(ref) in ws:
        row(f"start-up working set, requests at {c} KiB", ws[str(c)][0], "requests", f"at {ref} KiB", ws[str(ref)][0])
        row(f"start-up working set, MB at {c} KiB", round(ws[str(c)][1] / 1e6, 1), "MB", f"at {ref} KiB", round(ws[str(ref)][1] / 1e6, 1))
        row(f"fetch everything, requests at {c} KiB", ws[str(c)][2], "requests", f"at {ref} KiB", ws[str(ref)][2])
        row(f"warm resume, MB read from the store at {c} KiB", round(ws[str(c)][6] / 1e6, 2), "MB", f"at {ref} KiB", round(ws[str(ref)][6] / 1e6, 2))
PY
