//! Argument checks, zero-copy views of numpy arrays, and checked allocation of output arrays: the helpers
//! every glue module takes its arguments with (arrays in and out, int pairs, scales).
//!
//! Input arrays are read in place, except misaligned ones (e.g. `numpy.frombuffer(buf, offset=1)`),
//! which are copied once to an aligned array: kernels need naturally aligned elements. Arrays updated in
//! place cannot be copied, so misaligned ones are refused with that reason.

use edgelearn_core::gemm::Scale;
use numpy::ndarray::{Dimension, IntoDimension, IxDyn};
use numpy::npyffi::{self, npy_intp, PY_ARRAY_API};
use numpy::{
    Element, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

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

/// A read-only, C-contiguous array with its shape.
pub(crate) struct In<'py, T: Element> {
    arr: PyReadonlyArrayDyn<'py, T>,
    pub(crate) shape: Vec<usize>,
}

impl<'py, T: Element> In<'py, T> {
    pub(crate) fn new(
        arg: &str,
        obj: &Bound<'py, PyAny>,
        dtype: &str,
        ndim: Option<usize>,
    ) -> PyResult<Self> {
        let arr = readonly::<T>(arg, obj, dtype, ndim)?;
        if !arr.is_c_contiguous() {
            return Err(value_error(
                arg,
                "must be C-contiguous; pass numpy.ascontiguousarray(...)",
            ));
        }
        let shape = arr.shape().to_vec();
        Ok(In { arr, shape })
    }
    pub(crate) fn slice(&self) -> &[T] {
        // C-contiguity was checked, so this cannot fail.
        self.arr.as_slice().unwrap_or(&[])
    }
    pub(crate) fn shape4(&self) -> [usize; 4] {
        [self.shape[0], self.shape[1], self.shape[2], self.shape[3]]
    }
}

pub(crate) fn f32_4d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<In<'py, f32>> {
    In::new(arg, obj, "float32", Some(4))
}
pub(crate) fn i8_4d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<In<'py, i8>> {
    In::new(arg, obj, "int8", Some(4))
}

/// An optional float32 vector of exactly `n` values (`None` or Python `None` → absent).
pub(crate) fn opt_vec<'py>(
    arg: &str,
    obj: Option<&Bound<'py, PyAny>>,
    n: usize,
    what: &str,
) -> PyResult<Option<In<'py, f32>>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => Ok(Some(vec_of(arg, o, n, what)?)),
    }
}

pub(crate) fn vec_of<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    n: usize,
    what: &str,
) -> PyResult<In<'py, f32>> {
    let v = In::new(arg, obj, "float32", Some(1))?;
    if v.shape[0] != n {
        return Err(value_error(
            arg,
            format!("expected {n} values (one per {what}), got {}", v.shape[0]),
        ));
    }
    Ok(v)
}

/// An int or a 2-tuple/list of non-negative ints.
pub(crate) fn pair(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let as_dim = |o: &Bound<'_, PyAny>| -> PyResult<usize> {
        if o.is_instance_of::<pyo3::types::PyBool>() {
            return Err(type_error(
                arg,
                "expected an int or a pair of ints, got a bool",
            ));
        }
        let v: i64 = o
            .extract()
            .map_err(|_| type_error(arg, "expected an int or a pair of ints"))?;
        usize::try_from(v).map_err(|_| value_error(arg, format!("must be non-negative, got {v}")))
    };
    if let Ok(t) = obj.cast::<PyTuple>() {
        if t.len() != 2 {
            return Err(value_error(
                arg,
                format!(
                    "expected an int or a pair of ints, got a tuple of {}",
                    t.len()
                ),
            ));
        }
        return Ok((as_dim(&t.get_item(0)?)?, as_dim(&t.get_item(1)?)?));
    }
    if let Ok(l) = obj.cast::<pyo3::types::PyList>() {
        if l.len() != 2 {
            return Err(value_error(
                arg,
                format!(
                    "expected an int or a pair of ints, got a list of {}",
                    l.len()
                ),
            ));
        }
        return Ok((as_dim(&l.get_item(0)?)?, as_dim(&l.get_item(1)?)?));
    }
    let v = as_dim(obj)?;
    Ok((v, v))
}

pub(crate) fn opt_pair(
    arg: &str,
    obj: Option<&Bound<'_, PyAny>>,
    default: usize,
) -> PyResult<(usize, usize)> {
    match obj {
        None => Ok((default, default)),
        Some(o) if o.is_none() => Ok((default, default)),
        Some(o) => pair(arg, o),
    }
}

/// A scale: a Python/numpy float, a 0-d array, or (if `per_index` is given) a float32 vector of that length.
pub(crate) enum ScaleArg<'py> {
    Scalar(f32),
    Vector(In<'py, f32>),
}

impl<'py> ScaleArg<'py> {
    pub(crate) fn new(
        arg: &str,
        obj: &Bound<'py, PyAny>,
        per_index: Option<(usize, &str)>,
    ) -> PyResult<Self> {
        if obj.cast::<PyUntypedArray>().is_ok() {
            let arr = readonly::<f32>(arg, obj, "float32", None)?;
            match (arr.ndim(), per_index) {
                (0, _) => {
                    return Ok(ScaleArg::Scalar(
                        arr.as_array().iter().next().copied().unwrap_or(0.0),
                    ))
                }
                (1, Some((n, what))) => return Ok(ScaleArg::Vector(vec_of(arg, obj, n, what)?)),
                (d, _) => {
                    return Err(value_error(
                        arg,
                        format!(
                            "expected a float{}, got an array with {d} dimensions",
                            if per_index.is_some() {
                                " or a 1-D float32 array"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
            }
        }
        if obj.is_instance_of::<pyo3::types::PyBool>() {
            return Err(type_error(arg, "expected a float, got a bool"));
        }
        let v: f64 = obj.extract().map_err(|_| {
            type_error(
                arg,
                format!(
                    "expected a float, got {}",
                    obj.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ),
            )
        })?;
        Ok(ScaleArg::Scalar(v as f32))
    }
    pub(crate) fn scale(&self) -> Scale<'_> {
        match self {
            ScaleArg::Scalar(s) => Scale::Scalar(*s),
            ScaleArg::Vector(v) => Scale::PerIndex(v.slice()),
        }
    }
    pub(crate) fn scalar(&self) -> f32 {
        match self {
            ScaleArg::Scalar(s) => *s,
            ScaleArg::Vector(_) => f32::NAN,
        }
    }
}

/// A new uninitialised C-ordered array; every caller overwrites all of it before returning it.
pub(crate) fn empty<'py, T: Element>(
    py: Python<'py>,
    arg: &str,
    dims: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    new_array(py, arg, IxDyn(dims))
}

pub(crate) fn as_mut<'a, T: Element>(
    arr: &'a mut numpy::PyReadwriteArrayDyn<'_, T>,
) -> PyResult<&'a mut [T]> {
    arr.as_slice_mut().map_err(|e| value_error("output", e))
}

/// A writable, C-contiguous float32 vector of `n` values, updated in place.
pub(crate) fn inout_vec<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    n: usize,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    readonly::<f32>(arg, obj, "float32", Some(1))?; // dtype/rank messages
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| type_error(arg, "expected a float32 numpy.ndarray"))?;
    if arr.len() != n {
        return Err(value_error(
            arg,
            format!("expected {n} values (one per channel), got {}", arr.len()),
        ));
    }
    check_aligned_inplace(arg, arr.as_untyped())?;
    if !arr.is_c_contiguous() {
        return Err(value_error(
            arg,
            "must be contiguous (it is updated in place)",
        ));
    }
    writable(arg, arr)
}

/// A writable, C-contiguous float32 array of any shape (or `ndim` dimensions), updated in place.
pub(crate) fn inout_arr<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    ndim: Option<usize>,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    readonly::<f32>(arg, obj, "float32", ndim)?; // dtype/rank messages
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| type_error(arg, "expected a float32 numpy.ndarray"))?;
    check_aligned_inplace(arg, arr.as_untyped())?;
    if !arr.is_c_contiguous() {
        return Err(value_error(
            arg,
            "must be C-contiguous (it is updated in place)",
        ));
    }
    writable(arg, arr)
}

pub(crate) fn dy_shape_check(arg: &str, got: &[usize], want: [usize; 4]) -> PyResult<()> {
    if got != want {
        return Err(value_error(
            arg,
            format!("expected shape {want:?} (the convolution's output), got {got:?}"),
        ));
    }
    Ok(())
}

pub(crate) type F32Out<'py> = Bound<'py, PyArrayDyn<f32>>;

/// `obj` as a float32 array (an argument already checked to be one).
pub(crate) fn f32_array<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<F32Out<'py>> {
    obj.cast::<PyArrayDyn<f32>>()
        .cloned()
        .map_err(|_| type_error(arg, "expected a float32 numpy.ndarray"))
}

/// The float32 result array of an op that takes `out=`: `out` when given (checked to be a writable,
/// aligned, C-contiguous float32 array of `shape`), else a new array (`new_arg` in errors).
pub(crate) fn out_or_new<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    new_arg: &str,
    shape: &[usize],
) -> PyResult<F32Out<'py>> {
    let Some(o) = out else {
        return empty::<f32>(py, new_arg, shape);
    };
    let got = inout_arr("out", o, None)?.shape().to_vec();
    if got != shape {
        return Err(value_error(
            "out",
            format!("expected shape {shape:?}, got {got:?}"),
        ));
    }
    f32_array("out", o)
}

/// A write borrow of a result array: fails (naming `arg`) when it shares memory with an argument the
/// op reads, which a caller's `out=` array may.
pub(crate) fn writable<'py>(
    arg: &str,
    arr: &F32Out<'py>,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    arr.try_readwrite().map_err(|e| {
        value_error(
            arg,
            format!("must be a writable array not aliasing another argument: {e}"),
        )
    })
}
