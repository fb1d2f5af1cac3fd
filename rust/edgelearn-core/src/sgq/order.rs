//! Channel re-ordering by similarity: channels whose value ranges are alike should share a group, so
//! that one shared range wastes little of the code grid on any of them.
//!
//! Rule: sort channels by the width of their range over the whole tensor (`max − min`), then by its
//! midpoint, then by index (a total, deterministic order). On post-ReLU features, where every channel's
//! min is about 0, this puts channels of similar scale together, which is what matters for the error.

/// Per-channel `(min, max)` over the whole tensor → the order: entry `p` is the source channel at
/// position `p`. Values must be finite.
pub fn order_from_ranges(ranges: &[(f32, f32)]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..ranges.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        let (amin, amax) = ranges[a as usize];
        let (bmin, bmax) = ranges[b as usize];
        let key = |mn: f32, mx: f32| (mx as f64 - mn as f64, mx as f64 + mn as f64);
        let (aw, am) = key(amin, amax);
        let (bw, bm) = key(bmin, bmax);
        aw.total_cmp(&bw).then(am.total_cmp(&bm)).then(a.cmp(&b))
    });
    idx
}

/// True if `perm` is `0, 1, …, len − 1`.
pub fn is_identity(perm: &[u32]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| p as usize == i)
}

/// Checks that `perm` holds each of `0..perm.len()` once.
pub fn is_permutation(perm: &[u32]) -> bool {
    let mut seen = vec![false; perm.len()];
    for &p in perm {
        match seen.get_mut(p as usize) {
            Some(s) if !*s => *s = true,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_of_similar_width_end_up_adjacent() {
        let ranges = [(0.0, 10.0), (0.0, 1.0), (0.0, 9.5), (0.0, 1.1), (-1.0, 0.0)];
        // widths 10, 1, 9.5, 1.1, 1 (midpoint -0.5 < 0.5)
        assert_eq!(order_from_ranges(&ranges), vec![4, 1, 3, 2, 0]);
    }

    #[test]
    fn permutation_checks() {
        assert!(is_permutation(&[2, 0, 1]));
        assert!(!is_permutation(&[2, 2, 1]));
        assert!(!is_permutation(&[0, 3, 1]));
        assert!(is_identity(&[0, 1, 2]) && !is_identity(&[1, 0]));
    }
}
