#!/usr/bin/env bash
# Section of benches/harness.sh: how long a cold resume takes to mount a
# 100 GiB image (IMAGE_GIB) over dsl (PROFILE), by manifest format: format 2
# mounts once it has the root and fetches segments as reads need them;
# format 1 downloads the whole manifest first. The baseline is the same
# resume of the parcel's first version, a 1 MiB image: everything a resume
# does but the big manifest. The issue's goal for format 2: at most the
# baseline + 3 RTT + the root's transfer time.
# The big versions come from examples/tree_version.rs (written from inside
# the link's namespace, past the shaping); their chunks are not stored,
# nothing reads them. Prints ROW lines (benches/lib.sh). Needs root, FUSE,
# weed, ip, tc.
#   sudo bash benches/resume-tree.sh     # PROFILE=dsl IMAGE_GIB=100 RUNS=3
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$bench_root/examples/lib/link.sh"
profile=${PROFILE_RESUME_TREE:-dsl}; gib=${IMAGE_GIB:-100}
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-resumetree.XXXXXX")
cleanup() { set +e; stop_machines; link_down; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd && cargo build --release --quiet -p isr --example delay_proxy)
(cd "$bench_root" && cargo build --release --quiet -p isr --example tree_version)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
isrctl() { "$bin/isrctl" "$@"; }

link_up "$work" "$profile"
say "resume to mounted over $profile (RTT $LINK_RTT_MS ms): $gib GiB, format 2 vs format 1"
mkdir -p "$work/src"; head -c 1M /dev/urandom > "$work/src/disk.img"
machine A; isrctl init > /dev/null; isrctl import --chunk-size 131072 vm "$work/src" > /dev/null
# The big versions are written to weed itself, from inside the namespace.
sed "s|$LINK_ENDPOINT|$LINK_BACKEND|" "$ISR_CONFIG" > "$work/backend.toml"
read -r tree root_bytes whole whole_bytes < <(ip netns exec "$LINK_NS" \
  env ISR_CONFIG="$work/backend.toml" "$bench_root/target/release/examples/tree_version" vm "$gib")
say "version $tree: root $root_bytes bytes; version $whole: whole manifest $whole_bytes bytes"

# resume_secs VERSION RUN: a fresh machine's resume to mounted, in seconds.
resume_secs() {
  machine "B$1-$2"
  local t0 t1
  t0=$(now)
  isrctl resume --vmm none "vm@$1" > /dev/null || { tail -n 30 "$ISR_RUNTIME_DIR"/log/* >&2; exit 1; }
  t1=$(now)
  isrctl discard vm > /dev/null
  elapsed "$t0" "$t1"
}
small=(); lazy=()
[ -n "${ONLY_WHOLE:-}" ] && { resume_secs "$whole" 1; exit 0; }
for r in $(seq "$runs"); do
  small+=("$(resume_secs 1 "$r")"); lazy+=("$(resume_secs "$tree" "$r")")
  say "run $r: 1 MiB ${small[-1]} s, $gib GiB format 2 ${lazy[-1]} s"
done
eager=$(resume_secs "$whole" 1) # one run: it is the long one
say "$gib GiB format 1: $eager s"
small_s=$(printf '%s\n' "${small[@]}" | median); lazy_s=$(printf '%s\n' "${lazy[@]}" | median)
goal=$(python3 -c "print(f'{$small_s + 3 * $LINK_RTT_MS / 1e3 + $root_bytes * 8 / $LINK_RATE_BPS:.3f}')")
row "resume to mounted over $profile, $gib GiB, format 2 (s)" "$lazy_s" s "a 1 MiB image" "$small_s" "<= $goal s (+3 RTT + root)"
row "resume to mounted over $profile, $gib GiB, format 2 (s)" "$lazy_s" s "format 1 (whole manifest)" "$eager" ""
