"""Grouped and depthwise ``nn.Conv2d``: FP32 forward and both gradients against a direct numpy reference,
INT8 (Octo) against FP32 within quantization error, bad arguments as named errors."""

import numpy as np
import pytest

import edgelearn as el
from edgelearn import _native, nn


def ref_conv(x, w, b, stride, padding, dilation, groups):
    """Direct numpy grouped convolution (float64)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (h + 2 * ph - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + 2 * pw - (kw - 1) * dw - 1) // sw + 1
    og = o // groups
    y = np.zeros((n, o, oh, ow))
    for oc in range(o):
        g = oc // og
        for ci in range(cg):
            for i in range(kh):
                for j in range(kw):
                    patch = xp[:, g * cg + ci, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                               j * dw: j * dw + sw * (ow - 1) + 1: sw]
                    y[:, oc] += w[oc, ci, i, j] * patch
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


CASES = [
    # (n, c, h, w, o, groups, k, stride, padding, dilation)
    (2, 4, 8, 8, 4, 4, 3, 1, 1, 1),     # depthwise
    (2, 4, 9, 9, 8, 4, 3, 2, 1, 1),     # depthwise, multiplier 2, stride 2
    (1, 6, 7, 9, 4, 2, 3, 1, 1, 1),     # grouped
    (1, 4, 10, 10, 4, 4, 3, 1, 2, 2),   # dilated depthwise
    (1, 4, 6, 6, 6, 2, 1, 1, 0, 1),     # grouped 1x1
    (1, 3, 8, 8, 5, 1, 3, 1, 1, 2),     # dilation with groups=1 (grouped kernels too)
]


@pytest.mark.parametrize("case", CASES)
def test_fp32_forward_and_gradients_match_reference(case):
    n, c, h, w, o, groups, k, s, p, d = case
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(c, o, k, stride=s, padding=p, dilation=d, groups=groups)
    assert conv.weight.shape == (o, c // groups, k, k)
    x = el.tensor(rng.standard_normal((n, c, h, w)).astype(np.float32), requires_grad=True)
    y = conv(x)
    want = ref_conv(x.data, conv.weight.data, conv.bias.data, (s, s), (p, p), (d, d), groups)
    np.testing.assert_allclose(y.data, want, rtol=1e-4, atol=1e-4)
    r = rng.standard_normal(y.shape).astype(np.float32)
    (y * el.tensor(r)).sum().backward()
    # gradients of L = Σ r·y by central differences of the reference (it is linear, so they are exact)
    eps = 1e-3
    for idx in [(0, 0, 1, 1), (n - 1, c - 1, h - 1, w - 2), (0, c // 2, h // 2, 0)]:
        xp, xm = x.data.astype(np.float64), x.data.astype(np.float64)
        xp = xp.copy(); xm = xm.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd = ((ref_conv(xp, conv.weight.data, None, (s, s), (p, p), (d, d), groups) * r).sum()
              - (ref_conv(xm, conv.weight.data, None, (s, s), (p, p), (d, d), groups) * r).sum()) / (2 * eps)
        assert abs(fd - x.grad.data[idx]) < 1e-3 * (1 + abs(fd))
    wd = conv.weight.data.astype(np.float64)
    for idx in [(0, 0, 0, 0), (o - 1, c // groups - 1, k - 1, k - 1)]:
        wp, wm = wd.copy(), wd.copy()
        wp[idx] += eps
        wm[idx] -= eps
        fd = ((ref_conv(x.data, wp, None, (s, s), (p, p), (d, d), groups) * r).sum()
              - (ref_conv(x.data, wm, None, (s, s), (p, p), (d, d), groups) * r).sum()) / (2 * eps)
        assert abs(fd - conv.weight.grad.data[idx]) < 1e-3 * (1 + abs(fd))
    np.testing.assert_allclose(conv.bias.grad.data, r.sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 11, 11)).astype(np.float32)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
    tc = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
    with torch.no_grad():
        tc.weight.copy_(torch.from_numpy(conv.weight.data))
        tc.bias.copy_(torch.from_numpy(conv.bias.data))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tc(xt)
    yt.sum().backward()
    xe = el.tensor(x, requires_grad=True)
    ye = conv(xe)
    ye.sum().backward()
    np.testing.assert_allclose(ye.data, yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(xe.grad.data, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(conv.weight.grad.data, tc.weight.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_int8_depthwise_tracks_fp32():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    fp = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    q = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    q.load_state_dict(fp.state_dict())
    el.octo(q, el.OctoConfig(act_rounding="nearest", grad_rounding="nearest", prc=None))
    xf, xq = el.tensor(x, requires_grad=True), el.tensor(x, requires_grad=True)
    yf, yq = fp(xf), q(xq)
    rel = np.linalg.norm(yq.data - yf.data) / np.linalg.norm(yf.data)
    assert rel < 0.02
    g = rng.standard_normal(yf.shape).astype(np.float32)
    (yf * el.tensor(g)).sum().backward()
    (yq * el.tensor(g)).sum().backward()
    for a, b in [(xq.grad.data, xf.grad.data), (q.weight.grad.data, fp.weight.grad.data)]:
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.03


def test_bad_groups_raise_named_errors():
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="groups"):
        _native.conv2d_grouped_f32_forward(np.zeros((1, 4, 5, 5), np.float32), np.zeros((6, 1, 3, 3), np.float32),
                                           groups=4)
    with pytest.raises(ValueError, match="w"):
        _native.conv2d_grouped_f32_forward(np.zeros((1, 4, 5, 5), np.float32), np.zeros((4, 2, 3, 3), np.float32),
                                           groups=4)
    with pytest.raises(ValueError, match="dilat"):
        _native.conv2d_grouped_f32_forward(np.zeros((1, 4, 5, 5), np.float32), np.zeros((4, 1, 3, 3), np.float32),
                                           groups=4, dilation=0)
