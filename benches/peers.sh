#!/usr/bin/env bash
# Peers for issue #6's side-by-side benchmark, measured on one image file:
#
#   import   casync make (blob index + chunk store) vs cat and zstd -3 -T0 of
#            the same file, page cache warm for all three;
#   lazy     a lazy peer reading the whole image (dd bs=1M, page cache dropped
#            before every read) with its data behind HTTP: cold (nothing local
#            yet) and warm (second read, after the first populated local state):
#              casync-mkdev  casync mkdev (NBD) of a blob index, --store=http://
#              casync-mount  casync mount (FUSE) of an archive index, --store=http://
#              qemu          a qcow2 overlay with copy-on-read over a raw http
#                            backing file (QEMU's curl driver), read through
#                            qemu-nbd (/dev/nbdX), else a qemu-storage-daemon
#                            FUSE export, else qemu-io.
#            The HTTP server here (--serve) closes the connection after every
#            ranged response: QEMU 10.0's curl driver hangs when a kept-alive
#            connection is reused by another of its requests in flight.
#
# Usage (root: drop_caches, FUSE, NBD):
#   bash benches/peers.sh IMAGE [HTTP_DIR]
#   bash benches/peers.sh --serve DIR ADDR PORT    # the HTTP server alone
#
# IMAGE     the image file (e.g. a 1 GiB raw disk image); only read.
# HTTP_DIR  the directory whose contents the peers fetch over HTTP. The script
#           fills it with store.castr/ (casync chunk store), disk.caidx,
#           disk.caibx and disk.img (a hard link or copy of IMAGE). Given, it is
#           the caller's and is left in place; omitted, a temp dir (removed).
#
# Stdout: one line per figure, `figure<TAB>value<TAB>unit`, value a number, or
# NA when that peer could not run here (the reason is on stderr). Figures:
#   import.cat  import.zstd3  import.casync_make        MB/s (1 MB = 10^6 B)
#   import.casync_store                                  MiB (size of store)
#   lazy.<peer>.cold  lazy.<peer>.warm                   MB/s
#   lazy.<peer>.cold_fetched  lazy.<peer>.warm_fetched   MiB served over HTTP
#                                                        (own server only)
# Human-readable progress, failures and a summary go to stderr. Cold reads drop
# the page cache of the whole machine, so the server's files too: on one machine
# a cold read also reads the store back from the local disk.
#
# Environment:
#   PEERS_HTTP=HOST:PORT  fetch from this server instead of starting one (e.g. a
#                         server behind a shaped link). It must serve HTTP_DIR at
#                         its root, with Range requests (QEMU's curl driver needs
#                         them; python3 -m http.server has none): run
#                         `bash benches/peers.sh --serve HTTP_DIR ADDR PORT` there,
#                         and pass HTTP_DIR so that this script fills it.
#                         Default: a server of its own on a free 127.0.0.1 port.
#   PEERS=LIST            comma-separated subset of: import,casync-mkdev,
#                         casync-mount,qemu (default: all of them)
#   RUNS=N                runs per figure, the median is printed (the lower of
#                         the middle two for even N; default 1); every cold run
#                         starts from empty local state
#   PEERS_READ_TIMEOUT=S  a whole-image read still running after S seconds is
#                         taken as hung and its peer is killed (default
#                         300 + image size / 1 MB/s)
#   PEERS_QEMU_READER=auto|nbd|fuse|qemu-io   (default auto, in that order)
#   PEERS_KEEP=1          keep the work dir (its path is printed)
#   TMPDIR                where the work dir goes (default /tmp); the casync
#                         store of the import runs is written there
#
# Tools: casync (apt-get install casync), qemu-img/qemu-io/qemu-nbd
# (apt-get install qemu-utils), the curl block driver (apt-get install
# qemu-block-extra), qemu-storage-daemon (apt-get install qemu-system-common),
# zstd, python3, fusermount (apt-get install fuse3).
set -euo pipefail
set -o errtrace

# ---------------------------------------------------------------- http server
# A static file server with Range support, HTTP/1.1 keep-alive and sendfile.
# Logs one line per response, "METHOD PATH STATUS BYTES", to LOG.
httpd_py=$(cat <<'PY'
import http.server, os, posixpath, re, sys, urllib.parse
root, host, port = os.path.abspath(sys.argv[1]), sys.argv[2], int(sys.argv[3])
portfile = sys.argv[4] if len(sys.argv) > 4 else ""
log = open(sys.argv[5], "a", buffering=1) if len(sys.argv) > 5 else None
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go out in two writes
    def log_message(self, *args): pass
    def note(self, status, n):
        if log: log.write("%s %s %d %d\n" % (self.command, self.path, status, n))
    def fail(self, status):
        self.send_response(status); self.send_header("Content-Length", "0"); self.end_headers()
        self.note(status, 0)
    def do_HEAD(self): self.serve(False)
    def do_GET(self): self.serve(True)
    def serve(self, body):
        rel = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)).lstrip("/")
        full = os.path.join(root, rel)
        if rel.startswith("..") or not os.path.isfile(full): return self.fail(404)
        with open(full, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start, end, status = 0, size - 1, 200
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1)); end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(0, size - int(m.group(2)))
                if start > end or start >= size:
                    self.send_response(416); self.send_header("Content-Range", "bytes */%d" % size)
                    self.send_header("Content-Length", "0"); self.end_headers(); return self.note(416, 0)
                status = 206
            n = end - start + 1
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(n))
            if status == 206:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
                # QEMU's curl driver loses track of a kept-alive connection that
                # another of its requests reuses, and hangs: one range, one connection
                self.send_header("Connection", "close"); self.close_connection = True
            self.end_headers()
            if body and n > 0: self.connection.sendfile(f, start, n)
            self.note(status, n if body else 0)
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address): pass   # clients hanging up
s = S((host, port), H)
if portfile:
    with open(portfile + ".tmp", "w") as p: p.write(str(s.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
s.serve_forever()
PY
)

if [ "${1:-}" = --serve ]; then
  [ $# -eq 4 ] || { echo "usage: $0 --serve DIR ADDR PORT" >&2; exit 2; }
  exec python3 -c "$httpd_py" "$2" "$3" "$4"
fi

# ---------------------------------------------------------------- arguments
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
case "${1:-}" in -h|--help|'') usage ;; esac
[ $# -le 2 ] || usage
image=$(realpath -e "$1" 2>/dev/null) || { echo "peers.sh: no such image: $1" >&2; exit 2; }
[ -f "$image" ] || { echo "peers.sh: not a regular file: $image" >&2; exit 2; }
size=$(stat -c %s "$image")
[ "$size" -gt 0 ] || { echo "peers.sh: empty image: $image" >&2; exit 2; }
runs=${RUNS:-1}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: RUNS must be a positive integer" >&2; exit 2; }
peers=",${PEERS:-import,casync-mkdev,casync-mount,qemu},"
for p in ${peers//,/ }; do
  case $p in import|casync-mkdev|casync-mount|qemu) ;; *) echo "peers.sh: unknown peer in PEERS: $p" >&2; exit 2 ;; esac
done
want() { [[ $peers == *",$1,"* ]]; }
qemu_reader=${PEERS_QEMU_READER:-auto}
case $qemu_reader in auto|nbd|fuse|qemu-io) ;; *) echo "peers.sh: PEERS_QEMU_READER: auto, nbd, fuse or qemu-io" >&2; exit 2 ;; esac
# a read slower than 1 MB/s (plus 5 minutes) is taken as hung, and its peer is killed
read_timeout=${PEERS_READ_TIMEOUT:-$(( 300 + size / 1000000 ))}
[[ $read_timeout =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: PEERS_READ_TIMEOUT must be whole seconds" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "peers.sh: needs root (drop_caches, FUSE, NBD)" >&2; exit 2; }

# Every fetch goes straight to the endpoint, never through a proxy from the environment.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy='*' NO_PROXY='*'
need() { # tool install-hint
  command -v "$1" > /dev/null || { echo "peers.sh: needs $1 — install it: $2" >&2; exit 1; }
}
need python3 "apt-get install -y python3"
need dd "apt-get install -y coreutils"
if want import; then need zstd "apt-get install -y zstd"; fi
if want import || want casync-mkdev || want casync-mount; then need casync "apt-get install -y casync"; fi
if want casync-mount; then need fusermount "apt-get install -y fuse3 (or fuse)"; fi
if want qemu; then
  need qemu-img "apt-get install -y qemu-utils"
  need qemu-io "apt-get install -y qemu-utils"
  [ -n "$(find /usr/lib*/ -path '*qemu*' -name 'block-curl.so' -print -quit 2>/dev/null)" ] ||
    { echo "peers.sh: QEMU has no curl (http) block driver — install it: apt-get install -y qemu-block-extra" >&2; exit 1; }
fi

say() { printf '%s\n' "$*" >&2; }
summary=()
figure() { printf '%s\t%s\t%s\n' "$1" "$2" "$3"; summary+=("$(printf '%-30s %10s %s' "$1" "$2" "$3")"); }

# ---------------------------------------------------------------- cleanup
work=$(mktemp -d "${TMPDIR:-/tmp}/isr-peers.XXXXXX")
pids=()      # processes we started, killed by id
mounts=()    # FUSE mount points we made
nbds=()      # nbd devices we connected
is_mounted() { awk -v m="$1" '$2 == m {found = 1} END {exit !found}' /proc/self/mounts; }
unmount() { # mountpoint, also a dead one (its daemon gone)
  local m=$1 i
  [ -n "$m" ] || return 0
  for i in $(seq 30); do
    is_mounted "$m" || return 0
    fusermount -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || sleep 0.1
  done
  is_mounted "$m" && umount -l "$m"
  return 0
}
stop() { # pid: TERM, up to 5 s, KILL
  local p=$1 i
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || return 0
  for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local rc=$? m p d
  trap - EXIT INT TERM HUP ERR
  set +e
  for m in "${mounts[@]}"; do unmount "$m"; done
  for d in "${nbds[@]}"; do [ -n "$d" ] && qemu-nbd -d "$d" > /dev/null 2>&1; done
  for p in "${pids[@]}"; do stop "$p"; done
  for m in "${mounts[@]}"; do unmount "$m"; done    # those whose daemon only now went
  if [ "${PEERS_KEEP:-0}" = 1 ]; then say "peers.sh: kept $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "peers.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
on_signal() { # signal exit-code
  # In a subshell ($(...)), die of the signal itself: bash then acts on it in the
  # main shell too (it takes a child that exits normally to have handled it).
  if [ "$BASHPID" != "$$" ]; then trap - "$1"; kill -s "$1" "$BASHPID"; fi
  say "peers.sh: SIG$1, cleaning up"
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP
forget_mount() { local m=$1 i; for i in "${!mounts[@]}"; do [ "${mounts[$i]}" = "$m" ] && unset 'mounts[i]'; done; return 0; }
forget_nbd() { local d=$1 i; for i in "${!nbds[@]}"; do [ "${nbds[$i]}" = "$d" ] && unset 'nbds[i]'; done; return 0; }

# ---------------------------------------------------------------- measuring
mbps() { # bytes seconds
  python3 -c "import sys; b, s = map(float, sys.argv[1:]); print('%.1f' % (b / 1e6 / max(s, 1e-9)))" "$@"
}
elapsed() { python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$@"; }
now() { echo "${EPOCHREALTIME/,/.}"; }
median() { sort -g | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]; else print "NA"}'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
seq_read() { # file-or-device [peer-pid] → MB/s of one dd bs=1M of all of it, page cache dropped first.
  # The time is dd's own; a dd past $read_timeout is taken as hung: the peer is killed to free it.
  local f=$1 peer=${2:-} dd_pid t0 out bytes secs
  drop_caches
  dd if="$f" of=/dev/null bs=1M > "$work/dd.out" 2>&1 &
  dd_pid=$!; t0=$SECONDS
  while kill -0 "$dd_pid" 2>/dev/null; do
    if (( SECONDS - t0 > read_timeout )); then
      say "  dd of $f still running after ${read_timeout}s: hung, killing the peer${peer:+ (pid $peer)}"
      [ -n "$peer" ] && kill -KILL "$peer" 2>/dev/null
      kill -KILL "$dd_pid" 2>/dev/null; wait "$dd_pid" 2>/dev/null
      return 1
    fi
    sleep 0.2
  done
  wait "$dd_pid" || { say "  dd of $f failed: $(tr '\n' ' ' < "$work/dd.out")"; return 1; }
  out=$(awk '/copied/ {for (i = 1; i <= NF; i++) if ($i == "s,") print $1, $(i - 1)}' "$work/dd.out")
  read -r bytes secs <<<"$out"
  [ "${bytes:-}" = "$size" ] || { say "  dd of $f read ${bytes:-?} bytes, expected $size"; return 1; }
  mbps "$bytes" "$secs"
}
spot_check() { # file-or-device: a few 1 MiB blocks equal the image's
  local f=$1 blocks=$(( (size + 1048575) / 1048576 )) b
  for b in 0 $((blocks / 3)) $((blocks / 2)) $((blocks - 1)); do
    cmp -s <(dd if="$image" bs=1M skip="$b" count=1 status=none) <(dd if="$f" bs=1M skip="$b" count=1 status=none) ||
      { say "  data mismatch at MiB $b of $f"; return 1; }
  done
}

# ---------------------------------------------------------------- HTTP side
say "== peers.sh: $image, $size bytes, RUNS=$runs, work dir $work"
say "   $(casync --version 2>/dev/null | head -1 || true); $(qemu-img --version 2>/dev/null | head -1 || true); $(zstd --version 2>/dev/null || true)"
if [ $# -eq 2 ]; then
  http_dir=$(realpath -m "$2"); mkdir -p "$http_dir"
else
  http_dir=$work/http; mkdir -p "$http_dir"
fi
httplog=$work/http.log; : > "$httplog"
if [ -n "${PEERS_HTTP:-}" ]; then
  [[ $PEERS_HTTP =~ ^[^/:]+:[0-9]+$ ]] || { echo "peers.sh: PEERS_HTTP must be HOST:PORT" >&2; exit 2; }
  endpoint=$PEERS_HTTP
  say "using the HTTP server at $endpoint (it must serve $http_dir at /)"
else
  python3 -c "$httpd_py" "$http_dir" 127.0.0.1 0 "$work/http.port" "$httplog" 2> "$work/http.err" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/http.port" ] && break; kill -0 "${pids[-1]}" 2>/dev/null || break; sleep 0.1; done
  [ -s "$work/http.port" ] || { say "HTTP server did not start: $(cat "$work/http.err")"; exit 1; }
  endpoint=127.0.0.1:$(cat "$work/http.port")
  say "serving $http_dir on http://$endpoint/"
fi
url=http://$endpoint
served() { # bytes served by our own server so far (NA behind PEERS_HTTP)
  if [ -n "${PEERS_HTTP:-}" ]; then echo NA; else awk '{s += $4} END {printf "%.0f\n", s}' "$httplog"; fi
}
fetched_since() { # a served reading → MiB served since
  if [ "$1" = NA ]; then echo NA; else python3 -c "import sys; print('%.1f' % ((int(sys.argv[2]) - int(sys.argv[1])) / 1048576))" "$1" "$(served)"; fi
}
link_or_copy() { rm -f "$2"; ln "$1" "$2" 2>/dev/null || cp --reflink=auto "$1" "$2"; }

# ---------------------------------------------------------------- 1. import
if want import; then
  say "== import throughput (page cache warm: the image is read once first)"
  cat "$image" > /dev/null
  c=() z=() m=() store_mib=NA
  for r in $(seq "$runs"); do
    t0=$(now); cat "$image" > /dev/null; t1=$(now); c+=("$(mbps "$size" "$(elapsed "$t0" "$t1")")")
    t0=$(now); zstd -3 -T0 -q -f "$image" -o /dev/null; t1=$(now); z+=("$(mbps "$size" "$(elapsed "$t0" "$t1")")")
    rm -rf "$work/import.castr" "$work/import.caibx"; sync
    t0=$(now)
    casync make --store="$work/import.castr" "$work/import.caibx" "$image" > /dev/null
    t1=$(now); m+=("$(mbps "$size" "$(elapsed "$t0" "$t1")")")
    store_mib=$(du -sm "$work/import.castr" | cut -f1)
    say "  run $r: cat ${c[-1]} MB/s, zstd -3 -T0 ${z[-1]} MB/s, casync make ${m[-1]} MB/s (store $store_mib MiB)"
  done
  rm -rf "$work/import.castr" "$work/import.caibx"
  figure import.cat "$(printf '%s\n' "${c[@]}" | median)" MB/s
  figure import.zstd3 "$(printf '%s\n' "${z[@]}" | median)" MB/s
  figure import.casync_make "$(printf '%s\n' "${m[@]}" | median)" MB/s
  figure import.casync_store "$store_mib" MiB
fi

# ---------------------------------------------------------------- 2. lazy peers
lazy_na() { # peer reason
  say "  $1: NOT RUN — $2"
  figure "lazy.$1.cold" NA MB/s; figure "lazy.$1.warm" NA MB/s
}
report_lazy() { # peer "cold..." "warm..." cold-fetched warm-fetched
  figure "lazy.$1.cold" "$(tr ' ' '\n' <<<"$2" | median)" MB/s
  figure "lazy.$1.warm" "$(tr ' ' '\n' <<<"$3" | median)" MB/s
  figure "lazy.$1.cold_fetched" "$4" MiB
  figure "lazy.$1.warm_fetched" "$5" MiB
}
nbd_size() { cat "/sys/block/${1#/dev/}/size" 2>/dev/null || echo 0; }
nbd_free() { # first /dev/nbdX with nothing attached
  local d
  for d in /dev/nbd[0-9]*; do
    [ -b "$d" ] && [ "$(nbd_size "$d")" = 0 ] && { echo "$d"; return 0; }
  done
  return 1
}
have_nbd() {
  [ -b /dev/nbd0 ] && return 0
  if [ ! -d /sys/module/nbd ] && command -v modprobe > /dev/null; then modprobe nbd 2> /dev/null || true; fi
  for _ in $(seq 20); do [ -b /dev/nbd0 ] && return 0; sleep 0.1; done
  return 1
}
nbd_why() {
  local why="no /dev/nbd0"
  if [ -r /proc/config.gz ] && zcat /proc/config.gz | grep '^# CONFIG_BLK_DEV_NBD is not set' > /dev/null; then
    why+=", this kernel is built without NBD (CONFIG_BLK_DEV_NBD is not set)"
  fi
  if ! command -v modprobe > /dev/null; then why+=", no modprobe (apt-get install -y kmod)"
  elif ! modprobe nbd 2> /dev/null; then why+=", modprobe nbd fails (no module for $(uname -r))"; fi
  echo "$why"
}

if want casync-mkdev || want casync-mount || want qemu; then
  say "== preparing $http_dir (untimed)"
  link_or_copy "$image" "$http_dir/disk.img"
  if want casync-mkdev || want casync-mount; then
    rm -rf "$http_dir/store.castr" "$http_dir/disk.caidx" "$http_dir/disk.caibx" "$work/tree"
    mkdir -p "$work/tree"; link_or_copy "$image" "$work/tree/disk.img"
    casync make --store="$http_dir/store.castr" "$http_dir/disk.caibx" "$image" > /dev/null
    casync make --store="$http_dir/store.castr" "$http_dir/disk.caidx" "$work/tree" > /dev/null
    cp "$http_dir/disk.caibx" "$http_dir/disk.caidx" "$work/"   # the peers' local copies of the indexes
  fi
  ranged=$(python3 -c '
import sys, urllib.request
r = urllib.request.Request(sys.argv[1], headers={"Range": "bytes=0-0"})
print(urllib.request.urlopen(r, timeout=10).status)' "$url/disk.img" 2>&1 | tail -1) || true
fi

# a. casync mkdev: NBD
if want casync-mkdev; then
  say "== lazy peer: casync mkdev (NBD) of disk.caibx, --store=$url/store.castr"
  if ! have_nbd; then
    lazy_na casync-mkdev "$(nbd_why)"
  else
    cold=() warm=() cf=() wf=() ok=1 why=''
    for r in $(seq "$runs"); do
      mkdir -p "$work/tmp"; rm -rf "${work:?}/tmp"/*
      # casync picks a free /dev/nbdX and prints it
      TMPDIR=$work/tmp casync mkdev --store="$url/store.castr" "$work/disk.caibx" > "$work/mkdev.out" 2> "$work/mkdev.err" &
      pid=$!; pids+=("$pid"); dev=''
      for _ in $(seq 100); do
        dev=$(grep -o '/dev/nbd[0-9]*' "$work/mkdev.out" | head -1 || true)
        [ -n "$dev" ] && [ "$(nbd_size "$dev")" != 0 ] && break
        kill -0 "$pid" 2>/dev/null || break; sleep 0.1
      done
      if [ -z "$dev" ] || [ "$(nbd_size "$dev")" = 0 ]; then
        why="casync mkdev brought up no device: $(tr '\n' ' ' < "$work/mkdev.err")"; stop "$pid"; ok=0; break
      fi
      s0=$(served); v=$(seq_read "$dev" "$pid") || { why="cold read failed"; stop "$pid"; ok=0; break; }
      cold+=("$v"); cf+=("$(fetched_since "$s0")")
      s0=$(served); v=$(seq_read "$dev" "$pid") || { why="warm read failed"; stop "$pid"; ok=0; break; }
      warm+=("$v"); wf+=("$(fetched_since "$s0")")
      spot_check "$dev" || { why="wrong data on $dev"; stop "$pid"; ok=0; break; }
      say "  run $r: cold ${cold[-1]} MB/s (${cf[-1]} MiB fetched), warm ${warm[-1]} MB/s (${wf[-1]} MiB fetched)"
      stop "$pid"
    done
    if [ $ok = 1 ]; then report_lazy casync-mkdev "${cold[*]}" "${warm[*]}" "${cf[-1]}" "${wf[-1]}"; else lazy_na casync-mkdev "$why"; fi
  fi
fi

# b. casync mount: FUSE
if want casync-mount; then
  say "== lazy peer: casync mount (FUSE) of disk.caidx, --store=$url/store.castr"
  if [ ! -c /dev/fuse ]; then
    lazy_na casync-mount "no /dev/fuse"
  else
    cold=() warm=() cf=() wf=() ok=1 why=''
    mnt=$work/cmnt; f=$mnt/disk.img
    for r in $(seq "$runs"); do
      # casync keeps the chunks it fetched in $TMPDIR/*.carem while mounted: the warm state
      mkdir -p "$work/tmp" "$mnt"; rm -rf "${work:?}/tmp"/*
      mounts+=("$mnt")
      TMPDIR=$work/tmp casync mount --store="$url/store.castr" "$work/disk.caidx" "$mnt" > "$work/mount.log" 2>&1 &
      pid=$!; pids+=("$pid")
      for _ in $(seq 100); do is_mounted "$mnt" && [ -f "$f" ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if ! is_mounted "$mnt" || [ ! -f "$f" ]; then
        why="casync mount failed: $(tr '\n' ' ' < "$work/mount.log")"; unmount "$mnt"; stop "$pid"; ok=0; break
      fi
      s0=$(served); v=$(seq_read "$f" "$pid") || { why="cold read failed"; unmount "$mnt"; stop "$pid"; ok=0; break; }
      cold+=("$v"); cf+=("$(fetched_since "$s0")")
      s0=$(served); v=$(seq_read "$f" "$pid") || { why="warm read failed"; unmount "$mnt"; stop "$pid"; ok=0; break; }
      warm+=("$v"); wf+=("$(fetched_since "$s0")")
      spot_check "$f" || { why="wrong data in $f"; unmount "$mnt"; stop "$pid"; ok=0; break; }
      say "  run $r: cold ${cold[-1]} MB/s (${cf[-1]} MiB fetched), warm ${warm[-1]} MB/s (${wf[-1]} MiB fetched); local chunk cache $(du -sm "$work/tmp" | cut -f1) MiB"
      unmount "$mnt"; stop "$pid"; forget_mount "$mnt"
    done
    if [ $ok = 1 ]; then report_lazy casync-mount "${cold[*]}" "${warm[*]}" "${cf[-1]}" "${wf[-1]}"; else lazy_na casync-mount "$why"; fi
  fi
fi

# c. QEMU: a qcow2 overlay on a raw http backing file, read through the copy-on-read filter
qemu_opts() { # overlay → --image-opts
  printf 'driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename=%s' "$1"
}
qemu_up() { # reader overlay → qdev (what to dd), qpid (the process serving it)
  local reader=$1 ov=$2
  qpid='' qdev=''
  case $reader in
    nbd)
      qdev=$(nbd_free) || { say "  no free /dev/nbdX"; return 1; }
      rm -f "$work/qnbd.pid"
      qemu-nbd --fork --pid-file="$work/qnbd.pid" -c "$qdev" --image-opts "$(qemu_opts "$ov")" 2> "$work/qemu.err" ||
        { say "  qemu-nbd: $(cat "$work/qemu.err")"; qdev=''; return 1; }
      nbds+=("$qdev"); qpid=$(cat "$work/qnbd.pid" 2>/dev/null || true); [ -n "$qpid" ] && pids+=("$qpid")
      for _ in $(seq 50); do [ "$(nbd_size "$qdev")" != 0 ] && break; sleep 0.1; done
      [ "$(nbd_size "$qdev")" != 0 ] || { say "  qemu-nbd: $qdev did not come up"; return 1; } ;;
    fuse)
      qdev=$work/qemu.export; : > "$qdev"; rm -f "$work/qsd.pid"
      mounts+=("$qdev")
      qemu-storage-daemon \
        --blockdev driver=file,node-name=ovf,filename="$ov" \
        --blockdev driver=qcow2,node-name=ov,file=ovf \
        --blockdev driver=copy-on-read,node-name=cor,file=ov \
        --export type=fuse,id=exp,node-name=cor,mountpoint="$qdev",writable=off \
        --pidfile "$work/qsd.pid" --daemonize 2> "$work/qemu.err" || { say "  qemu-storage-daemon: $(cat "$work/qemu.err")"; return 1; }
      qpid=$(cat "$work/qsd.pid"); pids+=("$qpid")
      is_mounted "$qdev" || { say "  qemu-storage-daemon: the export is not mounted"; return 1; } ;;
  esac
}
qemu_down() { # reader
  case $1 in
    nbd) if [ -n "$qdev" ]; then qemu-nbd -d "$qdev" > /dev/null 2>&1 || true; forget_nbd "$qdev"; fi; stop "$qpid" ;;
    fuse) unmount "$qdev"; stop "$qpid"; unmount "$qdev"; forget_mount "$qdev" ;;
  esac
  return 0
}
qemu_io_read() { # overlay → MB/s: qemu-io -C reading all of it in sequential 1 MiB requests
  local ov=$1 t0 t1 off
  drop_caches
  t0=$(now)
  for ((off = 0; off < size; off += 1048576)); do
    echo "read -q $off $(( size - off < 1048576 ? size - off : 1048576 ))"
  done | timeout -s KILL "$read_timeout" qemu-io -C -f qcow2 "$ov" > "$work/qemu-io.out" 2>&1 ||
    { say "  qemu-io failed or hung: $(head -3 "$work/qemu-io.out")"; return 1; }
  t1=$(now)
  if grep -qiE 'error|fail' "$work/qemu-io.out"; then say "  qemu-io: $(head -3 "$work/qemu-io.out")"; return 1; fi
  mbps "$size" "$(elapsed "$t0" "$t1")"
}

if want qemu; then
  say "== lazy peer: QEMU copy-on-read, qcow2 overlay on the http backing file $url/disk.img"
  if [ "$ranged" != 206 ]; then
    lazy_na qemu "$url/disk.img answers no ranged GET (got: $ranged); QEMU's curl driver needs Range (python3 -m http.server has none: use --serve)"
  else
    case $qemu_reader in auto) readers=(nbd fuse qemu-io) ;; *) readers=("$qemu_reader") ;; esac
    done_qemu=0
    for reader in "${readers[@]}"; do
      case $reader in
        nbd) if ! command -v qemu-nbd > /dev/null; then say "  reader nbd: no qemu-nbd (apt-get install -y qemu-utils)"; continue; fi
             if ! have_nbd; then say "  reader nbd: $(nbd_why)"; continue; fi ;;
        fuse) if ! command -v qemu-storage-daemon > /dev/null; then say "  reader fuse: no qemu-storage-daemon (apt-get install -y qemu-system-common)"; continue; fi
              if [ ! -c /dev/fuse ]; then say "  reader fuse: no /dev/fuse"; continue; fi ;;
      esac
      say "  reader: $reader"
      cold=() warm=() cf=() wf=() ok=1
      ov=$work/overlay.qcow2
      for r in $(seq "$runs"); do
        rm -f "$ov"
        qemu-img create -q -f qcow2 -b "$url/disk.img" -F raw "$ov" 2> "$work/qemu.err" ||
          { say "  qemu-img create: $(cat "$work/qemu.err")"; ok=0; break; }
        if [ "$reader" = qemu-io ]; then
          s0=$(served); v=$(qemu_io_read "$ov") || { ok=0; break; }; cold+=("$v"); cf+=("$(fetched_since "$s0")")
          s0=$(served); v=$(qemu_io_read "$ov") || { ok=0; break; }; warm+=("$v"); wf+=("$(fetched_since "$s0")")
          qemu-img compare -q -f qcow2 -F raw "$ov" "$image" || { say "  the overlay does not read back as the image"; ok=0; break; }
        else
          qemu_up "$reader" "$ov" || { qemu_down "$reader"; ok=0; break; }
          s0=$(served); v=$(seq_read "$qdev" "$qpid") || { qemu_down "$reader"; ok=0; break; }
          cold+=("$v"); cf+=("$(fetched_since "$s0")")
          # warm: a new process on the same overlay, so what is read is what copy-on-read left on disk
          qemu_down "$reader"; qemu_up "$reader" "$ov" || { qemu_down "$reader"; ok=0; break; }
          s0=$(served); v=$(seq_read "$qdev" "$qpid") || { qemu_down "$reader"; ok=0; break; }
          warm+=("$v"); wf+=("$(fetched_since "$s0")")
          spot_check "$qdev" || { qemu_down "$reader"; ok=0; break; }
          qemu_down "$reader"
        fi
        say "  run $r: cold ${cold[-1]} MB/s (${cf[-1]} MiB fetched), warm ${warm[-1]} MB/s (${wf[-1]} MiB fetched); overlay $(du -sm "$ov" | cut -f1) MiB"
      done
      if [ $ok = 1 ]; then
        say "  (lazy.qemu.* are through the $reader reader)"
        report_lazy qemu "${cold[*]}" "${warm[*]}" "${cf[-1]}" "${wf[-1]}"
        figure "lazy.qemu.reader_${reader//-/_}" 1 flag
        done_qemu=1; break
      fi
      say "  reader $reader failed"
    done
    [ $done_qemu = 1 ] || lazy_na qemu "no reader worked (see above)"
  fi
fi

say "== summary: $image, $size bytes, endpoint $url"
for l in "${summary[@]}"; do say "  $l"; done
