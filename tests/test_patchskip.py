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


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("uint8", [False, True])
def test_outputs_kept_stay_intact_and_dropped_ones_are_reused(uint8):
    """Frame outputs live in memory the runner reuses once their arrays are gone (no fresh allocation, and no
    page faults, per frame): an output the caller keeps is never written by a later frame, one it dropped is."""
    el.manual_seed(0)
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8, threshold=0.0)
    g = np.random.default_rng(1)
    if uint8:
        frames = [g.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    else:
        frames = [g.random((3, 40, 40), dtype=np.float32) for _ in range(4)]
    kept = runner(frames[0])
    first = kept.copy()
    view = kept[0, 1]  # a view keeps the memory too
    addr = _address(kept)
    del kept
    second = runner(frames[1])
    assert _address(second) != addr  # still held through `view`
    np.testing.assert_array_equal(view, first[0, 1])
    assert not np.array_equal(second, first)
    del view
    # the first output's memory is free again: the runner reuses it, even though a new array of the same size
    # (which malloc would have placed there) was made in between
    blocker = np.empty_like(first)
    third = runner(frames[2])
    assert _address(third) == addr != _address(blocker)
    assert type(third.base).__name__ == "OutputBuffer"
    want = [dense(model, runner.preprocess(f)) for f in frames[:3]]
    np.testing.assert_allclose(third, want[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, want[1], rtol=1e-5, atol=1e-5)
    assert third.flags.writeable and third.flags.c_contiguous and third.dtype == np.float32


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


# --- property: threshold 0 equals dense for any geometry ---------------------------------------------------

from hypothesis import assume, given, settings, strategies as st  # noqa: E402


@st.composite
def conv_chains(draw):
    layers, c = [], 3
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 2, 3, 5]))
        s = draw(st.sampled_from([1, 2]))
        p = draw(st.integers(0, k // 2))
        o = draw(st.integers(1, 5))
        layers.append(nn.Conv2d(c, o, k, stride=s, padding=p, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(o))
        layers.append(nn.ReLU())
        c = o
    if draw(st.booleans()):
        layers.insert(draw(st.integers(0, len(layers))), nn.MaxPool2d(draw(st.sampled_from([2, 3])), stride=2))
    return layers


@settings(max_examples=25, deadline=None)
@given(
    layers=conv_chains(),
    h=st.integers(13, 31),
    w=st.integers(13, 31),
    patch=st.sampled_from([3, 5, 7, 16]),
    tile=st.sampled_from([1, 3, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_threshold_zero_equals_dense(layers, h, w, patch, tile, seed):
    el.manual_seed(seed % 1000)
    model = randomize_bn(nn.Sequential(*layers), seed)
    runner = PatchSkipRunner(model, patch=patch, threshold=0.0, tile=tile)
    g = np.random.default_rng(seed)
    x = g.random((3, h, w), dtype=np.float32)
    try:
        dense(model, x)
    except ValueError:  # the chain shrinks this frame below a kernel: no model to compare with
        assume(False)
    for t in range(4):
        x = x.copy()
        y0, x0 = g.integers(0, h - 2), g.integers(0, w - 2)
        x[:, y0:y0 + g.integers(1, 4), x0:x0 + g.integers(1, 4)] += np.float32(0.5)
        y = runner(x)
        ref = dense(model, x)
        assert y.shape == ref.shape
        assert rel_l2(y, ref) <= 1e-6, (t, rel_l2(y, ref), runner.stats)


# --- INT8 (Octo) models, Compensation, classifier tail ------------------------------------------------------


def octo_net(per_channel=False):
    el.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 1),
    )
    el.octo(model, el.OctoConfig(per_channel_weights=per_channel))
    g = np.random.default_rng(1)
    for m in model.modules():
        if isinstance(m, nn.Compensation):  # make the folded shift visible
            m.mu.data[...] = g.normal(0, 0.2, m.mu.shape).astype(np.float32)
            m.beta.data[...] = g.normal(0, 0.2, m.beta.shape).astype(np.float32)
    return randomize_bn(model)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_scales_threshold_zero_equals_model(per_channel):
    model = octo_net(per_channel)
    assert sum(isinstance(m, nn.Compensation) for m in model.modules()) == 3
    runner = PatchSkipRunner(model, patch=8, threshold=0.0, int8_scales="dynamic")
    frames = frames_moving_square(6, h=40, w=48)
    for f in frames:
        y = runner(f)
        assert rel_l2(y, dense(model, f)) <= 1e-6, runner.stats
    assert not runner.stats["dense"]


def test_int8_frozen_scales_first_frame_exact_then_close_and_sparse():
    model = octo_net()
    runner = PatchSkipRunner(model, patch=8, threshold=0.0)
    frames = frames_moving_square(6, h=64, w=64)
    assert rel_l2(runner(frames[0]), dense(model, frames[0])) <= 1e-6  # dense frame: scales calibrated on it
    for f in frames[1:]:
        y = runner(f)
        assert rel_l2(y, dense(model, f)) < 0.02  # only the activation scales differ from the model's
        assert runner.stats["compute_fraction"] < 0.5
    # FP32 model of the same weights: the INT8 path really is different arithmetic
    from edgelearn.octo import fp32

    fp32(model)
    assert rel_l2(runner(frames[-1]), dense(model, frames[-1])) > 1e-4


def test_cnn_with_classifier_tail_equals_model():
    el.manual_seed(2)
    model = randomize_bn(el.models.cnn(3, 10, 32))
    runner = PatchSkipRunner(model, patch=8, threshold=0.0)
    for f in frames_moving_square(4, h=32, w=40):
        y = runner(f)
        assert y.shape == (1, 10)
        assert rel_l2(y, dense(model, f)) <= 1e-6
    assert model.training is False


def test_uint8_frames_normalised_and_grayscale():
    el.manual_seed(0)
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    model = randomize_bn(net_stride1())
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = PatchSkipRunner(model, patch=8, mean=mean, std=std)(img)
    x = (img.transpose(2, 0, 1).astype(np.float32) / 255 - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    assert rel_l2(y, dense(model, x.astype(np.float32))) <= 1e-6
    gray_model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()))
    y = PatchSkipRunner(gray_model, patch=8)(img)
    luma = (img.astype(np.float32) / 255) @ np.float32([0.299, 0.587, 0.114])
    assert rel_l2(y, dense(gray_model, luma[None].astype(np.float32))) <= 1e-6


# --- drift control --------------------------------------------------------------------------------------------


def test_no_drift_over_500_frames_of_a_slowly_changing_scene():
    """A scene that changes a little every frame (global brightness creep, a slowly sliding blob, a slow
    sinusoidal shimmer): every per-frame change is far below the threshold, so a gate comparing consecutive
    frames would never fire and the output would drift away. The gate compares against the cached reference,
    so the error vs dense stays bounded all along."""
    el.manual_seed(7)
    model = randomize_bn(net_stride1())
    threshold, bound = 0.03, 0.01
    runner = PatchSkipRunner(model, patch=8, threshold=threshold)
    g = np.random.default_rng(3)
    h, w = 24, 32
    bg = g.random((3, h, w), dtype=np.float32) * 0.5 + 0.25
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    worst, fractions, flagged, first = 0.0, [], 0, None
    for t in range(500):
        f = bg + np.float32(0.0004 * t)  # +0.2 over the clip, 0.0004 per frame
        cy, cx = 12 + 6 * np.sin(t / 80), (t * 0.05) % w
        f = f + 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8)[None]
        f = f + 0.05 * np.sin(xx / 5 + t / 50)[None]
        f = f.astype(np.float32)
        y = runner(f)
        ref = dense(model, f)
        first = ref if first is None else first
        err = rel_l2(y, ref)
        worst = max(worst, err)
        if t > 0:
            fractions.append(runner.stats["compute_fraction"])
            flagged += runner.stats["patch_fraction"] > 0
        assert err <= bound, (t, err, runner.stats)
    assert runner.stats["frame"] == 499
    # never recomputing (what a gate on consecutive-frame differences would do here) breaks the bound
    assert rel_l2(first, ref) > 3 * bound, rel_l2(first, ref)
    assert worst > 0  # it did skip changes
    assert np.mean(fractions) < 0.6, np.mean(fractions)  # it really skipped work ...
    assert flagged > 10  # ... and slow changes did add up and trip the gate


def test_error_bound_forces_a_dense_refresh():
    el.manual_seed(8)
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8, threshold=0.05, error_bound=0.01)
    x = np.full((3, 32, 32), 0.5, np.float32)
    runner(x)
    seen = []
    for t in range(1, 30):
        runner(x + np.float32(0.002 * t))  # uniform creep below the threshold
        s = runner.stats
        seen.append((s["dense"], s["error_refresh"], s["estimated_error"]))
        assert s["estimated_error"] <= 0.01 or s["dense"]
    assert any(d and e for d, e, _ in seen), seen
    assert all(est == 0.0 for d, _, est in seen if d)
    assert runner.stats["gate_seconds"] >= 0 and runner.stats["seconds"] >= runner.stats["core_seconds"]


def test_reset_starts_a_new_stream():
    model = randomize_bn(net_stride1())
    runner = PatchSkipRunner(model, patch=8, threshold=0.5)
    a = np.zeros((3, 16, 16), np.float32)
    runner(a)
    y = runner(a + np.float32(0.1))  # below threshold: cached output of `a`
    assert rel_l2(y, dense(model, a)) <= 1e-6 and len(runner.history) == 2
    runner.reset()
    assert runner.stats == {} and len(runner.history) == 0 and runner.input_shape is None
    y = runner(a + np.float32(0.1))  # dense again after reset
    assert runner.stats["dense"] and rel_l2(y, dense(model, a + np.float32(0.1))) <= 1e-6


def test_mostly_dirty_layers_switch_to_the_dense_kernel():
    el.manual_seed(9)
    model = randomize_bn(net_stride1())
    x = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    f = x.copy()
    f[:, :20, :] += np.float32(0.3)  # 5/8 of the rows change
    outs = {}
    for above in (0.5, 1.0):
        runner = PatchSkipRunner(model, patch=8, threshold=0.0, dense_above=above)
        runner(x)
        outs[above] = runner(f)
        fr = runner.stats["layer_fractions"]
        if above == 0.5:
            assert fr[-1] == 1.0  # switched to dense
        else:
            assert all(v < 1.0 for v in fr[:2])  # stayed sparse
        assert rel_l2(outs[above], dense(model, f)) <= 1e-6
    with pytest.raises(ValueError, match="dense_above"):
        PatchSkipRunner(model, dense_above=0)


# --- grouped / depthwise / dilated convolutions ------------------------------------------------------------


def net_grouped():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2),
    )


@pytest.mark.parametrize("int8", [False, True])
def test_grouped_depthwise_dilated_threshold_zero_equals_model(int8):
    el.manual_seed(3)
    model = randomize_bn(net_grouped())
    if int8:
        model = el.octo(model, el.OctoConfig()).eval()
    runner = PatchSkipRunner(model, patch=8, threshold=0.0, int8_scales="dynamic")
    for f in frames_moving_square(5, h=36, w=44):
        y = runner(f)
        assert rel_l2(y, dense(model, f)) <= 1e-6, runner.stats
    assert not runner.stats["dense"] and runner.stats["compute_fraction"] < 0.8


# --- the zoo's residual backbones ------------------------------------------------------------------------


@pytest.mark.parametrize("name,int8", [("resnet20", False), ("resnet20", True), ("mobilenet_v2", False),
                                       ("mobilenet_v2", True)])
def test_zoo_residual_backbones_threshold_zero_equal_the_model(name, int8):
    """ResNet BasicBlocks (identity and 1x1-downsample skips) and MobileNetV2 inverted residuals (ReLU6,
    depthwise) run as main path + side branch + add: output equals the model's at threshold 0 (FP32, and INT8
    with LAC at dynamic scales), while a moving square recomputes only part of the work."""
    from edgelearn import models

    el.manual_seed(5)
    model = models.resnet20(10, 3) if name == "resnet20" else models.mobilenet_v2(10, 0.35, 3, small_input=True)
    model = randomize_bn(model)
    if int8:
        model = el.octo(model, el.OctoConfig()).eval()
    runner = PatchSkipRunner(model, patch=8, threshold=0.0, int8_scales="dynamic")
    for f in frames_moving_square(4, h=40, w=48, size=5):
        y = runner(f)
        with el.no_grad():
            ref = dense(model, f)
        assert y.shape == ref.shape == (1, 10)
        assert rel_l2(y, ref) <= 1e-5, (rel_l2(y, ref), runner.stats)
    s = runner.stats
    # (INT8 at dynamic scales recomputes a layer in full when its input range moves, as here)
    assert not s["dense"] and (int8 or s["compute_fraction"] < 0.9), s
    if int8:  # frozen scales keep cached tiles valid: sparse, and close to the model
        frozen = PatchSkipRunner(model, patch=8, threshold=0.0)
        for f in frames_moving_square(4, h=40, w=48, size=5):
            y = frozen(f)
            with el.no_grad():
                assert rel_l2(y, dense(model, f)) <= 0.05, frozen.stats
        assert frozen.stats["compute_fraction"] < 0.9, frozen.stats
    # stages: per conv (with its BN/activation) one, per residual add one
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    adds = sum(getattr(m, "use_res_connect", False) for m in model.modules()) if name == "mobilenet_v2" else 9
    assert len(s["layer_fractions"]) == convs + adds


def test_zoo_backbone_feature_map_without_tail_equals_the_model():
    """A ResNet stage alone (a Sequential of BasicBlocks, downsample included) gives the feature map itself."""
    from edgelearn import models

    el.manual_seed(6)
    net = randomize_bn(models.resnet20(10, 3))
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2)
    runner = PatchSkipRunner(stem, patch=8, threshold=0.0)
    for f in frames_moving_square(3, h=32, w=40, size=4):
        y = runner(f)
        with el.no_grad():
            ref = dense(stem, f)
        assert y.shape == ref.shape == (1, 32, 16, 20) and rel_l2(y, ref) <= 1e-6


# --- uint8 streams, time split, dense tail -----------------------------------------------------------------


def test_uint8_stream_equals_its_float_conversion_and_skips_unchanged_frames():
    """uint8 frames are gated on their bytes and converted only where flagged: frame by frame the output is
    the runner's output on the converted float frames (bit for bit), and an unchanged frame recomputes nothing."""
    el.manual_seed(0)
    model = randomize_bn(net_stride1())
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    a = PatchSkipRunner(model, patch=8, threshold=0.0, mean=mean, std=std)
    b = PatchSkipRunner(model, patch=8, threshold=0.0)  # fed a's float input, already normalised
    g = np.random.default_rng(4)
    img = g.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for t in range(5):
        img = img.copy()
        if t in (1, 3):
            img[5 + t:12 + t, 8:20] = g.integers(0, 256, (7, 12, 3), dtype=np.uint8)
        ya = a(img)
        yb = b(a.preprocess(img))
        np.testing.assert_array_equal(ya, yb)
        s = a.stats
        for key in ("gate_seconds", "bookkeeping_seconds", "recompute_seconds", "tail_seconds", "core_seconds"):
            assert 0.0 <= s[key] <= s["seconds"], key
        if t in (2, 4):
            assert s["compute_fraction"] == 0.0 and s["output_changed"] is False
        elif t > 0:
            assert 0.0 < s["compute_fraction"] < 0.8 and s["output_changed"] is True


def test_classifier_tail_runs_only_when_its_input_changed():
    el.manual_seed(2)
    model = randomize_bn(el.models.cnn(3, 10, 32))
    runner = PatchSkipRunner(model, patch=8, threshold=0.0)
    calls = []
    first = runner.tail[0]
    orig = first.forward
    first.forward = lambda x: (calls.append(1), orig(x))[1]
    f = frames_moving_square(2, h=32, w=40)
    y0 = runner(f[0])
    y1 = runner(f[0].copy())  # nothing changed: the tail is not run again
    assert len(calls) == 1 and np.array_equal(y0, y1)
    y2 = runner(f[1])
    assert len(calls) == 2 and rel_l2(y2, dense(model, f[1])) <= 1e-6


def test_prediction_agreement():
    from edgelearn.video.pipeline import prediction_agreement

    ref = np.zeros((1, 3, 2, 2), np.float32)
    ref[0, 1] = 1.0  # argmax channel 1 everywhere
    y = ref.copy()
    y[0, 2, 0, 0] = 2.0  # one pixel of four now predicts channel 2
    assert prediction_agreement(y, ref) == 0.75
    assert prediction_agreement(np.float32([[0.1, 0.9]]), np.float32([[0.2, 0.8]])) == 1.0
    assert prediction_agreement(np.float32([[0.9, 0.1]]), np.float32([[0.2, 0.8]])) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        prediction_agreement(y, ref[:, :2])
