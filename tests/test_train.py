"""The training loop on real data: learning, exact resume, logs, plots, memory figures; the reference models."""

import builtins
import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgelearn
from edgelearn import data, nn, optim
from edgelearn.checkpoint import read_checkpoint
from edgelearn.data import ArrayDataset
from edgelearn.models import build_model, cnn, mlp
from edgelearn.train import evaluate, fit


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


@pytest.fixture(scope="module")
def digits_small(digits):
    train, test = digits
    return (ArrayDataset(train.images[:320], train.labels[:320], "digits-small"),
            ArrayDataset(test.images[:160], test.labels[:160], "digits-small-test"))


def test_fit_on_digits_learns(digits):
    train, test = digits
    edgelearn.manual_seed(0)
    model = mlp(64, 64, 10)
    before = evaluate(model, test)["accuracy"]
    opt = optim.SGD(list(model.parameters()), lr=0.1, momentum=0.9)
    history = fit(model, opt, train, test, 2, batch_size=32, seed=0, progress=False, verbose=False)
    after = evaluate(model, test)["accuracy"]
    assert before < 0.3 and after > 0.85
    assert history["train_loss"][1] < history["train_loss"][0]
    assert history["val_accuracy"][-1] == pytest.approx(after)
    s = history.summary()
    assert s["epochs"] == 2 and s["train_images_per_s"] > 0
    assert s["peak_rss_mb"] >= s["rss_before_first_step_mb"] > 0


def int8_cnn_with_dropout(seed):
    """The CNN in INT8 mode (stochastic rounding, LAC, PRC) with a Dropout: every kind of training randomness."""
    edgelearn.manual_seed(seed)
    model = cnn(1, 10, 8, channels=(8, 16, 16))
    model.insert(len(model) - 1, nn.Dropout(0.2))
    edgelearn.octo(model, edgelearn.OctoConfig(seed=seed))
    opt = optim.SGD(list(model.parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, opt, optim.CosineAnnealingLR(opt, T_max=3)


def test_resume_reproduces_the_uninterrupted_loss_curve(digits_small, tmp_path):
    train, test = digits_small
    kw = dict(batch_size=32, seed=5, progress=False, verbose=False, augment=data.RandomCrop(1))

    model, opt, sched = int8_cnn_with_dropout(0)
    straight = fit(model, opt, train, test, 3, scheduler=sched, checkpoint=tmp_path / "a.safetensors", **kw)

    path = tmp_path / "b.safetensors"
    model, opt, sched = int8_cnn_with_dropout(0)
    fit(model, opt, train, test, 2, scheduler=sched, checkpoint=path, **kw)
    # A new process builds the same model (same seed: Dropout's and stochastic rounding's base seeds are
    # construction-time settings) but none of its state: scramble every parameter and buffer, so all of it
    # must come from the checkpoint.
    model2, opt2, sched2 = int8_cnn_with_dropout(0)
    noise = np.random.default_rng(1)
    model2.load_state_dict({k: (noise.standard_normal(v.shape) * 3).astype(v.dtype) if v.dtype.kind == "f"
                            else v + 17 for k, v in model2.state_dict().items()})
    resumed = fit(model2, opt2, train, test, 3, scheduler=sched2, checkpoint=path, resume=True, **kw)

    assert resumed.resumed_from_epoch == 2 and len(resumed) == 3
    assert resumed["train_loss"] == straight["train_loss"]  # bit for bit
    assert resumed["val_loss"] == straight["val_loss"]
    final_a = read_checkpoint(tmp_path / "a.safetensors")[0]
    for k, v in model2.state_dict().items():
        np.testing.assert_array_equal(v, final_a[k], err_msg=k)


def test_resume_without_checkpoint_file_starts_fresh(digits_small, tmp_path):
    train, _ = digits_small
    edgelearn.manual_seed(0)
    model = mlp(64, 10)
    opt = optim.SGD(list(model.parameters()), lr=0.1)
    h = fit(model, opt, train, None, 1, checkpoint=tmp_path / "new.safetensors", resume=True,
            progress=False, verbose=False)
    assert h.resumed_from_epoch == 0 and len(h) == 1 and (tmp_path / "new.safetensors").exists()


def test_logs_and_plot_are_written(digits_small, tmp_path):
    pytest.importorskip("matplotlib")
    train, test = digits_small
    edgelearn.manual_seed(0)
    model = mlp(64, 10)
    opt = optim.SGD(list(model.parameters()), lr=0.1)
    fit(model, opt, train, test, 2, log_csv=tmp_path / "log.csv", log_json=tmp_path / "log.json",
        plot=tmp_path / "curves.png", progress=False, verbose=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["val_accuracy"]) > 0
    records = json.loads((tmp_path / "log.json").read_text())
    assert len(records) == 2 and set(records[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_training(digits_small, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    model = mlp(64, 10)
    with pytest.raises(ImportError, match=r"edgelearn\[plot\]"):
        fit(model, optim.SGD(list(model.parameters()), lr=0.1), digits_small[0], None, 1,
            plot=tmp_path / "c.png", progress=False, verbose=False)


def test_progress_bar_stays_off_when_not_a_terminal(digits_small, capsys):
    model = mlp(64, 10)
    fit(model, optim.SGD(list(model.parameters()), lr=0.1), digits_small[0], None, 1, progress=True, verbose=True)
    out, err = capsys.readouterr()
    assert "epoch 1/1" in out and err == ""


def test_evaluate_restores_training_mode(digits_small):
    model = mlp(64, 10)
    model.train()
    r = evaluate(model, digits_small[1])
    assert model.training and r["n"] == 160 and 0 <= r["accuracy"] <= 1
    model.eval()
    evaluate(model, (digits_small[1].images, digits_small[1].labels))
    assert not model.training


def test_reference_models_have_the_documented_shapes():
    m = mlp(784, 256, 128, 10)
    assert sum(p.numpy().size for p in m.parameters()) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    for shape in ((1, 28, 28), (1, 8, 8), (3, 32, 32)):
        model = build_model("cnn", shape, 10)
        model.eval()
        with edgelearn.no_grad():
            out = model(edgelearn.tensor(np.zeros((2, *shape), np.float32)))
        assert out.numpy().shape == (2, 10)
    convs = [m for m in build_model("cnn", (1, 28, 28), 10).modules() if isinstance(m, nn.Conv2d)]
    assert [c.weight.numpy().shape[0] for c in convs] == [16, 32, 64]
    with pytest.raises(ValueError, match="model"):
        build_model("resnet", (1, 8, 8), 10)


def test_fit_re_estimates_batchnorm_statistics_after_each_epoch(digits_small):
    """After ``fit`` (default settings) the running statistics are the exact re-estimate on the final
    weights: re-estimating again with fit's sample changes nothing. Without re-estimation they would be the
    exponential average taken while the weights moved."""
    from edgelearn.train import recalibrate_batchnorm

    train, _ = digits_small
    edgelearn.manual_seed(1)
    model = edgelearn.octo(cnn(1, 10, 8, channels=(4, 8)))
    opt = optim.SGD(list(model.parameters()), lr=0.05, momentum=0.9)
    fit(model, opt, train, None, 1, batch_size=32, seed=4, progress=False, verbose=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    after_fit = [(bn.running_mean.copy(), bn.running_var.copy()) for bn in bns]
    loader = data.DataLoader(train, batch_size=32, shuffle=True, seed=4)
    recalibrate_batchnorm(model, loader, batches=32, batch_size=32, seed=4 + 7919)
    for bn, (mean, var) in zip(bns, after_fit):
        np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-6, atol=1e-7)


def test_fit_times_the_batchnorm_re_estimation_apart_from_the_steps(digits_small, monkeypatch):
    """The epoch time counts the re-estimation; ``bn_recalibration_s`` is that part alone (per epoch and in
    total) and ``train_step_images_per_s`` the speed of the training steps without it."""
    import time

    import edgelearn.train as train_mod

    def slow_recalibration(*args, **kwargs):
        time.sleep(0.25)
        return 0

    monkeypatch.setattr(train_mod, "recalibrate_batchnorm", slow_recalibration)
    train, _ = digits_small
    edgelearn.manual_seed(0)
    model = mlp(64, 8, 10)
    opt = optim.SGD(list(model.parameters()), lr=0.05)
    history = fit(model, opt, train, None, 2, batch_size=64, progress=False, verbose=False)
    recal, epoch_time = history["bn_recalibration_s"], history["epoch_time_s"]
    assert all(0.25 <= r < t for r, t in zip(recal, epoch_time))
    s = history.summary()
    assert s["bn_recalibration_s"] == pytest.approx(sum(recal))
    assert s["train_images_per_s"] == pytest.approx(2 * len(train) / sum(epoch_time))
    assert s["train_step_images_per_s"] == pytest.approx(2 * len(train) / (sum(epoch_time) - sum(recal)))
    assert s["train_step_images_per_s"] > s["train_images_per_s"]


def test_fit_hides_older_objects_from_the_collector_only_while_it_trains(digits_small):
    """During the training loop the objects made before it are frozen (gc.freeze); afterwards, and after an
    error inside the loop, nothing stays frozen; objects a caller froze stay frozen and are not touched."""
    import gc

    train, _ = digits_small
    counts = []

    def loss_fn(logits, y):
        counts.append(gc.get_freeze_count())
        return edgelearn.functional.cross_entropy(logits, y)

    def run(loss):
        edgelearn.manual_seed(0)
        model = mlp(64, 8, 10)
        opt = optim.SGD(list(model.parameters()), lr=0.05)
        fit(model, opt, train, None, 1, batch_size=64, loss_fn=loss, progress=False, verbose=False,
            bn_recalibration_batches=0)

    assert gc.get_freeze_count() == 0
    run(loss_fn)
    assert counts and min(counts) > 0
    assert gc.get_freeze_count() == 0

    def failing(logits, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(failing)
    assert gc.get_freeze_count() == 0

    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        counts.clear()
        run(loss_fn)
        # fit froze nothing more (frozen objects can only die meanwhile) and unfroze nothing
        assert counts and max(counts) <= mine
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt/mallinfo2: Linux only")
def test_training_allocator_keeps_feature_maps_in_the_heap():
    """After ``release_large_buffers`` (called by ``fit``), a 13 MB feature map (a batch-32 MobileNetV2 or
    batch-128 CNN activation) comes from the heap and its freed memory is reused, not mmapped and unmapped on
    every step (which faulted fresh pages in each time and serialised the threads on the faults). In a fresh
    process: mallopt is process-wide."""
    code = textwrap.dedent("""
        import ctypes, sys
        import numpy as np
        from edgelearn.train import release_large_buffers
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallinfo2"):
            print("no-mallinfo2"); sys.exit(0)
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]
        libc.mallinfo2.restype = MallInfo2
        assert release_large_buffers()
        before = libc.mallinfo2().hblkhd
        maps = [np.ones((32, 96, 32, 32), np.float32) for _ in range(2)]  # 12.6 MB each
        mmapped = libc.mallinfo2().hblkhd - before
        del maps
        free_in_heap = libc.mallinfo2().fordblks
        print(mmapped, free_in_heap)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["no-mallinfo2"]:
        pytest.skip("this libc has no mallinfo2 (glibc < 2.33 or not glibc)")
    mmapped, free_in_heap = map(int, out)
    assert mmapped == 0, f"{mmapped} bytes of feature maps were mmapped"
    # freed, they stay in the heap for the next step (trim threshold above them)
    assert free_in_heap >= 2 * 32 * 96 * 32 * 32 * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc: Linux only")
def test_warm_training_memory_counts_a_steps_feature_maps():
    """The warm memory figure (peak RSS after the first step minus the RSS right after it) counts what a step
    holds: the heap keeps the first step's freed feature maps for the next (``release_large_buffers``), so
    ``fit`` gives them back before it takes the reference, else the later steps reuse them unseen and the
    figure reads near zero. A batch-128 FP32 CNN step holds well over its 6.4 MB first feature map. In a fresh
    process, so earlier tests' heap does not serve the steps."""
    code = textwrap.dedent("""
        import numpy as np
        from edgelearn import optim
        from edgelearn.data import ArrayDataset
        from edgelearn.models import cnn
        from edgelearn.train import fit
        rng = np.random.default_rng(0)
        train = ArrayDataset(rng.random((512, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 512), "noise")
        model = cnn(1, 10)
        opt = optim.SGD(model.parameters(), lr=0.01)
        h = fit(model, opt, train, None, 1, batch_size=128, progress=False, verbose=False)
        print(h.train_memory_warm_mb, h.train_memory_mb)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    warm, cold = map(float, out[-2:])
    first_map_mb = 128 * 16 * 28 * 28 * 4 / 2**20
    assert warm >= first_map_mb, f"warm {warm:.1f} MB, cold {cold:.1f} MB"
