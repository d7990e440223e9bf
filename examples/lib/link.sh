# Link emulation for the example scripts and benches (source it): SeaweedFS
# serving S3 in its own network namespace, reached over a veth pair this script
# creates (10.211.N.1 host side, 10.211.N.2 namespace side; N is the first index
# whose devices and subnet are free, 0 normally). Nothing else is touched.
# Needs root, ip, tc, weed, curl; iptables for LOSS; cargo the first time a
# profile with an RTT is used (to build examples/delay_proxy.rs into
# target/release/examples/delay_proxy, rebuilt when the source is newer;
# DELAY_PROXY=/path/to/binary skips that).
#
#   source examples/lib/link.sh
#   link_up "$work" wan          # or lan | dsl | collective | 100mbit | 50mbit/30ms
#   link_up "$work" dsl 1        # ... with 1 % packet loss (or LOSS=1 in the env)
#   ...                          # talk S3 to $LINK_ENDPOINT (ISR_STORE is set, see below)
#   link_down                    # idempotent; also call it from your EXIT trap
#
# Profiles (rate, round-trip time added to the path):
#   lan         1 Gbit/s    0.5 ms
#   wan       100 Mbit/s     20 ms
#   dsl         8 Mbit/s     40 ms
#   collective 384 kbit/s   100 ms
#   RATE        a tc rate (100mbit, 8mbit, 384kbit, ...): rate only, no delay
#               (the old form: `link_up "$work" 100mbit` behaves as before)
#   RATE/RTTms  e.g. 50mbit/30ms
# LOSS (third argument, else $LOSS, default 0) is a per-packet drop probability
# in percent, applied to each direction on the namespace's veth (iptables
# `-m statistic --mode random`; GSO is limited to one segment per packet on a
# lossy link so that drops hit single wire packets). See the limits below:
# loss costs far less throughput here than on a real long-RTT path.
#
# After link_up these are exported: LINK_ENDPOINT (http://10.211.N.2:8333),
# LINK_RATE_BPS (bits/s), LINK_RTT_MS, LINK_LOSS_PCT, LINK_PROFILE, LINK_BUCKET,
# LINK_ACCESS_KEY, LINK_SECRET_KEY, LINK_NS, LINK_IFACE and LINK_BACKEND (the
# namespace, its veth end, and weed's own S3 address inside it, bypassing link
# and proxy), and ISR_STORE=s3://isr/bench; if ISR_CONFIG is set, an [s3]
# section for the endpoint is appended to it. PROFILE defaults to wan.
#
# How: both veth ends have a tbf qdisc at RATE (egress on each side, so both
# directions are shaped). This kernel has no sch_netem, so the RTT comes from
# examples/delay_proxy.rs running in the namespace: it listens on 10.211.N.2:8333
# and forwards to weed's S3 on 127.0.0.1:8343 inside the namespace, holding
# every byte RTT/2 in each direction (and charging a new connection one RTT for
# the handshake). weed binds only 127.0.0.1 then, so all client traffic crosses
# the proxy and the shaped veth. Without an RTT weed binds 10.211.N.2 directly.
# Limits: the proxy terminates TCP, so TCP's own dynamics over a long-RTT path
# (slow start, congestion-window growth, loss recovery costing a round trip)
# are NOT emulated: both TCP legs have a sub-millisecond RTT, so a lost packet
# is repaired in well under one emulated RTT and the window barely shrinks (1 %
# loss on wan still gives ~90-95 Mbit/s here, where the Mathis formula gives
# one TCP flow ~7 Mbit/s on a real 20 ms path), and a new connection is at full
# speed after its first round trip. What is emulated: serialisation at RATE,
# request/response latency, connection setup latency, random packet loss.

link_ns=isrlink$$
link_dev=
link_proxy=${DELAY_PROXY:-}

# _link_bps RATE: a tc rate (bit kbit mbit gbit tbit, bps kbps mbps gbps = bytes,
# kibit mibit gibit = 1024-based) in bits per second.
_link_bps() {
  awk -v r="$1" 'BEGIN {
    if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
    n = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    m["bit"] = 1; m[""] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12
    m["kibit"] = 1024; m["mibit"] = 1048576; m["gibit"] = 1073741824
    m["bps"] = 8; m["kbps"] = 8e3; m["mbps"] = 8e6; m["gbps"] = 8e9
    if (!(u in m) || n * m[u] <= 0) exit 1
    printf "%.0f\n", n * m[u] }'
}

# _link_proxy_bin: path of the delay proxy, built if missing or older than its source.
_link_proxy_bin() {
  local root src bin
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  src=$root/examples/delay_proxy.rs bin=$root/target/release/examples/delay_proxy
  if [ -n "$link_proxy" ]; then echo "$link_proxy"; return; fi
  if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
    echo "link.sh: building the delay proxy (cargo build --release --example delay_proxy)" >&2
    if ! (cd "$root" && cargo build --release --quiet --example delay_proxy) >&2; then
      [ -x "$bin" ] || return 1
      echo "link.sh: build failed; using the existing $bin" >&2
    fi
  fi
  echo "$bin"
}

_link_ns_exists() {
  local n
  for n in $(ip netns list 2>/dev/null | awk '{ print $1 }'); do [ "$n" = "$link_ns" ] && return 0; done
  return 1
}

# _link_curl ARGS: curl signed for the link's SeaweedFS.
_link_curl() {
  curl -s --aws-sigv4 "aws:amz:us-east-1:s3" --user "$LINK_ACCESS_KEY:$LINK_SECRET_KEY" "$@"
}

link_up() { # WORK PROFILE [LOSS_PCT]
  local work=$1 profile=${2:-wan} loss=${3:-${LOSS:-0}} rate rtt
  case $profile in
    lan) rate=1gbit rtt=0.5 ;;
    wan) rate=100mbit rtt=20 ;;
    dsl) rate=8mbit rtt=40 ;;
    collective) rate=384kbit rtt=100 ;;
    */*) rate=${profile%%/*} rtt=${profile#*/} rtt=${rtt%ms} ;;
    *) rate=$profile rtt=0 ;;
  esac
  local bps
  bps=$(_link_bps "$rate") || { echo "link.sh: bad rate '$rate' (profile '$profile'; want lan|wan|dsl|collective|RATE|RATE/RTTms)" >&2; return 1; }
  awk -v x="$rtt" 'BEGIN { exit !(x ~ /^[0-9]+(\.[0-9]+)?$/) }' || { echo "link.sh: bad RTT '$rtt' ms" >&2; return 1; }
  awk -v x="$loss" 'BEGIN { exit !(x ~ /^[0-9]+(\.[0-9]+)?$/ && x < 100) }' || { echo "link.sh: bad LOSS '$loss' (percent, 0 <= LOSS < 100)" >&2; return 1; }
  local delayed=0 lossy=0
  awk -v x="$rtt" 'BEGIN { exit !(x > 0) }' && delayed=1
  awk -v x="$loss" 'BEGIN { exit !(x > 0) }' && lossy=1
  if [ "$lossy" = 1 ] && ! command -v iptables >/dev/null; then
    echo "link.sh: LOSS needs iptables (apt-get install iptables)" >&2; return 1
  fi
  if _link_ns_exists; then echo "link.sh: link already up (link_down first)" >&2; return 1; fi
  local proxy=
  if [ "$delayed" = 1 ]; then proxy=$(_link_proxy_bin) || { echo "link.sh: cannot build the delay proxy" >&2; return 1; }; fi

  local i
  local addrs
  addrs=$(ip -4 -o addr show)
  for i in $(seq 0 63); do # first index with free devices and subnet
    ip link show "isrl${i}h" >/dev/null 2>&1 && continue
    [[ $addrs == *" 10.211.$i."* ]] && continue
    [ -n "$(ip -4 route show "10.211.$i.0/24")" ] && continue
    break
  done
  link_dev=isrl${i}h
  local peer=isrl${i}n host_ip=10.211.$i.1 ns_ip=10.211.$i.2
  # tbf: burst ≈ 5 ms at RATE (min 16 KiB; ~64 KiB at 100mbit, as before), queue ≤ 50 ms.
  local burst queue
  burst=$(awk -v b="$bps" 'BEGIN { x = b / 8 * 0.005; printf "%.0f", x < 16384 ? 16384 : x }')
  # proxy queue per direction and connection: 2 × rate × one-way delay, at least 1 MiB.
  queue=$(awk -v b="$bps" -v r="$rtt" 'BEGIN { x = b / 8 * r / 1000; printf "%.0f", x < 1048576 ? 1048576 : x }')
  # weed's own S3 port: 8333 on 10.211.N.2, or 8343 on 127.0.0.1 behind the proxy.
  local bind=$ns_ip s3port=8333
  [ "$delayed" = 1 ] && bind=127.0.0.1 s3port=8343

  export LINK_PROFILE=$profile LINK_RATE_BPS=$bps LINK_RTT_MS=$rtt LINK_LOSS_PCT=$loss
  export LINK_NS=$link_ns LINK_IFACE=$peer LINK_BACKEND=http://$bind:$s3port # weed itself, from inside LINK_NS
  export LINK_ENDPOINT=http://$ns_ip:8333 LINK_BUCKET=isr LINK_ACCESS_KEY=bench LINK_SECRET_KEY=benchsecret
  printf '{"identities":[{"name":"b","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List"]}]}' \
    "$LINK_ACCESS_KEY" "$LINK_SECRET_KEY" > "$work/s3.json"
  mkdir -p "$work/weed"
  if ! {
    ip netns add "$link_ns" &&
    ip link add "$link_dev" type veth peer name "$peer" netns "$link_ns" &&
    ip addr add "$host_ip/24" dev "$link_dev" && ip link set "$link_dev" up &&
    ip -n "$link_ns" addr add "$ns_ip/24" dev "$peer" &&
    ip -n "$link_ns" link set "$peer" up && ip -n "$link_ns" link set lo up &&
    tc qdisc add dev "$link_dev" root tbf rate "$bps" burst "$burst" latency 50ms &&
    tc -n "$link_ns" qdisc add dev "$peer" root tbf rate "$bps" burst "$burst" latency 50ms &&
    if [ "$lossy" = 1 ]; then
      # One MSS per skb, so that a drop is one wire packet, not a 64 KiB GSO burst.
      ip link set "$link_dev" gso_max_segs 1 && ip -n "$link_ns" link set "$peer" gso_max_segs 1 &&
      local p &&
      p=$(awk -v x="$loss" 'BEGIN { printf "%.6f", x / 100 }') &&
      ip netns exec "$link_ns" iptables -w -A INPUT -i "$peer" -m statistic --mode random --probability "$p" -j DROP &&
      ip netns exec "$link_ns" iptables -w -A OUTPUT -o "$peer" -m statistic --mode random --probability "$p" -j DROP
    fi
  }; then
    echo "link.sh: setting up $link_ns/$link_dev failed" >&2; link_down; return 1
  fi
  # Started from a subshell: not jobs of the caller (no `wait` on them, no job
  # notices); link_down finds them through the namespace.
  (ip netns exec "$link_ns" weed mini -dir="$work/weed" -ip="$bind" -ip.bind="$bind" \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.port="$s3port" -s3.config="$work/s3.json" -bucket="$LINK_BUCKET" \
    -filer.localSocket="$work/weed/filer.sock" -s3.localFilerSocket="$work/weed/filer.sock" \
    -s3.localSocket="$work/weed/s3.sock" > "$work/weed.log" 2>&1 &)
  if [ "$delayed" = 1 ]; then
    local oneway
    oneway=$(awk -v r="$rtt" 'BEGIN { printf "%g", r / 2 }')
    (ip netns exec "$link_ns" "$proxy" --listen "$ns_ip:8333" --upstream "127.0.0.1:$s3port" \
      --delay-ms "$oneway" --queue-bytes "$queue" > "$work/delay_proxy.log" 2>&1 &)
  fi
  # Ready when the bucket answers a signed HEAD through the whole path.
  local code=
  for _ in $(seq 120); do
    code=$(_link_curl -o /dev/null -w '%{http_code}' --max-time 5 -I "$LINK_ENDPOINT/$LINK_BUCKET") || true
    [ "$code" = 200 ] && break
    sleep 0.5
  done
  if [ "$code" != 200 ]; then
    echo "link.sh: SeaweedFS not ready at $LINK_ENDPOINT (last HTTP status '$code'); weed.log:" >&2
    tail -n 20 "$work/weed.log" >&2; [ -f "$work/delay_proxy.log" ] && tail -n 5 "$work/delay_proxy.log" >&2
    link_down; return 1
  fi
  if [ -n "${ISR_CONFIG:-}" ]; then
    printf '\n[s3]\nendpoint = "%s"\naccess_key_id = "%s"\nsecret_access_key = "%s"\n' \
      "$LINK_ENDPOINT" "$LINK_ACCESS_KEY" "$LINK_SECRET_KEY" >> "$ISR_CONFIG"
  fi
  export ISR_STORE=s3://$LINK_BUCKET/bench
}

link_down() {
  local pids _
  if _link_ns_exists; then
    pids=$(ip netns pids "$link_ns" 2>/dev/null) || true
    [ -n "$pids" ] && { kill $pids 2>/dev/null || true; }
    for _ in $(seq 100); do # up to 10 s for weed to exit, then SIGKILL
      if pids=$(ip netns pids "$link_ns" 2>/dev/null) && [ -z "$pids" ]; then break; fi
      sleep 0.1
    done
    pids=$(ip netns pids "$link_ns" 2>/dev/null) || true
    [ -n "$pids" ] && { kill -9 $pids 2>/dev/null || true; }
    ip netns del "$link_ns" 2>/dev/null || true
  fi
  # (callers may run with set -e: nothing here may fail)
  [ -n "$link_dev" ] && { ip link del "$link_dev" 2>/dev/null || true; }
  link_dev=
  unset LINK_PROFILE LINK_RATE_BPS LINK_RTT_MS LINK_LOSS_PCT LINK_ENDPOINT LINK_NS LINK_IFACE LINK_BACKEND
  return 0
}
