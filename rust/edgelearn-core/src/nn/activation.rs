//! ReLU forward and backward on flat buffers (any shape).

use super::{for_each_chunk, worth_parallel};
use crate::error::{Error, Result};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

fn same_len(arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(arg, format!("expected {want} elements (the input's size), got {got}")));
    }
    Ok(())
}

/// `y = max(x, 0)`; NaN stays NaN (like PyTorch).
pub fn relu_forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    same_len("y", y.len(), x.len())?;
    for_each_chunk(y, CHUNK, worth_parallel(x.len()), |i, yc| {
        for (o, &v) in yc.iter_mut().zip(&x[i * CHUNK..]) {
            *o = if v < 0.0 { 0.0 } else { v };
        }
    });
    Ok(())
}

/// `dx = dy` where `y > 0`, else 0 (`y` is the forward output).
pub fn relu_backward(dy: &[f32], y: &[f32], dx: &mut [f32]) -> Result<()> {
    same_len("y", y.len(), dy.len())?;
    same_len("dx", dx.len(), dy.len())?;
    for_each_chunk(dx, CHUNK, worth_parallel(dy.len()), |i, dc| {
        let (d, yv) = (&dy[i * CHUNK..], &y[i * CHUNK..]);
        for ((o, &g), &v) in dc.iter_mut().zip(d).zip(yv) {
            *o = if v > 0.0 { g } else { 0.0 };
        }
    });
    Ok(())
}
