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
    if g.len() != p.len() {
        return Err(Error::invalid(
            "grad",
            format!("has {} elements, the parameter {}", g.len(), p.len()),
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
        (true, Some(b)) if b.len() != p.len() => {
            return Err(Error::invalid(
                "momentum_buffer",
                format!("has {} elements, the parameter {}", b.len(), p.len()),
            ))
        }
        (true, Some(b)) => Some(b),
    };
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
    Ok(())
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
}
