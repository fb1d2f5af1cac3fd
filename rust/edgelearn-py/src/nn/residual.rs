//! The residual add of a block (`edgelearn_core::nn::residual`).

use edgelearn_core::nn;
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

use crate::arrays::{as_mut, inout_arr, In};
use crate::errors::{value_error, CoreResultExt};
use crate::octo::ActivationRange;

/// `out += identity` in place (float32, C-contiguous, the same shape; the same bits as numpy's add).
/// Returns the sum's `ActivationRange` (for `octo_forward(x_range=...)`), `None` if it has NaN or an
/// infinity.
#[pyfunction]
fn residual_add_<'py>(
    py: Python<'py>,
    out: &Bound<'py, PyAny>,
    identity: &Bound<'py, PyAny>,
) -> PyResult<Option<ActivationRange>> {
    let identity = In::<f32>::new("identity", identity, "float32", None)?;
    let mut ow = inout_arr("out", out, None)?;
    if ow.shape() != identity.shape.as_slice() {
        return Err(value_error(
            "identity",
            format!(
                "expected the shape of out {:?}, got {:?}",
                ow.shape(),
                identity.shape
            ),
        ));
    }
    let ov = as_mut(&mut ow)?;
    let iv = identity.slice();
    let range = py.detach(|| nn::residual_add_inplace(ov, iv)).py()?;
    Ok(range.map(ActivationRange::from))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(residual_add_, m)?)?;
    Ok(())
}
