//! Dense b-bit packing, `b ∈ 1..=8`, least significant bit first: code `i` of a stream occupies stream
//! bits `i·b .. i·b+b`, and stream bit `k` is bit `k mod 8` of byte `k / 8`.
//!
//! Eight codes always fill exactly `b` bytes, so a stream cut at code indices that are multiples of 8 is
//! cut at byte boundaries: that is how encoding splits work between threads. The hot loops handle 8
//! codes per step through one u64, specialised per `b` so they unroll.

/// Bytes needed for `count` codes of `bits` bits (None on overflow).
pub fn packed_len(count: usize, bits: u32) -> Option<usize> {
    Some(count.checked_mul(bits as usize)?.div_ceil(8))
}

#[inline(always)]
fn pack_blocks<const B: usize>(codes: &[u8], out: &mut [u8]) {
    for (c, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(B)) {
        let mut v = 0u64;
        for (k, &q) in c.iter().enumerate() {
            v |= (q as u64) << (k * B);
        }
        o.copy_from_slice(&v.to_le_bytes()[..B]);
    }
}

#[inline(always)]
fn unpack_blocks<const B: usize>(packed: &[u8], codes: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    for (p, c) in packed.chunks_exact(B).zip(codes.chunks_exact_mut(8)) {
        let mut w = [0u8; 8];
        w[..B].copy_from_slice(p);
        let v = u64::from_le_bytes(w);
        for (k, q) in c.iter_mut().enumerate() {
            *q = ((v >> (k * B)) & mask) as u8;
        }
    }
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must hold exactly [`packed_len`]`(codes.len())`
/// bytes; the stream starts at bit 0 of `out[0]`. Unused high bits of the last byte are 0.
pub fn pack(codes: &[u8], bits: u32, out: &mut [u8]) {
    debug_assert!((1..=8).contains(&bits));
    debug_assert_eq!(Some(out.len()), packed_len(codes.len(), bits));
    let full = codes.len() / 8 * 8;
    let body = full / 8 * bits as usize;
    let (cb, ob) = (&codes[..full], &mut out[..body]);
    match bits {
        1 => pack_blocks::<1>(cb, ob),
        2 => pack_blocks::<2>(cb, ob),
        3 => pack_blocks::<3>(cb, ob),
        4 => pack_blocks::<4>(cb, ob),
        5 => pack_blocks::<5>(cb, ob),
        6 => pack_blocks::<6>(cb, ob),
        7 => pack_blocks::<7>(cb, ob),
        _ => ob.copy_from_slice(cb),
    }
    let tail = &codes[full..];
    if !tail.is_empty() {
        let mut v = 0u64;
        for (k, &q) in tail.iter().enumerate() {
            v |= (q as u64) << (k * bits as usize);
        }
        let rest = &mut out[body..];
        let n = rest.len();
        rest.copy_from_slice(&v.to_le_bytes()[..n]);
    }
}

/// Code `index` of a packed stream (`packed` must hold it).
#[inline(always)]
fn code_at(packed: &[u8], bits: u32, index: usize) -> u8 {
    let bit = index * bits as usize;
    let byte = bit / 8;
    let lo = packed.get(byte).copied().unwrap_or(0) as u16;
    let hi = packed.get(byte + 1).copied().unwrap_or(0) as u16;
    (((lo | (hi << 8)) >> (bit % 8)) & ((1u16 << bits) - 1)) as u8
}

/// Reads codes `first .. first + codes.len()` of the stream `packed` (which must hold them) into
/// `codes`. Any `first`; the aligned middle runs 8 codes per step.
pub fn unpack(packed: &[u8], bits: u32, first: usize, codes: &mut [u8]) {
    debug_assert!((1..=8).contains(&bits));
    let n = codes.len();
    let head = ((8 - first % 8) % 8).min(n);
    for (i, q) in codes[..head].iter_mut().enumerate() {
        *q = code_at(packed, bits, first + i);
    }
    let aligned = first + head;
    let full = (n - head) / 8 * 8;
    let start_byte = aligned / 8 * bits as usize;
    let body_bytes = full / 8 * bits as usize;
    let src = packed
        .get(start_byte..start_byte + body_bytes)
        .unwrap_or(&[]);
    let dst = &mut codes[head..head + full];
    match bits {
        1 => unpack_blocks::<1>(src, dst),
        2 => unpack_blocks::<2>(src, dst),
        3 => unpack_blocks::<3>(src, dst),
        4 => unpack_blocks::<4>(src, dst),
        5 => unpack_blocks::<5>(src, dst),
        6 => unpack_blocks::<6>(src, dst),
        7 => unpack_blocks::<7>(src, dst),
        _ => {
            if src.len() == dst.len() {
                dst.copy_from_slice(src)
            }
        }
    }
    for i in head + full..n {
        codes[i] = code_at(packed, bits, first + i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(n: usize, bits: u32, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s as u8) & (((1u16 << bits) - 1) as u8)
            })
            .collect()
    }

    #[test]
    fn pack_matches_the_documented_bit_order() {
        // codes 1, 2, 3 at 2 bits: bits 0-1 = 01, 2-3 = 10, 4-5 = 11 -> 0b0011_1001
        let mut out = [0u8; 1];
        pack(&[1, 2, 3], 2, &mut out);
        assert_eq!(out, [0b0011_1001]);
        // 3-bit codes straddle bytes: 7, 0, 5 -> bits 111 000 101 -> byte0 = 0b01_000_111, byte1 = 0b1
        let mut out = [0u8; 2];
        pack(&[7, 0, 5], 3, &mut out);
        assert_eq!(out, [0b0100_0111, 0b0000_0001]);
    }

    #[test]
    fn unpack_inverts_pack_from_any_offset() {
        for bits in 1..=8 {
            for n in [0usize, 1, 7, 8, 9, 63, 64, 200] {
                let c = codes(n, bits, 7 + n as u64);
                let mut packed = vec![0u8; packed_len(n, bits).unwrap()];
                pack(&c, bits, &mut packed);
                for first in 0..n.min(19) {
                    let mut back = vec![0u8; n - first];
                    unpack(&packed, bits, first, &mut back);
                    assert_eq!(back, c[first..], "bits {bits} n {n} first {first}");
                }
            }
        }
    }
}
