//! Argument checks and zero-copy views of numpy arrays.

use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::{type_error, value_error};

/// Largest element count accepted for one array (guards against absurd sizes before allocating).
pub const MAX_ELEMENTS: usize = 1 << 34;

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A read-only numpy array of element type `T` with `ndim` dimensions (any if `None`), or a clear error
/// naming `arg`, the expected dtype and what was given.
pub fn readonly<'py, T: Element>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    dtype_name: &str,
    ndim: Option<usize>,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        type_error(
            arg,
            format!(
                "expected a numpy.ndarray of dtype {dtype_name}, got {}",
                type_name(obj)
            ),
        )
    })?;
    if let Some(nd) = ndim {
        if untyped.ndim() != nd {
            return Err(value_error(
                arg,
                format!(
                    "expected {nd} dimensions, got {} (shape {:?})",
                    untyped.ndim(),
                    untyped.shape()
                ),
            ));
        }
    }
    let arr = obj.cast::<PyArrayDyn<T>>().map_err(|_| {
        let got = untyped
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into());
        type_error(
            arg,
            format!(
                "expected dtype {dtype_name}, got {got} (convert with .astype(numpy.{dtype_name}))"
            ),
        )
    })?;
    arr.try_readonly()
        .map_err(|e| value_error(arg, format!("cannot borrow the array: {e}")))
}

/// Element strides of a 2-D view, checked to be non-negative with one unit stride (C- or F-ordered
/// rows/columns), so it can be read in place.
pub fn strides_2d(arg: &str, shape: &[usize], strides: &[isize]) -> PyResult<(usize, usize)> {
    let (rows, cols) = (shape[0], shape[1]);
    // A stride along an axis of length ≤ 1 is never used: normalise it.
    let rs = if rows <= 1 {
        cols.max(1) as isize
    } else {
        strides[0]
    };
    let cs = if cols <= 1 { 1 } else { strides[1] };
    if rs < 0 || cs < 0 {
        return Err(value_error(
            arg,
            "has negative strides (a reversed view); pass numpy.ascontiguousarray(...) instead",
        ));
    }
    let (rs, cs) = (rs as usize, cs as usize);
    if rs != 1 && cs != 1 && rows > 1 && cols > 1 {
        return Err(value_error(
            arg,
            format!(
                "is not contiguous along either axis (element strides {rs}, {cs}); pass a C- or F-ordered \
                 array such as numpy.ascontiguousarray(...)"
            ),
        ));
    }
    Ok((rs, cs))
}

/// The memory a strided 2-D view spans, as a slice starting at its first element.
///
/// # Safety
/// `ptr` is the first element of a live array with this shape and these element strides.
pub unsafe fn span<'a, T>(
    ptr: *const T,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> &'a [T] {
    if rows == 0 || cols == 0 {
        return &[];
    }
    std::slice::from_raw_parts(ptr, (rows - 1) * rs + (cols - 1) * cs + 1)
}

/// Rejects element counts beyond [`MAX_ELEMENTS`] before anything is allocated.
pub fn check_size(arg: &str, dims: &[usize]) -> PyResult<usize> {
    let mut n: usize = 1;
    for &d in dims {
        n = n
            .checked_mul(d)
            .filter(|&x| x <= MAX_ELEMENTS)
            .ok_or_else(|| {
                value_error(
                    arg,
                    format!("shape {dims:?} is too large (limit {MAX_ELEMENTS} elements)"),
                )
            })?;
    }
    Ok(n)
}
