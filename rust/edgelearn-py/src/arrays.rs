//! Argument checks, zero-copy views of numpy arrays, and checked allocation of output arrays.
//!
//! Input arrays are read in place, except misaligned ones (e.g. `numpy.frombuffer(buf, offset=1)`),
//! which are copied once to an aligned array: kernels need naturally aligned elements. Arrays updated in
//! place cannot be copied, so misaligned ones are refused with that reason.

use numpy::ndarray::{Dimension, IntoDimension};
use numpy::npyffi::{self, npy_intp, PY_ARRAY_API};
use numpy::{
    Element, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::{to_py, type_error, value_error};

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
    if !untyped.is_aligned() {
        // A copy is aligned (and C-ordered); it lives as long as the returned borrow.
        let copy = arr.call_method0("copy")?;
        let copy = copy
            .cast_into::<PyArrayDyn<T>>()
            .map_err(|e| value_error(arg, format!("cannot copy the misaligned array: {e}")))?;
        return copy
            .try_readonly()
            .map_err(|e| value_error(arg, format!("cannot borrow the array: {e}")));
    }
    arr.try_readonly()
        .map_err(|e| value_error(arg, format!("cannot borrow the array: {e}")))
}

/// Refuses a misaligned array that would be updated in place (a copy would not be seen by the caller).
pub fn check_aligned_inplace(arg: &str, arr: &Bound<'_, PyUntypedArray>) -> PyResult<()> {
    if arr.is_aligned() {
        return Ok(());
    }
    Err(value_error(
        arg,
        "is not aligned to its element size (e.g. numpy.frombuffer with an odd offset) and is updated \
         in place, so it cannot be copied; pass an aligned array such as numpy.array(...)",
    ))
}

/// A new uninitialised C-ordered array of `dims`, named `arg` in errors: element counts beyond
/// [`MAX_ELEMENTS`] are a `ValueError`, sizes beyond the memory limit (`edgelearn.set_memory_limit`) or
/// refused by the system a `MemoryError`. Every caller writes all elements before Python sees them.
pub fn new_array<'py, T: Element, D: Dimension>(
    py: Python<'py>,
    arg: &str,
    dims: impl IntoDimension<Dim = D>,
) -> PyResult<Bound<'py, PyArray<T, D>>> {
    let dims = dims.into_dimension();
    let n = check_size(arg, dims.slice())?;
    edgelearn_core::alloc::check(arg, n, std::mem::size_of::<T>()).map_err(to_py)?;
    let mut np_dims: Vec<npy_intp> = dims.slice().iter().map(|&d| d as npy_intp).collect();
    // SAFETY: the arguments are what numpy's PyArray_NewFromDescr expects (the dtype reference is
    // stolen; null strides, data and base ask numpy to allocate a C-ordered array); a null result
    // carries a Python exception (MemoryError when the allocation fails), returned as the error.
    unsafe {
        let ptr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            T::get_dtype(py).into_dtype_ptr(),
            np_dims.len() as std::os::raw::c_int,
            np_dims.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
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
