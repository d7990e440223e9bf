#!/usr/bin/env bash
# The README's main job: build isrctl, make a ~1 GiB disk image that mixes random
# data, zeros and compressible text, then import → ls → info → export → verify it
# in a throwaway local store, check the export is byte-identical, and print
# import throughput next to `cat` and `zstd -3 -T0` reading the same file in the
# same run.
#
#   bash examples/roundtrip.sh            # SIZE_MIB=1024 by default
#   SIZE_MIB=256 KEEP=1 bash examples/roundtrip.sh
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${SIZE_MIB:-1024}

echo "== building isrctl (release)"
cargo build --release --quiet -p isrctl
isrctl=$PWD/target/release/isrctl

work=$(mktemp -d "${TMPDIR:-/tmp}/isr-roundtrip.XXXXXX")
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$work"' EXIT; else echo "keeping $work"; fi
export ISR_STORE="$work/store" ISR_PASSPHRASE="example passphrase" ISR_CONFIG=/dev/null
export ISR_STATE_DIR="$work/state" ISR_CACHE_DIR="$work/cache" ISR_RUNTIME_DIR="$work/run"

echo "== making a ${size_mib} MiB disk image in $work/vm"
mkdir -p "$work/vm"
image="$work/vm/disk.img"
quarter=$((size_mib / 4))
head -c "${quarter}M" /dev/urandom > "$image"                                   # incompressible
truncate -s "$((2 * quarter))M" "$image"                                         # a hole (zeros)
{ yes "isr example: the quick brown fox jumps over the lazy dog" || true; } | head -c "${quarter}M" >> "$image"  # text
head -c 131072 /dev/urandom > "$work/block"
for _ in $(seq 1 $((quarter * 8))); do cat "$work/block"; done >> "$image"        # one block, repeated
printf '[vm]\nmemory = "512M"\ncpus = 1\n' > "$work/vm/vm.toml"

rate() { python3 -c "import sys; print(f'{$1 / $2 / 1e6:.0f} MB/s')"; }
now() { date +%s.%N; }
bytes=$(stat -c %s "$image")

echo "== isrctl import example $work/vm"
"$isrctl" import example "$work/vm"
import_json=$("$isrctl" --json import --new-version example "$work/vm")
echo "   (a second import of the same files uploads $(python3 -c "import json,sys; print(json.load(sys.stdin)['uploaded_chunks'])" <<<"$import_json") chunks)"

echo "== isrctl ls / info"
"$isrctl" ls
"$isrctl" info example

echo "== isrctl export example@1 $work/out"
"$isrctl" export example@1 "$work/out"
cmp "$image" "$work/out/disk.img"
cmp "$work/vm/vm.toml" "$work/out/vm.toml"
echo "   export is byte-identical"

echo "== isrctl verify --deep example"
"$isrctl" verify --deep example

echo "== throughput on the same file, same run (file in page cache for all three)"
rm -rf "$work/store2"
start=$(now); ISR_STORE="$work/store2" "$isrctl" init > /dev/null; ISR_STORE="$work/store2" "$isrctl" import example "$work/vm" > /dev/null; end=$(now)
isr_rate=$(rate "$bytes" "$(python3 -c "print($end - $start)")")
start=$(now); cat "$image" > /dev/null; end=$(now)
cat_rate=$(rate "$bytes" "$(python3 -c "print($end - $start)")")
if command -v zstd > /dev/null; then
  start=$(now); zstd -q -3 -T0 -f "$image" -o /dev/null; end=$(now)
  zstd_rate=$(rate "$bytes" "$(python3 -c "print($end - $start)")")
else
  zstd_rate="(zstd not installed: apt-get install zstd)"
fi
printf '   %-28s %s\n' "isrctl import (new store)" "$isr_rate" "cat FILE > /dev/null" "$cat_rate" "zstd -3 -T0 FILE -o /dev/null" "$zstd_rate"
echo "== done: import, ls, info, export, verify all succeeded"
