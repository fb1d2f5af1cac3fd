#!/usr/bin/env bash
# Fuzzes the SGQ frame decoder for a bounded time (default 60 s) on the stable toolchain: mutated valid
# frames of every kind (per-sample and per-frame ranges, constant-block maps, frames that leave the channel
# order to their stream; bit flips, truncations, flag and length-field edits with the CRC re-sealed, random
# bytes) must decode to Ok or Err without a panic or an allocation out of proportion to the frame
# (rust/edgelearn-core/tests/sgq_fuzz.rs). With a nightly toolchain and cargo-fuzz, the coverage-guided target in
# rust/edgelearn-core/fuzz runs too. Usage: scripts/fuzz-sgq.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
seed="${SGQ_FUZZ_SEED:-$(date +%s)}"
echo "sgq fuzz: ${seconds}s, seed ${seed} (reproduce with SGQ_FUZZ_SEED=${seed})"
SGQ_FUZZ_SECONDS="$seconds" SGQ_FUZZ_SEED="$seed" \
    cargo test -p edgelearn-core --release --test sgq_fuzz -- --nocapture
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    (cd rust/edgelearn-core && cargo +nightly fuzz run sgq_frame_decode -- -max_total_time="$seconds")
fi
