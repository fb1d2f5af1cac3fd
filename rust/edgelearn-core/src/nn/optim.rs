//! Optimizer updates over many parameters in one call (the Python layer's `optim.SGD.step` hands every
//! parameter of a group over at once: one call per step instead of a few numpy passes per parameter).

use crate::error::{Error, Result};

/// Hyper-parameters of an SGD step, as the f32 values the update multiplies by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    /// `1 − dampening`.
    pub one_minus_dampening: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

/// One SGD step in place, PyTorch's update with its rounding (each product and sum rounded to f32, in
/// this order, never fused):
/// `g' = g + wd·p`; with momentum `buf = buf·μ + (1−d)·g'` and `g' = g' + μ·buf` (Nesterov) or `buf`;
/// then `p = p − lr·g'`. `buf` is required when `momentum ≠ 0` (the first step, which initialises it, is
/// the caller's) and ignored otherwise.
pub fn sgd_update(p: &mut [f32], g: &[f32], buf: Option<&mut [f32]>, h: &Sgd) -> Result<()> {
    let buf = checked_buffer(p.len(), g.len(), buf, h)?;
    update(p, g, buf, h);
    Ok(())
}

/// One parameter of [`sgd_update_all`]: the parameter, its gradient and its momentum buffer.
pub struct SgdParam<'a> {
    pub p: &'a mut [f32],
    pub g: &'a [f32],
    pub buf: Option<&'a mut [f32]>,
}

/// Elements per task of [`sgd_update_all`].
const PIECE: usize = 1 << 14;

/// [`sgd_update`] of every parameter (the same bits), in pieces spread over the pool when there is enough
/// work. Every parameter is checked before any is updated: an error leaves them all as they were.
pub fn sgd_update_all(params: Vec<SgdParam<'_>>, h: &Sgd) -> Result<()> {
    let mut checked = Vec::with_capacity(params.len());
    for (i, sp) in params.into_iter().enumerate() {
        let buf = checked_buffer(sp.p.len(), sp.g.len(), sp.buf, h).map_err(|e| match e {
            Error::InvalidArgument { arg, msg } => {
                Error::invalid(arg, format!("parameter {i}: {msg}"))
            }
            e => e,
        })?;
        checked.push((sp.p, sp.g, buf));
    }
    let total: usize = checked.iter().map(|(_, g, _)| g.len()).sum();
    // every parameter cut into pieces of at most PIECE elements (its gradient and buffer in step)
    let mut pieces: Vec<Piece<'_>> = Vec::with_capacity(total / PIECE + checked.len());
    for (p, g, buf) in checked {
        let mut bufs = buf.map(|b| b.chunks_mut(PIECE));
        for (pp, gp) in p.chunks_mut(PIECE).zip(g.chunks(PIECE)) {
            pieces.push((pp, gp, bufs.as_mut().and_then(|b| b.next())));
        }
    }
    let run = |(p, g, b): &mut Piece<'_>| update(p, g, b.as_deref_mut(), h);
    if super::worth_parallel(total) {
        crate::threads::for_each_piece(&mut pieces, 1, |_, one| {
            run(&mut one[0]);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|e| match e {});
    } else {
        pieces.iter_mut().for_each(run);
    }
    Ok(())
}

/// A piece of one parameter for [`sgd_update_all`]: its values, gradient and momentum buffer.
type Piece<'a> = (&'a mut [f32], &'a [f32], Option<&'a mut [f32]>);

/// The momentum buffer [`update`] takes (`None` without momentum), after checking the lengths.
fn checked_buffer<'a>(
    p: usize,
    g: usize,
    buf: Option<&'a mut [f32]>,
    h: &Sgd,
) -> Result<Option<&'a mut [f32]>> {
    if g != p {
        return Err(Error::invalid(
            "grad",
            format!("has {g} elements, the parameter {p}"),
        ));
    }
    let buf = match (h.momentum != 0.0, buf) {
        (false, _) => None,
        (true, None) => {
            return Err(Error::invalid(
                "momentum_buffer",
                "is required when momentum is not 0".to_string(),
            ))
        }
        (true, Some(b)) if b.len() != p => {
            return Err(Error::invalid(
                "momentum_buffer",
                format!("has {} elements, the parameter {p}", b.len()),
            ))
        }
        (true, Some(b)) => Some(b),
    };
    Ok(buf)
}

/// The update of [`sgd_update`] on checked arguments.
fn update(p: &mut [f32], g: &[f32], buf: Option<&mut [f32]>, h: &Sgd) {
    let (lr, mom, d1, wd) = (h.lr, h.momentum, h.one_minus_dampening, h.weight_decay);
    let decay = |pi: f32, gi: f32| if wd != 0.0 { gi + wd * pi } else { gi };
    match buf {
        None => {
            for (pi, &gi) in p.iter_mut().zip(g) {
                *pi = *pi - lr * decay(*pi, gi);
            }
        }
        Some(buf) => {
            for ((pi, &gi), bi) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                let gi = decay(*pi, gi);
                let b = *bi * mom + d1 * gi;
                *bi = b;
                let step = if h.nesterov { gi + mom * b } else { b };
                *pi = *pi - lr * step;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_written_out_update() {
        let h = Sgd {
            lr: 0.1,
            momentum: 0.9,
            one_minus_dampening: 1.0,
            weight_decay: 0.01,
            nesterov: true,
        };
        let (mut p, g, mut b) = (vec![1.0f32, -2.0], vec![0.5f32, 0.25], vec![0.2f32, -0.1]);
        sgd_update(&mut p, &g, Some(&mut b), &h).unwrap();
        let g0 = 0.5f32 + 0.01 * 1.0;
        let b0 = 0.2f32 * 0.9 + 1.0 * g0;
        assert_eq!(b[0], b0);
        assert_eq!(p[0], 1.0 - 0.1 * (g0 + 0.9 * b0));
        assert!(sgd_update(&mut p, &g, None, &h).is_err());
        assert!(sgd_update(&mut p, &g[..1], Some(&mut b), &h).is_err());
    }

    /// Many parameters at once, in pieces over the pool: the bits of one `sgd_update` per parameter; a bad
    /// parameter anywhere leaves every one as it was.
    #[test]
    fn update_all_equals_one_by_one_and_checks_first() {
        let lens = [1usize, 7, PIECE - 1, PIECE, 3 * PIECE + 5, 200_000, 0, 33];
        let val = |i: usize, j: usize| ((i * 7919 + j * 104_729) % 2001) as f32 / 1000.0 - 1.0;
        for nesterov in [false, true] {
            let h = Sgd {
                lr: 0.05,
                momentum: 0.9,
                one_minus_dampening: 0.9,
                weight_decay: 5e-4,
                nesterov,
            };
            let make = |k: usize| -> Vec<Vec<f32>> {
                lens.iter()
                    .enumerate()
                    .map(|(i, &n)| (0..n).map(|j| val(i + k, j)).collect())
                    .collect()
            };
            let (g, mut p0, mut b0) = (make(1), make(2), make(3));
            let (mut p1, mut b1) = (p0.clone(), b0.clone());
            for ((p, g), b) in p0.iter_mut().zip(&g).zip(b0.iter_mut()) {
                sgd_update(p, g, Some(b), &h).unwrap();
            }
            let all = p1
                .iter_mut()
                .zip(&g)
                .zip(b1.iter_mut())
                .map(|((p, g), b)| SgdParam { p, g, buf: Some(b) })
                .collect();
            sgd_update_all(all, &h).unwrap();
            assert_eq!(p0, p1);
            assert_eq!(b0, b1);
            // a short momentum buffer on the last parameter: an error, nothing updated
            let (p2, b2) = (p1.clone(), b1.clone());
            let last = b1.len() - 1;
            let mut items: Vec<SgdParam> = p1
                .iter_mut()
                .zip(&g)
                .zip(b1.iter_mut())
                .map(|((p, g), b)| SgdParam { p, g, buf: Some(b) })
                .collect();
            items[last].buf = None;
            let err = sgd_update_all(items, &h).unwrap_err();
            assert!(
                err.to_string().contains(&format!("parameter {last}")),
                "{err}"
            );
            assert_eq!(p1, p2);
            assert_eq!(b1, b2);
        }
    }
}
