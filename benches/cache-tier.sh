#!/usr/bin/env bash
# Section of benches/harness.sh: N fresh machines resume one parcel and read all
# of it, through a caching tier (nginx proxy_cache on this side of the link, the
# machines' read_url) vs straight from the store (no read_url), in the same run.
# The store is SeaweedFS S3 behind an emulated link (PROFILE, default wan;
# examples/lib/link.sh); a second nginx server on this side of the link counts
# every request and byte that reaches the store (the "origin"), for both runs.
# Prints ROW lines (benches/lib.sh): origin requests, origin MB and the time for
# all N machines, each through the cache next to the direct run.
# Needs root, FUSE, weed, nginx, curl, ip, tc.
#   sudo bash benches/cache-tier.sh        # PROFILE=wan SIZE_MIB=64 MACHINES=10
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$bench_root/examples/lib/link.sh"
profile=${PROFILE:-wan}; size_mib=${SIZE_MIB:-64}; machines=${MACHINES:-10}
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx_bin" ] || { echo "needs nginx: apt-get install nginx (.ci/install-deps.sh)" >&2; exit 1; }
need curl "apt-get install curl"
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-cachetier.XXXXXX")
cleanup() {
  set +e; stop_machines
  [ -f "$work/nginx/nginx.pid" ] && kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null
  link_down; [ -n "${KEEP_WORK:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
[ -n "${ISR_BIN:-}" ] || (cd "$bench_root" && cargo build --release --quiet -p isrctl -p isrfsd && cargo build --release --quiet -p isr --example delay_proxy)
printf '[kdf]\nmemory_kib = 1024\niterations = 1\n' > "$work/config.toml"
export ISR_PASSPHRASE=bench ISR_CONFIG="$work/config.toml"
isrctl() { "$bin/isrctl" "$@"; }

link_up "$work" "$profile"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
origin_port=$(free_port); cache_port=$(free_port)
mkdir -p "$work/nginx/tmp"
cat > "$work/nginx/nginx.conf" <<EOF
daemon on;
user root;
worker_processes 2;
pid $work/nginx/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  log_format counted '\$request_method \$uri \$status \$upstream_cache_status \$body_bytes_sent';
  client_body_temp_path $work/nginx/tmp/body; proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fastcgi; uwsgi_temp_path $work/nginx/tmp/uwsgi; scgi_temp_path $work/nginx/tmp/scgi;
  proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=isr:16m max_size=8g inactive=7d use_temp_path=off;
  server {
    listen 127.0.0.1:$origin_port;
    access_log $work/nginx/origin.log counted;
    client_max_body_size 0; proxy_request_buffering off;
    location / { proxy_pass ${LINK_ENDPOINT}; proxy_set_header Host \$http_host;
                 proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$cache_port;
    access_log $work/nginx/cache.log counted;
    location / { proxy_pass http://127.0.0.1:$origin_port; proxy_cache isr; proxy_cache_lock on;
                 proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
"$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$cache_port/" && break; sleep 0.1; done
# Chunks, and only chunks, are readable without credentials (what the cache reads).
policy='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::'$LINK_BUCKET'/bench/chunks/*"]}]}'
code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" --user "$LINK_ACCESS_KEY:$LINK_SECRET_KEY" \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -H "Content-Type: application/json" -X PUT --data-binary "$policy" \
  "$LINK_ENDPOINT/$LINK_BUCKET?policy=")
[ "$code" = 204 ] || { echo "the bucket policy was refused (HTTP $code)" >&2; exit 1; }
# Every machine reaches the store through the counted origin.
sed -i "s|endpoint = \"$LINK_ENDPOINT\"|endpoint = \"http://127.0.0.1:$origin_port\"|" "$ISR_CONFIG"

say "importing a ${size_mib} MiB random image"
mkdir -p "$work/src"; head -c "${size_mib}M" /dev/urandom > "$work/src/disk.img"
machine importer; isrctl init > /dev/null; isrctl import vm "$work/src" > /dev/null
sum=$(sha256sum < "$work/src/disk.img")

# origin_counts: "requests bytes" of chunk GETs in the origin log so far.
origin_counts() { awk '$1 == "GET" && $2 ~ /\/chunks\// {n++; b += $5} END {printf "%d %.0f\n", n, b}' "$work/nginx/origin.log"; }
# fleet LABEL [--read-url URL]: N fresh machines resume, read and discard; prints
# "seconds requests bytes" (origin chunk GETs during the run).
fleet() {
  local label=$1; shift
  local before; before=$(origin_counts)
  local t0; t0=$(now)
  for m in $(seq "$machines"); do
    machine "$label$m"
    local mount; mount=$(isrctl "$@" resume --vmm none vm 2>/dev/null)
    [ "$(sha256sum < "$mount/disk.img")" = "$sum" ] || { echo "$label$m read wrong bytes" >&2; exit 1; }
    isrctl discard vm > /dev/null
    kill "$(cat "$work/$label$m/run/isrfsd.pid")" 2>/dev/null || true
    rm -rf "${work:?}/$label$m/cache"
  done
  local t1; t1=$(now)
  local after; after=$(origin_counts)
  python3 -c "import sys; b=list(map(int,sys.argv[2].split())); a=list(map(int,sys.argv[3].split())); print(sys.argv[1], a[0]-b[0], a[1]-b[1])" \
    "$(elapsed "$t0" "$t1")" "$before" "$after"
}
direct_t=(); direct_n=(); direct_b=(); cached_t=(); cached_n=(); cached_b=()
for r in $(seq "$runs"); do
  # A cold cache each run.
  rm -rf "$work/nginx/cache"/* 2>/dev/null || true
  kill -HUP "$(cat "$work/nginx/nginx.pid")"; sleep 1
  fleet "direct$r-" > "$work/fleet.out"; read -r t n b < "$work/fleet.out"
  direct_t+=("$t"); direct_n+=("$n"); direct_b+=("$b")
  fleet "cached$r-" --read-url "http://127.0.0.1:$cache_port/$LINK_BUCKET/bench" > "$work/fleet.out"
  read -r t n b < "$work/fleet.out"
  cached_t+=("$t"); cached_n+=("$n"); cached_b+=("$b")
  say "run $r: direct ${direct_t[-1]} s, ${direct_n[-1]} origin chunk GETs, $(mb "${direct_b[-1]}") MB; through the cache ${cached_t[-1]} s, ${cached_n[-1]} GETs, $(mb "${cached_b[-1]}") MB"
done
med() { printf '%s\n' "$@" | median; }
what="$machines fresh machines resume + read a ${size_mib} MiB parcel over $profile"
row "$what: origin chunk requests, through a cache" "$(med "${cached_n[@]}")" requests "direct to the store" "$(med "${direct_n[@]}")" "<= $(python3 -c "print(f'{1/$machines:.2f}')")"
row "$what: origin MB, through a cache" "$(mb "$(med "${cached_b[@]}")")" MB "direct to the store" "$(mb "$(med "${direct_b[@]}")")" ""
row "$what: seconds for all, through a cache" "$(med "${cached_t[@]}")" s "direct to the store" "$(med "${direct_t[@]}")" ""
