"""The model zoo: torchvision layout and names (a state dict built from torchvision's names and shapes loads with
strict=True), small inputs, INT8 conversion of every Linear/Conv2d in residual blocks (depthwise included), and a
residual block's gradients against PyTorch when it is importable."""

import numpy as np
import pytest

import edgelearn as el
from edgelearn import models, nn

# A slice of torchvision's own key list for each model (written out, so no torch is needed).
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer1.1.bn2.running_var",
    "layer2.0.conv1.weight", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
    "layer4.1.conv2.weight", "fc.weight", "fc.bias",
]
TORCHVISION_MOBILENET_V2_KEYS = [
    "features.0.0.weight", "features.0.1.weight", "features.0.1.num_batches_tracked",
    "features.1.conv.0.0.weight", "features.1.conv.0.1.bias", "features.1.conv.1.weight", "features.1.conv.2.weight",
    "features.2.conv.0.0.weight", "features.2.conv.1.0.weight", "features.2.conv.2.weight",
    "features.2.conv.3.running_var", "features.17.conv.2.weight", "features.18.0.weight", "features.18.1.bias",
    "classifier.1.weight", "classifier.1.bias",
]


def test_state_dict_names_follow_torchvision_and_load_strictly():
    nn.manual_seed(0)
    for model, keys in [(models.resnet18(10), TORCHVISION_RESNET18_KEYS),
                        (models.mobilenet_v2(10, 1.0), TORCHVISION_MOBILENET_V2_KEYS)]:
        sd = model.state_dict()
        assert set(keys) <= set(sd), sorted(set(keys) - set(sd))
        # a "torchvision" dict: the same names and shapes, other values
        other = {k: np.full_like(v, 3) for k, v in sd.items()}
        model.load_state_dict(other, strict=True)
        assert all(np.all(v == 3) for v in model.state_dict().values())
    assert models.mobilenet_v2(10, 1.0).features[1].conv[0][0].groups == 32  # depthwise
    assert models.mobilenet_v2(10, 1.0).state_dict()["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)


def test_state_dict_matches_torchvision_when_available():
    tv = pytest.importorskip("torchvision")
    for ours, theirs in [(models.resnet18(10), tv.models.resnet18(num_classes=10)),
                         (models.mobilenet_v2(10, 0.5), tv.models.mobilenet_v2(num_classes=10, width_mult=0.5)),
                         (models.mobilenet_v2(7, 1.0, in_channels=3), tv.models.mobilenet_v2(num_classes=7))]:
        want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        # edgelearn adds one optional buffer (Dropout's step counter, see register_buffer(optional=True))
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.endswith("classifier.0.step")}
        assert got == want
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()}, strict=True)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "resnet18"])
def test_small_inputs_train_in_fp32_and_int8(name):
    nn.manual_seed(1)
    model = models.build_model(name, (1, 28, 28), 10, width_mult=0.25 if name == "mobilenet_v2" else 1.0)
    x = el.tensor(np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32))
    y = np.array([1, 3])
    out = model(x)
    assert out.shape == (2, 10)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    el.octo(model)
    # every Linear/Conv2d (depthwise included) is INT8 with a Compensation of its own
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == n_layers and all(m.int8 is not None for m in layers)
    assert sum(isinstance(m, nn.Compensation) for m in model.modules()) == n_layers
    opt = el.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        loss = el.nn.functional.cross_entropy(model(x), y) + model.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert np.isfinite(float(loss.data))
    assert all(p.grad is not None for p in model.parameters())


def test_residual_block_matches_torch():
    torch = pytest.importorskip("torch")
    from edgelearn.models.resnet import BasicBlock

    nn.manual_seed(2)
    block = BasicBlock(4, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False),
                                                                 nn.BatchNorm2d(8)))

    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(4, 8, 3, 2, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU()
            self.conv2 = torch.nn.Conv2d(8, 8, 3, 1, 1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(8)
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, 2, bias=False), torch.nn.BatchNorm2d(8))

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + self.downsample(x))

    tb = TorchBlock()
    tb.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in block.state_dict().items()})
    x = np.random.default_rng(3).standard_normal((3, 4, 9, 9)).astype(np.float32)
    xe, xt = el.tensor(x, requires_grad=True), torch.from_numpy(x).requires_grad_(True)
    ye, yt = block(xe), tb(xt)
    np.testing.assert_allclose(ye.data, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    g = np.random.default_rng(4).standard_normal(ye.shape).astype(np.float32)
    (ye * el.tensor(g)).sum().backward()
    (yt * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(xe.grad.data, xt.grad.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(block.conv1.weight.grad.data, tb.conv1.weight.grad.numpy(), rtol=1e-3, atol=1e-4)


def test_new_activations_match_numpy():
    x = el.tensor(np.linspace(-8, 8, 33, dtype=np.float32).reshape(1, 33), requires_grad=True)
    for layer, f, df in [
        (nn.ReLU6(), lambda v: np.clip(v, 0, 6), lambda v: ((v > 0) & (v < 6)).astype(np.float32)),
        (nn.Hardswish(), lambda v: v * np.clip(v + 3, 0, 6) / 6,
         lambda v: np.where(v < -3, 0, np.where(v > 3, 1, (2 * v + 3) / 6))),
        (nn.Sigmoid(), lambda v: 1 / (1 + np.exp(-v)), lambda v: np.exp(-v) / (1 + np.exp(-v)) ** 2),
    ]:
        x.grad = None
        y = layer(x)
        np.testing.assert_allclose(y.data, f(x.data), rtol=1e-6, atol=1e-6)
        y.sum().backward()
        np.testing.assert_allclose(x.grad.data, df(x.data), rtol=1e-5, atol=1e-6)
    relu6 = nn.ReLU6()
    relu6.save_mask = True  # the INT8-mode form: a bit mask
    x.grad = None
    relu6(x).sum().backward()
    np.testing.assert_array_equal(x.grad.data, ((x.data > 0) & (x.data < 6)).astype(np.float32))


def test_cli_model_choices_are_the_zoo():
    from edgelearn import cli

    assert cli.TRAIN_MODELS == models.MODEL_NAMES


def test_image_fitting_and_stratified_subsets():
    from edgelearn import data

    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(rng.random((100, 1, 28, 28), dtype=np.float32), np.repeat(np.arange(4), 25))
    padded = data.fit_images(ds, 32)
    assert padded.images.shape == (100, 1, 32, 32)
    np.testing.assert_array_equal(padded.images[:, :, 2:30, 2:30], ds.images)
    assert padded.images[:, :, :2].sum() == 0
    small = data.fit_images(ds, 14)
    assert small.images.shape == (100, 1, 14, 14)
    assert abs(small.images.mean() - ds.images.mean()) < 0.02
    sub = data.stratified_subset(ds, 40, seed=1)
    assert len(sub) == 40 and np.all(np.bincount(sub.labels) == 10)
    # shares that do not divide evenly still add up to n (each rounded alone: 3 + 3 + 3 = 9 of 10)
    uneven = data.ArrayDataset(ds.images[:100], np.repeat(np.arange(3), [33, 33, 34]))
    for n in (10, 11, 50, 99):
        counts = np.bincount(data.stratified_subset(uneven, n, seed=2).labels, minlength=3)
        assert counts.sum() == n and counts.max() - counts.min() <= 1, (n, counts)


def test_mobilenet_v2_fp32_matches_torchvision_on_the_same_weights():
    """The whole FP32 mobilenet_v2 (depthwise convs, ReLU6, inverted residuals, small-input strides) against
    torchvision's in float64 with the same weights: forward, input and parameter gradients within float32 noise
    (BatchNorm's backward cancels heavily through 17 blocks: torchvision's own float32 is ~0.5% off at worst)."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    nn.manual_seed(0)
    ours = models.mobilenet_v2(10, 0.5, in_channels=1, small_input=True)
    ours.classifier[0].p = 0.0
    theirs = tv.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    theirs.features[0][0] = torch.nn.Conv2d(1, theirs.features[0][0].out_channels, 3, 1, 1, bias=False)
    theirs.features[2].conv[1][0].stride = (1, 1)  # small input: the first block of setting 1 keeps the size
    theirs.classifier[0].p = 0.0
    sd = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items() if not k.endswith(".step")}
    theirs.load_state_dict(sd, strict=True)
    theirs = theirs.double()
    x = np.random.default_rng(1).standard_normal((8, 1, 32, 32)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((8, 10))
    xe, xt = el.tensor(x, requires_grad=True), torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    ye, yt = ours(xe), theirs(xt)
    np.testing.assert_allclose(ye.data, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    (ye * el.tensor(g.astype(np.float32))).sum().backward()
    (yt * torch.from_numpy(g)).sum().backward()

    def rel(a, b):
        return np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b)

    assert rel(xe.grad.data, xt.grad.numpy()) < 2e-2
    want = dict(theirs.named_parameters())
    norms = {n: np.linalg.norm(want[n].grad.numpy()) for n, _ in ours.named_parameters()}
    top = max(norms.values())
    # gradients that are zero in exact arithmetic (a BatchNorm bias feeding conv -> BatchNorm) are rounding only
    errs = {n: rel(p.grad.data, want[n].grad.numpy()) for n, p in ours.named_parameters() if norms[n] > 1e-3 * top}
    assert len(errs) > 100 and max(errs.values()) < 2e-2, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def test_width_mult_is_refused_where_it_would_be_ignored(capsys):
    """Only mobilenet_v2 has a width multiplier: the other models (library and CLI, training and video) refuse
    a value other than 1.0 instead of silently building their full width; mobilenet_v2 takes it."""
    from edgelearn import cli

    for name in ("cnn", "resnet20", "resnet18", "mlp"):
        with pytest.raises(ValueError, match="only to mobilenet_v2"):
            models.build_model(name, (1, 28, 28), 10, width_mult=0.5)
        models.build_model(name, (1, 28, 28), 10, width_mult=1.0)
    with pytest.raises(ValueError, match="only to mobilenet_v2"):
        models.build_video_model("fcn", width_mult=0.5)
    narrow = models.build_model("mobilenet_v2", (1, 32, 32), 10, width_mult=0.5)
    full = models.build_model("mobilenet_v2", (1, 32, 32), 10)
    assert sum(p.data.size for p in narrow.parameters()) < sum(p.data.size for p in full.parameters())
    assert cli.main(["train", "--model", "resnet20", "--width-mult", "0.5", "--epochs", "1"]) == 2
    assert "--width-mult applies only to --model mobilenet_v2" in capsys.readouterr().err
