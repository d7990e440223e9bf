#!/usr/bin/env bash
# Section of benches/harness.sh: a cold sequential read of a whole image over an
# emulated link (PROFILE, default wan; examples/lib/link.sh), by isr (SeaweedFS
# S3 behind the link, empty cache) against the link rate, then warm; and the
# lazy peers of benches/peers.sh (casync mount, QEMU copy-on-read over HTTP) on
# the same image with their HTTP server behind the same link.
# Prints ROW lines (benches/lib.sh). Needs root, FUSE, weed, ip, tc, casync.
#   sudo bash benches/link-read.sh        # PROFILE=wan LINK_MIB=256 RUNS=3
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$bench_root/examples/lib/link.sh"
profile=${PROFILE:-wan}; link_mib=${LINK_MIB:-256}
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-linkread.XXXXXX")
cleanup() { set +e; stop_machines; [ -n "${serve_pid:-}" ] && kill "$serve_pid" 2>/dev/null; link_down; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd && cargo build --release --quiet -p isr --example delay_proxy)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
isrctl() { "$bin/isrctl" "$@"; }
mbps() { dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {print $(NF-1) * ($NF == "GB/s" ? 1000 : 1)}'; }

link_up "$work" "$profile"
link_mbs=$(python3 -c "print(f'{$LINK_RATE_BPS / 8e6:.2f}')")
say "cold sequential read over $profile ($link_mbs MB/s): a ${link_mib} MiB random image"
mkdir -p "$work/src"; head -c "${link_mib}M" /dev/urandom > "$work/src/disk.img"
machine A; isrctl import vm "$work/src" > /dev/null
cold=(); warm=()
for r in $(seq "$runs"); do
  machine "B$r"
  mount=$(isrctl resume --vmm none vm 2>/dev/null)
  drop_caches; cold+=("$(mbps "$mount/disk.img")")
  drop_caches; warm+=("$(mbps "$mount/disk.img")")
  isrctl discard vm > /dev/null
  say "run $r: cold ${cold[-1]} MB/s, warm ${warm[-1]} MB/s"
done
isr_cold=$(printf '%s\n' "${cold[@]}" | median); isr_warm=$(printf '%s\n' "${warm[@]}" | median)
row "cold sequential read over $profile, MB/s" "$isr_cold" MB/s "link rate" "$link_mbs" ">= 0.9"

say "lazy peers over the same link"
mkdir -p "$work/http"
port=18080
ip netns exec "$LINK_NS" bash "$bench_root/benches/peers.sh" --serve "$work/http" 127.0.0.1 "$port" \
  > "$work/serve.log" 2>&1 &
serve_pid=$!
oneway=$(python3 -c "print($LINK_RTT_MS / 2)")
addr=${LINK_ENDPOINT#http://}; addr=${addr%:*}
ip netns exec "$LINK_NS" "$bin/examples/delay_proxy" --listen "$addr:18081" \
  --upstream "127.0.0.1:$port" --delay-ms "$oneway" > "$work/proxy2.log" 2>&1 &
sleep 1
PEERS_HTTP="$addr:18081" PEERS=casync-mount,qemu RUNS=$runs \
  bash "$bench_root/benches/peers.sh" "$work/src/disk.img" "$work/http" > "$work/peers.tsv" 2> "$work/peers.err" \
  || { echo "peers.sh failed:" >&2; tail -n 20 "$work/peers.err" >&2; }
peer() { awk -F'\t' -v f="$1" '$1 == f {print $2}' "$work/peers.tsv"; }
for p in casync-mount qemu; do
  c=$(peer "lazy.$p.cold"); w=$(peer "lazy.$p.warm")
  [ -n "$c" ] && [ "$c" != NA ] && row "cold sequential read over $profile, MB/s" "$isr_cold" MB/s "$p (cold)" "$c" ""
  [ -n "$w" ] && [ "$w" != NA ] && row "warm sequential read after a cold one, MB/s" "$isr_warm" MB/s "$p (warm)" "$w" ""
done
