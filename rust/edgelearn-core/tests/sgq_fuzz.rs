//! Stable-toolchain fuzzing of the SGQ frame decoder: mutate valid frames (bit flips, byte writes,
//! truncations, extensions, header-field edits with the CRC re-sealed so the deeper checks are reached,
//! binary16 NaN/infinity patterns written over the payload, random bytes) and require that `decode` returns
//! `Ok` with finite values only, or `Err`, without panicking and without any allocation larger than a bound
//! proportional to the frame (a counting global allocator checks).
//!
//! `cargo test --release --test sgq_fuzz` runs a short pass (a few seconds); `SGQ_FUZZ_SECONDS=N` runs
//! for N seconds (`scripts/fuzz-sgq.sh N`). `SGQ_FUZZ_SEED` picks the mutation stream. The nightly
//! cargo-fuzz target in `fuzz/` exercises the same entry point with coverage guidance.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edgelearn_core::quant::{Clip, Rounding};
use edgelearn_core::sgq::{self, frame, Mode, Plan, RangeScope, Settings, Shape};

struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only records the largest size requested.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: LargestAllocation = LargestAllocation;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let shapes = [
        (1, 1, 1, 1),
        (2, 5, 3, 4),
        (3, 7, 9, 2),
        (1, 16, 8, 8),
        (4, 3, 1, 1),
        (2, 4, 7, 1),
    ];
    for (i, &(n, c, h, w)) in shapes.iter().enumerate() {
        let shape = Shape { n, c, h, w };
        // ReLU-like: about a third zeros, and the first row of every plane zero (an empty image
        // border), so frames with a constant-block map mark some blocks
        let mut x: Vec<f32> = (0..n * c * h * w)
            .map(|_| ((rng.below(2000) as f32 - 700.0) / 100.0).max(0.0))
            .collect();
        for plane in x.chunks_mut(h * w) {
            plane[..w].fill(0.0);
        }
        for (mode, bits) in [
            (Mode::Sgq, 1 + (i as u8 % 8)),
            (Mode::Sgq, 8 - i as u8),
            (Mode::Uniform, 3),
            (Mode::Fp16, 16),
        ] {
            let rounding = if i % 2 == 0 {
                Rounding::Nearest
            } else {
                Rounding::Stochastic { seed: i as u64 }
            };
            let s = Settings {
                mode,
                bits: bits.clamp(1, 8),
                group: 1 + i % 3,
                stripe_rows: i % 3,
                rounding,
                ranges: if i % 3 == 1 {
                    RangeScope::Frame
                } else {
                    RangeScope::Sample
                },
                constant_blocks: i % 2 == 1,
                clip: match (mode, i % 3) {
                    (Mode::Sgq, 1) => Clip::Sigma { z: 1.5 },
                    (Mode::Sgq, 2) => Clip::MinMax { kappa: 0.7 },
                    _ => Clip::None,
                },
            };
            let ndim = if w == 1 && h == 1 {
                2
            } else if w == 1 {
                3
            } else {
                4
            };
            out.push(sgq::encode(&x, shape, ndim, &s, None).unwrap());
            if mode == Mode::Sgq && c > 1 {
                // a frame that leaves its (reversed) channel order to the stream
                let order: Vec<u32> = (0..c as u32).rev().collect();
                let mut plan = Plan::new(&x, shape, ndim, &s, Some(&order)).unwrap();
                plan.omit_order();
                let mut f = vec![0u8; plan.frame_len()];
                plan.write(&x, &mut f).unwrap();
                out.push(f);
            }
        }
    }
    out
}

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    let reseal = rng.below(2) == 0;
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
        }
        match rng.below(9) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                for _ in 0..1 + rng.below(16) {
                    b.push(rng.next() as u8);
                }
            }
            4 | 5 => {
                // a header field: a u32 among the shape/length fields, or a u64 codes length
                let at = [12, 16, 20, 24, 28, 32, 36, 40][rng.below(8)];
                let v: u32 = match rng.below(4) {
                    0 => rng.next() as u32,
                    1 => u32::MAX - rng.below(3) as u32,
                    2 => rng.below(70) as u32,
                    _ => 1 << rng.below(32),
                };
                if b.len() >= at + 4 {
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            8 => {
                // a binary16 NaN or infinity over a payload value (fp16 codes, or range bounds)
                if b.len() >= frame::HEADER_LEN + 2 {
                    let at = frame::HEADER_LEN + 2 * rng.below((b.len() - frame::HEADER_LEN) / 2);
                    let v: u16 = [0x7E00, 0x7C00, 0xFC00, 0x7C01][rng.below(4)];
                    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            6 => {
                if b.len() >= 52 {
                    let v = rng.next() >> rng.below(64);
                    b[44..52].copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                // byte 9 (the flags) among them: stream order / frame ranges on and off
                let i = rng.below(12);
                if b.len() > i {
                    b[i] = rng.below(20) as u8;
                }
            }
        }
    }
    if reseal && b.len() >= frame::HEADER_LEN {
        frame::seal(&mut b);
    }
    b
}

/// One decode under the allocation check; returns whether it succeeded.
fn check_one(bytes: &[u8]) -> bool {
    LARGEST.store(0, Ordering::Relaxed);
    // frames that use the stream's order get one (of the header's C when it can be read), to reach
    // the decoder past the order check
    let c = bytes
        .get(16..20)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0);
    let stream: Vec<u32> = (0..c.min(64) as u32).rev().collect();
    let result = sgq::decode_with_order(bytes, Some(&stream));
    let largest = LARGEST.load(Ordering::Relaxed);
    // the output is at most MAX_EXPANSION f32 bytes per frame byte (32 without constant blocks, 1-bit
    // codes); anything beyond is header-sized
    let limit = sgq::MAX_EXPANSION * bytes.len() + (1 << 20);
    assert!(
        largest <= limit,
        "decode of a {}-byte frame allocated {largest} bytes",
        bytes.len()
    );
    if let Ok((h, y)) = &result {
        assert_eq!(y.len(), h.shape.elements("x").unwrap());
        // encoders refuse non-finite values, so a decoded frame never holds one
        assert!(
            y.iter().all(|v| v.is_finite()),
            "a {}-byte frame decoded to a non-finite value",
            bytes.len()
        );
    }
    result.is_ok()
}

#[test]
fn decoder_survives_mutated_frames() {
    let seconds: u64 = std::env::var("SGQ_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let seed: u64 = std::env::var("SGQ_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_F00D);
    let mut rng = Rng(seed | 1);
    let corpus = seeds(&mut rng);
    let marked = corpus
        .iter()
        .filter(|f| {
            let f = sgq::parse(f).unwrap();
            (0..8 * f.map.len()).any(|i| f.is_constant(i))
        })
        .count();
    assert!(marked > 0, "no seed frame has a constant block");
    for f in &corpus {
        assert!(check_one(f), "a valid frame was rejected");
        let stream_order = sgq::parse(f).unwrap().header.stream_order;
        assert_eq!(sgq::decode(f).is_ok(), !stream_order);
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut iterations, mut accepted) = (0u64, 0u64);
    loop {
        let base = &corpus[rng.below(corpus.len())];
        let m = if rng.below(50) == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            mutate(&mut rng, base)
        };
        accepted += check_one(&m) as u64;
        iterations += 1;
        if (seconds == 0 && iterations >= 100_000)
            || (seconds > 0 && iterations % 256 == 0 && Instant::now() >= deadline)
        {
            break;
        }
    }
    eprintln!(
        "sgq fuzz: {} seed frames ({marked} with constant blocks), {iterations} mutated frames (seed \
         {seed}), {accepted} decoded, no panic",
        corpus.len()
    );
}
