# Shared helpers for the benchmark sections under benches/ (source it).
#
# A section prints its results on stdout, one tab-separated row per figure:
#   ROW  figure  isr-value  unit  baseline-label  baseline-value  ratio  target
# (ratio = isr ÷ baseline; target is the issue's goal for the ratio, e.g. ">= 0.8",
# or "" when there is none), and everything else on stderr. benches/harness.sh
# collects the rows into one markdown table.

bench_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The binaries measured: this tree's release build, or ISR_BIN (the harness
# points it at an earlier commit's build for BASELINE_REV; sections then skip
# their own cargo build).
bin=${ISR_BIN:-$bench_root/target/release}
runs=${RUNS:-3}

# median of the numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]}'; }
# p-th percentile (0-100) of the numbers on stdin
percentile() { sort -g | awk -v p="$1" '{a[NR]=$1} END {i=int((NR-1)*p/100+0.5)+1; if (NR) print a[i]}'; }
# a ÷ b to 2 decimals ("" if either is empty or b is 0)
ratio() { python3 -c "import sys; a,b=sys.argv[1:3]; print(f'{float(a)/float(b):.2f}' if a and b and float(b) else '')" "$1" "$2"; }
row() { printf 'ROW\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(ratio "$2" "$5")" "${6:-}"; }
say() { echo "== $*" >&2; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
# json FIELD-EXPRESSION: reads JSON on stdin, prints python expression over `d`
# d is the document; s its sessions (`status --json`: {"sessions": [...]},
# a bare list before the schema field, as a BASELINE_REV build prints it).
json() { python3 -c "import json,sys; d=json.load(sys.stdin); s=d.get('sessions') if isinstance(d, dict) else d; print($1)"; }
# json_lines FIELD: reads one JSON object per line on stdin, prints each one's FIELD
json_lines() { python3 -c "import json,sys; [print(json.loads(l)[sys.argv[1]]) for l in sys.stdin if l.strip()]" "$1"; }
# mb BYTES: in MB (10^6), one decimal
mb() { awk -v b="$1" 'BEGIN {printf "%.1f", b/1e6}'; }

# A simulated machine: its own state, cache and runtime dirs (and daemon) under $work.
machine() {
  export ISR_STATE_DIR="$work/$1/state" ISR_CACHE_DIR="$work/$1/cache" ISR_RUNTIME_DIR="$work/$1/run"
}
# Stops every daemon and mount under $work (for EXIT traps).
stop_machines() {
  local r m
  for r in "$work"/*/run; do
    [ -d "$r" ] || continue
    for m in "$r"/mnt/*; do ISR_RUNTIME_DIR=$r "$bin/isrctl" discard "$(basename "$m")" >/dev/null 2>&1 || true; done
    [ -f "$r/isrfsd.pid" ] && kill "$(cat "$r/isrfsd.pid")" 2>/dev/null
  done
  sleep 1
  awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true
}
need() { # tool hint
  command -v "$1" >/dev/null || { echo "needs $1: $2" >&2; exit 1; }
}
