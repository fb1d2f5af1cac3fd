//! `gemm_i8`, `gemm_i8_f32`: argument checks, zero-copy views, GIL released around the kernel.

use edgelearn_core::gemm::{self, MatRef, Scale};
use numpy::ndarray::Ix2;
use numpy::{PyArray, PyArray2, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{check_size, new_array, readonly, span, strides_2d};
use crate::errors::{type_error, value_error, CoreResultExt};

/// A checked 2-D int8 operand: readonly borrow plus its strides.
struct Operand<'py> {
    arr: PyReadonlyArrayDyn<'py, i8>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'py> Operand<'py> {
    fn new(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let arr = readonly::<i8>(arg, obj, "int8", Some(2))?;
        let shape = arr.shape().to_vec();
        let strides: Vec<isize> = arr.strides().iter().map(|s| *s as isize).collect();
        let (rs, cs) = strides_2d(arg, &shape, &strides)?;
        Ok(Operand {
            arr,
            rows: shape[0],
            cols: shape[1],
            rs,
            cs,
        })
    }
    fn view(&self) -> PyResult<MatRef<'_>> {
        // SAFETY: the pointer and byte strides come from a live, borrowed numpy array (strides are in
        // elements for i8).
        let data = unsafe {
            span(
                self.arr.data() as *const i8,
                self.rows,
                self.cols,
                self.rs,
                self.cs,
            )
        };
        MatRef::new(data, self.rows, self.cols, self.rs, self.cs).py()
    }
}

fn check_inner(a: &Operand, b: &Operand) -> PyResult<()> {
    if a.cols != b.rows {
        return Err(value_error(
            "b",
            format!(
                "inner dimensions differ: a has shape ({}, {}), b has shape ({}, {}); a.shape[1] must equal b.shape[0]",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    Ok(())
}

/// `C[i32] = A[i8] · B[i8]`; `a`: int8 (M, K), `b`: int8 (K, N), C- or F-ordered, read in place.
#[pyfunction]
pub fn gemm_i8<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let (a, b) = (Operand::new("a", a)?, Operand::new("b", b)?);
    check_inner(&a, &b)?;
    // K above gemm::MAX_K_I32 is the core's AccumulatorOverflowError (checked before any write).
    check_size("result", &[a.rows, b.cols])?;
    let kernel = gemm::active_kernel().py()?;
    // Uninitialised output; the driver writes every element before Python sees it.
    let out: Bound<'py, PyArray<i32, Ix2>> = new_array(py, "result", [a.rows, b.cols])?;
    {
        let mut out_rw = out.readwrite();
        let c = out_rw
            .as_slice_mut()
            .map_err(|e| value_error("result", e))?;
        let (av, bv) = (a.view()?, b.view()?);
        py.detach(|| gemm::gemm_i8_with(kernel, gemm::Blocking::default(), &av, &bv, c))
            .py()?;
    }
    Ok(out)
}

/// A scale argument: a Python/numpy scalar, or a 1-D float32 array of length `n`.
enum ScaleArg<'py> {
    Scalar(f32),
    Vector(PyReadonlyArrayDyn<'py, f32>),
}

impl<'py> ScaleArg<'py> {
    fn new(arg: &str, obj: &Bound<'py, PyAny>, n: usize, what: &str) -> PyResult<Self> {
        let is_array = obj.cast::<numpy::PyUntypedArray>().is_ok();
        if is_array {
            let arr = readonly::<f32>(arg, obj, "float32", None)?;
            return match arr.ndim() {
                0 => Ok(ScaleArg::Scalar(
                    arr.as_array().iter().next().copied().unwrap_or(0.0),
                )),
                1 if arr.len() == n => Ok(ScaleArg::Vector(arr)),
                1 => Err(value_error(
                    arg,
                    format!("expected {n} values (one per {what}), got {}", arr.len()),
                )),
                d => Err(value_error(
                    arg,
                    format!("expected a scalar or a 1-D array, got {d} dimensions"),
                )),
            };
        }
        match obj.extract::<f64>() {
            Ok(v) => Ok(ScaleArg::Scalar(v as f32)),
            Err(_) => Err(type_error(
                arg,
                format!("expected a float or a float32 array of length {n} (one per {what})"),
            )),
        }
    }
    fn scale(&self) -> PyResult<Scale<'_>> {
        match self {
            ScaleArg::Scalar(s) => Ok(Scale::Scalar(*s)),
            ScaleArg::Vector(a) => Ok(Scale::PerIndex(
                a.as_slice().map_err(|e| value_error("scale", e))?,
            )),
        }
    }
}

/// `C[f32] = (A·B) · (scale_a[i]·scale_b[j]) + bias[j]`; any K (split internally so INT32 cannot overflow).
#[pyfunction]
#[pyo3(signature = (a, b, scale_a, scale_b, bias=None))]
pub fn gemm_i8_f32<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    scale_a: &Bound<'py, PyAny>,
    scale_b: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (a, b) = (Operand::new("a", a)?, Operand::new("b", b)?);
    check_inner(&a, &b)?;
    check_size("result", &[a.rows, b.cols])?;
    let sa = ScaleArg::new("scale_a", scale_a, a.rows, "row of a")?;
    let sb = ScaleArg::new("scale_b", scale_b, b.cols, "column of b")?;
    let bias = match bias {
        None => None,
        Some(obj) if obj.is_none() => None,
        Some(obj) => {
            let arr = readonly::<f32>("bias", obj, "float32", Some(1))?;
            if arr.len() != b.cols {
                return Err(value_error(
                    "bias",
                    format!(
                        "expected {} values (one per column of b), got {}",
                        b.cols,
                        arr.len()
                    ),
                ));
            }
            Some(arr)
        }
    };
    let kernel = gemm::active_kernel().py()?;
    // Uninitialised output; the driver writes every element before Python sees it.
    let out: Bound<'py, PyArray<f32, Ix2>> = new_array(py, "result", [a.rows, b.cols])?;
    {
        let mut out_rw = out.readwrite();
        let c = out_rw
            .as_slice_mut()
            .map_err(|e| value_error("result", e))?;
        let (av, bv) = (a.view()?, b.view()?);
        let (sa, sb) = (sa.scale()?, sb.scale()?);
        let bias_slice = match &bias {
            Some(arr) => Some(arr.as_slice().map_err(|e| value_error("bias", e))?),
            None => None,
        };
        py.detach(|| {
            gemm::gemm_i8_f32_with(
                kernel,
                gemm::Blocking::default(),
                &av,
                &bv,
                sa,
                sb,
                bias_slice,
                c,
            )
        })
        .py()?;
    }
    Ok(out)
}
