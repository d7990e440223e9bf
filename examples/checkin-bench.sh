#!/usr/bin/env bash
# Checkin figures for issue #4's closing note, measured in one run on a local
# store (real FUSE mount, so run as root or with fuse3): resume a 1 GiB disk
# image, dirty 1 %, 5 % and 25 % of it with random 64 KiB writes, check in, and
# print bytes uploaded against the ideal (compressed size of the distinct
# changed chunks) and the time checkin took; then the same 5 % with trickle
# upload on, checked in after a quiet period, against trickle off.
#
#   bash examples/checkin-bench.sh                 # local store, SIZE_MIB=1024
#   LINK=100mbit bash examples/checkin-bench.sh    # SeaweedFS behind a shaped link, SIZE_MIB=256
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/lib/link.sh
if [ -n "${LINK:-}" ]; then size_mib=${SIZE_MIB:-256}; else size_mib=${SIZE_MIB:-1024}; fi
cargo build --release --quiet -p isrctl -p isrfsd
isrctl=$PWD/target/release/isrctl
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-checkin.XXXXXX")
cleanup() { ISR_RUNTIME_DIR="$work/run" "$isrctl" status >/dev/null 2>&1 || true
            [ -f "$work/run/isrfsd.pid" ] && kill "$(cat "$work/run/isrfsd.pid")" 2>/dev/null; sleep 1
            link_down; rm -rf "$work"; }
trap cleanup EXIT
export ISR_STORE="$work/store" ISR_PASSPHRASE="bench" ISR_CONFIG="$work/config.toml"
export ISR_STATE_DIR="$work/state" ISR_CACHE_DIR="$work/cache" ISR_RUNTIME_DIR="$work/run"
"$isrctl" init > /dev/null

mkdir -p "$work/vm"
head -c "$((size_mib / 2))M" /dev/urandom > "$work/vm/disk.img"
{ yes "isr checkin bench: some compressible text" || true; } | head -c "$((size_mib / 2))M" >> "$work/vm/disk.img"

dirty() { # mount percent seed: random 64 KiB writes covering PERCENT of the image
  python3 - "$1/disk.img" "$2" "$3" <<'PY'
import os, random, sys
path, percent, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed); size = os.path.getsize(path); block = 65536
with open(path, "r+b") as f:
    for _ in range(int(size * percent / 100 / block)):
        f.seek(rng.randrange(0, size - block) // 4096 * 4096); f.write(os.urandom(block))
    f.flush(); os.fsync(f.fileno())
PY
}
ideal() { # version: stored bytes of chunks in VERSION that VERSION-1 lacks
  "$isrctl" --json history vm | python3 -c "import json,sys; h=json.load(sys.stdin); print(h['versions'][$1-1]['new_bytes'])"
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/base.toml"
cp "$work/base.toml" "$ISR_CONFIG"
if [ -n "${LINK:-}" ]; then
  link_up "$work" "$LINK"; cp "$ISR_CONFIG" "$work/base.toml"
  echo "store: SeaweedFS behind a $LINK tbf link; image ${size_mib} MiB"
else
  echo "store: local directory; image ${size_mib} MiB"
fi
{ cat "$work/base.toml"; printf '[upload]\ntrickle = false\n'; } > "$ISR_CONFIG"
"$isrctl" import vm "$work/vm" >/dev/null
echo "| dirty | uploaded | ideal (compressed distinct changed chunks) | ratio | checkin time |"
echo "|---|---|---|---|---|"
version=1
for percent in 1 5 25; do
  mount=$("$isrctl" resume vm)
  dirty "$mount" "$percent" "$percent"
  report=$("$isrctl" --json checkin vm)
  version=$((version + 1))
  uploaded=$(echo "$report" | field uploaded_bytes); seconds=$(echo "$report" | field seconds)
  want=$(ideal "$version")
  python3 -c "print(f'| {$percent} % | {$uploaded/2**20:.1f} MiB | {$want/2**20:.1f} MiB | {$uploaded/$want:.3f} | {$seconds:.2f} s |')"
done

echo
echo "| 5 % dirty, then checkin | checkin time | uploaded by checkin |"
echo "|---|---|---|"
for trickle in false true; do
  { cat "$work/base.toml"; printf '[upload]\ntrickle = %s\nquiet_secs = 2\n' "$trickle"; } > "$ISR_CONFIG"
  "$isrctl" status >/dev/null 2>&1 || true
  [ -f "$work/run/isrfsd.pid" ] && kill "$(cat "$work/run/isrfsd.pid")" && sleep 1   # restart with the new config
  mount=$("$isrctl" resume vm 2>/dev/null)
  dirty "$mount" 5 "$((50 + ${#trickle}))"
  if [ "$trickle" = true ]; then
    until "$isrctl" --json status vm | python3 -c "import json,sys; s=json.load(sys.stdin)['sessions'][0]; sys.exit(0 if s['pending_chunks']==0 and s['dirty_bytes']==0 else 1)"; do sleep 1; done
  else
    sleep 3
  fi
  start=$(date +%s.%N)
  report=$("$isrctl" --json checkin vm)
  end=$(date +%s.%N)
  uploaded=$(echo "$report" | field uploaded_bytes)
  python3 -c "print(f'| trickle {\"on, after it drained\" if \"$trickle\"==\"true\" else \"off\"} | {$end-$start:.2f} s | {$uploaded/2**20:.1f} MiB |')"
done
