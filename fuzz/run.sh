#!/usr/bin/env bash
# isr's fuzz targets (fuzz/fuzz_targets/*.rs) on stable Rust, libFuzzer with
# no sanitizer (docs/decisions.md, "Fuzzing").
#
#   bash fuzz/run.sh smoke            build if needed, run every target over its
#                                     seed corpus and then SMOKE_RUNS (100,000)
#                                     mutations with a fixed seed, at most
#                                     SMOKE_SECS (10) s each; non-zero exit on any
#                                     crash, hang or oversized allocation (CI)
#   bash fuzz/run.sh long [RUNS]      RUNS executions per target (default
#                                     10,000,000), one target at a time; prints
#                                     target / executions / seconds / exec/s / result
#   bash fuzz/run.sh build            only build
#   bash fuzz/run.sh run TARGET [libFuzzer args...]   one target, by hand
#
# Environment: TARGETS="a b" limits the targets; KEEP_GOING=1 runs libFuzzer's fork
# mode, which keeps every finding in artifacts/ and goes on (counts in the
# result column); ISR_FUZZ_CARGO_FUZZ=1 builds with `cargo fuzz build -s none`
# instead (same flags, same build directory).
#
# No cargo-fuzz needed: the build is plain `cargo build --release` of the fuzz
# crate with the SanitizerCoverage flags cargo-fuzz would pass (`-s none`), for
# the host triple so build scripts and proc macros stay uninstrumented.
# Crashes, hangs (-timeout) and out-of-memory (-rss_limit_mb; the targets' own
# allocator aborts on oversized allocations) land in fuzz/artifacts/TARGET/,
# except those of a defect listed in fuzz/known-defects (reported, not yet
# fixed: counted, not a failure). Mutations that found new coverage go to a
# scratch directory, not into the committed seeds in fuzz/corpus/TARGET/.
set -euo pipefail
fuzz_dir=$(cd "$(dirname "$0")" && pwd)
mode=${1:-smoke}
shift || true

# Nothing from a calling cargo (tests/fuzz_smoke.rs runs this under `cargo
# test`) or the caller's environment may redirect or reflag this build.
unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_BUILD_TARGET_DIR
export CARGO_TARGET_DIR="$fuzz_dir/target"
triple=$(rustc -vV | sed -n 's/^host: //p')
# Exactly the flags of cargo-fuzz 0.13's `cargo fuzz build -s none` (release, debug
# assertions on), in its order, so either builds for the other; plus the
# repository's own rustflags (.cargo/config.toml: RUSTFLAGS replaces them).
fuzz_rustflags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Ccodegen-units=1"
repo_rustflags="--cfg chacha20_avx512"
bin_dir="$fuzz_dir/target/$triple/release"

all_targets() { # the [[bin]] names of Cargo.toml
    awk '/^\[/ { bin = ($0 == "[[bin]]") } bin && /^name = / { gsub(/"/, "", $3); print $3 }' \
        "$fuzz_dir/Cargo.toml"
}
targets=${TARGETS:-$(all_targets | tr '\n' ' ')}

# Per-target input size bound: the objects are small (a keyslot is 156 bytes,
# TOML and JSON lines a few KiB); chunks and manifests get 64 KiB.
max_len() {
    case $1 in
        keyslot) echo 512 ;;
        version_hints) echo 256 ;;
        parcel_toml|lock|control_line|vm_toml|config) echo 8192 ;;
        *) echo 65536 ;;
    esac
}

build() {
    local start=$SECONDS
    if [ "${ISR_FUZZ_CARGO_FUZZ:-}" = 1 ] && command -v cargo-fuzz > /dev/null; then
        echo "== building the fuzz targets (cargo fuzz build -s none)" >&2
        (cd "$fuzz_dir/.." && RUSTFLAGS="$repo_rustflags" cargo fuzz build -s none)
    else
        echo "== building the fuzz targets (cargo build --release, SanitizerCoverage flags)" >&2
        RUSTFLAGS="$fuzz_rustflags $repo_rustflags" cargo build --release --bins \
            --manifest-path "$fuzz_dir/Cargo.toml" --target "$triple"
    fi
    echo "== build took $((SECONDS - start)) s" >&2
}

# Whether libFuzzer's log $2 of target $1 shows a defect listed in known-defects.
is_known() {
    local pattern
    pattern=$(awk -F '\t' -v t="$1" '$1 == t { print $2 }' "$fuzz_dir/known-defects")
    [ -n "$pattern" ] && grep -Eq "$pattern" "$2"
}

# Runs one target; prints "executions seconds result" on stdout, libFuzzer's
# log in $log. A finding's input goes to artifacts/TARGET/ unless it is a
# known defect (known-defects; its reproducer is there already).
run_target() {
    local target=$1 runs=$2 max_time=$3 log=$4
    shift 4
    local seeds="$fuzz_dir/corpus/$target" scratch found
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/isr-fuzz-$target.XXXXXX")
    found="$scratch/found"
    mkdir -p "$scratch/corpus" "$found" "$seeds"
    local start end status=0 keep_going=()
    if [ -n "${KEEP_GOING:-}" ]; then
        # Fork mode: every finding is kept and fuzzing goes on, so a known
        # defect does not hide the rest of the target.
        keep_going=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
    fi
    start=$(date +%s.%N)
    "$bin_dir/$target" "$scratch/corpus" "$seeds" "${keep_going[@]}" \
        -runs="$runs" -max_total_time="$max_time" -max_len="$(max_len "$target")" \
        -rss_limit_mb=512 -malloc_limit_mb=512 -timeout=10 \
        -artifact_prefix="$found/" -print_final_stats=1 "$@" > "$log" 2>&1 || status=$?
    end=$(date +%s.%N)
    local executions result known=0 new=0 input
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -n "${KEEP_GOING:-}" ]; then
        executions=$(sed -n 's/^#\([0-9]*\): cov:.*/\1/p' "$log" | tail -1)
    fi
    # Classify every input found by replaying it.
    for input in "$found"/*; do
        [ -e "$input" ] || continue
        "$bin_dir/$target" -timeout=10 -rss_limit_mb=512 "$input" > "$input.log" 2>&1 || true
        if is_known "$target" "$input.log"; then
            known=$((known + 1))
        else
            new=$((new + 1))
            mkdir -p "$fuzz_dir/artifacts/$target"
            mv "$input" "$fuzz_dir/artifacts/$target/"
            cp "$input.log" "$log.$(basename "$input")"
        fi
    done
    if [ "$new" -gt 0 ]; then
        if grep -q 'ERROR: libFuzzer: timeout' "$log"; then
            result=HANG
        elif grep -q 'out-of-memory\|unbounded allocation' "$log"; then
            result=OOM
        else
            result=CRASH
        fi
        [ -z "${KEEP_GOING:-}" ] || result="FOUND-$new-new"
    elif [ "$known" -gt 0 ]; then
        result="known-defect($known)"
    elif [ "$status" = 0 ]; then
        result=ok
    else
        result=ERROR # libFuzzer failed without a finding
    fi
    rm -rf "$scratch"
    echo "${executions:-0} $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }') $result"
}

case $mode in
    build)
        build
        ;;
    run)
        target=${1:?usage: run.sh run TARGET [libFuzzer args]}
        shift
        [ -x "$bin_dir/$target" ] || build
        mkdir -p "$fuzz_dir/artifacts/$target"
        exec "$bin_dir/$target" "$fuzz_dir/corpus/$target" -max_len="$(max_len "$target")" \
            -rss_limit_mb=512 -timeout=10 -artifact_prefix="$fuzz_dir/artifacts/$target/" "$@"
        ;;
    smoke | long)
        build
        extra=()
        if [ "$mode" = smoke ]; then
            # Deterministic: a fixed seed and a number of runs (the time is
            # only a cap for a slow machine), so CI does not flake.
            runs=${SMOKE_RUNS:-100000} max_time=${SMOKE_SECS:-10} extra=(-seed=1)
        else
            runs=${1:-10000000} max_time=0
        fi
        logs=$(mktemp -d "${TMPDIR:-/tmp}/isr-fuzz-logs.XXXXXX")
        failed=0 total_start=$SECONDS
        printf '%-15s %12s %9s %9s  %s\n' target executions seconds exec/s result
        for target in $targets; do
            read -r executions seconds result < <(run_target "$target" "$runs" "$max_time" "$logs/$target.log" "${extra[@]}")
            rate=$(awk -v n="$executions" -v s="$seconds" 'BEGIN { printf "%d", n / (s + 0.000001) }')
            printf '%-15s %12s %9.1f %9s  %s\n' "$target" "$executions" "$seconds" "$rate" "$result"
            if [ "${result#known-defect}" != "$result" ]; then
                echo "     ^ known defect (fuzz/known-defects): $(awk -F '\t' -v t="$target" '$1 == t { print $3 }' "$fuzz_dir/known-defects")" >&2
            elif [ "$result" != ok ]; then
                failed=1
                echo "---- $target: last lines of libFuzzer's log ($logs/$target.log)" >&2
                tail -n 40 "$logs/$target.log" >&2
                echo "---- inputs in fuzz/artifacts/$target/; replay one with" \
                    "fuzz/target/$triple/release/$target FILE" >&2
            fi
        done
        echo "== $mode: $((SECONDS - total_start)) s of fuzzing (after the build); logs in $logs"
        if [ "$failed" = 0 ] && [ -z "${KEEP_LOGS:-}" ]; then rm -rf "$logs"; fi
        exit "$failed"
        ;;
    *)
        echo "usage: bash fuzz/run.sh smoke | long [RUNS] | build | run TARGET [args]" >&2
        exit 2
        ;;
esac
