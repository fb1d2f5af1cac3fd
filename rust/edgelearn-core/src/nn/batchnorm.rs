//! 2-D batch normalisation over NCHW (statistics per channel over N, H, W), PyTorch semantics:
//! training normalises with the biased batch variance and updates the running variance with the
//! unbiased one; evaluation uses the running statistics.

use rayon::prelude::*;

use super::{check_len, for_each_chunk, worth_parallel};
use crate::error::{Error, Result};
use crate::threads;

/// Per-channel `(Σ f(x), Σ g(x))`-style reductions: `f(c)` for every channel, in the pool if large.
fn per_channel<R: Send>(c: usize, parallel: bool, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    if parallel {
        threads::install(|| (0..c).into_par_iter().map(&f).collect())
    } else {
        (0..c).map(f).collect()
    }
}

/// `(Σ a, Σ b)` over paired elements with `f(u, v) -> (a, b)`, accumulated in 8 f32 lanes per block of
/// 512 and in f64 across blocks (vectorises, and stays accurate over large batches).
#[inline(always)]
fn pair_sums(u: &[f32], v: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    let (mut s0, mut s1) = (0f64, 0f64);
    for (ub, vb) in u.chunks(512).zip(v.chunks(512)) {
        let (mut l0, mut l1) = ([0f32; 8], [0f32; 8]);
        for (uc, vc) in ub.chunks_exact(8).zip(vb.chunks_exact(8)) {
            for t in 0..8 {
                let (a, b) = f(uc[t], vc[t]);
                l0[t] += a;
                l1[t] += b;
            }
        }
        let tail = ub.len() / 8 * 8;
        for (&a, &b) in ub[tail..].iter().zip(&vb[tail..]) {
            let (a, b) = f(a, b);
            s0 += a as f64;
            s1 += b as f64;
        }
        s0 += l0.iter().map(|&x| x as f64).sum::<f64>();
        s1 += l1.iter().map(|&x| x as f64).sum::<f64>();
    }
    (s0, s1)
}

/// [`pair_sums`] over the `n` planes of channel `ch` of two NCHW tensors.
fn channel_sums(u: &[f32], v: &[f32], n: usize, c: usize, hw: usize, ch: usize, f: impl Fn(f32, f32) -> (f32, f32) + Copy) -> (f64, f64) {
    (0..n).fold((0.0, 0.0), |(a, b), i| {
        let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
        let (da, db) = pair_sums(&u[r.clone()], &v[r], f);
        (a + da, b + db)
    })
}

fn opt_len(arg: &'static str, v: Option<&[f32]>, c: usize) -> Result<()> {
    match v {
        Some(v) => check_len(arg, v.len(), &[c]),
        None => Ok(()),
    }
}

/// Forward. `x`, `y`: `(N, C, H, W)`; `gamma`, `beta` (none: 1 and 0), `running_mean`, `running_var`,
/// `mean`, `invstd`: `C` values. Writes `y` and the statistics used (`mean`, `invstd = 1/√(var+eps)`);
/// in training also updates the running statistics in place with `momentum` (PyTorch's convention:
/// `running = (1−momentum)·running + momentum·batch`).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward(
    x: &[f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    training: bool,
    momentum: f32,
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    invstd: &mut [f32],
) -> Result<()> {
    let [n, c, h, w] = shape;
    check_len("x", x.len(), &shape)?;
    check_len("y", y.len(), &shape)?;
    opt_len("gamma", gamma, c)?;
    opt_len("beta", beta, c)?;
    check_len("running_mean", running_mean.len(), &[c])?;
    check_len("running_var", running_var.len(), &[c])?;
    check_len("mean", mean.len(), &[c])?;
    check_len("invstd", invstd.len(), &[c])?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid("eps", format!("must be finite and >= 0, got {eps}")));
    }
    if !(momentum.is_finite() && (0.0..=1.0).contains(&momentum)) {
        return Err(Error::invalid("momentum", format!("must be in [0, 1], got {momentum}")));
    }
    let hw = h * w;
    let m = n * hw;
    let parallel = worth_parallel(x.len());
    if training {
        if m <= 1 {
            return Err(Error::invalid(
                "x",
                format!("expected more than 1 value per channel when training, got shape {shape:?}"),
            ));
        }
        // Shifted sums (shift = the channel's first value) keep E[x²]−E[x]² free of cancellation.
        let stats = per_channel(c, parallel, |ch| {
            let shift = x[ch * hw];
            let (s, ss) = channel_sums(x, x, n, c, hw, ch, |v, _| {
                let d = v - shift;
                (d, d * d)
            });
            let dm = s / m as f64;
            let var = (ss / m as f64 - dm * dm).max(0.0);
            (shift as f64 + dm, var)
        });
        for (ch, &(mu, var)) in stats.iter().enumerate() {
            mean[ch] = mu as f32;
            invstd[ch] = (1.0 / (var + eps as f64).sqrt()) as f32;
            let unbiased = var * m as f64 / (m - 1) as f64;
            running_mean[ch] = ((1.0 - momentum) as f64 * running_mean[ch] as f64 + momentum as f64 * mu) as f32;
            running_var[ch] = ((1.0 - momentum) as f64 * running_var[ch] as f64 + momentum as f64 * unbiased) as f32;
        }
    } else {
        for ch in 0..c {
            mean[ch] = running_mean[ch];
            invstd[ch] = (1.0 / (running_var[ch] as f64 + eps as f64).sqrt()) as f32;
        }
    }
    // y = x·a + b with a = γ·invstd, b = β − mean·a.
    let ab: Vec<(f32, f32)> = (0..c)
        .map(|ch| {
            let a = gamma.map_or(1.0, |g| g[ch]) * invstd[ch];
            (a, beta.map_or(0.0, |b| b[ch]) - mean[ch] * a)
        })
        .collect();
    if hw == 0 {
        return Ok(());
    }
    for_each_chunk(y, hw, parallel, |plane, yp| {
        let (a, b) = ab[plane % c];
        for (o, &v) in yp.iter_mut().zip(&x[plane * hw..(plane + 1) * hw]) {
            *o = v * a + b;
        }
    });
    Ok(())
}

/// Backward of training-mode [`batchnorm2d_forward`] given the `mean` and `invstd` it returned:
/// `dx (N, C, H, W)`, `dgamma`, `dbeta (C,)`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward(
    dy: &[f32],
    x: &[f32],
    shape: [usize; 4],
    gamma: Option<&[f32]>,
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let [n, c, h, w] = shape;
    check_len("x", x.len(), &shape)?;
    check_len("dy", dy.len(), &shape)?;
    check_len("dx", dx.len(), &shape)?;
    opt_len("gamma", gamma, c)?;
    check_len("mean", mean.len(), &[c])?;
    check_len("invstd", invstd.len(), &[c])?;
    check_len("dgamma", dgamma.len(), &[c])?;
    check_len("dbeta", dbeta.len(), &[c])?;
    let hw = h * w;
    let m = (n * hw) as f64;
    let parallel = worth_parallel(x.len());
    let sums = per_channel(c, parallel, |ch| {
        let mu = mean[ch];
        channel_sums(dy, x, n, c, hw, ch, |g, v| (g, g * (v - mu)))
    });
    // dx = γ·invstd·(dy − Σdy/M − x̂·Σ(dy·x̂)/M), written as dx = dy·a + x·b + k per channel.
    let coef: Vec<(f32, f32, f32)> = (0..c)
        .map(|ch| {
            let (sdy, sdyxc) = sums[ch];
            let is = invstd[ch] as f64;
            dbeta[ch] = sdy as f32;
            dgamma[ch] = (sdyxc * is) as f32;
            if m == 0.0 {
                return (0.0, 0.0, 0.0);
            }
            let g = gamma.map_or(1.0, |g| g[ch]) as f64;
            let a = g * is;
            let b = -a * is * is * sdyxc / m;
            let k = -a * sdy / m - b * mean[ch] as f64;
            (a as f32, b as f32, k as f32)
        })
        .collect();
    if hw == 0 {
        return Ok(());
    }
    for_each_chunk(dx, hw, parallel, |plane, dp| {
        let (a, b, k) = coef[plane % c];
        let r = plane * hw..(plane + 1) * hw;
        for ((o, &g), &v) in dp.iter_mut().zip(&dy[r.clone()]).zip(&x[r]) {
            *o = g * a + v * b + k;
        }
    });
    Ok(())
}
