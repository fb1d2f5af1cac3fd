#!/usr/bin/env bash
# Runs the Python test suite against the released aarch64 wheel, inside an emulated aarch64 CPython 3.11,
# once per emulated CPU model, so each aarch64 INT8 kernel is exercised through the Python API:
#
#   scripts/test-aarch64.sh [CPU[:KERNEL] ...]      default: cortex-a72 neoverse-n1 max
#
#   cortex-a72   Raspberry Pi 4 class, NEON only       whole suite, expects kernel neon
#   neoverse-n1  Pi 5 / Orin class, dotprod             the tests that reach the INT8/FP32 kernels through
#                                                       Python (AARCH64_DOTPROD_TESTS), expects kernel dotprod
#   max          Armv8.6+ (dotprod, i8mm, SVE)          GEMM + backend tests, expects kernel i8mm
#   other CPUs   pass CPU:KERNEL, e.g. cortex-a76:dotprod (the suite of its kernel: dotprod CPUs run AARCH64_DOTPROD_TESTS, others the whole suite)
#
# Steps: (1) reuse dist/'s aarch64 wheel, or build it with scripts/build-wheels.sh when it is missing or
# older than the sources; (2) build an aarch64 CPython 3.11 sysroot from Debian arm64 debs (recipe §3 of
# shared/docs/arm-cross.md), cached under target/aarch64-py; (3) install the wheel's runtime and every
# extra's dependencies for aarch64 with pip --platform/--only-binary (cached by requirement set), then the
# wheel itself; (4) per CPU: print `edgelearn info`, run pytest under qemu-aarch64-static with
# EDGELEARN_EXPECT_KERNEL set (tests/test_backend_arch.py fails if the kernel differs); (5) smoke-test
# `edgelearn train --epochs 1` if the train subcommand exists.
#
# Subprocesses: tests start `sys.executable`. Without binfmt_misc the host cannot exec an aarch64 binary,
# so sys.executable is a tiny shell wrapper next to python3.11 in the sysroot (qemu's -0 sets argv[0] to
# it); the host kernel runs the wrapper, which re-enters qemu with the same QEMU_CPU. qemu gets
# `-L <sysroot>` (its multiarch libc6:arm64), never /usr/aarch64-linux-gnu, whose libc hangs in
# pthread_create under qemu (recipe §2). The runs go AARCH64_JOBS at a time (default: nproc), each with
# its own log and pytest basetemp; logs are printed in order at the end.
#
# Environment: AARCH64_PY_DIR (cache, default <repo>/target/aarch64-py), AARCH64_PYTEST_TIMEOUT seconds per
# CPU (default 1800), AARCH64_DOTPROD_TESTS (pytest args under neoverse-n1 and other dotprod CPUs; default
# the kernel-path files: the rest of the suite (CLI, collab, fleet, ONNX, checkpoints, README) runs no
# kernel that cortex-a72's whole-suite run does not already take through the same Python code, and under
# emulation it doubled the stage's time), AARCH64_MAX_TESTS (pytest args under -cpu max, default the GEMM and backend tests),
# AARCH64_SUITE_TESTS (pytest args under cortex-a72 and other non-dotprod CPUs; default `tests`, the whole
# suite; `kernel-path`: the AARCH64_DOTPROD_TESTS files), AARCH64_TRAIN_CPU (default neoverse-n1), AARCH64_JOBS (parallel runs, default nproc), AARCH64_SHARDS (the
# whole-suite runs are split into this many pytest processes, whole test files each, so they share the cores
# with the other runs; default AARCH64_JOBS),
# AARCH64_REBUILD_WHEEL=1 forces a wheel rebuild.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${AARCH64_PY_DIR:-$ROOT/target/aarch64-py}"
TIMEOUT="${AARCH64_PYTEST_TIMEOUT:-1800}"
MAX_TESTS="${AARCH64_MAX_TESTS:-tests/test_gemm.py tests/test_backend_arch.py}"
DOTPROD_TESTS="${AARCH64_DOTPROD_TESTS:-tests/test_gemm.py tests/test_backend_arch.py tests/test_quant.py
 tests/test_octo_step.py tests/test_nn_ops.py tests/test_grouped_conv.py tests/test_layers.py
 tests/test_inplace_int8.py tests/test_deferred_grad.py tests/test_bn_relu_fusion.py tests/test_patchskip.py
 tests/test_models_zoo.py tests/test_sgq.py}"
SUITE_TESTS="${AARCH64_SUITE_TESTS:-tests}"
TRAIN_CPU="${AARCH64_TRAIN_CPU:-neoverse-n1}"
HOST_PY="${HOST_PYTHON:-python3}"
PYVER=3.11
PLAT=(--platform manylinux_2_36_aarch64 --platform manylinux_2_35_aarch64 --platform manylinux_2_34_aarch64
      --platform manylinux_2_31_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64
      --platform manylinux_2_26_aarch64 --platform manylinux_2_24_aarch64 --platform manylinux_2_17_aarch64
      --platform manylinux2014_aarch64)
PIPX=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi cp311 --abi abi3 --abi none)
# Debian arm64 packages making a working python3.11 (ssl, sqlite3, ctypes, lzma, bz2, readline).
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 libc6 libexpat1 zlib1g libffi8
      libssl3 libbz2-1.0 libcrypt1 liblzma5 libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libuuid1 libgcc-s1
      libstdc++6 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
      libkeyutils1)

# Tests that cannot run under emulation, as "node id|reason" lines (pytest --deselect). Keep this empty
# unless a test truly cannot work there; every entry is printed with its reason.
DESELECT=(
"tests/test_flower.py::test_flower_deployment_with_one_superlink_and_three_supernodes|starts a SuperLink, 3 SuperNodes, their SuperExecs and one Flower ClientApp process per message (~25 Python processes importing flwr, fastapi, sqlalchemy): minutes per message round under emulation; the same apps and messages run in process in test_flower_apps_give_the_accuracy_and_bytes_of_collab"
)

log() { printf '[test-aarch64] %s\n' "$*"; }
die() { log "FAIL: $*"; exit 1; }
t_start=$SECONDS
cd "$ROOT"
mkdir -p "$WORK"
unset QEMU_LD_PREFIX QEMU_CPU EDGELEARN_KERNEL EDGELEARN_EXPECT_KERNEL PYTHONHOME PYTHONSTARTUP
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# --- CPUs and the kernel each must pick ---
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(cortex-a72 neoverse-n1 max)
declare -a CPU_NAMES CPU_KERNELS
for s in "${specs[@]}"; do
    cpu="${s%%:*}"
    if [ "$s" != "$cpu" ]; then
        k="${s#*:}"
    else
        case "$cpu" in
            cortex-a72|cortex-a53|cortex-a57) k=neon ;;
            neoverse-n1|cortex-a76|cortex-a55) k=dotprod ;;
            max|neoverse-v1|neoverse-n2|cortex-a710) k=i8mm ;;
            *) die "no expected kernel known for -cpu $cpu; pass it as $cpu:KERNEL" ;;
        esac
    fi
    CPU_NAMES+=("$cpu")
    CPU_KERNELS+=("$k")
done

# --- 1. the aarch64 wheel: reuse, or build when missing or older than any source file ---
find_wheel() { ls -t "$ROOT"/dist/edgelearn-*-cp39-abi3-*manylinux*_aarch64.whl 2>/dev/null | head -1 || true; }
WHEEL=$(find_wheel)
stale=""
if [ -z "$WHEEL" ]; then
    stale="no aarch64 wheel in dist/"
elif [ "${AARCH64_REBUILD_WHEEL:-0}" = 1 ]; then
    stale="AARCH64_REBUILD_WHEEL=1"
else
    # what goes into the wheel (Rust tests, benches and fuzz targets do not)
    newer=$(find rust python Cargo.toml Cargo.lock pyproject.toml README.md -newer "$WHEEL" -type f \
        -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path 'rust/*/tests/*' -not -path 'rust/*/benches/*' \
        -not -path 'rust/*/fuzz/*' 2>/dev/null | head -3 || true)
    [ -z "$newer" ] || stale="sources changed since the wheel was built: $(echo $newer)"
fi
if [ -n "$stale" ]; then
    log "building the aarch64 wheel ($stale)"
    t0=$SECONDS
    WHEEL_TARGETS=aarch64 bash "$ROOT/scripts/build-wheels.sh"
    log "wheel build: $((SECONDS - t0)) s"
    WHEEL=$(find_wheel)
    [ -n "$WHEEL" ] || die "build-wheels.sh made no aarch64 wheel"
else
    log "reusing $(basename "$WHEEL")"
fi
command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static missing (scripts/build-wheels.sh installs it)"

# --- 2. emulated CPython 3.11 sysroot from Debian arm64 debs (cached) ---
S="$WORK/sysroot"
stamp="$(printf '%s\n' "${DEBS[@]}" | sha1sum | cut -c1-12)"
if [ "$(cat "$S/.complete" 2>/dev/null)" != "$stamp" ]; then
    t0=$SECONDS
    log "building the aarch64 CPython $PYVER sysroot in $S"
    rm -rf "$S" "$WORK/debs"
    mkdir -p "$WORK/debs"
    args=()
    for p in "${DEBS[@]}"; do args+=("$p:arm64"); done
    if ! (cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root "${args[@]}"); then
        log "apt-get download failed; refreshing the package lists once"
        dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
        apt-get update -q
        (cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root "${args[@]}") || die "cannot download the arm64 debs"
    fi
    for d in "$WORK"/debs/*.deb; do dpkg -x "$d" "$S"; done
    rm -rf "$WORK/debs"
    echo "$stamp" >"$S/.complete"
    log "sysroot: $((SECONDS - t0)) s, $(du -sh "$S" | cut -f1)"
fi
# sys.executable wrapper: the host runs it (shell), it re-enters qemu; QEMU_CPU is inherited from the env.
PYW="$S/usr/bin/python$PYVER-qemu"
cat >"$PYW" <<EOF
#!/bin/sh
exec qemu-aarch64-static -L "$S" -0 "\$0" "$S/usr/bin/python$PYVER" "\$@"
EOF
chmod +x "$PYW"

# --- 3. dependencies (cached per requirement set) and the wheel ---
# pip runs from its own small venv, so the resolver does not weigh whatever the host Python has installed
PIPVENV="$WORK/pip-venv"
if ! "$PIPVENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$PIPVENV"
    "$HOST_PY" -m venv "$PIPVENV"
    "$PIPVENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$PIPVENV/bin/python" -m pip)
meta=$(unzip -p "$WHEEL" '*.dist-info/METADATA') || die "cannot read METADATA from $WHEEL"
extras=$(sed -n 's/^Provides-Extra: *//p' <<<"$meta" | tr '\n' ',' | sed 's/,$//')
reqkey=$( (grep '^Requires-Dist:' <<<"$meta"; echo "${PLAT[*]} ${PIPX[*]} pytest hypothesis") | sha1sum | cut -c1-12)
SITE="$WORK/site-$reqkey"
if [ ! -f "$SITE/.complete" ]; then
    t0=$SECONDS
    rm -rf "$SITE" "$SITE.tmp"
    log "installing aarch64 dependencies (extras: ${extras:-none}) into $SITE"
    # the wheel pulls its own requirements; pytest and hypothesis are asked for explicitly as well
    pip_ok=0
    if "${PIP[@]}" install -q --target "$SITE.tmp" "${PLAT[@]}" "${PIPX[@]}" \
        "$WHEEL${extras:+[$extras]}" pytest hypothesis; then
        pip_ok=1
    elif [ -n "$extras" ]; then
        # some extra has no aarch64 wheel: take the runtime deps, then every extra that installs
        log "WARNING: not every extra installs for aarch64; trying them one by one"
        rm -rf "$SITE.tmp"
        "${PIP[@]}" install -q --target "$SITE.tmp" "${PLAT[@]}" "${PIPX[@]}" "$WHEEL" pytest hypothesis \
            || die "runtime dependencies of the wheel do not install for aarch64"
        for e in ${extras//,/ }; do
            "${PIP[@]}" install -q --upgrade --target "$SITE.tmp" "${PLAT[@]}" "${PIPX[@]}" "$WHEEL[$e]" \
                || log "WARNING: extra '$e' has no aarch64 binary wheels; its tests must skip"
        done
        pip_ok=1
    fi
    [ "$pip_ok" = 1 ] || die "dependencies do not install for aarch64"
    # the wheel itself is installed separately below, fresh on every run
    rm -rf "$SITE.tmp"/edgelearn "$SITE.tmp"/edgelearn-*.dist-info "$SITE.tmp"/bin/edgelearn
    # onnxruntime's aarch64 wheel dies with SIGSEGV while importing its native module under qemu-user (every
    # emulated CPU; seen with onnxruntime 1.23+); it is only the ONNX tests' oracle, never used by edgelearn's
    # kernels, so it is left out here: those tests skip with a visible reason and run natively in .ci/run
    rm -rf "$SITE.tmp"/onnxruntime "$SITE.tmp"/onnxruntime-*.dist-info
    log "onnxruntime left out of the emulated runs (its native module segfaults on import under qemu-user)"
    touch "$SITE.tmp/.complete"
    mv "$SITE.tmp" "$SITE"
    log "dependencies: $((SECONDS - t0)) s, $(du -sh "$SITE" | cut -f1)"
fi
# drop caches of older requirement sets
for d in "$WORK"/site-*; do
    [ "$d" = "$SITE" ] || rm -rf "$d"
done
PKG="$WORK/wheel"
rm -rf "$PKG"
"${PIP[@]}" install -q --no-deps --target "$PKG" "${PLAT[@]}" "${PIPX[@]}" "$WHEEL"
# console script: point its shebang at the wrapper so `edgelearn ...` runs emulated too
if [ -f "$PKG/bin/edgelearn" ]; then
    sed -i "1s|^#!.*|#!$PYW|" "$PKG/bin/edgelearn"
fi
export PYTHONPATH="$PKG:$SITE:$WORK/plugins" PATH="$PKG/bin:$PATH" PYTHONDONTWRITEBYTECODE=1
# Hypothesis under emulation: examples run ~10-50x slower than natively, so its deadline and too_slow health
# check would fail on time alone. A pytest plugin loads Hypothesis' own "ci" profile (deadline=None,
# too_slow suppressed, derandomized); tests' explicit @settings still win.
mkdir -p "$WORK/plugins"
cat >"$WORK/plugins/edgelearn_qemu_profile.py" <<'EOF'
"""Loaded by scripts/test-aarch64.sh (pytest -p): Hypothesis settings for runs under qemu-user, and
EDGELEARN_TEST_SHARD=K/N: keep the test files of shard K of N (1-based), the rest deselected. Files stay whole
(tests of one file may build on each other, as README blocks do); they go largest first to the shard with the
fewest tests so far, the same split in every shard's process."""
import os

try:
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("EDGELEARN_TEST_SHARD")
    if not spec:
        return
    k, n = (int(v) for v in spec.split("/"))
    if not 1 <= k <= n:
        raise ValueError(f"EDGELEARN_TEST_SHARD={spec!r}: want K/N with 1 <= K <= N")
    files = {}
    for it in items:
        files.setdefault(it.nodeid.split("::")[0], []).append(it)
    load = [0] * n
    shard_of = {}
    for name in sorted(files, key=lambda f: (-len(files[f]), f)):
        s = min(range(n), key=lambda i: (load[i], i))
        shard_of[name] = s
        load[s] += len(files[name])
    keep = [it for it in items if shard_of[it.nodeid.split("::")[0]] == k - 1]
    drop = [it for it in items if shard_of[it.nodeid.split("::")[0]] != k - 1]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
EOF
where=$(QEMU_CPU=cortex-a72 "$PYW" -P -c 'import edgelearn; print(edgelearn.__file__)' 2>&1 || true)
case "$where" in
    "$PKG"/*) log "edgelearn imports from the installed wheel: $where" ;;
    *) die "edgelearn imports from $where, not from the wheel in $PKG" ;;
esac

# --- 4. the runs: pytest per CPU, then the training smoke test; JOBS at a time, logs printed in order ---
deselect=()
for d in "${DESELECT[@]}"; do
    log "excluded under emulation: ${d%%|*} (${d#*|})"
    deselect+=(--deselect "${d%%|*}")
done
logdir="$WORK/logs"
rm -rf "$logdir" "$WORK/pytest-tmp"
mkdir -p "$logdir" "$WORK/pytest-tmp"

# run_pytest KEY CPU KERNEL [K/N]: one emulated pytest run (shard K of N); writes $logdir/KEY.{log,rc,secs}
run_pytest() {
    set +e
    local key="$1" cpu="$2" want="$3" shard="${4:-}" t0=$SECONDS rc tests
    if [ "$cpu" = max ]; then read -r -d '' -a tests <<<"$MAX_TESTS"
    elif [ "$want" = dotprod ]; then read -r -d '' -a tests <<<"$DOTPROD_TESTS"
    elif [ "$SUITE_TESTS" = kernel-path ]; then read -r -d '' -a tests <<<"$DOTPROD_TESTS"
    else read -r -d '' -a tests <<<"$SUITE_TESTS"; fi
    export QEMU_CPU="$cpu" EDGELEARN_EXPECT_KERNEL="$want"
    if [ -n "$shard" ]; then export EDGELEARN_TEST_SHARD="$shard"; else unset EDGELEARN_TEST_SHARD; fi
    # Under -cpu max OpenBLAS (numpy) picks its SVE kernels: about 4x slower under qemu, and they raise
    # spurious overflow warnings in matmul (recipe §3). numpy's BLAS is only a reference here, so pin it
    # to its Neoverse-N1 kernels; our kernels are unaffected.
    if [ "$cpu" = max ]; then export OPENBLAS_CORETYPE=NEOVERSEN1; else unset OPENBLAS_CORETYPE; fi
    {
        echo "=== -cpu $cpu (expect kernel: $want): pytest ${tests[*]}${shard:+ (test files of shard $shard)}"
        echo "\$ edgelearn info   # qemu-aarch64-static -cpu $cpu"
        edgelearn info
        rc=$?
        if [ "$rc" -eq 0 ]; then
            timeout --kill-after=30 "$TIMEOUT" "$PYW" -P -m pytest -q -p no:cacheprovider \
                -p edgelearn_qemu_profile --durations=10 --basetemp="$WORK/pytest-tmp/$key" \
                "${deselect[@]}" "${tests[@]}"
            rc=$?
        fi
        echo "$rc" >"$logdir/$key.rc"
    } >"$logdir/$key.log" 2>&1 </dev/null
    echo $((SECONDS - t0)) >"$logdir/$key.secs"
}

# run_train: `edgelearn train --epochs 1` on the default dataset, in a scratch directory
run_train() {
    set +e
    local t0=$SECONDS rc
    export QEMU_CPU="$TRAIN_CPU"
    unset OPENBLAS_CORETYPE EDGELEARN_EXPECT_KERNEL
    {
        echo "=== -cpu $TRAIN_CPU: edgelearn train --epochs 1"
        rm -rf "$WORK/train-smoke" && mkdir -p "$WORK/train-smoke"
        (cd "$WORK/train-smoke" && timeout --kill-after=30 "$TIMEOUT" edgelearn train --epochs 1)
        rc=$?
        echo "$rc" >"$logdir/train.rc"
    } >"$logdir/train.log" 2>&1 </dev/null
    echo $((SECONDS - t0)) >"$logdir/train.secs"
}

have_train=0
QEMU_CPU="$TRAIN_CPU" "$PYW" -P -m edgelearn train --help >/dev/null 2>&1 && have_train=1
JOBS="${AARCH64_JOBS:-$(nproc)}"
SHARDS="${AARCH64_SHARDS:-$JOBS}"
[[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || die "AARCH64_SHARDS=$SHARDS: want a positive integer"
# the whole-suite runs (the longest) first, split into SHARDS processes; then the others
declare -a RUN_KEYS RUN_CPUS RUN_KERNELS RUN_SHARDS
for i in "${!CPU_NAMES[@]}"; do
    cpu="${CPU_NAMES[$i]}" want="${CPU_KERNELS[$i]}"
    if [ "$cpu" != max ] && [ "$want" != dotprod ] && [ "$SHARDS" -gt 1 ]; then
        for ((k = 1; k <= SHARDS; k++)); do
            RUN_KEYS+=("$cpu.$k"); RUN_CPUS+=("$cpu"); RUN_KERNELS+=("$want"); RUN_SHARDS+=("$k/$SHARDS")
        done
    fi
done
for i in "${!CPU_NAMES[@]}"; do
    cpu="${CPU_NAMES[$i]}" want="${CPU_KERNELS[$i]}"
    if ! { [ "$cpu" != max ] && [ "$want" != dotprod ] && [ "$SHARDS" -gt 1 ]; }; then
        RUN_KEYS+=("$cpu"); RUN_CPUS+=("$cpu"); RUN_KERNELS+=("$want"); RUN_SHARDS+=("")
    fi
done
jobs_list=()
for i in "${!RUN_KEYS[@]}"; do
    jobs_list+=("run_pytest ${RUN_KEYS[$i]} ${RUN_CPUS[$i]} ${RUN_KERNELS[$i]} ${RUN_SHARDS[$i]}")
done
[ "$have_train" = 1 ] && jobs_list+=("run_train")
log "running ${#jobs_list[@]} emulated jobs, $JOBS at a time (logs: $logdir)"
t0=$SECONDS
running=0
for j in "${jobs_list[@]}"; do
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    log "start: ${j#run_}"
    $j &
    running=$((running + 1))
done
wait || true
log "emulated jobs: $((SECONDS - t0)) s"

failed=0
summary=()
for i in "${!RUN_KEYS[@]}"; do
    key="${RUN_KEYS[$i]}"
    cpu="${RUN_CPUS[$i]}"
    want="${RUN_KERNELS[$i]}"
    shard="${RUN_SHARDS[$i]}"
    out="$logdir/$key.log"
    echo
    cat "$out"
    rc=$(cat "$logdir/$key.rc" 2>/dev/null || echo 99)
    secs=$(cat "$logdir/$key.secs" 2>/dev/null || echo '?')
    counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)' "$out" | tail -1 \
        | sed 's/=//g; s/^ *//; s/ *$//' || true)
    part="${shard:+  shard $shard}"
    if [ "$rc" -eq 0 ]; then
        summary+=("PASS  -cpu $cpu  kernel=$want$part  ${counts:-?}  (${secs} s)")
    else
        [ "$rc" -eq 124 ] && why="timed out after ${TIMEOUT} s" || why="exit $rc"
        summary+=("FAIL  -cpu $cpu  kernel=$want$part  ${counts:-?}  ($why, ${secs} s, log: $out)")
        failed=1
    fi
done
if [ "$have_train" = 1 ]; then
    echo
    cat "$logdir/train.log"
    rc=$(cat "$logdir/train.rc" 2>/dev/null || echo 99)
    secs=$(cat "$logdir/train.secs" 2>/dev/null || echo '?')
    if [ "$rc" -eq 0 ]; then
        summary+=("PASS  -cpu $TRAIN_CPU  edgelearn train --epochs 1  (${secs} s)")
    else
        summary+=("FAIL  -cpu $TRAIN_CPU  edgelearn train --epochs 1  (exit $rc, ${secs} s, log: $logdir/train.log)")
        failed=1
    fi
else
    summary+=("SKIP  edgelearn train --epochs 1: 'python -m edgelearn train --help' fails (no train subcommand)")
fi

echo
log "summary ($(basename "$WHEEL"), total $((SECONDS - t_start)) s):"
for line in "${summary[@]}"; do
    log "  $line"
done
[ "$failed" -eq 0 ] || die "aarch64 wheel tests failed"
log "aarch64 wheel tests passed"
