#!/usr/bin/env bash
# The side-by-side benchmark harness (issue #6): every figure next to a baseline
# measured in the same run, medians of RUNS runs, as one markdown table.
#
#   sudo bash benches/harness.sh              # all sections, RUNS=3, PROFILE=wan
#   SECTIONS="mount vm" sudo bash benches/harness.sh
#   BASELINE_REV=main~3 SECTIONS=mount sudo bash benches/harness.sh
#
# With BASELINE_REV, the same sections also run on that commit's release build
# (built from `git archive` under target/baseline/), first, and a second table
# puts each figure of this tree next to the same figure of that commit: a
# refactor shows there that it costs nothing.
#
# Sections (each a script beside this one, usable alone; they print ROW lines,
# see benches/lib.sh):
#   import     isrctl import of a 1 GiB disk-like image vs cat, zstd -3 -T0 and
#              casync make on the same file (benches/peers.sh)
#   mount      warm sequential and 4 KiB random reads, re-reads with the page
#              cache kept, sequential and 4 KiB random + fsync writes vs native
#              and bindfs; isrfsd CPU s/GiB read and write amplification vs
#              bindfs's; isrfsd peak RSS for a 16 GiB image (benches/mount.sh)
#   link       cold sequential read over the link vs its rate; casync mount and
#              QEMU copy-on-read over HTTP behind the same link (benches/link-read.sh)
#   vm         the test guest's resume-to-running over the link, cold and warm;
#              demand latency under prefetch load (benches/vm-link.sh)
#   checkin    bytes a checkin uploads vs the ideal (examples/checkin-bench.sh)
#   lazy       lazy memory vs image mode vs plain QEMU: resume-to-running and
#              to first guest progress for 256 MiB to 4 GiB guests over wan
#              and dsl, suspend uploads, guest memory writes (benches/lazy-memory.sh;
#              PROFILES and SIZES_MIB choose)
#   guestio    fio inside the test guest on its virtio disk (sequential read and
#              write, 4 KiB random read and write) with the disk on the mount,
#              every chunk local, vs on a local raw file (benches/guest-io.sh;
#              TCG: CPU-bound, small sizes)
#   dedup      docs/scale.md's measured inputs: dedup of real Debian images (a
#              base, flavours, a week of use) and 64/128/512 KiB chunks: store
#              bytes and objects, start-up working set (benches/dedup.sh;
#              QUICK=1 for a short run; not in the default list: it needs the
#              Debian mirror and ~4 GB of scratch disk)
#   cachetier  N fresh machines resume + read one parcel over the link through
#              an nginx proxy_cache (read_url) vs straight from the store: origin
#              requests, origin MB and time (benches/cache-tier.sh; SIZE_MIB,
#              MACHINES choose)
#   bigimage   a 1 TiB sparse image with 20 GiB written (IMAGE_GIB, WRITTEN_GIB):
#              import, resume, cold random reads, checkin, peak RSS, store bytes
#              per version vs a 1 % image and native reads (benches/big-image.sh;
#              not in the default SECTIONS: it needs ≈ 21 GB of disk)
#   manifest   manifest bytes of a 100 GiB image, format 2 (root + segments) vs
#              format 1 (whole): stored per version and uploaded by a 1 %
#              checkin in 1, 16, 256 regions or scattered, vs the issue's goal
#              (examples/manifest_tree.rs; computed from the real encoders)
#   resumetree resume to mounted of a 100 GiB image over dsl, format 2 (mounts
#              after the root) vs a 1 MiB image (the goal: + 3 RTT + root)
#              and vs format 1 (the whole manifest first) (benches/resume-tree.sh)
# Installs what it needs (.ci/install-deps.sh, bindfs, fio, casync, iptables).
# Needs root (FUSE, drop_caches, network namespaces). Timing is only reported:
# nothing here passes or fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
sections=${SECTIONS:-import mount link vm checkin lazy guestio cachetier manifest resumetree}
export RUNS=${RUNS:-3} PROFILE=${PROFILE:-wan}

bash .ci/install-deps.sh --without-libvirt >&2
missing=()
for t in bindfs fio casync iptables; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq "${missing[@]}" >&2 || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >&2; }
fi
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts:$PATH"
cargo build --release --quiet -p isrctl -p isrfsd >&2 && cargo build --release --quiet -p isr --example delay_proxy --example qemu_baseline >&2

rows=$(mktemp); base_rows=$(mktemp); trap 'rm -f "$rows" "$base_rows"' EXIT
baseline_rev=${BASELINE_REV:-}
if [ -n "$baseline_rev" ]; then
  rev=$(git rev-parse --short "$baseline_rev^{commit}")
  src=target/baseline/src-$rev
  if [ ! -d "$src" ]; then
    mkdir -p "$src.tmp" && git archive "$rev" | tar -x -C "$src.tmp" && mv "$src.tmp" "$src"
  fi
  say "building $baseline_rev ($rev) for the baseline"
  (cd "$src" && CARGO_TARGET_DIR=$PWD/../release-target cargo build --release --quiet -p isrctl -p isrfsd >&2 \
    && CARGO_TARGET_DIR=$PWD/../release-target cargo build --release --quiet -p isr --example delay_proxy --example qemu_baseline >&2)
  base_bin=$PWD/target/baseline/release-target/release
fi
import_section() {
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/isr-import.XXXXXX")
  # A disk-like image: a quarter each random, zeros, text, one repeated block.
  python3 - "$work/disk.img" <<'PY'
import os, sys
q = 256 << 20
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(q)); f.seek(2 * q)
    line = b"isr import benchmark: some compressible text, line after line\n"
    f.write((line * (q // len(line) + 1))[:q])
    f.write((os.urandom(4096) * (q // 4096)))
PY
  mkdir -p "$work/src"; mv "$work/disk.img" "$work/src/"
  printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/config.toml"
  cat "$work/src/disk.img" > /dev/null
  local t=()
  for r in $(seq "$RUNS"); do
    local t0 t1
    t0=$(now)
    # A named store must exist (init); a baseline built before init existed creates it on import.
    ISR_CONFIG=$work/config.toml ISR_STORE=$work/store$r "$bin/isrctl" init > /dev/null 2>&1 || true
    ISR_CONFIG=$work/config.toml ISR_PASSPHRASE=bench ISR_STORE=$work/store$r "$bin/isrctl" import vm "$work/src" > /dev/null
    t1=$(now)
    t+=("$(python3 -c "print(f'{(1 << 30) / 1e6 / ($t1 - $t0):.0f}')")")
  done
  local isr; isr=$(printf '%s\n' "${t[@]}" | median)
  PEERS=import RUNS=$RUNS bash benches/peers.sh "$work/src/disk.img" > "$work/peers.tsv" 2> "$work/peers.err" || tail "$work/peers.err" >&2
  local f
  for f in cat zstd3 casync_make; do
    local v; v=$(awk -F'\t' -v f="import.$f" '$1 == f {print $2}' "$work/peers.tsv")
    local label; case $f in cat) label="cat";; zstd3) label="zstd -3 -T0";; casync_make) label="casync make";; esac
    [ -n "$v" ] && row "import of a 1 GiB disk image, MB/s" "$isr" MB/s "$label" "$v" ""
  done
  row "import of a 1 GiB disk image, MB/s" "$isr" MB/s "300 MB/s target" 300 ">= 1.0"
  rm -rf "$work"
}
checkin_section() {
  # examples/checkin-bench.sh prints its own table; take the 5 % row of it.
  local out; out=$(bash examples/checkin-bench.sh 2>/dev/null)
  echo "$out" | python3 -c '
import re, sys
for line in sys.stdin:
    m = re.match(r"\|\s*5 %\s*\|\s*([\d.]+) MiB\s*\|\s*([\d.]+) MiB\s*\|", line)
    if m:
        print("ROW\tcheckin after 5 %% random 64 KiB writes, MiB uploaded\t%s\tMiB\tideal (distinct changed chunks)\t%s\t%.3f\t<= 1.05" % (m[1], m[2], float(m[1]) / float(m[2])))'
}

run_section() {
  case $1 in
    import) import_section ;;
    mount) bash benches/mount.sh ;;
    link) bash benches/link-read.sh ;;
    vm) bash benches/vm-link.sh ;;
    checkin) checkin_section ;;
    lazy) bash benches/lazy-memory.sh ;;
    guestio) bash benches/guest-io.sh ;;
    dedup) bash benches/dedup.sh ;;
    cachetier) bash benches/cache-tier.sh ;;
    bigimage) bash benches/big-image.sh ;;
    manifest) cargo build --release --quiet -p isr --example manifest_tree >&2 && target/release/examples/manifest_tree ;;
    resumetree) bash benches/resume-tree.sh ;;
    *) echo "unknown section $1" >&2; exit 2 ;;
  esac
}
for s in $sections; do
  if [ -n "$baseline_rev" ]; then
    say "section $s on $baseline_rev ($rev)"
    (export ISR_BIN=$base_bin; bin=$base_bin; run_section "$s") | tee -a "$base_rows" | grep '^ROW' >&2 || true
  fi
  say "section $s"
  t0=$(now)
  run_section "$s" | tee -a "$rows" | grep '^ROW' >&2 || true
  say "section $s took $(elapsed "$t0" "$(now)") s"
done

cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "Machine: $(nproc) cores ($cpu), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r); link profile $PROFILE; medians of $RUNS runs; $(date -u +%Y-%m-%d)."
echo
echo "| figure | isr | baseline | ratio | target |"
echo "|---|---|---|---|---|"
grep '^ROW' "$rows" | while IFS=$'\t' read -r _ figure value unit label base ratio target; do
  echo "| $figure | $value | $label $base | $ratio | ${target:--} |"
done
if [ -n "$baseline_rev" ]; then
  echo
  echo "This tree against $baseline_rev ($rev), same run:"
  echo
  echo "| figure | this tree | $rev | ratio |"
  echo "|---|---|---|---|"
  python3 - "$rows" "$base_rows" <<'PY'
import sys
def figures(path):
    out = {}
    for line in open(path):
        if line.startswith("ROW\t"):
            f = line.rstrip("\n").split("\t")
            out.setdefault(f[1], (f[2], f[3]))
    return out
new, old = figures(sys.argv[1]), figures(sys.argv[2])
for figure, (value, unit) in new.items():
    base = old.get(figure, ("", ""))[0]
    ratio = f"{float(value) / float(base):.2f}" if value and base and float(base) else "-"
    print(f"| {figure} | {value} {unit} | {base or '-'} {unit} | {ratio} |")
PY
fi
