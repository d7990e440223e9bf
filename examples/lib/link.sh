# Link emulation for the example scripts (source it): SeaweedFS serving S3 in
# its own network namespace behind a veth pair shaped with tbf (this kernel has
# no sch_netem, so rate only, no added RTT). Addresses 10.211.0.1/2 on a pair
# this script creates; nothing else is touched. Needs root, ip, tc, weed, curl.
#
#   source examples/lib/link.sh
#   link_up "$work" 100mbit     # exports ISR_STORE and appends [s3] to $ISR_CONFIG
#   ...
#   link_down                   # (also call it from your EXIT trap)

link_ns=isrlink$$

link_up() { # work-dir rate
  local work=$1 rate=$2
  ip netns add "$link_ns"
  ip link add isrb0 type veth peer name isrb1
  ip link set isrb1 netns "$link_ns"
  ip addr add 10.211.0.1/24 dev isrb0; ip link set isrb0 up
  ip -n "$link_ns" addr add 10.211.0.2/24 dev isrb1
  ip -n "$link_ns" link set isrb1 up; ip -n "$link_ns" link set lo up
  tc qdisc add dev isrb0 root tbf rate "$rate" burst 64kb latency 50ms
  ip netns exec "$link_ns" tc qdisc add dev isrb1 root tbf rate "$rate" burst 64kb latency 50ms
  printf '{"identities":[{"name":"b","credentials":[{"accessKey":"bench","secretKey":"benchsecret"}],"actions":["Admin","Read","Write","List"]}]}' > "$work/s3.json"
  mkdir -p "$work/weed"
  ip netns exec "$link_ns" weed mini -dir="$work/weed" -ip=10.211.0.2 -ip.bind=10.211.0.2 \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.config="$work/s3.json" -bucket=isr > "$work/weed.log" 2>&1 &
  for _ in $(seq 60); do curl -s -o /dev/null http://10.211.0.2:8333/ && break; sleep 1; done; sleep 2
  printf '\n[s3]\nendpoint = "http://10.211.0.2:8333"\naccess_key_id = "bench"\nsecret_access_key = "benchsecret"\n' >> "$ISR_CONFIG"
  export ISR_STORE=s3://isr/bench
}

link_down() {
  ip netns pids "$link_ns" 2>/dev/null | xargs -r kill 2>/dev/null
  ip netns del "$link_ns" 2>/dev/null
  ip link del isrb0 2>/dev/null
  return 0
}
