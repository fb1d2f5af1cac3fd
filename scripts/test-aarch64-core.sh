#!/usr/bin/env bash
# Builds edgelearn-core for aarch64 and runs its tests under qemu-user with three CPU models, so every
# aarch64 GEMM kernel (NEON, dotprod, i8mm) and the run-time dispatch between them is exercised on x86-64.
#
#   cortex-a72  -> NEON only (no dotprod, no i8mm)   EDGELEARN_EXPECT_KERNEL=neon
#   neoverse-n1 -> dotprod, no i8mm                   EDGELEARN_EXPECT_KERNEL=dotprod
#   max         -> dotprod + i8mm                     EDGELEARN_EXPECT_KERNEL=i8mm
#
# Idempotent: installs the Debian cross toolchain only when something is missing (needs root or sudo).
# Recipe and its gotchas: shared/docs/arm-cross.md. Exit status is non-zero if anything fails.
# Environment: AARCH64_TARGET_DIR (default <repo>/target/aarch64), AARCH64_CPUS (default
# "cortex-a72:neon neoverse-n1:dotprod max:i8mm"), AARCH64_TEST_TIMEOUT seconds per CPU (default 900).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=aarch64-unknown-linux-gnu
TARGET_DIR="${AARCH64_TARGET_DIR:-$ROOT/target/aarch64}"
CPUS="${AARCH64_CPUS:-cortex-a72:neon neoverse-n1:dotprod max:i8mm}"
TIMEOUT="${AARCH64_TEST_TIMEOUT:-900}"
PKGS=(rustc-web cargo-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstd-rust-web-dev:arm64 qemu-user-static)

log() { printf '[test-aarch64-core] %s\n' "$*"; }

# --- 1. toolchain (apt; Debian's rustc-web ships the aarch64 std that rustup here cannot download) ---
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null \
    || [ ! -x /usr/bin/rustc ] || [ ! -x /usr/bin/cargo ] \
    || [ ! -d /usr/lib/rustlib/$TARGET/lib ]; then
    [ ${#missing[@]} -gt 0 ] || missing=("${PKGS[@]}")
fi
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { log "FAIL: need root or sudo to install: ${missing[*]}"; exit 1; }
        SUDO="sudo"
    fi
    log "installing: ${missing[*]}"
    t0=$SECONDS
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        $SUDO dpkg --add-architecture arm64
    fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${PKGS[@]}"
    log "toolchain installed in $((SECONDS - t0)) s"
else
    log "toolchain present"
fi

# --- 2. environment: Debian's 1.96 toolchain (rustup's 1.95 cannot use the aarch64 std) ---
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# Never point qemu at /usr/aarch64-linux-gnu (-L or QEMU_LD_PREFIX): with that cross libc every
# thread-spawning program, i.e. every test harness, hangs in pthread_create. The multiarch libc6:arm64
# that qemu finds by default works.
unset QEMU_LD_PREFIX EDGELEARN_KERNEL EDGELEARN_EXPECT_KERNEL
CARGO_ARGS=(-p edgelearn-core --release --target "$TARGET" --target-dir "$TARGET_DIR")
cd "$ROOT"
log "$("$RUSTC" --version), $(qemu-aarch64-static --version | head -1)"

# --- 3. build once (the runner is not part of the build, so the three runs below reuse it) ---
t0=$SECONDS
if ! "$CARGO" test "${CARGO_ARGS[@]}" --no-run; then
    log "FAIL: aarch64 build failed"
    exit 1
fi
log "build: $((SECONDS - t0)) s"

# --- 4. run the tests once per CPU model ---
failed=0
summary=()
logdir="$TARGET_DIR/test-logs"
mkdir -p "$logdir"
for spec in $CPUS; do
    cpu="${spec%%:*}"
    want="${spec#*:}"
    out="$logdir/$cpu.log"
    t0=$SECONDS
    log "=== -cpu $cpu (expect kernel: $want)"
    set +e
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -cpu $cpu" \
        EDGELEARN_EXPECT_KERNEL="$want" \
        timeout --kill-after=30 "$TIMEOUT" "$CARGO" test "${CARGO_ARGS[@]}" --no-fail-fast 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$out" | awk '{s += $4} END {print s + 0}')
    nfail=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s += $1} END {print s + 0}')
    secs=$((SECONDS - t0))
    if [ "$rc" -eq 0 ]; then
        summary+=("PASS  -cpu $cpu  kernel=$want  $passed passed, $nfail failed  (${secs} s)")
    else
        [ "$rc" -eq 124 ] && why="timed out after ${TIMEOUT} s" || why="exit $rc"
        summary+=("FAIL  -cpu $cpu  kernel=$want  $passed passed, $nfail failed  ($why, ${secs} s, log: $out)")
        failed=1
    fi
done

echo
log "summary:"
for line in "${summary[@]}"; do
    log "  $line"
done
if [ "$failed" -ne 0 ]; then
    log "aarch64 core tests FAILED"
    exit 1
fi
log "aarch64 core tests passed on: $CPUS"
