//! FP32 matrix product (`edgelearn_core::nn::matmul`) on strided views.

use edgelearn_core::nn::{self, MatF32};
use numpy::{PyArray2, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{check_size, new_array, opt_vec, readonly, span, strides_2d};
use crate::errors::{value_error, CoreResultExt};

/// A strided 2-D float32 operand of `matmul_f32`.
struct Operand<'py> {
    arr: PyReadonlyArrayDyn<'py, f32>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'py> Operand<'py> {
    fn new(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let arr = readonly::<f32>(arg, obj, "float32", Some(2))?;
        let shape = arr.shape().to_vec();
        let mut strides = Vec::with_capacity(2);
        for &b in arr.strides() {
            if b % 4 != 0 {
                return Err(value_error(
                    arg,
                    "has strides that are not a multiple of the item size; pass a copy",
                ));
            }
            strides.push(b / 4);
        }
        let (rs, cs) = strides_2d(arg, &shape, &strides)?;
        Ok(Operand {
            arr,
            rows: shape[0],
            cols: shape[1],
            rs,
            cs,
        })
    }
    fn view(&self) -> PyResult<MatF32<'_>> {
        // SAFETY: pointer and element strides describe a live, borrowed numpy array.
        let data = unsafe {
            span(
                self.arr.data() as *const f32,
                self.rows,
                self.cols,
                self.rs,
                self.cs,
            )
        };
        MatF32::new(data, self.rows, self.cols, self.rs, self.cs).py()
    }
}

/// `a @ b + bias[None, :]` in float32; `a` (M, K) and `b` (K, N) may be C- or F-ordered (read in place).
#[pyfunction]
#[pyo3(signature = (a, b, bias=None))]
fn matmul_f32<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (a, b) = (Operand::new("a", a)?, Operand::new("b", b)?);
    if a.cols != b.rows {
        return Err(value_error(
            "b",
            format!(
                "inner dimensions differ: a has shape ({}, {}), b has shape ({}, {}); a.shape[1] must equal b.shape[0]",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    let bias = opt_vec("bias", bias, b.cols, "column of b")?;
    check_size("result", &[a.rows, b.cols])?;
    // matmul_f32 writes every element (bias or zero first when K = 0).
    let out: Bound<'py, PyArray2<f32>> = new_array(py, "result", [a.rows, b.cols])?;
    {
        let mut rw = out.readwrite();
        let c = rw.as_slice_mut().map_err(|e| value_error("result", e))?;
        let (av, bv) = (a.view()?, b.view()?);
        let bias = bias.as_ref().map(|v| v.slice());
        py.detach(|| nn::matmul_f32(&av, &bv, bias, c)).py()?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(matmul_f32, m)?)?;
    Ok(())
}
