"""edgelearn.video.PatchSkipRunner: patch-skip inference equals dense inference at threshold 0, skips work
on unchanged regions, refreshes on schedule and rejects bad input clearly."""

import numpy as np
import pytest

import edgelearn as el
from edgelearn import nn
from edgelearn.video import PatchSkipRunner, UnsupportedLayerError


class Upsample(nn.Module):
    """A layer the runner does not know."""

    def forward(self, x):
        return x


def dense(model, x):
    return model(el.tensor(x[None])).numpy()


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def randomize_bn(model, seed=0):
    g = np.random.default_rng(seed)
    for m in model.modules() if hasattr(model, "modules") else []:
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean[...] = g.normal(0, 0.3, n).astype(np.float32)
            m.running_var[...] = g.uniform(0.5, 2.0, n).astype(np.float32)
            m.weight.data[...] = g.uniform(0.5, 1.5, n).astype(np.float32)
            m.bias.data[...] = g.normal(0, 0.2, n).astype(np.float32)
    return model.eval()


def net_stride1():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 1),
    )


def net_stride2():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, (3, 5), stride=(2, 1), padding=(1, 2), bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 6, 3, stride=2),
    )


def frames_moving_square(n, c=3, h=37, w=45, size=6, seed=0):
    g = np.random.default_rng(seed)
    bg = g.random((c, h, w), dtype=np.float32)
    out = []
    for t in range(n):
        f = bg.copy()
        y, x = 3 + t, 4 + 2 * t
        f[:, y:y + size, x:x + size] = 1.0
        out.append(f)
    return out


@pytest.mark.parametrize("make", [net_stride1, net_stride2])
@pytest.mark.parametrize("shape,patch", [((3, 37, 45), 16), ((3, 33, 29), 7), ((3, 24, 32), 8)])
def test_threshold_zero_equals_dense(make, shape, patch):
    el.manual_seed(1)
    model = randomize_bn(make())
    runner = PatchSkipRunner(model, patch=patch, threshold=0.0)
    g = np.random.default_rng(2)
    x = g.random(shape, dtype=np.float32)
    for t in range(6):
        x = x.copy()
        # change a few random small blobs each frame, sometimes nothing
        for _ in range(t % 3):
            y0, x0 = g.integers(0, shape[1] - 3), g.integers(0, shape[2] - 3)
            x[:, y0:y0 + 3, x0:x0 + 3] = g.random((shape[0], 3, 3), dtype=np.float32)
        y = runner(x)
        ref = dense(model, x)
        assert y.shape == ref.shape and y.dtype == np.float32
        assert rel_l2(y, ref) <= 1e-6, (t, rel_l2(y, ref))
    assert runner.stats["dense"] is False


def test_identical_frames_recompute_nothing():
    el.manual_seed(0)
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8, threshold=0.0)
    x = np.random.default_rng(0).random((3, 40, 40), dtype=np.float32)
    y0 = runner(x)
    assert runner.stats["dense"] and runner.stats["compute_fraction"] == 1.0
    for _ in range(3):
        y = runner(x.copy())
        s = runner.stats
        assert not s["dense"]
        assert s["patch_fraction"] == 0.0 and s["compute_fraction"] == 0.0
        assert all(f == 0.0 for f in s["layer_fractions"])
        np.testing.assert_array_equal(y, y0)


def test_moving_square_small_fraction_and_exact():
    el.manual_seed(3)
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8, threshold=0.0)
    frames = frames_moving_square(8, h=96, w=128)
    for i, f in enumerate(frames):
        y = runner(f)
        assert rel_l2(y, dense(model, f)) <= 1e-6
        if i > 0:
            s = runner.stats
            assert 0.0 < s["patch_fraction"] <= 0.1, s
            assert 0.0 < s["compute_fraction"] < 0.35, s
            assert len(s["layer_fractions"]) == 4
    assert len(runner.history) == 8


def test_threshold_skips_small_changes_and_drift_triggers():
    el.manual_seed(4)
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8, threshold=0.05)
    x = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    runner(x)
    flagged = []
    for t in range(1, 8):
        f = x.copy()
        f[:, :4, :4] += 0.02 * t  # slow drift in one patch
        y = runner(f)
        flagged.append(runner.stats["patch_fraction"] > 0)
        # output always equals dense inference of some frame whose patches differ from f by <= threshold
        assert rel_l2(y, dense(model, f)) < 0.05
    assert flagged[0] is False and flagged[1] is False  # 0.02, 0.04 <= 0.05
    assert flagged[2] is True  # 0.06 accumulated vs the reference
    assert flagged[3] is False  # reference updated to 0.06; 0.08 - 0.06 <= 0.05


def test_refresh_every_k():
    model = randomize_bn(net_stride2())
    runner = PatchSkipRunner(model, patch=16, threshold=0.1, refresh_every=3)
    x = np.zeros((3, 20, 20), np.float32)
    dense_flags = []
    for _ in range(7):
        runner(x)
        dense_flags.append(runner.stats["dense"])
    assert dense_flags == [True, False, False, True, False, False, True]


def test_uint8_hwc_frame():
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8)
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    y = runner(img)
    x = img.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert rel_l2(y, dense(model, x)) <= 1e-6


def test_errors():
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model)
    runner(np.zeros((3, 20, 20), np.float32))
    with pytest.raises(ValueError, match="shape changed"):
        runner(np.zeros((3, 20, 22), np.float32))
    with pytest.raises(ValueError):
        runner(np.zeros((20, 20), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        runner(np.zeros((3, 20, 20), np.float64))
    bad = np.zeros((3, 20, 20), np.float32)
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        runner(bad)
    runner.reset()
    assert runner(np.zeros((3, 16, 18), np.float32)).shape == (1, 4, 8, 9)
    with pytest.raises(ValueError, match="input channels"):
        PatchSkipRunner(model)(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(Upsample\)"):
        PatchSkipRunner(nn.Sequential(nn.Conv2d(3, 4, 3), Upsample(), nn.Conv2d(4, 4, 3)))
    with pytest.raises(UnsupportedLayerError, match="Flatten"):
        PatchSkipRunner(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(UnsupportedLayerError, match="Compensation"):
        PatchSkipRunner(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Compensation((4, 5, 5))))
    with pytest.raises(ValueError, match="patch"):
        PatchSkipRunner(model, patch=0)
    with pytest.raises(ValueError, match="threshold"):
        PatchSkipRunner(model, threshold=-1)
