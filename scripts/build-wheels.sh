#!/usr/bin/env bash
# Builds the two release wheels of edgelearn into dist/, from this x86-64 machine:
#
#   edgelearn-<v>-cp39-abi3-manylinux_2_17_aarch64.manylinux2014_aarch64.whl   (Raspberry Pi, Jetson, Graviton)
#   edgelearn-<v>-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
#
# Both are abi3 (PyO3 `abi3-py39`: one wheel for CPython >= 3.9) and linked by zig against glibc 2.17
# symbol stubs, so maturin's `--compatibility manylinux2014` check passes (a gcc link against Debian's
# glibc 2.36 would need GLIBC_2.34 symbols). No target-cpu flags: the aarch64 kernels are picked at run
# time, so the same wheel runs on a Cortex-A72 (Pi 4) and uses sdot/smmla where the CPU has them.
#
# Then checks: sizes printed (aarch64 <= 5 MB), `unzip -l` lists edgelearn/py.typed and
# edgelearn/_native.pyi, `auditwheel show` reports manylinux2014 / manylinux_2_17 for the aarch64 wheel.
#
# Idempotent: installs the Debian cross toolchain only when missing (needs root or sudo) and creates the
# build venv (maturin, ziglang, auditwheel from PyPI) only once. Recipe and gotchas: shared/docs/arm-cross.md.
# Environment: WHEEL_TARGETS (default "aarch64 x86_64"), WHEEL_VENV (default <repo>/target/wheel-venv),
# WHEEL_TARGET_DIR (cargo target dir, default <repo>/target/wheel-build), DIST (default <repo>/dist).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WHEEL_VENV:-$ROOT/target/wheel-venv}"
TARGET_DIR="${WHEEL_TARGET_DIR:-$ROOT/target/wheel-build}"
DIST="${DIST:-$ROOT/dist}"
TARGETS="${WHEEL_TARGETS:-aarch64 x86_64}"
MAX_AARCH64_BYTES=$((5 * 1024 * 1024))
PKGS=(rustc-web cargo-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstd-rust-web-dev:arm64 qemu-user-static)
PY_TOOLS=("maturin>=1.16,<2" "ziglang" "auditwheel")

log() { printf '[build-wheels] %s\n' "$*"; }
die() { log "FAIL: $*"; exit 1; }

# --- 1. toolchain (apt): Debian's rustc-web has the aarch64 std that rustup here cannot download ---
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ! -x /usr/bin/rustc ] || [ ! -x /usr/bin/cargo ] || [ ! -d /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib ] \
    || [ ! -d /usr/lib/rustlib/x86_64-unknown-linux-gnu/lib ]; then
    [ ${#missing[@]} -gt 0 ] || missing=("${PKGS[@]}")
fi
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
        SUDO="sudo"
    fi
    log "installing: ${missing[*]}"
    dpkg --print-foreign-architectures | grep -qx arm64 || $SUDO dpkg --add-architecture arm64
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${PKGS[@]}"
else
    log "apt toolchain present"
fi

# --- 2. build venv: maturin + ziglang (+ auditwheel for the check) ---
if ! "$VENV/bin/python" -c 'import maturin, ziglang, auditwheel' >/dev/null 2>&1; then
    log "creating build venv $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "${PY_TOOLS[@]}"
fi
log "$("$VENV/bin/maturin" --version), zig $("$VENV/bin/python" -m ziglang version), $("$VENV/bin/auditwheel" --version 2>&1 | head -1 | cut -d" " -f1-2)"

# --- 3. environment ---
# One toolchain for both targets: Debian's rustc 1.96 (rustup's 1.95 first in PATH cannot use the aarch64
# std). maturin runs `cargo` from PATH, so /usr/bin goes before ~/.cargo/bin; the venv goes first for zig.
export PATH="$VENV/bin:/usr/bin:$PATH"
export RUSTC=/usr/bin/rustc CARGO=/usr/bin/cargo RUSTDOC=/usr/bin/rustdoc
# --zig sets its own linker; an explicit LINKER would win and link against glibc 2.36 (recipe §4).
unset CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER
# No target-cpu / target-feature flags may leak in from the caller's environment.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS
export CARGO_TERM_COLOR=never
cd "$ROOT"
mkdir -p "$DIST"
log "$(rustc --version)"

# --- 4. build ---
status=0
for arch in $TARGETS; do
    case "$arch" in
        aarch64|x86_64) ;;
        *) die "unknown target '$arch' (aarch64 or x86_64)" ;;
    esac
    triple="$arch-unknown-linux-gnu"
    rm -f "$DIST"/edgelearn-*_"$arch".whl
    t0=$SECONDS
    log "=== $arch: maturin build --release --zig --compatibility manylinux2014"
    maturin build --release --strip --target "$triple" --zig --compatibility manylinux2014 \
        --target-dir "$TARGET_DIR" --out "$DIST" \
        || die "$arch wheel build failed"
    whl=$(ls -t "$DIST"/edgelearn-*_"$arch".whl 2>/dev/null | head -1 || true)
    [ -n "$whl" ] || die "no $arch wheel in $DIST"
    log "$arch build: $((SECONDS - t0)) s"

    # --- 5. checks ---
    name=$(basename "$whl")
    size=$(stat -c %s "$whl")
    log "$name: $size bytes ($(awk -v s="$size" 'BEGIN {printf "%.2f MB", s / 1048576}'))"
    case "$name" in
        *-cp39-abi3-*) ;;
        *) log "FAIL: $name is not a cp39-abi3 wheel"; status=1 ;;
    esac
    case "$name" in
        *manylinux2014_"$arch"*|*manylinux_2_17_"$arch"*) ;;
        *) log "FAIL: $name is not tagged manylinux2014 / manylinux_2_17"; status=1 ;;
    esac
    if [ "$arch" = aarch64 ] && [ "$size" -gt "$MAX_AARCH64_BYTES" ]; then
        log "FAIL: aarch64 wheel is $size bytes > 5 MB"
        status=1
    fi
    listing=$(python3 -m zipfile -l "$whl")
    if command -v unzip >/dev/null; then
        listing=$(unzip -l "$whl")
    fi
    echo "$listing"
    for f in edgelearn/py.typed edgelearn/_native.pyi; do
        if ! grep -q " $f\$" <<<"$listing"; then
            log "FAIL: $name lacks $f"
            status=1
        fi
    done
    show=$(auditwheel show "$whl" 2>&1) || { echo "$show"; log "FAIL: auditwheel show $name"; status=1; }
    echo "$show"
    if ! grep -Eq "\"(manylinux2014|manylinux_2_17)_$arch\"" <<<"$show"; then
        log "FAIL: auditwheel does not report manylinux2014_$arch / manylinux_2_17_$arch for $name"
        status=1
    fi
done

echo
log "wheels in $DIST:"
for whl in "$DIST"/edgelearn-*.whl; do
    [ -e "$whl" ] && log "  $(basename "$whl")  $(stat -c %s "$whl") bytes"
done
[ "$status" -eq 0 ] || die "wheel checks failed"
log "ok"
