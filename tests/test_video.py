"""edgelearn.video.frames (decoding through PyAV), the synthetic clip writer, the video pipeline and the
'edgelearn video' command. PyAV is in the test extra: these tests fail, not skip, without it."""

import json
import subprocess
import sys

import numpy as np
import pytest

import edgelearn as el
from edgelearn import nn, video
from edgelearn.video.pipeline import load_video_model, rel_l2, run_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = video.synthetic_clip(12, 48, 64, objects=2, size=8, seed=1)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    video.write_clip(path, frames)
    return path, frames


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgelearn", *args], capture_output=True, text=True, timeout=300, **kw)


def test_frames_decodes_a_clip_to_uint8_rgb(clip):
    path, original = clip
    reader = video.frames(path)
    assert reader.backend == "av" and (reader.width, reader.height) == (64, 48) and reader.fps == pytest.approx(25)
    decoded = list(reader)
    assert len(decoded) == len(original)
    for d, o in zip(decoded, original):
        assert d.shape == (48, 64, 3) and d.dtype == np.uint8
        assert np.abs(d.astype(np.int16) - o).mean() < 12  # lossy codec, same picture
    assert len(list(video.frames(path, max_frames=5))) == 5


def test_frames_rejects_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        video.frames(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    with pytest.raises(video.VideoError, match="bad.mp4: cannot open"):
        video.frames(bad)
    with pytest.raises(video.VideoError, match="directory"):
        video.frames(tmp_path)
    with pytest.raises(ValueError, match="backend"):
        video.frames(bad, backend="gstreamer")


def test_synthetic_clip_is_a_static_scene_with_moving_objects():
    frames = video.synthetic_clip(5, 40, 50, objects=1, size=6, seed=0)
    diff = np.abs(frames[1].astype(int) - frames[0]).max(axis=2) > 0
    assert 0 < diff.mean() < 0.1  # only around the object


def test_pipeline_on_a_decoded_clip_threshold_zero_is_exact(clip):
    path, _ = clip
    model = load_video_model("fcn", seed=0)
    runner = video.PatchSkipRunner(model, patch=8, threshold=0.0)
    run = run_video(video.frames(path), model, runner, compare_dense=True)
    s = run.summary()
    assert run.frames == 12 and s["max_rel_l2_error"] <= 1e-6
    assert 0 < s["mean_compute_fraction"] < 1 and s["dense_frames"] == 1
    assert s["dense_fps"] > 0 and s["patchskip_fps"] > 0


def test_default_fcn_loads_the_shipped_trained_weights():
    weights = el.models.fcn_weights()
    model = load_video_model("fcn")
    state = model.state_dict()
    assert np.array_equal(state["0.weight"], weights["0.weight"]) and np.array_equal(state["12.bias"], weights["12.bias"])
    assert not np.array_equal(load_video_model("fcn", pretrained=False).state_dict()["0.weight"], weights["0.weight"])
    # the task it was trained for: a uniform frame is flat (output 0), a frame split by a horizontal edge
    # (output 1) or a vertical one (output 3) has that orientation along the edge
    frames = np.full((3, 3, 32, 32), 0.4, np.float32)
    frames[1, :, 16:] = 0.8
    frames[2, :, :, 16:] = 0.8
    with el.no_grad():
        pred = model(el.tensor(frames)).numpy().argmax(axis=1)  # (3, 8, 8)
    assert (pred[0, 2:-2, 2:-2] == 0).all()
    assert (pred[1, 3:5, 2:-2] == 1).all() and (pred[2, 2:-2, 3:5] == 3).all()


def test_runner_rejects_a_frame_of_another_size_mid_stream(clip):
    path, _ = clip
    model = load_video_model("fcn")
    runner = video.PatchSkipRunner(model)
    frames = list(video.frames(path, max_frames=2))
    runner(frames[0])
    with pytest.raises(ValueError, match="shape changed mid-stream"):
        runner(frames[1][:40])


def test_cli_video_json_compare_dense_and_plot(clip, tmp_path):
    path, _ = clip
    plot = tmp_path / "frames.png"
    r = run_cli("video", str(path), "--threshold", "0", "--patch", "8", "--compare-dense", "--json",
                "--save-plot", str(plot), "--max-frames", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 8 and out["max_rel_l2_error"] <= 1e-6 and out["input_shape"] == [3, 48, 64]
    assert out["speedup"] > 0 and 0 <= out["skip_fraction"] < 1
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_video_text_output_with_progress(clip):
    path, _ = clip
    r = run_cli("video", str(path), "--model", "cnn", "--threshold", "0.05", "--refresh", "4", "--compare-dense")
    assert r.returncode == 0, r.stderr
    assert "frames/s" in r.stdout and "speedup" in r.stdout and "error vs dense" in r.stdout
    assert "12/12" in r.stderr  # tqdm progress bar


def test_cli_video_runs_a_trained_checkpoint(clip, tmp_path):
    path, _ = clip
    ckpt = tmp_path / "digits.safetensors"
    r = run_cli("train", "--epochs", "1", "--checkpoint", str(ckpt), "--no-progress")
    assert r.returncode == 0, r.stderr
    model = load_video_model(str(ckpt))  # INT8 cnn with Compensation layers, one input channel
    assert any(isinstance(m, nn.Compensation) for m in model.modules())
    runner = video.PatchSkipRunner(model, patch=8, threshold=0.0, int8_scales="dynamic")
    for f in video.frames(path, max_frames=4):
        y = runner(f)
        x = runner.preprocess(f)
        assert x.shape == (1, 48, 64) and y.shape == (1, 10)
        with el.no_grad():
            assert rel_l2(y, model(el.tensor(x[None])).numpy()) <= 1e-5
    r = run_cli("video", str(path), "--model", str(ckpt), "--compare-dense", "--json", "--max-frames", "4")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] == 4


@pytest.mark.parametrize("model", ["resnet20", "mobilenet_v2"])
def test_cli_video_takes_the_zoo_backbones(clip, model):
    path, _ = clip
    width = ["--width-mult", "0.5"] if model == "mobilenet_v2" else []  # (the others refuse it)
    r = run_cli("video", str(path), "--model", model, *width, "--threshold", "0", "--patch", "8",
                "--downsample", "2", "--compare-dense", "--json", "--max-frames", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 3 and out["model"] == model and out["input_shape"] == [3, 24, 32]
    assert out["max_rel_l2_error"] <= 1e-5 and out["min_agreement"] == 1.0


def test_cli_video_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00" * 1000)
    r = run_cli("video", str(bad))
    assert r.returncode != 0 and "cannot open as video" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("video", str(tmp_path / "missing.mp4"))
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("video", str(bad), "--model", "resnet")
    assert r.returncode != 0 and "neither a built-in architecture" in r.stderr


def test_cli_video_runs_int8_and_dynamic_scales_equal_dense(clip):
    """``--precision int8`` runs the built-in model in Octo INT8 (reported as such); with ``--int8-scales dynamic``
    and threshold 0, patch skip follows dense INT8 inference far closer than the default frozen scales, which
    still agree on the predictions; ``--precision fp32`` reports FP32."""
    path, _ = clip
    common = ("video", str(path), "--compare-dense", "--json", "--max-frames", "6", "--threshold", "0")
    outs = {}
    for name, extra in (("dynamic", ("--precision", "int8", "--int8-scales", "dynamic")),
                        ("frozen", ("--precision", "int8")), ("fp32", ("--precision", "fp32"))):
        r = run_cli(*common, *extra)
        assert r.returncode == 0, r.stderr
        outs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["dynamic"]["precision"] == outs["frozen"]["precision"] == "int8"
    assert outs["dynamic"]["int8_scales"] == "dynamic" and outs["frozen"]["int8_scales"] == "frozen"
    assert outs["fp32"]["precision"] == "fp32" and outs["fp32"]["int8_scales"] is None
    # dynamic: dense INT8's own scales every frame (x86-64: 3e-7; under qemu's aarch64 a few codes round the other
    # way: 4e-4), far below frozen scales' difference (7e-3 here)
    dyn, frozen = outs["dynamic"]["max_rel_l2_error"], outs["frozen"]["max_rel_l2_error"]
    assert dyn <= 1e-3 and dyn < frozen / 4 and outs["dynamic"]["min_agreement"] >= 0.99
    assert frozen <= 0.05 and outs["frozen"]["mean_agreement"] >= 0.97
    assert outs["fp32"]["max_rel_l2_error"] <= 1e-5


def test_set_precision_leaves_a_model_already_in_that_precision():
    """``set_precision`` (behind ``edgelearn video --precision``) converts an FP32 model to INT8 and back, and
    leaves a model already INT8 as it is: an INT8 model without LAC gains no Compensation layers and gives the
    same outputs."""
    import edgelearn as el
    from edgelearn.video.pipeline import set_precision

    model = el.models.fcn().eval()
    el.octo(model, el.OctoConfig(lac=False)).eval()
    x = el.tensor(np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32))
    with el.no_grad():
        before = model(x).numpy()
    n_modules = len(list(model.modules()))
    assert set_precision(model, "int8") == "int8"
    assert len(list(model.modules())) == n_modules
    with el.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), before)
    assert set_precision(model, None) == "int8"
    assert set_precision(model, "fp32") == "fp32"
    other = el.models.fcn().eval()
    assert set_precision(other, None) == "fp32" and set_precision(other, "int8") == "int8"
    with pytest.raises(ValueError, match="precision"):
        set_precision(other, "fp16")
