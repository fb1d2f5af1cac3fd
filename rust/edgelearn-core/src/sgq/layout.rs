//! Where every element sits: the 4-D shape, the grid of (group, stripe) blocks that share a range, and
//! the walk of the code stream in runs of consecutive elements with one source plane and one range.
//!
//! The code stream is ordered `(n, p, h, w)` with `p` the position in the channel order; position `p`
//! reads source channel `perm[p]`. A run never crosses a plane `(n, p)` or a stripe boundary, so within
//! a run the source is contiguous and the range constant.

use crate::error::{Error, Result};

/// An `N×C×H×W` shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    /// Number of elements (checked), or an error naming `arg`.
    pub fn elements(&self, arg: &'static str) -> Result<usize> {
        self.n
            .checked_mul(self.c)
            .and_then(|v| v.checked_mul(self.h))
            .and_then(|v| v.checked_mul(self.w))
            .ok_or_else(|| Error::invalid(arg, format!("shape {self:?} has too many elements")))
    }

    /// Elements of one channel plane (`H·W`); only call on a shape whose element count was checked.
    pub fn plane(&self) -> usize {
        self.h * self.w
    }
}

/// `max(H / 4, 1)`: the default rows per stripe.
pub fn default_stripe_rows(h: usize) -> usize {
    (h / 4).max(1)
}

/// The blocks that share one range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Channels per group.
    pub group: usize,
    /// Rows per stripe.
    pub stripe_rows: usize,
    /// `⌈C / group⌉`.
    pub groups: usize,
    /// `⌈H / stripe_rows⌉`.
    pub stripes: usize,
    /// False for one range over the whole tensor (uniform mode).
    pub per_block: bool,
    /// True: every sample has its own ranges; false: the N samples share them (one set per frame).
    pub per_sample: bool,
}

impl Grid {
    /// SGQ blocks; `group` and `stripe_rows` must be ≥ 1 and the shape non-empty. `per_sample`: one
    /// range per (sample, group, stripe), else one per (group, stripe) shared by the whole frame.
    pub fn sgq(shape: Shape, group: usize, stripe_rows: usize, per_sample: bool) -> Grid {
        let group = group.clamp(1, shape.c.max(1));
        let stripe_rows = stripe_rows.clamp(1, shape.h.max(1));
        Grid {
            group,
            stripe_rows,
            groups: shape.c.div_ceil(group),
            stripes: shape.h.div_ceil(stripe_rows),
            per_block: true,
            per_sample,
        }
    }

    /// One block: the whole tensor.
    pub fn whole(shape: Shape) -> Grid {
        Grid {
            group: shape.c.max(1),
            stripe_rows: shape.h.max(1),
            groups: 1,
            stripes: 1,
            per_block: false,
            per_sample: false,
        }
    }

    /// Number of ranges for `n` samples (checked).
    pub fn ranges(&self, n: usize) -> Option<usize> {
        if self.per_block {
            let n = if self.per_sample { n } else { 1 };
            n.checked_mul(self.groups)?.checked_mul(self.stripes)
        } else {
            Some(1)
        }
    }

    /// Index of the range of sample `n`, channel position `p`, row `h`.
    #[inline(always)]
    pub fn range_index(&self, n: usize, p: usize, h: usize) -> usize {
        if self.per_block {
            let n = if self.per_sample { n } else { 0 };
            (n * self.groups + p / self.group) * self.stripes + h / self.stripe_rows
        } else {
            0
        }
    }
}

/// A run of the code stream: `len` elements from code index `pos`, of sample `n` at channel position
/// `p`, starting at offset `hw` within the plane, all in range `range`.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub pos: usize,
    pub len: usize,
    pub n: usize,
    pub p: usize,
    pub hw: usize,
    pub range: usize,
}

/// Calls `f` on the runs covering code indices `[start, end)`, in order. The shape must be non-empty
/// with a checked element count ≥ `end`.
#[inline]
pub fn for_each_run(shape: Shape, grid: &Grid, start: usize, end: usize, mut f: impl FnMut(Run)) {
    let plane = shape.plane();
    let stripe_len = grid.stripe_rows * shape.w;
    let mut pos = start;
    while pos < end {
        let plane_idx = pos / plane;
        let hw = pos - plane_idx * plane;
        let (n, p) = (plane_idx / shape.c, plane_idx % shape.c);
        let h = hw / shape.w;
        let stripe_end = if grid.per_block {
            ((hw / stripe_len) + 1) * stripe_len
        } else {
            plane
        };
        let len = (stripe_end.min(plane) - hw).min(end - pos);
        f(Run {
            pos,
            len,
            n,
            p,
            hw,
            range: grid.range_index(n, p, h),
        });
        pos += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_stream_once_and_respect_stripes() {
        let shape = Shape {
            n: 2,
            c: 5,
            h: 7,
            w: 3,
        };
        let grid = Grid::sgq(shape, 2, 3, true);
        assert_eq!((grid.groups, grid.stripes), (3, 3));
        let total = shape.elements("x").unwrap();
        for (start, end) in [(0, total), (8, 40), (16, total)] {
            let mut next = start;
            for_each_run(shape, &grid, start, end, |r| {
                assert_eq!(r.pos, next);
                assert!(r.len > 0);
                let h0 = r.hw / shape.w;
                let h1 = (r.hw + r.len - 1) / shape.w;
                assert_eq!(h0 / 3, h1 / 3, "a run crosses a stripe");
                assert_eq!(r.range, grid.range_index(r.n, r.p, h1));
                next += r.len;
            });
            assert_eq!(next, end);
        }
    }
}
