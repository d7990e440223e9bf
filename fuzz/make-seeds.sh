#!/usr/bin/env bash
# Rebuilds fuzz/corpus/: the seed corpora of the fuzz targets, from real
# objects. Run from the repository root after `cargo build` (it uses
# target/debug/isrctl and isrfsd, and FUSE for one resume):
#
#   bash fuzz/make-seeds.sh
#
# 1. a throwaway store made by isrctl: two imports, a resume (lock), a session
#    that reads and writes, checkin (access trace), gc (the `oldest` hint);
#    its objects are copied as they are (they open with that store's keys,
#    not the fixture's the targets use: they are real formats, rejected at the
#    tag);
# 2. the committed v1 fixture store (tests/fixtures/v1) and what the library's
#    own encoders make under its keys: `cargo run --example seeds`
#    (fuzz/examples/seeds.rs);
# 3. vm.toml and config files: the test guest's and fixture's, and the
#    documented every-key examples in src/vmm/config.rs and src/config.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=fuzz/corpus
isrctl=$PWD/target/debug/isrctl
[ -x "$isrctl" ] && [ -x target/debug/isrfsd ] || { echo "run cargo build first" >&2; exit 1; }

# Everything but the regression seeds (regress-*: inputs that once found a
# defect) is made anew.
mkdir -p "$corpus"
find "$corpus" -type f ! -name 'regress-*' -delete
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-seeds.XXXXXX")
fsd_pid=
cleanup() {
    if [ -n "$fsd_pid" ]; then kill "$fsd_pid" 2> /dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
export ISR_STORE="$work/store" ISR_CONFIG="$work/config.toml" ISR_PASSPHRASE="fuzz seeds"
export ISR_STATE_DIR="$work/state" ISR_CACHE_DIR="$work/cache" ISR_RUNTIME_DIR="$work/run"
printf '[kdf]\nmemory_kib = 1024\niterations = 1\nparallelism = 1\n' > "$ISR_CONFIG"
mkdir -p "$work/vm/sub"
python3 - "$work/vm" <<'PY'
import os, sys
root = sys.argv[1]
with open(f"{root}/disk.img", "wb") as f:
    f.write(os.urandom(70000))
    f.write(bytes(200000))
    f.write(b"".join(b"isr fuzz seed line %d\n" % n for n in range(6000)))
with open(f"{root}/vm.toml", "w") as f:
    f.write('vmm = "qemu"\nmemory = "256M"\ncpus = 1\n\n[[disk]]\nfile = "disk.img"\n')
with open(f"{root}/sub/notes.txt", "w") as f:
    f.write("notes\n" * 50)
PY
"$isrctl" import --chunk-size 65536 -m first seeds "$work/vm" > /dev/null
echo more >> "$work/vm/sub/notes.txt"
"$isrctl" import --new-version -m second seeds "$work/vm" > /dev/null
mnt=$("$isrctl" resume --vmm none seeds 2> "$work/resume.log")
fsd_pid=$(sed -n 's/.*started isrfsd (pid \([0-9]*\).*/\1/p' "$work/resume.log")
parcel=$ISR_STORE/parcels/seeds
mkdir -p "$corpus/lock"
cp "$parcel/lock" "$corpus/lock/real"
cat "$mnt/sub/notes.txt" "$mnt/disk.img" > /dev/null
echo changed >> "$mnt/sub/notes.txt"
"$isrctl" checkin -m session seeds > /dev/null
"$isrctl" gc --keep-last 2 > /dev/null

copy() { mkdir -p "$corpus/$1"; cp "$2" "$corpus/$1/$3"; }
copy manifest_open "$parcel/versions/0000000002.manifest" real-v2.manifest
copy manifest_open "$parcel/versions/0000000003.manifest" real-v3.manifest
copy trace_open "$parcel/versions/0000000003.trace" real-v3.trace
copy keyslot "$parcel/keyslots/0" real-passphrase
copy parcel_toml "$parcel/parcel.toml" real
copy parcel_toml tests/fixtures/v1/store/parcels/fixture/parcel.toml fixture
copy version_hints "$parcel/versions/oldest" real-oldest
for chunk in "$ISR_STORE"/chunks/*/*; do
    [ "$(stat -c %s "$chunk")" -lt 65536 ] && copy chunk_stored "$chunk" "real-$(basename "$chunk" | cut -c1-12)"
done

cargo run --quiet --manifest-path fuzz/Cargo.toml --example seeds > /dev/null

copy vm_toml tests/fixtures/guest-vm.toml guest
copy vm_toml tests/fixtures/v1/expected/vm.toml fixture
copy vm_toml "$work/vm/vm.toml" seeds-store
copy config tests/fixtures/v1/config.toml fixture
documented() { # the ```toml block of a module doc, without the //! prefix
    awk '/^\/\/! ```toml/ { on = 1; next } on && /^\/\/! ```/ { exit } on { sub(/^\/\/! ?/, ""); print }' "$1"
}
documented src/vmm/config.rs > "$corpus/vm_toml/documented"
documented src/config.rs > "$corpus/config/documented"

find "$corpus" -type f | sort | while read -r f; do printf '%6d %s\n' "$(stat -c %s "$f")" "$f"; done
