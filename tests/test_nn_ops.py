"""Native nn operators (edgelearn._native) against numpy references, plus argument errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgelearn
from edgelearn import _native as nat

RNG = np.random.default_rng(1234)

CONV_CASES = [
    # (x shape, w shape, stride, padding)
    ((2, 3, 7, 5), (4, 3, 3, 3), 1, 1),
    ((3, 2, 9, 8), (5, 2, 3, 3), 2, (1, 1)),
    ((2, 4, 6, 6), (3, 4, 1, 1), 1, 0),
    ((1, 3, 5, 7), (2, 3, 1, 1), (2, 1), 0),
    ((2, 1, 8, 9), (6, 1, 5, 3), (2, 3), (2, 0)),
    ((9, 3, 11, 13), (8, 3, 3, 3), 1, 1),
    ((32, 16, 14, 14), (32, 16, 3, 3), 1, 1),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_ref(x, w, b, stride, padding, dy=None):
    """Direct convolution in float64 (loop over kernel offsets); with dy also returns dx, dw, db."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,oc->nohw", xp[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw], w[:, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    if dy is None:
        return y
    dy = dy.astype(np.float64)
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            sl = (slice(None), slice(None), slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw))
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, xp[sl])
            dxp[sl] += np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    return y, dxp[:, :, ph : ph + h, pw : pw + wd], dw, dy.sum(axis=(0, 2, 3))


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i8(*shape):
    return RNG.integers(-127, 128, size=shape).astype(np.int8)


def assert_close(got, want, rtol=1e-5):
    want = np.asarray(want)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("xs,ws,stride,padding", CONV_CASES)
def test_conv2d_f32_matches_direct_convolution(xs, ws, stride, padding):
    x, w, b = f32(*xs), f32(*ws), f32(ws[0])
    y_ref = conv_ref(x, w, b, stride, padding)
    dy = f32(*y_ref.shape)
    _, dx_ref, dw_ref, db_ref = conv_ref(x, w, b, stride, padding, dy)
    assert_close(nat.conv2d_f32_forward(x, w, b, stride, padding), y_ref)
    assert_close(nat.conv2d_f32_forward(x, w, None, stride, padding), y_ref - b[None, :, None, None])
    dx, dw, db = nat.conv2d_f32_backward(x, w, dy, stride, padding)
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)
    dx, dw, db = nat.conv2d_f32_backward(x, w, dy, stride, padding, need_dx=False)
    assert dx is None
    assert_close(dw, dw_ref)


def test_conv2d_f32_backward_repeats_its_bits_on_every_thread_count():
    # dW and db sum over image chunks in float32, which is not associative: on a given thread count the
    # chunks must be grouped the same way on every run, whichever worker steals what (the chunk size
    # itself follows the thread count, so different counts may round differently; INT8 sums are exact
    # and do not, see test_octo_step).
    x, w = f32(16, 16, 24, 24), f32(8, 16, 3, 3)  # one image per chunk: 16 chunks
    dy = f32(16, 8, 24, 24)
    prev = edgelearn.get_num_threads()
    try:
        for t in (2, 3):
            edgelearn.set_num_threads(t)
            first = nat.conv2d_f32_backward(x, w, dy, 1, 1)
            for _ in range(10):
                for a, b in zip(first, nat.conv2d_f32_backward(x, w, dy, 1, 1)):
                    np.testing.assert_array_equal(a, b)
    finally:
        edgelearn.set_num_threads(prev)


@pytest.mark.parametrize("xs,ws,stride,padding", CONV_CASES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_conv2d_i8_equals_fp32_conv_of_dequantized_inputs(xs, ws, stride, padding, per_channel):
    xq, wq, b = i8(*xs), i8(*ws), f32(ws[0])
    sx, sdy = 0.0123, 0.0021
    sw = (0.003 + 0.001 * np.arange(ws[0])).astype(np.float32) if per_channel else 0.007
    sw_b = np.asarray(sw, np.float32).reshape(-1, 1, 1, 1) if per_channel else np.float32(sw)
    x, w = xq.astype(np.float32) * np.float32(sx), wq.astype(np.float32) * sw_b
    y_ref = conv_ref(x, w, b, stride, padding)
    dyq = i8(*y_ref.shape)
    _, dx_ref, dw_ref, _ = conv_ref(x, w, b, stride, padding, dyq.astype(np.float32) * np.float32(sdy))
    # integer products are exact, so only float rounding separates the two paths
    assert_close(nat.conv2d_i8_forward(xq, sx, wq, sw, b, stride, padding), y_ref, rtol=1e-6)
    dx, dw = nat.conv2d_i8_backward(xq, sx, wq, sw, dyq, sdy, stride, padding)
    assert_close(dx, dx_ref, rtol=1e-6)
    assert_close(dw, dw_ref, rtol=1e-6)
    dx, dw2 = nat.conv2d_i8_backward(xq, sx, wq, sw, dyq, sdy, stride, padding, need_dx=False)
    assert dx is None
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 3), (130, 33, 17), (300, 64, 200), (4, 0, 3)])
def test_matmul_f32_matches_numpy_in_every_layout(m, k, n):
    a, b, bias = f32(m, k), f32(k, n), f32(n)
    want = a.astype(np.float64) @ b.astype(np.float64)
    for aa in (a, np.asfortranarray(a), np.ascontiguousarray(a.T).T):
        for bb in (b, np.asfortranarray(b)):
            assert_close(nat.matmul_f32(aa, bb), want)
            assert_close(nat.matmul_f32(aa, bb, bias), want + bias)


def test_matmul_f32_large_threaded_matches_numpy():
    a, b = f32(784, 64), f32(64, 256)
    for threads in (1, 2):
        nat.set_num_threads(threads)
        assert_close(nat.matmul_f32(a, b), a.astype(np.float64) @ b)
    nat.set_num_threads(2)


def bn_ref(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(var + eps)
    xh = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
    return xh * gamma[None, :, None, None] + beta[None, :, None, None], mean, var, invstd, xh


def test_batchnorm2d_training_forward_backward_and_running_stats():
    x = f32(8, 5, 6, 7) * 3 + 2
    gamma, beta = f32(5), f32(5)
    rm, rv = np.full(5, 0.5, np.float32), np.full(5, 2.0, np.float32)
    y, mean, invstd = nat.batchnorm2d_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5)
    y_ref, mean_ref, var_ref, invstd_ref, xh = bn_ref(x, gamma, beta, 1e-5)
    assert_close(y, y_ref)
    assert_close(mean, mean_ref)
    assert_close(invstd, invstd_ref)
    m = 8 * 6 * 7
    assert_close(rm, 0.9 * 0.5 + 0.1 * mean_ref)
    assert_close(rv, 0.9 * 2.0 + 0.1 * var_ref * m / (m - 1))
    dy = f32(*x.shape)
    dx, dgamma, dbeta = nat.batchnorm2d_backward(dy, x, gamma, mean, invstd)
    dy64 = dy.astype(np.float64)
    sdy, sdyxh = dy64.sum(axis=(0, 2, 3)), (dy64 * xh).sum(axis=(0, 2, 3))
    g = (gamma * invstd_ref)[None, :, None, None]
    dx_ref = g * (dy64 - sdy[None, :, None, None] / m - xh * sdyxh[None, :, None, None] / m)
    assert_close(dx, dx_ref, rtol=1e-4)
    assert_close(dgamma, sdyxh, rtol=1e-4)
    assert_close(dbeta, sdy, rtol=1e-4)


def test_batchnorm2d_backward_i8_reads_int8_input_like_its_dequantized_copy():
    from edgelearn.quant import dequantize, quantize

    x = f32(6, 4, 5, 7) * 2 + 1
    gamma, beta = f32(4), f32(4)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    _, mean, invstd = nat.batchnorm2d_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5)
    xq, sx = quantize(x)
    dy = f32(*x.shape)
    got = nat.batchnorm2d_backward_i8(dy, xq, float(sx), gamma, mean, invstd)
    want = nat.batchnorm2d_backward(dy, dequantize(xq, sx), gamma, mean, invstd)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # and against the numpy formula on the dequantized input
    xd = dequantize(xq, sx).astype(np.float64)
    xh = (xd - mean[None, :, None, None]) * invstd[None, :, None, None]
    m = 6 * 5 * 7
    dy64 = dy.astype(np.float64)
    sdy, sdyxh = dy64.sum(axis=(0, 2, 3)), (dy64 * xh).sum(axis=(0, 2, 3))
    dx_ref = (gamma * invstd)[None, :, None, None] * (dy64 - sdy[None, :, None, None] / m - xh * sdyxh[None, :, None, None] / m)
    assert_close(got[0], dx_ref, rtol=1e-4)
    assert_close(got[2], sdy, rtol=1e-4)
    with pytest.raises(ValueError):
        nat.batchnorm2d_backward_i8(dy, xq, 0.0, gamma, mean, invstd)
    with pytest.raises((TypeError, ValueError)):
        nat.batchnorm2d_backward_i8(dy, x, float(sx), gamma, mean, invstd)
    with pytest.raises(ValueError):
        nat.batchnorm2d_backward_i8(dy[:, :, :4], xq, float(sx), gamma, mean, invstd)


def test_relu_mask_forward_backward_match_numpy():
    x = f32(3, 4, 5)
    x[0, 0, :2] = 0.0
    y, mask, _ = nat.relu_forward_mask(x)
    assert mask.dtype == np.uint8 and mask.shape == ((x.size + 7) // 8,)  # one bit per element
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(mask, np.packbits(x.ravel() > 0, bitorder="little"))
    dy = f32(3, 4, 5)
    np.testing.assert_array_equal(nat.relu_backward_mask(dy, mask), np.where(x > 0, dy, 0))
    np.testing.assert_array_equal(nat.relu_backward_mask(dy, mask), nat.relu_backward(dy, y))
    with pytest.raises(ValueError):
        nat.relu_backward_mask(dy, mask[:2])
    with pytest.raises((TypeError, ValueError)):
        nat.relu_backward_mask(dy, mask.astype(np.float32))
    # out=: the same values written to the given array; out=x / out=dy overwrites the argument itself
    xi = x.copy()
    yi, mi, _ = nat.relu_forward_mask(xi, out=xi)
    assert yi is xi
    np.testing.assert_array_equal(xi, y)
    np.testing.assert_array_equal(mi, mask)
    yo = np.full_like(x, np.nan)
    assert nat.relu_forward_mask(x, out=yo)[0] is yo
    np.testing.assert_array_equal(yo, y)
    gi = dy.copy()
    assert nat.relu_backward_mask(gi, mask, out=gi) is gi
    np.testing.assert_array_equal(gi, np.where(x > 0, dy, 0))
    with pytest.raises(ValueError):
        nat.relu_backward_mask(gi, mask[:1], out=gi)
    with pytest.raises(ValueError, match="out"):
        nat.relu_backward_mask(dy, mask, out=np.zeros(3, np.float32))


def test_batchnorm2d_out_and_inplace_match_out_of_place():
    from edgelearn.quant import quantize

    x = f32(4, 3, 5, 6) * 2 - 1
    gamma, beta = f32(3), f32(3)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd = nat.batchnorm2d_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5)
    xi = x.copy()
    yi, mean2, invstd2 = nat.batchnorm2d_forward(xi, gamma, beta, rm2, rv2, True, 0.1, 1e-5, out=xi)
    assert yi is xi
    np.testing.assert_array_equal(xi, y)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(invstd2, invstd)
    np.testing.assert_array_equal(rm2, rm)
    np.testing.assert_array_equal(rv2, rv)
    xq, sx = quantize(x)
    dy = f32(*x.shape)
    dx, dg, db = nat.batchnorm2d_backward_i8(dy, xq, float(sx), gamma, mean, invstd)
    gi = dy.copy()
    dxi, dg2, db2 = nat.batchnorm2d_backward_i8(gi, xq, float(sx), gamma, mean, invstd, out=gi)
    assert dxi is gi
    np.testing.assert_array_equal(gi, dx)
    np.testing.assert_array_equal(dg2, dg)
    np.testing.assert_array_equal(db2, db)
    dxo = np.empty_like(dy)
    assert nat.batchnorm2d_backward_i8(dy, xq, float(sx), gamma, mean, invstd, out=dxo)[0] is dxo
    np.testing.assert_array_equal(dxo, dx)
    xs = x[:, :, :, ::2]
    with pytest.raises(ValueError):
        nat.batchnorm2d_forward(xs, gamma, beta, rm2, rv2, True, 0.1, 1e-5, out=xs)
    with pytest.raises(ValueError, match="out"):  # an out= that is a view of the input it reads
        nat.batchnorm2d_forward(x, gamma, beta, rm2, rv2, True, 0.1, 1e-5, out=x[:])


def test_batchnorm2d_eval_uses_running_stats_and_leaves_them():
    x, gamma, beta = f32(4, 3, 5, 5), f32(3), f32(3)
    rm, rv = f32(3), np.abs(f32(3)) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = nat.batchnorm2d_forward(x, gamma, beta, rm, rv, False, 0.1, 1e-5)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    want = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + 1e-5) * gamma[None, :, None, None]
    assert_close(y, want + beta[None, :, None, None])
    assert_close(mean, rm)


def test_relu_forward_backward_any_shape():
    x = f32(3, 4, 5)
    y = nat.relu_forward(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    dy = f32(3, 4, 5)
    np.testing.assert_array_equal(nat.relu_backward(dy, y), np.where(y > 0, dy, 0))
    assert np.isnan(nat.relu_forward(np.array([np.nan], np.float32))[0])


def pool_windows(x, kernel, stride, padding, fill):
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return win.reshape(*win.shape[:4], kh * kw)


POOL_CASES = [((2, 3, 8, 8), 2, 2, 0), ((1, 2, 7, 9), 3, 2, 1), ((2, 1, 5, 6), (3, 2), (1, 2), (1, 0)), ((1, 1, 4, 4), 1, 1, 0)]


@pytest.mark.parametrize("shape,kernel,stride,padding", POOL_CASES)
def test_maxpool2d_matches_numpy(shape, kernel, stride, padding):
    x = f32(*shape)
    y, idx = nat.maxpool2d_forward(x, kernel, stride, padding)
    win = pool_windows(x, kernel, stride, padding, -np.inf)
    np.testing.assert_array_equal(y, win.max(axis=-1))
    assert idx.dtype == np.uint8
    np.testing.assert_array_equal(idx, win.argmax(axis=-1))
    dy = f32(*y.shape)
    dx = nat.maxpool2d_backward(dy, idx, x.shape, kernel, stride, padding)
    # reference: scatter dy onto the argmax positions of the padded input
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    dxp = np.zeros((shape[0], shape[1], shape[2] + 2 * ph, shape[3] + 2 * pw))
    n, c, oh, ow = y.shape
    nn_, cc, yy, xx = np.meshgrid(*map(np.arange, (n, c, oh, ow)), indexing="ij")
    np.add.at(dxp, (nn_, cc, yy * sh + idx // kw, xx * sw + idx % kw), dy)
    assert_close(dx, dxp[:, :, ph : ph + shape[2], pw : pw + shape[3]])


@pytest.mark.parametrize("shape,kernel,stride,padding", POOL_CASES)
def test_avgpool2d_counts_padding_like_pytorch(shape, kernel, stride, padding):
    x = f32(*shape)
    y = nat.avgpool2d_forward(x, kernel, stride, padding)
    assert_close(y, pool_windows(x.astype(np.float64), kernel, stride, padding, 0.0).mean(axis=-1))
    dy = f32(*y.shape)
    dx = nat.avgpool2d_backward(dy, x.shape, kernel, stride, padding)
    # adjoint identity <dy, pool(p)> == <dx, p>
    probe = f32(*shape)
    lhs = float((dy.astype(np.float64) * nat.avgpool2d_forward(probe, kernel, stride, padding)).sum())
    assert abs(lhs - float((dx.astype(np.float64) * probe).sum())) < 1e-4


def test_pool_stride_defaults_to_kernel():
    x = f32(1, 1, 6, 6)
    np.testing.assert_array_equal(nat.maxpool2d_forward(x, 2)[0], nat.maxpool2d_forward(x, 2, 2, 0)[0])


# --- errors ---


def test_wrong_dtype_is_a_type_error_naming_the_argument():
    x, w = f32(1, 2, 5, 5), f32(3, 2, 3, 3)
    with pytest.raises(TypeError, match="^x:"):
        nat.conv2d_f32_forward(x.astype(np.float64), w, None, 1, 1)
    with pytest.raises(TypeError, match="^xq:"):
        nat.conv2d_i8_forward(x, 0.1, i8(3, 2, 3, 3), 0.1, None, 1, 1)
    with pytest.raises(TypeError, match="^b:"):
        nat.matmul_f32(f32(2, 3), [[1.0]])
    with pytest.raises(TypeError, match="^stride:"):
        nat.conv2d_f32_forward(x, w, None, "1", 1)


def test_shape_and_layout_errors_are_value_errors_naming_the_argument():
    x, w = f32(1, 2, 5, 5), f32(3, 2, 3, 3)
    with pytest.raises(ValueError, match="^w:"):
        nat.conv2d_f32_forward(x, f32(3, 4, 3, 3), None, 1, 1)
    with pytest.raises(ValueError, match="^x:"):
        nat.conv2d_f32_forward(x[:, :, ::2, :], w, None, 1, 1)  # not contiguous
    with pytest.raises(ValueError, match="^x:"):
        nat.conv2d_f32_forward(f32(2, 5, 5), w, None, 1, 1)
    with pytest.raises(ValueError, match="^x:"):
        nat.conv2d_f32_forward(f32(1, 2, 2, 2), w, None, 1, 0)  # smaller than the kernel
    with pytest.raises(ValueError, match="^stride:"):
        nat.conv2d_f32_forward(x, w, None, 0, 1)
    with pytest.raises(ValueError, match="^padding:"):
        nat.conv2d_f32_forward(x, w, None, 1, -1)
    with pytest.raises(ValueError, match="^bias:"):
        nat.conv2d_f32_forward(x, w, f32(2), 1, 1)
    with pytest.raises(ValueError, match="^dy:"):
        nat.conv2d_f32_backward(x, w, f32(1, 3, 4, 4), 1, 1)
    with pytest.raises(ValueError, match="^sw:"):
        nat.conv2d_i8_forward(i8(1, 2, 5, 5), 0.1, i8(3, 2, 3, 3), np.ones(2, np.float32), None, 1, 1)
    with pytest.raises(ValueError, match="^sx:"):
        nat.conv2d_i8_forward(i8(1, 2, 5, 5), float("nan"), i8(3, 2, 3, 3), 0.1, None, 1, 1)
    with pytest.raises(ValueError, match="^dyq:"):
        nat.conv2d_i8_backward(i8(1, 2, 5, 5), 0.1, i8(3, 2, 3, 3), 0.1, i8(1, 3, 2, 2), 0.1, 1, 1)
    with pytest.raises(ValueError, match="^b:"):
        nat.matmul_f32(f32(2, 3), f32(4, 2))
    with pytest.raises(ValueError, match="^a:"):
        nat.matmul_f32(f32(6, 6)[::2, ::2], f32(3, 2))


def test_batchnorm_and_pool_errors():
    x = f32(2, 3, 4, 4)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="^running_mean:"):
        nat.batchnorm2d_forward(x, None, None, ro, rv, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="^running_var:"):
        nat.batchnorm2d_forward(x, None, None, rm, np.ones(4, np.float32), True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="^x:"):
        nat.batchnorm2d_forward(f32(1, 3, 1, 1), None, None, rm, rv, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="^kernel:"):
        nat.maxpool2d_forward(f32(1, 1, 20, 20), 16)
    with pytest.raises(ValueError, match="^padding:"):
        nat.maxpool2d_forward(x, 2, 2, 2)
    with pytest.raises(ValueError, match="^idx:"):
        nat.maxpool2d_backward(f32(2, 3, 2, 2), np.full((2, 3, 2, 2), 9, np.uint8), x.shape, 2, 2, 0)
    with pytest.raises(ValueError, match="^input_shape:"):
        nat.avgpool2d_backward(f32(2, 3, 2, 2), (2, 3, 4), 2, 2, 0)
    with pytest.raises(ValueError, match="^y:"):
        nat.relu_backward(f32(2, 3), f32(3, 2))


@pytest.mark.parametrize(
    "shape",
    [(32, 16, 28, 28), (32, 64, 7, 7), (4, 10), (3, 5, 17), (2, 3, 2, 3, 4), (1, 2, 300, 300), (0, 4, 3), (2, 3, 0)],
)
def test_channel_sums_match_float64_sums_over_every_axis_but_1(shape):
    x = (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)
    got = nat.channel_sums(x)
    want = x.astype(np.float64).sum(axis=(0,) + tuple(range(2, x.ndim)))
    assert got.dtype == np.float32 and got.shape == (shape[1],)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.sqrt(max(x.size, 1)))


def test_channel_sums_reject_bad_arrays():
    with pytest.raises(ValueError, match="x: needs at least 2 dimensions"):
        nat.channel_sums(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        nat.channel_sums(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        nat.channel_sums(np.zeros((4, 4), np.float32)[:, ::2])


@st.composite
def stride1_conv_shapes(draw):
    """Stride-1 convolutions of any small geometry: the INT8 paths (padded grid, direct kernel with channels
    in groups of 4, patch matrix) must all equal the FP32 convolution of the dequantized operands."""
    n, c, o = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 40))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 18))
    w = draw(st.integers(max(1, kw - 2 * pw), 36))
    return (n, c, h, w), (o, c, kh, kw), (ph, pw), draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([1, 2]))


@settings(max_examples=60, deadline=None)
@given(stride1_conv_shapes())
def test_int8_conv_equals_fp32_conv_of_dequantized_operands_on_any_stride1_shape(case):
    xs, ws, pad, seed, threads = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-127, 128, xs).astype(np.int8)
    w = rng.integers(-127, 128, ws).astype(np.int8)
    b = rng.standard_normal(ws[0]).astype(np.float32)
    sx, sw, sg = np.float32(0.01), np.float32(0.02), np.float32(0.003)
    xf, wf = x.astype(np.float32) * sx, w.astype(np.float32) * sw
    before = edgelearn.get_num_threads()
    edgelearn.set_num_threads(threads)
    try:
        y = nat.conv2d_i8_forward(x, float(sx), w, float(sw), b, (1, 1), pad)
        np.testing.assert_allclose(y, nat.conv2d_f32_forward(xf, wf, b, (1, 1), pad), rtol=1e-4, atol=1e-3)
        g = rng.integers(-127, 128, y.shape).astype(np.int8)
        dx, dw = nat.conv2d_i8_backward(x, float(sx), w, float(sw), g, float(sg), (1, 1), pad, need_dx=True)
        dxr, dwr, _ = nat.conv2d_f32_backward(xf, wf, g.astype(np.float32) * sg, (1, 1), pad, need_dx=True)
        np.testing.assert_allclose(dx, dxr, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dw, dwr, rtol=1e-4, atol=1e-2)
    finally:
        edgelearn.set_num_threads(before)


def test_int8_conv_shape_errors_name_xq_and_wq():
    """The INT8 convolutions' shape errors name their operands (`xq`, `wq`), as the same class as every other
    bad argument (the core's error, its argument renamed, not its message rewritten)."""
    xq, wq = np.zeros((1, 4, 5, 5), np.int8), np.zeros((4, 2, 3, 3), np.int8)
    with pytest.raises(nat.InvalidArgumentError, match=r"^wq: "):
        nat.conv2d_i8_forward(xq, 1.0, wq, 1.0)
    with pytest.raises(nat.InvalidArgumentError, match=r"^xq: "):
        nat.conv2d_i8_backward(xq[:, :2, :2, :2], 1.0, wq, 1.0, np.zeros((1, 4, 1, 1), np.int8), 1.0)
    with pytest.raises(nat.InvalidArgumentError, match=r"^wq: "):
        nat.conv2d_grouped_i8_forward(xq, 1.0, np.zeros((4, 1, 3, 3), np.int8), 1.0, groups=2)
